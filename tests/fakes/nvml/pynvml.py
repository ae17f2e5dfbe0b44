"""Fake NVML: the `pynvml` module of nvidia-ml-py, for the calls entrypoint/cuda/gpus.py makes, over the fake GPU.

Put this folder first on PYTHONPATH to use it. Like NVML, one reading is consistent: the figures of a GPU
and its process list come from one snapshot of the fake GPU's state, taken at nvmlInit(). Like NVML on an
H200 (driver 580), a locked process is not listed, though its memory counts in the GPU's `used`: measured
for a process restored and not yet unlocked (~0.9 GiB unlisted), taken here for every locked one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fakegpu  # noqa: E402

MIB = 2**20
nvmlMemory_v2 = 0x02000028  # a version tag, as nvidia-ml-py defines it; this fake ignores it


class NVMLError(Exception):
    pass


@dataclass(frozen=True)
class Memory:
    total: int
    used: int
    free: int


@dataclass(frozen=True)
class Process:
    pid: int
    usedGpuMemory: int  # noqa: N815 (NVML's name)


_snapshot: dict | None = None


def nvmlInit() -> None:  # noqa: N802 (NVML's names)
    global _snapshot
    if not os.environ.get("FAKE_CUDA_STATE_DIR"):
        raise NVMLError("Driver Not Loaded")
    gpus = fakegpu.read_gpus()
    if not gpus:
        raise NVMLError("No devices were found")
    apps = fakegpu.compute_apps()
    listed = [(pid, gpu, mib) for pid, gpu, mib in apps if fakegpu.read_state(pid) != "locked"]
    _snapshot = {"gpus": gpus, "apps": apps, "listed": listed}


def nvmlShutdown() -> None:  # noqa: N802
    global _snapshot
    _snapshot = None


def _taken() -> dict:
    if _snapshot is None:
        raise NVMLError("Uninitialized")
    return _snapshot


def nvmlDeviceGetCount() -> int:  # noqa: N802
    return len(_taken()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> int:  # noqa: N802
    if not 0 <= index < nvmlDeviceGetCount():
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetUUID(handle: int) -> str:  # noqa: N802
    return _taken()["gpus"][handle][1]


def nvmlDeviceGetMemoryInfo(handle: int, version: int | None = None) -> Memory:  # noqa: N802
    index, _, total_mib, baseline_mib = _taken()["gpus"][handle]
    used_mib = baseline_mib + sum(mib for _, gpu, mib in _taken()["apps"] if gpu == index)
    return Memory(total_mib * MIB, used_mib * MIB, (total_mib - used_mib) * MIB)


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[Process]:  # noqa: N802
    index = _taken()["gpus"][handle][0]
    return [Process(pid, mib * MIB) for pid, gpu, mib in _taken()["listed"] if gpu == index]
