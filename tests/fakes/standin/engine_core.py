"""VLLM::EngineCore: continuous batching, vLLM 0.20.2's pause and sleep, and the executors that run
each step (in-process at TP=1, on worker processes at TP >= 2)."""

from __future__ import annotations

import argparse
import os
import resource
import select
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import fakegpu
from standin.common import (
    MessageChannel,
    become_child,
    describe_exit,
    fake_cuda_enabled,
    log,
    sleep_pauses_scheduler,
    start_child,
    vllm_version,
)
from standin.model import (
    EOS_WORD,
    MIN_TOKENS_BEFORE_EOS,
    candidate_logprobs,
    combine_pieces,
    token_text,
)
from standin.worker import StepWhileAsleep, Worker

# ---------------------------------------------------------------------------------------------------
# Executors: how EngineCore runs a step. TP=1 computes in EngineCore itself (vLLM's UniProcExecutor);
# TP>=2 sends each step to every worker process (vLLM's MultiprocExecutor).


class WorkerDied(Exception):
    pass


class LocalExecutor:
    """TP=1: no worker processes; EngineCore holds the model on GPU 0 and computes every step."""

    def __init__(self, args: argparse.Namespace):
        self.worker = Worker(0, args.gpu_memory_utilization, "EngineCore")
        self.handles: list = []  # nothing to watch besides the API server

    def start(self) -> None:
        self.worker.load()

    def run(self, **message: object) -> list[dict]:
        return [self.worker.handle(message)]

    def on_readable(self, handle: object) -> None:
        raise AssertionError("a local executor has no handles")

    def stop(self) -> None:
        pass


@dataclass
class WorkerHandle:
    rank: int
    process: subprocess.Popen
    channel: MessageChannel

    def fileno(self) -> int:
        return self.channel.fileno()


class MultiprocExecutor:
    """TP>=2: one worker process per rank; every step goes to all of them."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args = args
        self.argv = argv
        self.handles: list[WorkerHandle] = []

    def start(self) -> None:
        for rank in range(self.args.tensor_parallel_size):
            process, sock = start_child(self.argv, "worker", f"--standin-rank={rank}")
            self.handles.append(WorkerHandle(rank, process, MessageChannel(sock)))
        self.gather()  # every worker reports its weights loaded

    def run(self, **message: object) -> list[dict]:
        for worker in self.handles:
            try:
                worker.channel.send(**message)
            except EOFError:
                self.worker_died(worker)
        return self.gather()

    def gather(self) -> list[dict]:
        """One reply from every worker, in rank order. Waits as long as a worker takes (a locked one
        blocks), but a worker that dies meanwhile takes the engine down."""
        replies: dict[int, dict] = {}
        while True:
            for worker in self.handles:
                if worker.rank not in replies and worker.channel.received:
                    replies[worker.rank] = worker.channel.received.popleft()
            if len(replies) == len(self.handles):
                return [replies[rank] for rank in range(len(self.handles))]
            readable, _, _ = select.select(self.handles, [], [])
            for worker in readable:
                self.on_readable(worker)

    def on_readable(self, worker: WorkerHandle) -> None:
        """An idle worker only ever becomes readable by dying."""
        try:
            worker.channel.pull()
        except EOFError:
            self.worker_died(worker)

    def worker_died(self, worker: WorkerHandle) -> None:
        try:
            worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        how = describe_exit(worker.process.returncode)
        raise WorkerDied(f"Worker proc VllmWorker-{worker.rank} died unexpectedly ({how})")

    def stop(self) -> None:
        for worker in self.handles:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait()


# ---------------------------------------------------------------------------------------------------
# EngineCore: continuous batching; every step advances every running request on every worker.


@dataclass
class EngineRequest:
    request_id: str
    key: str
    max_tokens: int
    stops_at_eos: bool  # greedy and not ignore_eos
    logprobs: int | None  # candidates to report per token (None: no logprobs)
    generated: int = 0
    recompute: bool = False  # preempted: its KV cache is gone, the next step recomputes it


UNPAUSED, PAUSED_NEW, PAUSED_ALL = "unpaused", "paused_new", "paused_all"  # vLLM's PauseState
PAUSE_MODES = ("abort", "wait", "keep")


class EngineCore:
    """Scheduling as vLLM 0.20.2's EngineCore (vllm/v1/engine/core.py): pause_scheduler(mode) holds new
    requests (abort also finishes every request with "abort", wait keeps stepping until the running ones
    finish, keep stops stepping); sleep(level, mode) pauses first, then sleeps the executor; wake_up wakes
    it, then resumes. While paused no step runs, so no worker (no CUDA) is touched. Older vLLM (before
    PR #34528) slept the executor without pausing: a step then ran on offloaded weights."""

    who = "EngineCore"

    def __init__(self, args: argparse.Namespace, argv: list[str], api: MessageChannel):
        self.api = api
        self.executor = LocalExecutor(args) if args.tensor_parallel_size == 1 else MultiprocExecutor(args, argv)
        self.sleep_pauses_scheduler = sleep_pauses_scheduler(vllm_version())
        self.running: dict[str, EngineRequest] = {}  # insertion order = scheduling order
        self.waiting: dict[str, EngineRequest] = {}  # added while paused, or preempted
        self.pause_state = UNPAUSED
        self.sleep_level = 0
        self.drain_waiters: list[tuple[int, Callable[[], dict]]] = []  # pause/sleep mode=wait callers

    def run(self) -> int:
        try:
            self.executor.start()
            self.api.send(op="ready")
            self.serve()
        except WorkerDied as died:
            log(self.who, "ERROR", f"{died}, shutting down executor.")
            return 1
        except StepWhileAsleep as error:
            log(self.who, "ERROR", f"EngineCore encountered a fatal error: {error}")
            return 1
        except EOFError:
            return 0  # the API server is gone
        finally:
            self.executor.stop()
        return 0

    def serve(self) -> None:
        while True:
            timeout = 0 if self.can_step() else None
            readable, _, _ = select.select([self.api, *self.executor.handles], [], [], timeout)
            for source in readable:
                if source is self.api:
                    self.api.pull()
                else:
                    self.executor.on_readable(source)
            while self.api.received:
                self.handle(self.api.received.popleft())
            self.schedule()
            if self.can_step():
                self.step()
            self.answer_drain_waiters()

    def can_step(self) -> bool:
        return bool(self.running) and self.pause_state != PAUSED_ALL

    def schedule(self) -> None:
        if self.pause_state != UNPAUSED:
            return  # every pause state holds new requests back
        for request in self.waiting.values():
            self.running[request.request_id] = request
            self.api.send(op="started", id=request.request_id)
        self.waiting.clear()

    def handle(self, message: dict) -> None:
        op = message["op"]
        if op == "add":
            request = EngineRequest(
                message["id"], message["key"], message["max_tokens"], message["stops_at_eos"], message["logprobs"]
            )
            self.waiting[request.request_id] = request
        elif op == "abort":
            self.running.pop(message["id"], None)
            self.waiting.pop(message["id"], None)
        elif op == "rpc":
            call_id = message["call_id"]
            result = self.rpc(call_id, message["method"], message.get("params") or {})
            if result is not None:
                self.api.send(op="rpc_result", call_id=call_id, result=result)

    def rpc(self, call_id: int, method: str, params: dict) -> dict | None:
        """The result of a utility call, or None when it answers later (mode=wait)."""
        if method == "pause":
            return self.pause(call_id, params["mode"], preempt=False, then=dict)
        if method == "resume":
            self.pause_state = UNPAUSED
        elif method == "is_paused":
            return {"is_paused": self.pause_state != UNPAUSED}
        elif method == "sleep":
            level = int(params.get("level", 1))
            if not self.sleep_pauses_scheduler:
                self.sleep_executor(level)
                return {}
            if level == 0:  # pause only, no memory released (vLLM 0.20.2)
                return self.pause(call_id, params["mode"], preempt=False, then=dict)
            return self.pause(call_id, params["mode"], preempt=True, then=lambda: self.sleep_executor(level))
        elif method == "wake_up":
            if self.sleep_level:
                self.executor.run(op="wake_up")
                self.sleep_level = 0
            if self.sleep_pauses_scheduler:
                self.pause_state = UNPAUSED
        elif method == "is_sleeping":
            paused = self.sleep_pauses_scheduler and self.pause_state != UNPAUSED
            return {"is_sleeping": bool(self.sleep_level) or paused}
        return {}

    def pause(self, call_id: int, mode: str, preempt: bool, then: Callable[[], dict]) -> dict | None:
        if mode == "abort":
            for request in [*self.running.values(), *self.waiting.values()]:
                self.api.send(op="token", id=request.request_id, text="", finish_reason="abort", logprobs=None)
            self.running.clear()
            self.waiting.clear()
        if mode == "keep":
            self.pause_state = PAUSED_ALL
            if preempt:  # sleep drops the KV cache: running requests go back to waiting
                for request in self.running.values():
                    request.recompute = True
                    self.api.send(op="preempted", id=request.request_id)
                self.waiting = {**self.running, **self.waiting}
                self.running.clear()
        else:
            self.pause_state = PAUSED_NEW
        if mode == "wait" and self.running:
            log(self.who, "INFO", "Waiting for in-flight requests to complete before pausing...")
            self.drain_waiters.append((call_id, then))
            return None
        return then()

    def answer_drain_waiters(self) -> None:
        if self.running or not self.drain_waiters:
            return
        waiters, self.drain_waiters = self.drain_waiters, []
        for call_id, then in waiters:
            self.api.send(op="rpc_result", call_id=call_id, result=then())

    def sleep_executor(self, level: int) -> dict:
        if not self.sleep_level:
            self.executor.run(op="sleep")
        self.sleep_level = level
        return {}

    def step(self) -> None:
        batch = list(self.running.values())
        replies = self.executor.run(op="step", items=[{"key": r.key, "index": r.generated} for r in batch])
        for position, request in enumerate(batch):
            pieces = [reply["pieces"][position] for reply in replies]
            if request.recompute:
                request.recompute = False  # this step rebuilt its KV cache; the next one continues
                continue
            self.emit_token(request, pieces)

    def emit_token(self, request: EngineRequest, pieces: list[int]) -> None:
        index = request.generated
        word = combine_pieces(pieces)
        request.generated += 1
        at_eos = request.stops_at_eos and index >= MIN_TOKENS_BEFORE_EOS and word == EOS_WORD
        if at_eos:
            finish_reason = "stop"
        elif request.generated >= request.max_tokens:
            finish_reason = "length"
        else:
            finish_reason = None
        logprobs = None
        if request.logprobs is not None:
            logprobs = candidate_logprobs(pieces, word, index, max(request.logprobs, 1))
            if at_eos:
                logprobs[0][0] = ""  # the end-of-sequence token decodes to nothing
        text = "" if at_eos else token_text(word, index)
        self.api.send(op="token", id=request.request_id, text=text, finish_reason=finish_reason, logprobs=logprobs)
        if finish_reason:
            del self.running[request.request_id]


def run_engine(args: argparse.Namespace, argv: list[str]) -> int:
    api = become_child(args, "VLLM::EngineCore")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # at TP=1 EngineCore is what segfaults
    if fake_cuda_enabled():
        fakegpu.register(os.getpid())  # vLLM's EngineCore holds a CUDA context (at TP=1, the model too)

    def exit_on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(0)  # unwinds through EngineCore.run, which kills the workers

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    return EngineCore(args, argv, api).run()
