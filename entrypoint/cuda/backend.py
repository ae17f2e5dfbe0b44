"""The small interface every checkpoint backend offers (the choice between them: choose.py)."""

from __future__ import annotations

from typing import Protocol

STATES = ("running", "locked", "checkpointed", "failed")


class BackendError(Exception):
    """One driver operation on one PID failed (or did not return in time)."""

    def __init__(self, op: str, pid: int, message: str, timed_out: bool = False):
        super().__init__(f"{op} of PID {pid}: {message}")
        self.op = op
        self.pid = pid
        self.message = message
        self.timed_out = timed_out


class Backend(Protocol):
    name: str

    def get_state(self, pid: int, timeout_s: float | None = None) -> str | None:
        """running | locked | checkpointed | failed, or None when the process has no CUDA context.

        Blocks while an operation on `pid` runs (measured on an H200 with both backends, the caller of
        that operation killed or not), then answers its end state; `timeout_s` (default
        CUDA_TOGGLE_STATE_TIMEOUT_S) bounds the wait where the backend can."""

    def lock(self, pid: int, timeout_ms: int) -> None: ...

    def checkpoint(self, pid: int) -> None: ...

    def restore(self, pid: int) -> None: ...

    def unlock(self, pid: int) -> None: ...
