"""What outlives one run of the tool: the lock that keeps runs apart, and the suspend record."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loguru import logger

from ..base.errors import ExitCode, ToolError
from ..base.processes import same_process


class ToolLock:
    """One cuda-toggle-all at a time: an flock on RUN_DIR/lock (released by the kernel if we crash)."""

    def __init__(self, run_dir: str, wait_s: float, purpose: str = "", same_purpose_wait_s: float = 0.0):
        self.path = Path(run_dir) / "lock"
        self.wait_s = wait_s
        self.purpose = purpose or " ".join(sys.argv)
        # A holder that does what we want to do (reach the same target) is waited for longer: once it is done,
        # we only have to prove that state (callers wanting the same state converge).
        self.same_purpose_wait_s = same_purpose_wait_s
        self.handle = None

    def __enter__(self) -> ToolLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a+")
        except OSError as error:
            raise ToolError(
                f"cannot open the lock file {self.path}: {error}; set CUDA_TOGGLE_RUN_DIR to a writable folder",
                ExitCode.USAGE,
            )
        began = time.monotonic()
        announced = False
        same = False
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # An empty file is a holder between its flock and its write, or between its truncate and its
                # unlock: it says nothing new, so the last purpose read stands.
                purpose = self.holder_purpose()
                if purpose is not None:
                    same = purpose == self.purpose
                if same and not announced and self.same_purpose_wait_s > self.wait_s:
                    logger.info("another caller is reaching the same state ({}): waiting for it", self.holder())
                    announced = True
                wait_s = max(self.wait_s, self.same_purpose_wait_s) if same else self.wait_s
                if time.monotonic() >= began + wait_s:
                    holder = self.holder()
                    self.handle.close()
                    raise ToolError(
                        f"another cuda-toggle-all holds {self.path} ({holder}); wait for it to finish",
                        ExitCode.BUSY,
                    )
                time.sleep(0.05)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps({"pid": os.getpid(), "purpose": self.purpose, "since": time.time()}))
        self.handle.flush()
        return self

    def holder_purpose(self) -> str | None:
        try:
            return json.loads(self.path.read_text() or "{}").get("purpose")
        except (OSError, ValueError, AttributeError):
            return None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "holder unknown"
        since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
        return f"PID {info.get('pid')}, {info.get('purpose', '?')!r}, since {since}"

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


@dataclass
class FrozenProcess:
    """A process named so that a reused PID is never mistaken for it (PID and create time)."""

    pid: int
    create_time: float
    title: str


ProcessRecord = FrozenProcess  # the same identity, for the CUDA processes a suspend moved


@dataclass
class GpuRecord:
    uuid: str
    index: int
    used_before_mib: int
    used_after_mib: int

    @property
    def released_mib(self) -> int:
        return max(0, self.used_before_mib - self.used_after_mib)


def merge_gpus(kept: list[GpuRecord], measured: list[GpuRecord]) -> list[GpuRecord]:
    """The GPU figures of a record after another suspend: a GPU's new figures replace the kept ones only
    when they show memory released. A suspend of a server already suspended releases nothing, and must
    not turn the figures the resume checks GPU room against into 0."""
    merged = {gpu.uuid: gpu for gpu in kept}
    for gpu in measured:
        if gpu.released_mib > 0 or gpu.uuid not in merged:
            merged[gpu.uuid] = gpu
    return sorted(merged.values(), key=lambda gpu: gpu.index)


QUIESCE_KINDS = ("scheduler", "sigstop", "none")
MODES = ("plain", "hybrid")
RECORDS_DIR = "servers"
NUMBER = (int, float)
PROCESS_FIELDS = {"pid": int, "create_time": NUMBER, "title": str}
GPU_FIELDS = {"uuid": str, "index": int, "used_before_mib": int, "used_after_mib": int}
RECORD_FIELDS = {
    "root_pid": int,
    "root_create_time": NUMBER,
    "backend": str,
    "started_at": NUMBER,
    "frozen": list,
    "cuda": list,
    "gpus": list,
    "complete": bool,
    "mode": str,
    "quiesce": str,
    "server_url": str,
}
# Fields a record of an earlier version may lack (their defaults apply).
OPTIONAL_RECORD_FIELDS = {"checkpoint_mib": int}


def _shaped(data: object, fields: dict[str, object], optional: dict[str, object] | None = None) -> bool:
    """True when `data` is a dict with exactly `fields` (and any of `optional`), each of its type (a bool is
    not a number)."""
    optional = optional or {}
    if not isinstance(data, dict) or not set(fields) <= set(data) <= set(fields) | set(optional):
        return False
    for key, kind in {**fields, **optional}.items():
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            return False
    return True


def _same_time(a: float, b: float) -> bool:
    return abs(a - b) < 0.01


@dataclass
class SuspendRecord:
    """One per suspended server instance, written while a suspend runs and kept while it is suspended:
    RUN_DIR/servers/<root pid>-<root create time>.json. The create time tells a server from a later one
    with the same PID (container PIDs repeat, and /run can survive a restart)."""

    root_pid: int
    root_create_time: float
    backend: str
    started_at: float
    frozen: list[FrozenProcess] = field(default_factory=list)  # dispatchers we SIGSTOPped
    cuda: list[ProcessRecord] = field(default_factory=list)  # the CUDA processes the suspend moved
    gpus: list[GpuRecord] = field(default_factory=list)  # each GPU's memory before and after
    complete: bool = False
    mode: str = "plain"  # plain | hybrid (vLLM slept at level 1 before the checkpoint)
    quiesce: str = "none"  # what held the requests: scheduler (vLLM's /pause or /sleep, mode=keep) | sigstop | none
    server_url: str = ""
    # What the server's own processes held on the GPUs right before the checkpoint (after vLLM's sleep or
    # pause): what its restore brings back. Per-process figures (NVML); 0 when unknown.
    checkpoint_mib: int = 0

    @staticmethod
    def directory(run_dir: str) -> Path:
        return Path(run_dir) / RECORDS_DIR

    @classmethod
    def path_for(cls, run_dir: str, root_pid: int, root_create_time: float) -> Path:
        return cls.directory(run_dir) / f"{root_pid}-{root_create_time:.2f}.json"

    def path(self, run_dir: str) -> Path:
        return self.path_for(run_dir, self.root_pid, self.root_create_time)

    def restore_need_mib(self) -> dict[str, int]:
        """What a restore alone takes back on each GPU (before vLLM wakes up): checkpoint_mib shared evenly by
        the GPUs the suspend released memory from (tensor-parallel ranks hold alike); empty when unknown."""
        gpus = [gpu for gpu in self.gpus if gpu.released_mib > 0]
        if not gpus or self.checkpoint_mib <= 0:
            return {}
        share = -(-self.checkpoint_mib // len(gpus))
        return {gpu.uuid: share for gpu in gpus}

    def merge_gpus(self, measured: list[GpuRecord]) -> None:
        self.gpus = merge_gpus(self.gpus, measured)

    def save(self, run_dir: str) -> None:
        """Write the record atomically; ToolError(USAGE) naming CUDA_TOGGLE_RUN_DIR if it cannot be."""
        path = self.path(run_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(asdict(self), indent=2))
            tmp.replace(path)
        except OSError as error:
            raise ToolError(
                f"cannot write the suspend record {path}: {error}; set CUDA_TOGGLE_RUN_DIR to a writable folder",
                ExitCode.USAGE,
            )

    @classmethod
    def parse(cls, data: object) -> SuspendRecord | None:
        """The record in `data` (decoded JSON), or None when it has the wrong shape."""
        if not _shaped(data, RECORD_FIELDS, OPTIONAL_RECORD_FIELDS):
            return None
        if data["mode"] not in MODES or data["quiesce"] not in QUIESCE_KINDS:
            return None
        if not all(_shaped(item, PROCESS_FIELDS) for item in data["frozen"] + data["cuda"]):
            return None
        if not all(_shaped(item, GPU_FIELDS) for item in data["gpus"]):
            return None
        return cls(
            **{
                **data,
                "frozen": [FrozenProcess(**item) for item in data["frozen"]],
                "cuda": [ProcessRecord(**item) for item in data["cuda"]],
                "gpus": [GpuRecord(**item) for item in data["gpus"]],
            }
        )

    @classmethod
    def _read(cls, path: Path) -> SuspendRecord | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.warning("suspend record {} is unreadable ({}): ignored", path, error)
            return None
        record = cls.parse(data)
        if record is None:
            logger.warning("suspend record {} is not a suspend record of this version: ignored", path)
        return record

    @classmethod
    def load(cls, run_dir: str, root_pid: int, root_create_time: float) -> SuspendRecord | None:
        """The record of the server (root PID and its create time), or None. A record left by another
        process with the same PID (stale) or of the wrong shape is reported once and ignored; a stale
        one is removed, since the process it named is gone. Never raises."""
        try:
            paths = sorted(cls.directory(run_dir).glob(f"{root_pid}-*.json"))
        except OSError as error:
            logger.warning("cannot read {}: {}", cls.directory(run_dir), error)
            return None
        found = None
        for path in paths:
            record = cls._read(path)
            if record is None or record.root_pid != root_pid:
                continue
            if _same_time(record.root_create_time, root_create_time):
                found = record
                continue
            logger.warning(
                "suspend record {} names an earlier process with PID {} (started {}): stale, removed",
                path,
                root_pid,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.root_create_time)),
            )
            with contextlib.suppress(OSError):
                path.unlink()
        return found

    @classmethod
    def load_all(cls, run_dir: str) -> list[SuspendRecord]:
        """Every well-formed record in RUN_DIR (the servers suspended, or being suspended, now)."""
        try:
            paths = sorted(cls.directory(run_dir).glob("*.json"))
        except OSError:
            return []
        return [record for record in map(cls._read, paths) if record is not None]

    @classmethod
    def any(cls, run_dir: str) -> bool:
        """True when some server has a record (a suspend ran and was not undone)."""
        try:
            return any(cls.directory(run_dir).glob("*.json"))
        except OSError:
            return False

    def instance_alive(self) -> bool:
        """True while the server instance this record belongs to lives: its root process, named by PID and
        create time (a restarted server is a new instance, even with the same PID)."""
        return same_process(self.root_pid, self.root_create_time)

    def describe_instance(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.root_create_time))
        return f"PID {self.root_pid}, started {started}"

    @classmethod
    def remove_stale(cls, run_dir: str) -> list[SuspendRecord]:
        """Remove every record whose server instance is gone (it died, or was restarted: supervisord's restart
        is a new instance), saying so in the log; returns the records removed. Nothing can resume a server
        that is gone, and its record would make the gate and `running` act on a server that is not there."""
        removed = []
        for record in cls.load_all(run_dir):
            if record.instance_alive():
                continue
            logger.warning(
                "suspend record of server {} removed: that server is gone (it died or was restarted while "
                "suspended); the server there now is acted on instead",
                record.describe_instance(),
            )
            record.clear(run_dir)
            removed.append(record)
        return removed

    def clear(self, run_dir: str) -> None:
        """Remove this server's record (never raises: a record that cannot be removed is reported)."""
        try:
            self.path(run_dir).unlink(missing_ok=True)
        except OSError as error:
            logger.warning("cannot remove the suspend record {}: {}", self.path(run_dir), error)
