"""The small interface every checkpoint backend offers, and the choice between them."""

from __future__ import annotations

import shutil
from typing import Protocol

from ..base.config import Config
from ..base.errors import ExitCode, ToolError

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


def select_backend(config: Config, choice: str | None = None) -> Backend:
    """The backend named by `choice` (or CUDA_TOGGLE_BACKEND); `auto` prefers the driver API."""
    from .cli_backend import CliBackend
    from .driver_backend import DriverBackend, DriverUnavailable

    choice = choice or config.backend
    if choice in ("auto", "driver"):
        try:
            return DriverBackend(config)
        except DriverUnavailable as why:
            if choice == "driver":
                raise ToolError(
                    f"the driver backend is unavailable: {why}; it needs NVIDIA driver >= 570 "
                    "(cuCheckpointProcess* in libcuda.so.1; set CUDA_TOGGLE_LIBCUDA to its path) "
                    "or use --backend cli",
                    ExitCode.USAGE,
                )
            driver_problem = str(why)
    if shutil.which(config.cuda_checkpoint_bin) is None:
        raise ToolError(
            f"no checkpoint backend: {config.cuda_checkpoint_bin!r} is not on PATH"
            + (f" and the driver API is unavailable ({driver_problem})" if choice == "auto" else "")
            + "; install NVIDIA's cuda-checkpoint (or set CUDA_CHECKPOINT_BIN), "
            "or use a driver >= 570 with --backend driver",
            ExitCode.USAGE,
        )
    return CliBackend(config)
