"""What every process of the stand-in shares: settings, arguments, logging, and the plumbing
between the processes (JSON messages over socket pairs, children that die with their parent)."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path

import setproctitle

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
ENTRY_SCRIPT = Path(__file__).resolve().parent.parent / "standin_vllm.py"  # every role starts from it
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
        str(ENTRY_SCRIPT),
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
