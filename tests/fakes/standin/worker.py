"""VLLM::Worker_TPn: one tensor-parallel rank on its GPU of the fake machine (at TP=1, EngineCore
runs one in-process)."""

from __future__ import annotations

import argparse
import os
import resource
import signal
import time
from pathlib import Path

import fakegpu
from standin.common import (
    DEFAULT_TOTAL_MIB,
    LOCK_POLL_S,
    SLEEP_RESIDUAL_FRACTION,
    become_child,
    env_float,
    fake_cuda_enabled,
    log,
    sleep_pauses_scheduler,
    vllm_version,
)
from standin.model import (
    step_piece,
)


class StepWhileAsleep(Exception):
    """An older vLLM ran a step on offloaded weights: the engine dies (vLLM issues #15483, #28714)."""


class Worker:
    def __init__(self, rank: int, memory_utilization: float, who: str):
        self.rank = rank
        self.pid = os.getpid()
        self.who = who
        self.memory_utilization = memory_utilization
        self.step_seconds = env_float("STANDIN_STEP_S", 0.005)
        self.step_seconds_file = os.environ.get("STANDIN_STEP_S_FILE")  # a test may change the pace mid-run
        self.sleep_pauses_scheduler = sleep_pauses_scheduler(vllm_version())
        self.loaded_mib = 0
        self.asleep = False

    def load(self) -> None:
        if not fake_cuda_enabled():
            return
        totals = {index: total for index, _, total, _ in fakegpu.read_gpus()}
        self.loaded_mib = int(self.memory_utilization * totals.get(self.rank, DEFAULT_TOTAL_MIB))
        fakegpu.register(self.pid, gpu=self.rank, mib=self.loaded_mib)

    def handle(self, message: dict) -> dict:
        self.wait_until_cuda_usable()  # every command below touches the GPU
        op = message["op"]
        if op == "step":
            return {"op": "pieces", "pieces": self.step(message["items"])}
        if op == "sleep":
            self.set_asleep(True)
        elif op == "wake_up":
            self.set_asleep(False)
        return {"op": "done"}

    def wait_until_cuda_usable(self) -> None:
        if not fake_cuda_enabled():
            return
        while True:
            state = fakegpu.read_state(self.pid)
            if state == "locked":
                time.sleep(LOCK_POLL_S)  # a CUDA call blocks while the process is locked
                continue
            if state in ("checkpointed", "failed"):
                # Measured on real GPUs: a suspended worker that gets work segfaults.
                log(self.who, "ERROR", f"CUDA call while {state}: segmentation fault")
                os.kill(self.pid, signal.SIGSEGV)
                time.sleep(1)  # not reached: a signal sent to oneself lands before kill() returns
            return

    def step(self, items: list[dict]) -> list[int]:
        if self.asleep and not self.sleep_pauses_scheduler:
            raise StepWhileAsleep("CUDA error: an illegal memory access was encountered (a step ran while asleep)")
        time.sleep(self.current_step_seconds())
        salt = self.garbage_reason()
        return [step_piece(item["key"], item["index"], self.rank, salt) for item in items]

    def current_step_seconds(self) -> float:
        """STANDIN_STEP_S, or the number in STANDIN_STEP_S_FILE while that file exists."""
        if self.step_seconds_file:
            try:
                return float(Path(self.step_seconds_file).read_text())
            except (OSError, ValueError):
                pass
        return self.step_seconds

    def garbage_reason(self) -> str:
        if self.asleep:
            return "weights-released"  # sleep mode freed the weights: the GPU computes on garbage
        if fake_cuda_enabled() and (fakegpu.pid_dir(self.pid) / "corrupt").exists():
            return "corrupt"
        return ""

    def set_asleep(self, asleep: bool) -> None:
        self.asleep = asleep
        if not fake_cuda_enabled():
            return
        residual = max(1, round(self.loaded_mib * SLEEP_RESIDUAL_FRACTION))
        # Rewrite only the memory: fakegpu.register would also reset the CUDA state to running.
        path = fakegpu.pid_dir(self.pid) / "gpu"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{self.rank} {residual if asleep else self.loaded_mib}\n")
        tmp.replace(path)  # nvidia-smi may read it at any moment: never show a half-written file
        if not asleep:
            fakegpu.note_if_overcommitted(self.rank, f"wake-up of PID {self.pid}")


def run_worker(args: argparse.Namespace) -> int:
    rank = args.standin_rank
    channel = become_child(args, f"VLLM::Worker_TP{rank}")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the SIGSEGV must not leave core files behind
    worker = Worker(rank, args.gpu_memory_utilization, f"VllmWorker TP{rank}")
    worker.load()
    channel.send(op="loaded")
    while True:
        try:
            message = channel.receive()
        except EOFError:
            return 0  # EngineCore is gone
        try:
            reply = worker.handle(message)
        except StepWhileAsleep as error:
            log(worker.who, "ERROR", str(error))
            return 1
        channel.send(**reply)
