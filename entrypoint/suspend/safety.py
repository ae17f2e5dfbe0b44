"""Checks that refuse a transition that would fail (and could brick the server) before anything changes.

Pure functions of what was observed (the process tree, CUDA states, environments, memory figures):
each returns the list of reasons to refuse, every reason naming the setting or the fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

from ..base.processes import ProcessInfo
from ..cuda.gpus import GpuReading
from .records import SuspendRecord

# NCCL transports whose memory cuda-checkpoint cannot restore (measured: restore fails, workers stuck).
REQUIRED_NCCL_ENV = {
    "NCCL_P2P_DISABLE": "1",  # P2P transport uses CUDA IPC memory
    "NCCL_SHM_DISABLE": "1",  # SHM transport: restore fails with `operation not supported`
    "NCCL_NVLS_ENABLE": "0",  # NVLink multicast memory cannot be checkpointed either
}
# The whole environment a TP server needs for suspend/resume (what the compose file sets; tests use it too).
REQUIRED_SERVER_ENV = {**REQUIRED_NCCL_ENV, "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}
CUSTOM_ALL_REDUCE_FLAGS = ("--disable-custom-all-reduce", "--disable_custom_all_reduce")
CAP_SYS_PTRACE = 19  # linux/capability.h


def workers_of(processes: list[ProcessInfo], cuda_pids: list[int], worker_title: str) -> list[ProcessInfo]:
    """The GPU workers among the CUDA processes: titled like vLLM's workers, else all of them."""
    cuda = [p for p in processes if p.pid in cuda_pids]
    titled = [p for p in cuda if worker_title and worker_title in p.title]
    return titled or cuda


def is_vllm(processes: list[ProcessInfo]) -> bool:
    return any("vllm" in p.title.lower() for p in processes)


def nccl_refusals(workers: list[ProcessInfo], read_environ: Callable[[int], Mapping[str, str] | None]) -> list[str]:
    if len(workers) < 2:
        return []
    reasons = []
    for worker in workers:
        environ = read_environ(worker.pid)
        if environ is None:
            reasons.append(
                f"cannot read the environment of PID {worker.pid} ({worker.short_title(40)}) to check the NCCL "
                "settings: run cuda-toggle-all as root (or as the server's user)"
            )
            continue
        missing = [f"{name}={value}" for name, value in REQUIRED_NCCL_ENV.items() if environ.get(name) != value]
        if missing:
            reasons.append(
                f"PID {worker.pid} ({worker.short_title(40)}) runs without {' '.join(missing)}: NCCL then uses "
                "memory cuda-checkpoint cannot restore, and the workers would stay checkpointed for good. "
                "Restart the server with these variables set"
            )
            break  # the environment is inherited: one worker says it for all
    return reasons


def vllm_all_reduce_refusals(
    processes: list[ProcessInfo],
    workers: list[ProcessInfo],
    read_environ: Callable[[int], Mapping[str, str] | None],
) -> list[str]:
    if len(workers) < 2 or not is_vllm(processes):
        return []
    reasons = []
    if not any(flag in p.title for p in processes for flag in CUSTOM_ALL_REDUCE_FLAGS):
        reasons.append(
            "the vLLM server was started without --disable-custom-all-reduce: its custom all-reduce uses "
            "CUDA IPC memory that cuda-checkpoint cannot restore. Restart it with --disable-custom-all-reduce"
        )
    environ = read_environ(workers[0].pid) or {}
    if environ.get("VLLM_ALLREDUCE_USE_SYMM_MEM") != "0":
        reasons.append(
            f"VLLM_ALLREDUCE_USE_SYMM_MEM is {environ.get('VLLM_ALLREDUCE_USE_SYMM_MEM', 'unset (default 1)')}: "
            "symmetric-memory all-reduce cannot be restored. Restart the server with VLLM_ALLREDUCE_USE_SYMM_MEM=0"
        )
    if environ.get("VLLM_ALLREDUCE_USE_FLASHINFER", "0") != "0":
        reasons.append(
            "VLLM_ALLREDUCE_USE_FLASHINFER is not 0: FlashInfer all-reduce uses CUDA IPC memory. "
            "Restart the server with VLLM_ALLREDUCE_USE_FLASHINFER=0"
        )
    return reasons


def cgroup_available_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory the container's cgroup still allows (v2, then v1); None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit != "max":
            return int(limit) - int((root / "memory.current").read_text())
        return None
    except (OSError, ValueError):
        pass
    try:
        limit_v1 = int((root / "memory" / "memory.limit_in_bytes").read_text())
        if limit_v1 < 2**60:
            return limit_v1 - int((root / "memory" / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):
        pass
    return None


def memory_to_copy_mib(gpus: GpuReading, cuda_pids: list[int]) -> int:
    """GPU memory a checkpoint will copy to host RAM: the processes' own use where NVML sees them
    (they match the server's PIDs), else everything in use on every GPU (an upper bound)."""
    own = [gpus.pids_mib[pid] for pid in cuda_pids if pid in gpus.pids_mib]
    if own:
        return sum(own)
    return sum(gpu.used_mib for gpu in gpus.gpus)


def host_memory_refusals(to_copy_mib: int, available_mib: int, margin_mib: int) -> list[str]:
    if to_copy_mib + margin_mib <= available_mib:
        return []
    return [
        f"host RAM cannot hold the GPU memory to be checkpointed: {to_copy_mib} MiB to copy + {margin_mib} MiB "
        f"margin, {available_mib} MiB available. Free host memory, raise the container's memory limit, or "
        "lower --gpu-memory-utilization (or --force to try anyway)"
    ]


def restore_refusals(
    record: SuspendRecord | None, now: GpuReading, margin_mib: int, restore_only: bool = False
) -> list[str]:
    """Refuse a restore that would run out of GPU memory (a failed restore leaves the workers stuck).

    restore_only: the resume waits, locked, before vLLM wakes up (a swap's resume, OverlapHooks.room_made),
    so only what the restore itself brings back must fit now, where the record knows it."""
    if record is None or not record.gpus or not now.gpus:
        return []
    current = now.by_uuid()
    need = record.restore_need_mib() if restore_only else {}
    reasons = []
    for gpu in record.gpus:
        if gpu.released_mib == 0:
            continue
        needed_mib = need.get(gpu.uuid, gpu.released_mib)
        present = current.get(gpu.uuid)
        if present is None:
            reasons.append(
                f"GPU {gpu.index} ({gpu.uuid}), which held {gpu.released_mib} MiB of the server, "
                "is not visible now: make it visible to the container again"
            )
        elif present.free_mib < needed_mib + margin_mib:
            reasons.append(
                f"GPU {present.index} has {present.free_mib} MiB free but the restore needs {needed_mib} MiB "
                f"(+{margin_mib} margin): another process took it while suspended; free "
                f"{needed_mib + margin_mib - present.free_mib} MiB on that GPU, then resume"
            )
    return reasons


def own_proc_status(path: Path = Path("/proc/self/status")) -> str:
    """This process's /proc status (capabilities, seccomp); empty where it cannot be read."""
    try:
        return path.read_text()
    except OSError:
        return ""


def ptrace_capability_refusals(proc_status: str) -> list[str]:
    """Refuse where SYS_PTRACE is missing from this process's bounding set: a container started without
    `cap_add: [SYS_PTRACE]` (Docker's default set drops it), in which no process can have it, and
    cuda-checkpoint cannot act on the server's processes. A user without root on a host keeps it in the
    bounding set (only the effective set is empty), so this refuses nothing there."""
    match = re.search(r"^CapBnd:\s*([0-9a-fA-F]+)\s*$", proc_status, re.M)
    if match is None or int(match.group(1), 16) >> CAP_SYS_PTRACE & 1:
        return []
    return [
        "this container lacks the SYS_PTRACE capability, which cuda-checkpoint needs to act on the server's "
        "processes: add `cap_add: [SYS_PTRACE]` and `security_opt: [seccomp=unconfined]` to the service in "
        "docker-compose.yml (docker run: --cap-add SYS_PTRACE --security-opt seccomp=unconfined) and recreate "
        "the container"
    ]
