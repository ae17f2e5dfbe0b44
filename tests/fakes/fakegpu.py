"""Shared state of the fake GPU (see README.md in this folder).

Used by the fake `cuda-checkpoint` and `nvidia-smi`, by the stand-in vLLM's workers and by the tests.
Standard library only: the fakes run under whatever python3 the test put on PATH.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STATES = ("running", "locked", "checkpointed", "failed")
STATE_NUMBER = {"running": 0, "locked": 1, "checkpointed": 2, "failed": 3}

CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_OPERATING_SYSTEM = 304
CUDA_ERROR_ILLEGAL_STATE = 401
CUDA_ERROR_NOT_READY = 600
CUDA_ERROR_UNKNOWN = 999

ERROR_TEXT = {
    CUDA_ERROR_INVALID_VALUE: "invalid argument",
    CUDA_ERROR_NOT_INITIALIZED: "initialization error",
    CUDA_ERROR_OPERATING_SYSTEM: "OS call failed or operation not supported on this OS",
    CUDA_ERROR_ILLEGAL_STATE: "the operation cannot be performed in the present state",
    CUDA_ERROR_NOT_READY: "device not ready",
    CUDA_ERROR_UNKNOWN: "unknown error",
}


def state_dir() -> Path:
    value = os.environ.get("FAKE_CUDA_STATE_DIR")
    if not value:
        raise SystemExit("FAKE_CUDA_STATE_DIR is not set")
    return Path(value)


def pid_dir(pid: int, root: Path | None = None) -> Path:
    return (root or state_dir()) / "pids" / str(pid)


def register(pid: int, gpu: int | None = None, mib: int = 0, root: Path | None = None) -> None:
    """Make `pid` a CUDA process: state running, holding `mib` on GPU `gpu`."""
    directory = pid_dir(pid, root)
    (directory / "faults").mkdir(parents=True, exist_ok=True)
    (directory / "gpu").write_text(f"{-1 if gpu is None else gpu} {mib}\n")
    write_state(pid, "running", root)


def read_state(pid: int, root: Path | None = None) -> str | None:
    try:
        return (pid_dir(pid, root) / "state").read_text().strip()
    except FileNotFoundError:
        return None


def write_state(pid: int, state: str, root: Path | None = None) -> None:
    path = pid_dir(pid, root) / "state"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state + "\n")
    tmp.replace(path)


def add_fault(pid: int, op: str, *faults: str, root: Path | None = None) -> None:
    path = pid_dir(pid, root) / "faults" / op
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for fault in faults:
            handle.write(fault + "\n")


def take_fault(pid: int, op: str) -> str | None:
    path = pid_dir(pid) / "faults" / op
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    if not lines:
        return None
    path.write_text("".join(line + "\n" for line in lines[1:]))
    return lines[0].strip()


def log_call(op: str, pid: int, result: str) -> None:
    with (state_dir() / "calls.log").open("a") as handle:
        handle.write(f"{time.monotonic_ns()} {op} {pid} {result}\n")


def log_start(op: str, pid: int) -> None:
    """When an operation began: orderings that the ends alone do not prove (two calls overlapped)."""
    with (state_dir() / "starts.log").open("a") as handle:
        handle.write(f"{time.monotonic_ns()} {op} {pid}\n")


def read_starts(root: Path) -> list[tuple[int, str, int]]:
    """The operations the fake cuda-checkpoint began, oldest first: (monotonic_ns, op, pid)."""
    try:
        text = (root / "starts.log").read_text()
    except FileNotFoundError:
        return []
    return sorted((int(stamp), op, int(pid)) for stamp, op, pid in (line.split(" ") for line in text.splitlines()))


def read_calls(root: Path) -> list[tuple[int, str, int, str]]:
    """The calls the fakes logged, oldest first: (monotonic_ns, op, pid, result)."""
    try:
        text = (root / "calls.log").read_text()
    except FileNotFoundError:
        return []
    calls = []
    for line in text.splitlines():
        stamp, op, pid, result = line.split(" ", 3)
        calls.append((int(stamp), op, int(pid), result))
    return sorted(calls)


def process_status(pid: int) -> str | None:
    """The one-letter state of /proc/PID/stat, or None when the process is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    letter = text.rsplit(")", 1)[1].split()[0]
    return None if letter in ("Z", "X") else letter


def gpu_holding(pid: int, root: Path | None = None) -> tuple[int, int]:
    try:
        index, mib = (pid_dir(pid, root) / "gpu").read_text().split()
    except FileNotFoundError:
        return -1, 0
    return int(index), int(mib)


def write_gpus(root: Path, gpus: list[tuple[int, str, int, int]]) -> None:
    """gpus: (index, uuid, total_mib, baseline_mib)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "gpus").write_text("".join(f"{i} {u} {t} {b}\n" for i, u, t, b in gpus))


def read_gpus(root: Path | None = None) -> list[tuple[int, str, int, int]]:
    try:
        text = ((root or state_dir()) / "gpus").read_text()
    except FileNotFoundError:
        return []
    gpus = []
    for line in text.splitlines():
        if line.strip():
            index, uuid, total, baseline = line.split()
            gpus.append((int(index), uuid, int(total), int(baseline)))
    return gpus


def compute_apps(root: Path | None = None) -> list[tuple[int, int, int]]:
    """(pid, gpu_index, mib) of every live process whose memory is on a GPU now, as nvidia-smi's
    compute-apps query lists them: running or locked, or checkpointed with `kept`."""
    root = root or state_dir()
    pids = root / "pids"
    if not pids.is_dir():
        return []
    apps = []
    for entry in sorted(pids.iterdir(), key=lambda entry: entry.name):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if process_status(pid) is None:
            continue
        state = read_state(pid, root)
        on_gpu = state in ("running", "locked") or (state == "checkpointed" and (entry / "kept").exists())
        index, mib = gpu_holding(pid, root)
        if on_gpu and index >= 0:
            apps.append((pid + listed_pid_offset(), index, mib))
    return apps


def listed_pid_offset() -> int:
    """FAKE_GPU_LISTED_PID_OFFSET: list every process under its PID plus this, as a GPU query that reports
    PIDs of another PID namespace would (they then match none of the server's)."""
    return int(os.environ.get("FAKE_GPU_LISTED_PID_OFFSET", "0") or 0)


def used_mib(root: Path | None = None) -> dict[int, int]:
    """Memory in use per GPU index, as the fake nvidia-smi reports it."""
    root = root or state_dir()
    used = {index: baseline for index, _, _, baseline in read_gpus(root)}
    for _, index, mib in compute_apps(root):
        if index in used:
            used[index] += mib
    return used


def note_if_overcommitted(index: int, who: str) -> None:
    """Log to `overcommitted` when GPU `index` holds more than it has (a real GPU would have failed the
    allocation): tests read it to prove two servers were never resident together."""
    totals = {gpu: total for gpu, _, total, _ in read_gpus()}
    used = used_mib().get(index, 0)
    if index in totals and used > totals[index]:
        with (state_dir() / "overcommitted").open("a") as handle:
            handle.write(f"{time.monotonic_ns()} GPU{index} {used}/{totals[index]} MiB after {who}\n")


def overcommits(root: Path) -> list[str]:
    try:
        return (root / "overcommitted").read_text().splitlines()
    except FileNotFoundError:
        return []


def process_name(pid: int) -> str:
    """What nvidia-smi shows as process_name: the first word of the command line (its title)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
    except (FileNotFoundError, ProcessLookupError):
        return "[Not Found]"
    return words[0].decode(errors="replace") if words else "[Not Found]"


def transfer_seconds(pid: int) -> float:
    """How long a checkpoint or restore of `pid` takes, from speed_mib_per_s (instant without it)."""
    try:
        speed = float((state_dir() / "speed_mib_per_s").read_text())
    except FileNotFoundError:
        return 0.0
    _, mib = gpu_holding(pid)
    return mib / speed if speed > 0 else 0.0
