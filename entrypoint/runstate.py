"""What outlives one run of the tool: the lock that keeps runs apart, and the suspend record."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ExitCode, SuspendError


class ToolLock:
    """One cuda-toggle-all at a time: an flock on RUN_DIR/lock (released by the kernel if we crash)."""

    def __init__(self, run_dir: str, wait_s: float, purpose: str = ""):
        self.path = Path(run_dir) / "lock"
        self.wait_s = wait_s
        self.purpose = purpose or " ".join(sys.argv)
        self.handle = None

    def __enter__(self) -> ToolLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a+")
        except OSError as error:
            raise SuspendError(
                f"cannot open the lock file {self.path}: {error}; set CUDA_TOGGLE_RUN_DIR to a writable folder",
                ExitCode.USAGE,
            )
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self.holder()
                    self.handle.close()
                    raise SuspendError(
                        f"another cuda-toggle-all holds {self.path} ({holder}); wait for it to finish",
                        ExitCode.BUSY,
                    )
                time.sleep(0.05)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps({"pid": os.getpid(), "purpose": self.purpose, "since": time.time()}))
        self.handle.flush()
        return self

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
    pid: int
    create_time: float
    title: str


@dataclass
class GpuRecord:
    uuid: str
    index: int
    used_before_mib: int
    used_after_mib: int

    @property
    def released_mib(self) -> int:
        return max(0, self.used_before_mib - self.used_after_mib)


@dataclass
class SuspendRecord:
    """Written while a suspend runs and kept while the server is suspended (RUN_DIR/suspended.json)."""

    root_pid: int
    root_create_time: float
    backend: str
    started_at: float
    frozen: list[FrozenProcess] = field(default_factory=list)
    gpus: list[GpuRecord] = field(default_factory=list)
    complete: bool = False
    mode: str = "plain"
    server_url: str = ""
    quiesce: str = "none"  # what holds the requests: scheduler (vLLM's pause or sleep), sigstop, none
    cuda_pids: list[FrozenProcess] = field(default_factory=list)  # every process checkpointed (identity)

    @staticmethod
    def path(run_dir: str) -> Path:
        return Path(run_dir) / "suspended.json"

    def save(self, run_dir: str) -> None:
        path = self.path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, run_dir: str) -> SuspendRecord | None:
        try:
            data = json.loads(cls.path(run_dir).read_text())
        except (OSError, ValueError):
            return None
        data["frozen"] = [FrozenProcess(**item) for item in data.get("frozen", [])]
        data["gpus"] = [GpuRecord(**item) for item in data.get("gpus", [])]
        data["cuda_pids"] = [FrozenProcess(**item) for item in data.get("cuda_pids", [])]
        return cls(**data)

    @classmethod
    def clear(cls, run_dir: str) -> None:
        cls.path(run_dir).unlink(missing_ok=True)
