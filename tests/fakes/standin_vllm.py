#!/usr/bin/env python3
"""Stand-in for a vLLM OpenAI-compatible server with tensor parallelism (see README.md in this folder).

One script, three roles, the process tree of vLLM V1:

    python3 -m vllm.entrypoints.openai.api_server ARGS   the API server (aiohttp), the process started
      VLLM::EngineCore                                   schedules steps, sends each to every worker
        VLLM::Worker_TP0 .. VLLM::Worker_TP{N-1}         compute their piece of every step

The workers are what cuda-checkpoint suspends, so they are the ones that behave like CUDA processes of
the fake GPU: before every step a worker reads its state there; `locked` blocks it, `checkpointed` or
`failed` kills it with SIGSEGV (what a request reaching a suspended real vLLM worker does).

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
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
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


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


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


def answer_key(kind: str, prompt: object, seed: object) -> str:
    """What a greedy answer depends on: the same key gives the same words (max_tokens only cuts them)."""
    return hashlib.sha256(json.dumps([kind, prompt, seed], sort_keys=True).encode()).hexdigest()[:32]


def step_piece(key: str, index: int, rank: int, salt: str) -> int:
    """One worker's share of token `index`; `salt` is empty unless the worker computes garbage."""
    digest = hashlib.blake2b(f"{key}/{index}/{rank}/{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def combine_pieces(pieces: list[int]) -> str:
    return WORDS[sum(pieces) % len(WORDS)]


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
# Worker: one tensor-parallel rank on its GPU of the fake machine.


class Worker:
    def __init__(self, rank: int, memory_utilization: float):
        self.rank = rank
        self.pid = os.getpid()
        self.who = f"VllmWorker TP{rank}"
        self.memory_utilization = memory_utilization
        self.step_seconds = env_float("STANDIN_STEP_S", 0.005)
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
    channel = become_child(args, f"VLLM::Worker_TP{args.standin_rank}")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the SIGSEGV must not leave core files behind
    worker = Worker(args.standin_rank, args.gpu_memory_utilization)
    worker.load()
    channel.send(op="loaded")
    while True:
        try:
            message = channel.receive()
        except EOFError:
            return 0  # EngineCore is gone
        channel.send(**worker.handle(message))


# ---------------------------------------------------------------------------------------------------
# EngineCore: continuous batching; every step advances every active request on every worker.


class WorkerDied(Exception):
    pass


@dataclass
class WorkerHandle:
    rank: int
    process: subprocess.Popen
    channel: MessageChannel

    def fileno(self) -> int:
        return self.channel.fileno()


@dataclass
class ActiveRequest:
    request_id: str
    key: str
    max_tokens: int
    generated: int = 0


class EngineCore:
    who = "EngineCore"

    def __init__(self, args: argparse.Namespace, argv: list[str], api: MessageChannel):
        self.args = args
        self.argv = argv
        self.api = api
        self.workers: list[WorkerHandle] = []
        self.active: dict[str, ActiveRequest] = {}  # insertion order = scheduling order
        self.sleep_level = 0

    def run(self) -> int:
        try:
            for rank in range(self.args.tensor_parallel_size):
                process, sock = start_child(self.argv, "worker", f"--standin-rank={rank}")
                self.workers.append(WorkerHandle(rank, process, MessageChannel(sock)))
            self.gather()  # every worker reports its weights loaded
            self.api.send(op="ready")
            self.serve()
        except WorkerDied as died:
            log(self.who, "ERROR", f"{died}, shutting down executor.")
            return 1
        except EOFError:
            return 0  # the API server is gone
        finally:
            for worker in self.workers:
                if worker.process.poll() is None:
                    worker.process.kill()
                worker.process.wait()
        return 0

    def serve(self) -> None:
        while True:
            idle = not self.active
            readable, _, _ = select.select([self.api, *self.workers], [], [], None if idle else 0)
            for source in readable:
                if source is self.api:
                    self.api.pull()
                else:
                    self.pull_from(source)  # an idle worker only ever becomes readable by dying
            while self.api.received:
                self.handle(self.api.received.popleft())
            if self.active:
                self.step()

    def handle(self, message: dict) -> None:
        op = message["op"]
        if op == "add":
            request = ActiveRequest(message["id"], message["key"], message["max_tokens"])
            self.active[request.request_id] = request
            self.api.send(op="started", id=request.request_id)
        elif op == "abort":
            self.active.pop(message["id"], None)
        elif op == "rpc":
            result = self.rpc(message["method"], message.get("params") or {})
            self.api.send(op="rpc_result", call_id=message["call_id"], result=result)

    def rpc(self, method: str, params: dict) -> dict:
        if method == "sleep" and not self.sleep_level:
            self.broadcast(op="sleep")
            self.gather()
            self.sleep_level = int(params.get("level", 1))
        elif method == "wake_up" and self.sleep_level:
            self.broadcast(op="wake_up")
            self.gather()
            self.sleep_level = 0
        elif method == "is_sleeping":
            return {"is_sleeping": bool(self.sleep_level)}
        return {}

    def step(self) -> None:
        batch = list(self.active.values())
        self.broadcast(op="step", items=[{"key": r.key, "index": r.generated} for r in batch])
        replies = self.gather()
        for position, request in enumerate(batch):
            word = combine_pieces([reply["pieces"][position] for reply in replies])
            request.generated += 1
            finished = request.generated >= request.max_tokens
            text = word if request.generated == 1 else " " + word
            self.api.send(op="token", id=request.request_id, text=text, finished=finished)
            if finished:
                del self.active[request.request_id]

    def broadcast(self, **message: object) -> None:
        for worker in self.workers:
            try:
                worker.channel.send(**message)
            except EOFError:
                self.worker_died(worker)

    def gather(self) -> list[dict]:
        """One reply from every worker, in rank order. Waits as long as a worker takes (a locked one
        blocks), but a worker that dies meanwhile takes the engine down."""
        replies: dict[int, dict] = {}
        while True:
            for worker in self.workers:
                if worker.rank not in replies and worker.channel.received:
                    replies[worker.rank] = worker.channel.received.popleft()
            if len(replies) == len(self.workers):
                return [replies[rank] for rank in range(len(self.workers))]
            readable, _, _ = select.select(self.workers, [], [])
            for worker in readable:
                self.pull_from(worker)

    def pull_from(self, worker: WorkerHandle) -> None:
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


def run_engine(args: argparse.Namespace, argv: list[str]) -> int:
    api = become_child(args, "VLLM::EngineCore")
    if fake_cuda_enabled():
        fakegpu.register(os.getpid())  # vLLM's EngineCore holds a CUDA context too

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
        self.sleep_endpoints = args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
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
        elif op == "started":
            if message["id"] in self.in_flight:
                self.in_flight[message["id"]].started = True
        elif op == "token":
            # A finished request leaves in_flight here, so whatever is still there when its handler
            # ends was cut short (client gone) and must be aborted in EngineCore.
            in_flight = self.in_flight.get(message["id"])
            if message["finished"]:
                self.in_flight.pop(message["id"], None)
            if in_flight is not None:
                in_flight.tokens.put_nowait((message["text"], message["finished"]))
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

    async def generate(self, key: str, max_tokens: int):
        """Yields (text, finished) per token. Closing it early aborts the request in EngineCore."""
        request_id = uuid.uuid4().hex
        in_flight = InFlight()
        self.send_to_engine(op="add", id=request_id, key=key, max_tokens=max_tokens)
        self.in_flight[request_id] = in_flight
        self.requests_total += 1
        try:
            while True:
                item = await in_flight.tokens.get()
                if item is ENGINE_DEAD:
                    raise EngineDeadError(self.stop_reason)
                yield item
                if item[1]:
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
        return web.json_response({"version": "0.0.0-standin"})

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
        temperature = body.get("temperature")
        seed = body.get("seed")
        greedy = temperature == 0 or seed is not None  # vLLM's default temperature is 1.0: sampling
        key = answer_key("chat" if chat else "text", prompt, seed) if greedy else uuid.uuid4().hex
        reply = Reply(
            chat=chat,
            request_id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            model=body.get("model") or self.served_names[0],
            prompt_tokens=prompt_tokens,
        )
        tokens = self.generate(key, max_tokens)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self.stream_reply(request, reply, tokens, include_usage)
        async with contextlib.aclosing(tokens):
            texts = [text async for text, _ in tokens]
        return web.json_response(reply.full(texts))

    async def stream_reply(self, request, reply: Reply, tokens, include_usage: bool):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send_event(payload: object) -> None:
            await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        try:
            async with contextlib.aclosing(tokens):
                if reply.chat:
                    await send_event(reply.chunk("", None, role=True))
                async for text, finished in tokens:
                    reply.completion_tokens += 1
                    await send_event(reply.chunk(text, "length" if finished else None))
            if include_usage:
                await send_event(reply.usage_chunk())
        except EngineDeadError as error:
            await send_event({"error": {"message": str(error), "type": "EngineDeadError", "code": 500}})
        except ConnectionResetError:
            return response  # the client went away; closing `tokens` aborted the request
        await response.write(b"data: [DONE]\n\n")
        return response

    async def sleep(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            return error_response(400, "level must be 1 or 2", "BadRequestError")
        await self.engine_rpc("sleep", level=int(level))
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


@dataclass
class Reply:
    """The OpenAI response shapes of one chat or text completion."""

    chat: bool
    request_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int = 0
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

    def full(self, texts: list[str]) -> dict:
        self.completion_tokens = len(texts)
        text = "".join(texts)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text}
            kind = "text_completion"
        choice.update(logprobs=None, finish_reason="length", stop_reason=None)
        return {**self.envelope(kind, [choice]), "usage": self.usage()}

    def chunk(self, text: str, finish_reason: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self.envelope("chat.completion.chunk", [choice])
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        return self.envelope("text_completion", [choice])

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.envelope(kind, []), "usage": self.usage()}


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
