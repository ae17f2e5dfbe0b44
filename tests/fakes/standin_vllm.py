#!/usr/bin/env python3
"""Stand-in for a vLLM OpenAI-compatible server with tensor parallelism (see README.md in this folder).

One script, three roles, the process tree of vLLM V1:

    python3 -m vllm.entrypoints.openai.api_server ARGS   the API server (aiohttp), the process started
      VLLM::EngineCore                                   schedules steps, sends each to every worker
        VLLM::Worker_TP0 .. VLLM::Worker_TP{N-1}         compute their piece of every step (TP >= 2)

At TP=1 there are no workers: EngineCore holds the model and computes every step itself, as vLLM's
does. Whatever computes is what cuda-checkpoint suspends, so it behaves like a CUDA process of the fake
GPU: before every step it reads its state there; `locked` blocks it, `checkpointed` or `failed` kills it
with SIGSEGV (what a request reaching a suspended real vLLM process does).

Processes talk over socket pairs, one JSON message per line. Standard library, aiohttp (the API
server only) and setproctitle: all three are in vLLM's image.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import http
import itertools
import json
import os
import random
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import setproctitle

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fakegpu  # noqa: E402

WORDS = (  # noqa: SIM905 (a sentence reads better than 45 quoted words)
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris "
    "nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse "
    "cillum fugiat nulla"
).split()
DEFAULT_MAX_TOKENS = 16
DEFAULT_TOTAL_MIB = 81559  # an H100 80GB, for a `gpus` file that does not list the worker's GPU
SLEEP_RESIDUAL_FRACTION = 0.02  # what vLLM's sleep mode leaves on the GPU (CUDA context, allocator)
LOCK_POLL_S = 0.01
PR_SET_PDEATHSIG = 1
HIDDEN_PREFIX = "--standin-"
DEFAULT_VLLM_VERSION = "0.20.2"
FIRST_VERSION_WHOSE_SLEEP_PAUSES = (0, 17)


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


def vllm_version() -> str:
    return os.environ.get("STANDIN_VLLM_VERSION", "").strip() or DEFAULT_VLLM_VERSION


def sleep_pauses_scheduler(version: str) -> bool:
    """Since vLLM PR #34528 (first released in 0.17) sleep pauses the scheduler and takes a pause mode."""
    major_minor = tuple(int(number) for number in re.findall(r"\d+", version)[:2])
    return major_minor >= FIRST_VERSION_WHOSE_SLEEP_PAUSES


def fake_cuda_enabled() -> bool:
    return bool(os.environ.get("FAKE_CUDA_STATE_DIR"))


def log(who: str, level: str, message: str) -> None:
    # vLLM prefixes each process's lines the same way, e.g. "(VllmWorker TP0 pid=123)".
    print(f"({who} pid={os.getpid()}) {level} {message}", flush=True)


def parse_token_count(text: str) -> int:
    """vLLM accepts --max-model-len 32768 as well as 32k."""
    text = text.strip().lower()
    if text.endswith("k"):
        return int(float(text[:-1]) * 1024)
    return int(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="standin_vllm", description="Stand-in for vLLM's OpenAI server", allow_abbrev=False
    )
    parser.add_argument("--model", default="standin-model")
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-model-len", type=parse_token_count, default=2048)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--disable-custom-all-reduce", action="store_true")
    # How the API server and EngineCore start their children (always written as --standin-x=value).
    parser.add_argument("--standin-role", choices=("api", "engine", "worker"), default="api", help=argparse.SUPPRESS)
    parser.add_argument("--standin-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--standin-parent", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--standin-rank", type=int, default=0, help=argparse.SUPPRESS)
    args, _ignored_vllm_args = parser.parse_known_args(argv)
    if args.tensor_parallel_size < 1:
        parser.error("--tensor-parallel-size must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------
# The "model": deterministic, so tests can compare answers across suspend/resume.

EOS_WORD = WORDS[-1]  # the word that plays the end-of-sequence token
MIN_TOKENS_BEFORE_EOS = 20  # so short greedy answers run to max_tokens, and long ones stop somewhere
MAX_LOGPROBS = 20  # vLLM's default max_logprobs


def answer_key(kind: str, prompt: object, seed: object) -> str:
    """What a greedy answer depends on: the same key gives the same words (max_tokens only cuts them)."""
    return hashlib.sha256(json.dumps([kind, prompt, seed], sort_keys=True).encode()).hexdigest()[:32]


def step_piece(key: str, index: int, rank: int, salt: str) -> int:
    """One worker's share of token `index`; `salt` is empty unless the worker computes garbage."""
    digest = hashlib.blake2b(f"{key}/{index}/{rank}/{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def combine_pieces(pieces: list[int]) -> str:
    return WORDS[sum(pieces) % len(WORDS)]


def token_text(word: str, index: int) -> str:
    return word if index == 0 else " " + word


def candidate_logprobs(pieces: list[int], word: str, index: int, count: int) -> list[list]:
    """The sampler's view of one position: [token, logprob] of the chosen word first (the most likely,
    as greedy decoding picks it), then of `count - 1` other words, each less likely than the one before.
    Derived from the workers' pieces, so a worker computing garbage changes them too."""
    rng = random.Random(sum(pieces))
    others = rng.sample([other for other in WORDS if other != word], min(count, len(WORDS)) - 1)
    logprob = -rng.uniform(0.01, 0.5)
    candidates = [[token_text(word, index), logprob]]
    for other in others:
        logprob -= rng.uniform(0.05, 1.5)
        candidates.append([token_text(other, index), logprob])
    return candidates


def tokenize(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def detokenize(tokens: list[int]) -> str:
    return bytes(tokens).decode("utf-8", errors="replace")


def render_chat(messages: list) -> str:
    """The prompt text a chat template would make (only its length matters here)."""
    lines = []
    for message in messages:
        if isinstance(message, dict):
            content = message.get("content")
            text = content if isinstance(content, str) else json.dumps(content)
            lines.append(f"{message.get('role', 'user')}: {text}")
    return "\n".join(lines) + "\nassistant:"


# ---------------------------------------------------------------------------------------------------
# Plumbing shared by EngineCore and the workers (blocking code; the API server uses asyncio streams).


class MessageChannel:
    """JSON messages, one per line, over a blocking socket to the parent or a child process."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.partial_line = b""
        self.received: deque[dict] = deque()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, **message: object) -> None:
        try:
            self.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as error:
            raise EOFError(f"peer gone: {error}") from error

    def pull(self) -> None:
        """Read what the socket holds now (call it when select says readable). EOFError: peer gone."""
        try:
            data = self.sock.recv(1 << 16)
        except OSError as error:
            raise EOFError(f"peer gone: {error}") from error
        if not data:
            raise EOFError("peer closed the connection")
        *lines, self.partial_line = (self.partial_line + data).split(b"\n")
        self.received.extend(json.loads(line) for line in lines)

    def receive(self) -> dict:
        while not self.received:
            self.pull()
        return self.received.popleft()


def start_child(argv: list[str], role: str, *extra: str) -> tuple[subprocess.Popen, socket.socket]:
    """Start this script again in `role`; returns the process and our end of its socket pair."""
    our_end, child_end = socket.socketpair()
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        *(arg for arg in argv if not arg.startswith(HIDDEN_PREFIX)),
        f"--standin-role={role}",
        f"--standin-fd={child_end.fileno()}",
        f"--standin-parent={os.getpid()}",
        *extra,
    ]
    process = subprocess.Popen(command, pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL)
    child_end.close()
    return process, our_end


def become_child(args: argparse.Namespace, title: str) -> MessageChannel:
    """Take the title vLLM gives this process, and die with the parent, as vLLM's children do."""
    setproctitle.setproctitle(title)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != args.standin_parent:
        os._exit(1)  # the parent died before prctl took effect
    # Ctrl-C reaches the whole process group; the API server alone decides how to shut down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return MessageChannel(socket.socket(fileno=args.standin_fd))


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


# ---------------------------------------------------------------------------------------------------
# Worker: one tensor-parallel rank on its GPU of the fake machine. At TP=1 EngineCore is the worker.


class StepWhileAsleep(Exception):
    """An older vLLM ran a step on offloaded weights: the engine dies (vLLM issues #15483, #28714)."""


class Worker:
    def __init__(self, rank: int, memory_utilization: float, who: str):
        self.rank = rank
        self.pid = os.getpid()
        self.who = who
        self.memory_utilization = memory_utilization
        self.step_seconds = env_float("STANDIN_STEP_S", 0.005)
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
        time.sleep(self.step_seconds)
        salt = self.garbage_reason()
        return [step_piece(item["key"], item["index"], self.rank, salt) for item in items]

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
            if request.request_id not in self.running:
                continue  # aborted while the step ran (cannot happen yet: steps are synchronous)
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


# ---------------------------------------------------------------------------------------------------
# API server: aiohttp; requests go to EngineCore, tokens come back one by one.


# aiohttp.web, imported by run_api_server only: EngineCore and the workers start 0.3 s faster without it.
web = None


class EngineDeadError(Exception):
    """EngineCore is gone (or going, on shutdown): requests get a 500 with this message."""


@dataclass
class InFlight:
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False  # EngineCore took it into its batch (else it is waiting)


@dataclass(frozen=True)
class TokenOutput:
    """One step's output for a request: its text, why it finished (None: not yet) and its logprobs."""

    text: str
    finish_reason: str | None  # "length", "stop" (end-of-sequence) or "abort" (pause or sleep, mode abort)
    logprobs: list | None  # [[token, logprob], ...], the chosen token first

    @property
    def counts(self) -> bool:
        return self.finish_reason != "abort"  # an abort finishes a request without a token


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    stops_at_eos: bool
    logprobs: int | None  # top candidates per token the client asked for (None: no logprobs)


ENGINE_DEAD = object()  # queued to in-flight requests when EngineCore goes away


def error_response(status: int, message: str, error_type: str) -> object:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    return web.json_response(body, status=status)


class ApiServer:
    who = "APIServer"

    def __init__(self, args: argparse.Namespace, argv: list[str], started_at: float):
        self.args = args
        self.argv = argv
        self.started_at = started_at
        self.served_names: list[str] = args.served_model_name or [args.model]
        self.vllm_version = vllm_version()
        dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
        self.sleep_endpoints = args.enable_sleep_mode and dev_mode
        self.sleep_pauses_scheduler = sleep_pauses_scheduler(self.vllm_version)
        self.pause_endpoints = dev_mode and self.sleep_pauses_scheduler
        self.in_flight: dict[str, InFlight] = {}
        self.rpc_calls: dict[int, asyncio.Future] = {}
        self.rpc_ids = itertools.count(1)
        self.model_loaded = False
        self.shutting_down = False
        self.stop_reason = ""  # why requests can no longer be served, once they cannot
        self.exit_code = 0
        self.requests_total = 0
        self.aborted_requests_total = 0
        self.done = asyncio.Event()
        self.engine: subprocess.Popen | None = None
        self.engine_writer: asyncio.StreamWriter | None = None
        self.background: set[asyncio.Task] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_shutdown)
        if fake_cuda_enabled():
            fakegpu.register(os.getpid())  # vLLM's API server holds a CUDA context too
        self.engine, sock = start_child(self.argv, "engine")
        reader, self.engine_writer = await asyncio.open_unix_connection(sock=sock)
        self.spawn(self.read_engine(reader))
        runner = web.AppRunner(self.build_app(), access_log=None, handler_cancellation=True, shutdown_timeout=2)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.args.host, self.args.port).start()
        except OSError as error:
            log(self.who, "ERROR", f"cannot listen on {self.args.host}:{self.args.port}: {error}")
            self.request_shutdown()
            self.exit_code = 1
        else:
            log(self.who, "INFO", f"listening on http://{self.args.host}:{self.args.port}, loading the model")
        await self.done.wait()
        await self.stop_engine()
        await runner.cleanup()
        return self.exit_code

    def spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.background.discard)

    def request_shutdown(self) -> None:
        if not self.shutting_down:
            self.shutting_down = True
            self.stop_reason = self.stop_reason or "The server is shutting down"
            log(self.who, "INFO", "shutting down")
            self.fail_in_flight()
            self.done.set()

    async def stop_engine(self) -> None:
        engine = self.engine
        if engine is None or engine.poll() is not None:
            return
        engine.terminate()
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine.pid, signal.SIGCONT)  # a SIGSTOPped EngineCore must run to handle SIGTERM
        deadline = time.monotonic() + 3
        while engine.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if engine.poll() is None:
            engine.kill()
            engine.wait()

    async def read_engine(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, asyncio.IncompleteReadError):
                line = b""
            if not line:
                break
            self.on_engine_message(json.loads(line))
        await self.on_engine_gone()

    def on_engine_message(self, message: dict) -> None:
        op = message["op"]
        if op == "ready":
            self.spawn(self.finish_loading())
        elif op in ("started", "preempted"):
            if message["id"] in self.in_flight:
                self.in_flight[message["id"]].started = op == "started"
        elif op == "token":
            # A finished request leaves in_flight here, so whatever is still there when its handler
            # ends was cut short (client gone) and must be aborted in EngineCore.
            in_flight = self.in_flight.get(message["id"])
            if message["finish_reason"]:
                self.in_flight.pop(message["id"], None)
            if in_flight is not None:
                in_flight.tokens.put_nowait(TokenOutput(message["text"], message["finish_reason"], message["logprobs"]))
        elif op == "rpc_result":
            future = self.rpc_calls.get(message["call_id"])
            if future is not None and not future.done():
                future.set_result(message["result"])

    async def finish_loading(self) -> None:
        if os.environ.get("STANDIN_NEVER_READY") == "1":
            return
        startup_s = env_float("STANDIN_STARTUP_S", 0.3)
        await asyncio.sleep(max(0.0, self.started_at + startup_s - time.monotonic()))
        self.model_loaded = True
        print(f"standin: ready (pid {os.getpid()}) on http://{self.args.host}:{self.args.port}", flush=True)

    async def on_engine_gone(self) -> None:
        if self.shutting_down:
            return
        self.stop_reason = "Engine core died unexpectedly"
        deadline = time.monotonic() + 2
        while self.engine.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        how = describe_exit(self.engine.poll())
        log(self.who, "ERROR", f"Engine core died unexpectedly ({how}), shutting down the API server.")
        self.exit_code = 1
        self.request_shutdown()

    def fail_in_flight(self) -> None:
        for in_flight in self.in_flight.values():
            in_flight.tokens.put_nowait(ENGINE_DEAD)
        self.in_flight.clear()
        for future in self.rpc_calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(self.stop_reason))

    def send_to_engine(self, **message: object) -> None:
        if self.stop_reason:
            raise EngineDeadError(self.stop_reason)
        self.engine_writer.write(json.dumps(message).encode() + b"\n")

    # -- talking to EngineCore ------------------------------------------------------------------

    async def generate(self, key: str, sampling: Sampling):
        """Yields a TokenOutput per token. Closing it early aborts the request in EngineCore."""
        request_id = uuid.uuid4().hex
        in_flight = InFlight()
        self.send_to_engine(
            op="add",
            id=request_id,
            key=key,
            max_tokens=sampling.max_tokens,
            stops_at_eos=sampling.stops_at_eos,
            logprobs=sampling.logprobs,
        )
        self.in_flight[request_id] = in_flight
        self.requests_total += 1
        try:
            while True:
                item = await in_flight.tokens.get()
                if item is ENGINE_DEAD:
                    raise EngineDeadError(self.stop_reason)
                yield item
                if item.finish_reason:
                    return
        finally:
            if self.in_flight.pop(request_id, None) is not None:
                self.aborted_requests_total += 1
                log(self.who, "INFO", f"Aborted request {request_id}.")
                with contextlib.suppress(EngineDeadError):
                    self.send_to_engine(op="abort", id=request_id)

    async def engine_rpc(self, method: str, **params: object) -> dict:
        call_id = next(self.rpc_ids)
        future = asyncio.get_running_loop().create_future()
        self.rpc_calls[call_id] = future
        try:
            self.send_to_engine(op="rpc", call_id=call_id, method=method, params=params)
            return await future
        finally:
            self.rpc_calls.pop(call_id, None)

    # -- HTTP -------------------------------------------------------------------------------------

    def build_app(self):
        @web.middleware
        async def middleware(request, handler):
            return await self.log_and_shape_errors(request, handler)

        app = web.Application(middlewares=[middleware])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/version", self.version)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        if self.pause_endpoints:  # vLLM serves these only in dev mode, since 0.17 (rlhf/api_router.py)
            app.router.add_post("/pause", self.pause)
            app.router.add_post("/resume", self.resume)
            app.router.add_get("/is_paused", self.is_paused)
        if self.sleep_endpoints:  # vLLM serves these only in dev mode
            app.router.add_post("/sleep", self.sleep)
            app.router.add_post("/wake_up", self.wake_up)
            app.router.add_get("/is_sleeping", self.is_sleeping)
            app.router.add_post("/collective_rpc", self.empty_engine_rpc("collective_rpc"))
            app.router.add_post("/reset_prefix_cache", self.empty_engine_rpc("reset_prefix_cache"))
        return app

    async def log_and_shape_errors(self, request, handler):
        """Middleware: one access line per request, and vLLM's error bodies."""
        try:
            response = await handler(request)
        except web.HTTPException as error:
            if error.status not in (404, 405):
                self.log_access(request, error.status)
                raise
            response = web.json_response({"detail": error.reason}, status=error.status)  # FastAPI's shape
        except asyncio.CancelledError:
            self.log_access(request, 499)  # the client went away
            raise
        except EngineDeadError as error:
            response = error_response(500, str(error), "EngineDeadError")
        self.log_access(request, response.status)
        return response

    def log_access(self, request, status: int) -> None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Client Closed Request"
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = f"{peer[0]}:{peer[1]}" if peer else "-"
        path = request.path_qs
        print(f"({self.who} pid={os.getpid()}) INFO:     {client} - \"{request.method} {path} HTTP/1.1\" "
              f"{status} {phrase}", flush=True)  # fmt: skip

    def not_serving(self):
        """The error to answer with while the model is not usable, else None."""
        if self.stop_reason:
            return error_response(500, self.stop_reason, "EngineDeadError")
        if not self.model_loaded:
            return error_response(503, "The model is still loading", "ServiceUnavailableError")
        return None

    async def read_json(self, request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        return body if isinstance(body, dict) else None

    def unknown_model(self, body: dict):
        model = body.get("model")
        if model is None or model in self.served_names:
            return None
        return error_response(404, f"The model `{model}` does not exist.", "NotFoundError")

    async def health(self, request):
        return web.Response(status=503 if self.stop_reason else 200)

    async def models(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        created = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": self.args.model,
                "parent": None,
                "max_model_len": self.args.max_model_len,
            }
            for name in self.served_names
        ]
        return web.json_response({"object": "list", "data": data})

    async def version(self, request):
        return web.json_response({"version": self.vllm_version})

    async def metrics(self, request):
        running = sum(1 for in_flight in self.in_flight.values() if in_flight.started)
        waiting = len(self.in_flight) - running
        label = f'{{model_name="{self.served_names[0]}"}}'
        # vLLM's gauges print as floats (prometheus_client); our own counters are plain integers.
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{label} {float(running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{label} {float(waiting)}\n"
            "# HELP standin:requests_total Generation requests handed to EngineCore.\n"
            "# TYPE standin:requests_total counter\n"
            f"standin:requests_total {self.requests_total}\n"
            "# HELP standin:aborted_requests_total Requests aborted because the client went away.\n"
            "# TYPE standin:aborted_requests_total counter\n"
            f"standin:aborted_requests_total {self.aborted_requests_total}\n"
        )
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def tokenize(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        body = await self.read_json(request)
        if body is None:
            return error_response(400, "Expected a JSON object", "BadRequestError")
        problem = self.unknown_model(body)
        if problem is not None:
            return problem
        if isinstance(body.get("messages"), list):
            text = render_chat(body["messages"])
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            return error_response(400, "Expected 'prompt' (a string) or 'messages'", "BadRequestError")
        tokens = tokenize(text)
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": self.args.max_model_len})

    async def detokenize(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        body = await self.read_json(request)
        tokens = body.get("tokens") if body else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < 256 for t in tokens):
            return error_response(400, "Expected 'tokens': a list of token ids", "BadRequestError")
        problem = self.unknown_model(body)
        if problem is not None:
            return problem
        return web.json_response({"prompt": detokenize(tokens)})

    async def chat_completions(self, request):
        return await self.completion_request(request, chat=True)

    async def completions(self, request):
        return await self.completion_request(request, chat=False)

    async def completion_request(self, request, chat: bool):
        problem = self.not_serving()
        if problem is not None:
            return problem
        body = await self.read_json(request)
        if body is None:
            return error_response(400, "Expected a JSON object", "BadRequestError")
        problem = self.unknown_model(body)
        if problem is not None:
            return problem
        if chat:
            prompt = body.get("messages")
            if not isinstance(prompt, list) or not prompt:
                return error_response(400, "'messages' must be a non-empty list", "BadRequestError")
            prompt_tokens = len(tokenize(render_chat(prompt)))
        else:
            prompt = body.get("prompt")
            if prompt is None:
                return error_response(400, "'prompt' is required", "BadRequestError")
            prompt_tokens = len(tokenize(prompt if isinstance(prompt, str) else json.dumps(prompt)))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return error_response(400, "max_tokens must be a positive integer", "BadRequestError")
        if prompt_tokens + max_tokens > self.args.max_model_len:
            message = (
                f"This model's maximum context length is {self.args.max_model_len} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion)."
            )
            return error_response(400, message, "BadRequestError")
        logprobs, problem = requested_logprobs(body, chat)
        if problem:
            return error_response(400, problem, "BadRequestError")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            return error_response(400, "ignore_eos must be a boolean", "BadRequestError")
        temperature = body.get("temperature")
        seed = body.get("seed")
        greedy = temperature == 0 or seed is not None  # vLLM's default temperature is 1.0: sampling
        key = answer_key("chat" if chat else "text", prompt, seed) if greedy else uuid.uuid4().hex
        reply = Reply(
            chat=chat,
            request_id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            model=body.get("model") or self.served_names[0],
            prompt_tokens=prompt_tokens,
            logprobs=logprobs,
        )
        # Only greedy answers stop at the end-of-sequence word, so sampled ones keep their length.
        tokens = self.generate(key, Sampling(max_tokens, greedy and not ignore_eos, logprobs))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self.stream_reply(request, reply, tokens, include_usage)
        async with contextlib.aclosing(tokens):
            outputs = [output async for output in tokens]
        return web.json_response(reply.full(outputs))

    async def stream_reply(self, request, reply: Reply, tokens, include_usage: bool):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send_event(payload: object) -> None:
            await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        try:
            async with contextlib.aclosing(tokens):
                if reply.chat:
                    await send_event(reply.chunk(None, role=True))
                async for output in tokens:
                    await send_event(reply.chunk(output))
            if include_usage:
                await send_event(reply.usage_chunk())
        except EngineDeadError as error:
            await send_event({"error": {"message": str(error), "type": "EngineDeadError", "code": 500}})
        except ConnectionResetError:
            return response  # the client went away; closing `tokens` aborted the request
        await response.write(b"data: [DONE]\n\n")
        return response

    async def pause(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        mode = request.query.get("mode", "abort")
        if mode not in PAUSE_MODES:  # FastAPI's validation error for a Literal query parameter
            message = "Input should be 'abort', 'wait' or 'keep'"
            detail = [{"type": "literal_error", "loc": ["query", "mode"], "msg": message, "input": mode}]
            return web.json_response({"detail": detail}, status=422)
        await self.engine_rpc("pause", mode=mode)
        return web.json_response({"status": "paused"})

    async def resume(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        await self.engine_rpc("resume")
        return web.json_response({"status": "resumed"})

    async def is_paused(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        return web.json_response(await self.engine_rpc("is_paused"))

    async def sleep(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        level = request.query.get("level", "1")
        if level not in ("0", "1", "2") or (level == "0" and not self.sleep_pauses_scheduler):
            return error_response(400, "level must be 1 or 2 (or 0: pause only, since vLLM 0.17)", "BadRequestError")
        if not self.sleep_pauses_scheduler:
            await self.engine_rpc("sleep", level=int(level))  # older vLLM: no mode, no pause
            return web.Response(status=200)
        mode = request.query.get("mode", "abort")  # vLLM 0.20.2: no mode means abort
        if mode not in PAUSE_MODES:  # vLLM raises in EngineCore: the request fails with a 500
            return error_response(500, f"Invalid pause mode: {mode}", "ValueError")
        await self.engine_rpc("sleep", level=int(level), mode=mode)
        return web.Response(status=200)

    async def wake_up(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        await self.engine_rpc("wake_up")
        return web.Response(status=200)

    async def is_sleeping(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        return web.json_response(await self.engine_rpc("is_sleeping"))

    def empty_engine_rpc(self, method: str):
        async def handler(request):
            problem = self.not_serving()
            if problem is not None:
                return problem
            return web.json_response(await self.engine_rpc(method))

        return handler


def requested_logprobs(body: dict, chat: bool) -> tuple[int | None, str]:
    """How many candidates per token the request wants (None: no logprobs), or why it is invalid."""
    if chat:
        wanted, count = body.get("logprobs") or False, body.get("top_logprobs")
        if not isinstance(wanted, bool):
            return None, "logprobs must be a boolean"
        if count is not None and not wanted and count != 0:
            return None, "when using `top_logprobs`, `logprobs` must be set to true."
        if not wanted:
            return None, ""
        count = 0 if count is None else count
    else:
        count = body.get("logprobs")
        if count is None:
            return None, ""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_LOGPROBS:
        return None, f"logprobs must be an integer from 0 to {MAX_LOGPROBS}"
    return count, ""


@dataclass
class Reply:
    """The OpenAI response shapes of one chat or text completion."""

    chat: bool
    request_id: str
    model: str
    prompt_tokens: int
    logprobs: int | None = None  # candidates per token to report (None: no logprobs)
    completion_tokens: int = 0
    text_offset: int = 0  # where the next token starts in the completion's text
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, object_kind: str, choices: list) -> dict:
        return {"id": self.request_id, "object": object_kind, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def logprobs_of(self, outputs: list[TokenOutput]) -> dict | None:
        """vLLM's logprobs of these tokens: the legacy completions shape, or the chat shape."""
        if self.logprobs is None:
            return None
        outputs = [output for output in outputs if output.counts]
        if self.chat:
            return {"content": [chat_logprob(output.logprobs, self.logprobs) for output in outputs]}
        shape = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for output in outputs:
            (token, logprob), *_ = output.logprobs
            shape["tokens"].append(token)
            shape["token_logprobs"].append(logprob)
            # vLLM lists the top candidates and the sampled token (here the same, greedy picks the top).
            shape["top_logprobs"].append(dict(output.logprobs[: max(self.logprobs, 1)]))
            shape["text_offset"].append(self.text_offset)
            self.text_offset += len(output.text)
        return shape

    def full(self, outputs: list[TokenOutput]) -> dict:
        self.completion_tokens = sum(1 for output in outputs if output.counts)
        text = "".join(output.text for output in outputs)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text}
            kind = "text_completion"
        finish_reason = outputs[-1].finish_reason if outputs else "length"
        choice.update(logprobs=self.logprobs_of(outputs), finish_reason=finish_reason, stop_reason=None)
        return {**self.envelope(kind, [choice]), "usage": self.usage()}

    def chunk(self, output: TokenOutput | None, role: bool = False) -> dict:
        """One streamed event: the assistant role first (chat), then one per token output."""
        if output is None:
            output = TokenOutput("", None, None)
        if output.counts and not role:
            self.completion_tokens += 1
        logprobs = self.logprobs_of([output]) if output.counts and not role else None
        if self.chat:
            delta = {"role": "assistant", "content": output.text} if role else {"content": output.text}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": output.finish_reason}
            return self.envelope("chat.completion.chunk", [choice])
        choice = {
            "index": 0,
            "text": output.text,
            "logprobs": logprobs,
            "finish_reason": output.finish_reason,
            "stop_reason": None,
        }
        return self.envelope("text_completion", [choice])

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.envelope(kind, []), "usage": self.usage()}


def chat_logprob(candidates: list, top: int) -> dict:
    """One token of the chat completions logprobs shape."""

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {**entry(*candidates[0]), "top_logprobs": [entry(*candidate) for candidate in candidates[:top]]}


def run_api_server(args: argparse.Namespace, argv: list[str]) -> int:
    global web
    from aiohttp import web

    started_at = time.monotonic()
    # Tools find vLLM by its command line; this is the one `python3 -m vllm.entrypoints...` shows.
    # Real vLLM never retitles its API server, so its /proc/PID/environ stays readable (cuda-toggle-all
    # checks the NCCL settings there); SPT_NOENV keeps setproctitle from overwriting it here too. It is
    # dropped again at once so EngineCore and the workers clobber theirs, as vLLM's do.
    os.environ["SPT_NOENV"] = "1"
    setproctitle.setproctitle(" ".join(["python3", "-m", "vllm.entrypoints.openai.api_server", *argv]))
    del os.environ["SPT_NOENV"]

    async def serve() -> int:
        return await ApiServer(args, argv, started_at).serve()  # its asyncio objects need the running loop

    return asyncio.run(serve())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.standin_role == "worker":
        return run_worker(args)
    if args.standin_role == "engine":
        return run_engine(args, argv)
    return run_api_server(args, argv)


if __name__ == "__main__":
    sys.exit(main())
