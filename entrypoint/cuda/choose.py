"""The choice of a checkpoint backend: the driver API where the driver has it, else NVIDIA's binary."""

from __future__ import annotations

import shutil

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from .backend import Backend
from .cli_backend import CliBackend
from .driver_backend import DriverBackend, DriverUnavailable


def select_backend(config: Config, choice: str | None = None) -> Backend:
    """The backend named by `choice` (or CUDA_TOGGLE_BACKEND); `auto` prefers the driver API."""
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
