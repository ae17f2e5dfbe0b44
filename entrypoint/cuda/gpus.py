"""GPU memory figures, from NVML (nvidia-ml-py: no CUDA context) or from nvidia-smi."""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass, field

from ..base.config import Config


@dataclass(frozen=True)
class GpuMemory:
    index: int
    uuid: str
    used_mib: int
    total_mib: int

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.used_mib


@dataclass(frozen=True)
class GpuReading:
    source: str  # "nvml", "nvidia-smi" or "none"
    gpus: tuple[GpuMemory, ...] = ()
    problem: str = ""  # why there are no figures, when there are none
    pids_mib: dict[int, int] = field(default_factory=dict)  # per-process use, where NVML can see it

    def by_uuid(self) -> dict[str, GpuMemory]:
        return {gpu.uuid: gpu for gpu in self.gpus}

    def to_json(self) -> list[dict]:
        return [asdict(gpu) for gpu in self.gpus]

    def summary(self) -> str:
        if not self.gpus:
            return f"GPU memory unknown ({self.problem or self.source})"
        return ", ".join(f"GPU{gpu.index} {gpu.used_mib}/{gpu.total_mib} MiB" for gpu in self.gpus)


def _query_nvml() -> GpuReading:
    import pynvml

    pynvml.nvmlInit()
    try:
        gpus = []
        pids_mib: dict[int, int] = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            try:  # v2 reports the driver's reserved memory apart from `used`, as nvidia-smi does
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
            except (TypeError, AttributeError, pynvml.NVMLError):
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuMemory(index, uuid, memory.used // 2**20, memory.total // 2**20))
            try:
                for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if process.usedGpuMemory is not None:
                        pids_mib[process.pid] = pids_mib.get(process.pid, 0) + process.usedGpuMemory // 2**20
            except pynvml.NVMLError:
                pass
        return GpuReading("nvml", tuple(gpus), pids_mib=pids_mib)
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi_rows(binary: str, query: str) -> list[list[str]]:
    """nvidia-smi's answer to one `--query-...=fields` as rows of stripped fields (blank lines dropped)."""
    done = subprocess.run(
        [binary, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=True
    )
    return [[part.strip() for part in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def _query_nvidia_smi(binary: str) -> GpuReading:
    gpus = [
        GpuMemory(int(index), uuid, int(float(used)), int(float(total)))
        for index, uuid, used, total in _nvidia_smi_rows(binary, "--query-gpu=index,uuid,memory.used,memory.total")
    ]
    return GpuReading("nvidia-smi", tuple(gpus), pids_mib=_compute_apps_mib(binary))


def _compute_apps_mib(binary: str) -> dict[int, int]:
    """Each process's GPU memory as nvidia-smi lists it; empty when it lists none or cannot say.

    Inside a container's PID namespace nvidia-smi may list the host's PIDs, which match none of the server's:
    the proof then falls back to the whole GPU's figure (see suspend/proof.py). Which one applies is read at run time.
    """
    try:
        rows = _nvidia_smi_rows(binary, "--query-compute-apps=pid,used_memory")
    except (OSError, subprocess.SubprocessError):
        return {}
    pids_mib: dict[int, int] = {}
    for parts in rows:
        if len(parts) != 2:
            continue
        try:
            pid, mib = int(parts[0]), int(float(parts[1]))
        except ValueError:
            continue
        pids_mib[pid] = pids_mib.get(pid, 0) + mib
    return pids_mib


def read_gpus(config: Config) -> GpuReading:
    """Memory of every GPU; GpuReading('none', problem=...) when neither source answers."""
    problems = []
    if config.gpu_query in ("auto", "nvml"):
        try:
            return _query_nvml()
        except Exception as error:  # NVML raises its own error types, and ImportError without the package
            problems.append(f"NVML: {error}")
    if config.gpu_query in ("auto", "nvidia-smi"):
        try:
            return _query_nvidia_smi(config.nvidia_smi)
        except (OSError, subprocess.SubprocessError, ValueError) as error:
            problems.append(f"nvidia-smi: {error}")
    if config.gpu_query == "none":
        problems.append("CUDA_TOGGLE_GPU_QUERY=none")
    return GpuReading("none", problem="; ".join(problems))
