"""Owned driver operations: every call that changes a CUDA state is journaled while it runs.

A lock, checkpoint, restore or unlock cannot be cancelled, and the driver does not roll one back when
its caller dies (NVIDIA/cuda-checkpoint issues): a `cuda-checkpoint` child runs on in its own session,
and a driver call keeps going in the target process. So each call leaves an entry in RUN_DIR/ops
before it starts and removes it when it returns; the next run waits for the calls a killed run left
behind (`settle_orphans`) and sees where they landed before it acts.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from loguru import logger

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..base.processes import describe, same_process
from .parallel import run_parallel

JOURNAL_DIR = "ops"
FIELDS = {
    "op": str,
    "pid": int,
    "pid_create_time": (int, float, type(None)),
    "owner_pid": int,
    "owner_create_time": (int, float),
    "started_at": (int, float),
    "child_pid": (int, type(None)),
    "child_create_time": (int, float, type(None)),
}


def _create_time(pid: int) -> float | None:
    info = describe(pid)
    return info.create_time if info else None


@dataclass
class OperationEntry:
    op: str
    pid: int
    pid_create_time: float | None
    owner_pid: int
    owner_create_time: float
    started_at: float
    child_pid: int | None = None
    child_create_time: float | None = None

    def owner_alive(self) -> bool:
        return same_process(self.owner_pid, self.owner_create_time)

    def child_alive(self) -> bool:
        return self.child_pid is not None and same_process(self.child_pid, self.child_create_time or 0.0)

    def describe(self) -> str:
        age = time.time() - self.started_at
        return f"{self.op} of PID {self.pid} (started by PID {self.owner_pid} {age:.0f} s ago)"


class OwnedOperation:
    """`with OwnedOperation(run_dir, op, pid) as operation:` journals the call for as long as it runs.

    An entry that cannot be written raises OSError before the call starts (the caller turns it into a
    BackendError): a call nobody could wait for must not be made.
    """

    def __init__(self, run_dir: str, op: str, pid: int):
        self.directory = Path(run_dir) / JOURNAL_DIR
        self.path = self.directory / f"{pid}.{uuid.uuid4().hex[:12]}.json"
        owner = os.getpid()
        self.entry = OperationEntry(op, pid, _create_time(pid), owner, _create_time(owner) or 0.0, time.time())

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.entry)))
        tmp.replace(self.path)

    def __enter__(self) -> OwnedOperation:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write()
        return self

    def record_child(self, child_pid: int) -> None:
        """The program that carries the call out (cuda-checkpoint), so the next run can wait for it."""
        self.entry.child_pid, self.entry.child_create_time = child_pid, _create_time(child_pid)
        try:
            self._write()
        except OSError as error:  # the entry written before the call still names the target
            logger.warning("cannot record the child of {}: {}", self.entry.describe(), error)

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def read_entries(run_dir: str) -> list[tuple[Path, OperationEntry]]:
    """Every journaled operation; an entry of the wrong shape is reported and dropped."""
    directory = Path(run_dir) / JOURNAL_DIR
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    entries = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # the call returned meanwhile
        except (OSError, ValueError) as error:
            logger.warning("journal entry {} unreadable ({}): dropped", path, error)
            path.unlink(missing_ok=True)
            continue
        if (
            not isinstance(data, dict)
            or set(data) != set(FIELDS)
            or not all(isinstance(data[key], kind) and not isinstance(data[key], bool) for key, kind in FIELDS.items())
        ):
            logger.warning("journal entry {} has the wrong shape: dropped", path)
            path.unlink(missing_ok=True)
            continue
        entries.append((path, OperationEntry(**data)))
    return entries


def helpers_acting_on(pid: int, binary: str) -> list[int]:
    """Live `cuda-checkpoint` processes whose command line acts on `pid` (the cli backend's children, or
    whatever a driver library runs on our behalf), wherever their parent went."""
    names = {"cuda-checkpoint", os.path.basename(binary)}
    target = re.compile(rf"--pid[ =]{pid}(?!\d)")
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        words = process.info["cmdline"] or []
        line = " ".join(words)
        if process.info["pid"] == os.getpid() or not target.search(line):
            continue
        if any(name and name in line for name in names):
            found.append(process.info["pid"])
    return found


def _still_running(path: Path, entry: OperationEntry, binary: str) -> bool:
    if not path.exists():
        return False  # its caller saw it return
    if entry.owner_alive():
        return True  # a caller still waits on it (a thread of a live process)
    return entry.child_alive() or bool(helpers_acting_on(entry.pid, binary))


READ_TRIES = 3


def _still_in_flight(config: Config, pid: int) -> ToolError:
    return ToolError(
        f"an operation on PID {pid} left by a killed run has not ended after CUDA_TOGGLE_OP_TIMEOUT_S="
        f"{config.op_timeout_s:g} s (its state read still blocks); nothing was changed by this run. Run again "
        f"later, or restart the server if PID {pid} stays stuck",
        ExitCode.INCONSISTENT,
    )


def _read_when_landed(config: Config, backend, pid: int, deadline: float) -> str:
    """The state of `pid` after the operation on it has ended.

    A get-state blocks while an operation on the PID runs, then answers the end state (measured on an
    H200, caller killed or not): so it may take up to the deadline, and one that does not answer by then
    means the operation is still in flight, not that the PID is unreadable.
    """
    error = "no answer"
    for attempt in range(READ_TRIES):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _still_in_flight(config, pid)
        answers: dict[int, str | None] = {}

        def ask(target: int, answers: dict[int, str | None] = answers, wait_s: float = remaining) -> None:
            answers[target] = backend.get_state(target, timeout_s=wait_s)

        outcome = run_parallel("get-state", [pid], ask, remaining)[pid]
        if outcome.ok:
            return answers.get(pid) or "no CUDA"
        if describe(pid) is None:
            return "gone"
        if outcome.error is not None and outcome.error.timed_out:
            raise _still_in_flight(config, pid)
        error = outcome.error.message if outcome.error else error
        time.sleep(0.1 * (attempt + 1))
    return f"unreadable ({error})"


def _settled_state(config: Config, backend, pid: int, deadline: float) -> str:
    """The state of `pid` once the operation has landed and two reads CUDA_TOGGLE_VERIFY_SLEEP_S apart agree."""
    previous = None
    while True:
        info = describe(pid)
        if info is None:
            return "gone"
        if info.stopped:
            return "stopped (not asked)"
        current = _read_when_landed(config, backend, pid, deadline)
        if current == previous:
            return current
        if time.monotonic() >= deadline:
            raise ToolError(
                f"the CUDA state of PID {pid} kept changing (last {current}) after an operation a killed run "
                f"left behind; CUDA_TOGGLE_OP_TIMEOUT_S={config.op_timeout_s:g} s passed: inspect it with "
                "`cuda-toggle-all status`, restart the server if it stays so",
                ExitCode.INCONSISTENT,
            )
        previous = current
        time.sleep(config.verify_sleep_s)


def settle_orphans(config: Config, backend) -> list[str]:
    """Wait for every operation an earlier run left in flight, and see where it landed; returns notes.

    Call it with the ToolLock held, before looking at the server. Raises ToolError(INCONSISTENT)
    naming the PID when an operation is still running after CUDA_TOGGLE_OP_TIMEOUT_S.
    """
    entries = read_entries(config.run_dir)
    if not entries:
        return []
    started = time.monotonic()
    deadline = started + config.op_timeout_s
    next_progress = started + config.progress_s
    for _path, entry in entries:
        logger.warning("an earlier run left {} in flight: waiting for it to end", entry.describe())
    pending = list(entries)
    while pending:
        pending = [(path, entry) for path, entry in pending if _still_running(path, entry, config.cuda_checkpoint_bin)]
        if not pending:
            break
        now = time.monotonic()
        if now >= deadline:
            names = "; ".join(entry.describe() for _, entry in pending)
            raise ToolError(
                f"{names}: still running after CUDA_TOGGLE_OP_TIMEOUT_S={config.op_timeout_s:g} s; nothing was "
                f"changed by this run. Run again later, or restart the server if PID "
                f"{', '.join(str(entry.pid) for _, entry in pending)} stays stuck",
                ExitCode.INCONSISTENT,
            )
        if now >= next_progress:
            logger.info(
                "still waiting after {:.0f} s for {}", now - started, "; ".join(e.describe() for _, e in pending)
            )
            next_progress = now + config.progress_s
        time.sleep(0.05)  # each look scans the process table
    notes = []
    for path, entry in entries:
        if entry.pid_create_time is not None and not same_process(entry.pid, entry.pid_create_time):
            state = "gone"
        else:
            state = _settled_state(config, backend, entry.pid, deadline)
        note = f"{entry.op} of PID {entry.pid} left in flight by a killed run (PID {entry.owner_pid}) ended: {state}"
        logger.warning(note)
        notes.append(note)
        path.unlink(missing_ok=True)
    return notes
