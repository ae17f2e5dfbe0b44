"""Configuration: read once from the environment into a frozen dataclass, by one pure function."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from .settings import DAY_S, Setting, describe, parse_settings
from .settings import settings_help as help_table

DEFAULT_MATCH = ("vllm.entrypoints.openai.api_server", "vllm serve")
MAX_MIB = 2**24  # 16 TiB: more memory than any one host has


# Every environment variable the tools read: one Setting row each (shown by --help and `config`; the
# field of Config is the name without CUDA_TOGGLE_, lower-cased).
SETTINGS: dict[str, Setting] = {
    s.env: s
    for s in [
        Setting(
            "CUDA_TOGGLE_BACKEND",
            "auto",
            "how to talk to the CUDA driver",
            "choice",
            choices=("auto", "cli", "driver"),
        ),
        Setting("CUDA_CHECKPOINT_BIN", "cuda-checkpoint", "the cuda-checkpoint binary (cli backend)"),
        Setting("CUDA_TOGGLE_LIBCUDA", "libcuda.so.1", "the CUDA driver library (driver backend)"),
        Setting(
            "CUDA_TOGGLE_MATCH",
            ",".join(DEFAULT_MATCH),
            "comma-separated command-line substrings that find the server when supervisord cannot",
            "list",
        ),
        Setting(
            "CUDA_TOGGLE_SUPERVISOR_URL",
            "unix:///run/supervisor/supervisord.sock",
            "supervisord's XML-RPC socket",
        ),
        Setting("CUDA_TOGGLE_PROGRAM", "vllm", "the supervisord program that runs the server"),
        Setting(
            "CUDA_TOGGLE_DISPATCHER",
            "VLLM::EngineCore",
            "comma-separated titles of the processes that hand work to the workers: frozen (SIGSTOP) while suspended",
            "list",
        ),
        Setting("CUDA_TOGGLE_WORKER", "VLLM::Worker", "title of the GPU worker processes"),
        Setting(
            "CUDA_TOGGLE_VERIFY_ATTEMPTS",
            "50",
            "verify loop: state reads until all reach the target",
            "int",
            1,
            10_000,
        ),
        Setting("CUDA_TOGGLE_VERIFY_SLEEP_S", "0.2", "verify loop: seconds between reads", "float", 0, 60, "seconds"),
        Setting("CUDA_TOGGLE_LOCK_TIMEOUT_MS", "500", "timeout of one lock round", "int", 1, 600_000, "milliseconds"),
        Setting(
            "CUDA_TOGGLE_LOCK_DEADLINE_S",
            "60",
            "give up locking (and roll back) after this long",
            "float",
            0,
            DAY_S,
            "seconds",
        ),
        Setting(
            "CUDA_TOGGLE_OP_TIMEOUT_S",
            "1800",
            "timeout of one checkpoint or restore call",
            "float",
            0.1,
            DAY_S,
            "seconds",
        ),
        Setting(
            "CUDA_TOGGLE_STATE_TIMEOUT_S", "15", "timeout of one get-state / unlock call", "float", 0.1, 3600, "seconds"
        ),
        Setting("CUDA_TOGGLE_RUN_DIR", "/run/cuda-toggle-all", "lock file and suspend record"),
        Setting(
            "CUDA_TOGGLE_BUSY_WAIT_S",
            "5",
            "how long a second cuda-toggle-all waits for the lock",
            "float",
            0,
            3600,
            "seconds",
        ),
        Setting(
            "CUDA_TOGGLE_CONVERGE_WAIT_S",
            "600",
            "how long a cuda-toggle-all waits for another caller (the gate, say) reaching the same state, before"
            " it proves that state itself; a caller reaching the other state is waited for CUDA_TOGGLE_BUSY_WAIT_S",
            "float",
            0,
            DAY_S,
            "seconds",
        ),
        Setting(
            "CUDA_TOGGLE_GPU_QUERY",
            "auto",
            "where GPU memory figures come from",
            "choice",
            choices=("auto", "nvml", "nvidia-smi", "none"),
        ),
        Setting("CUDA_TOGGLE_NVIDIA_SMI", "nvidia-smi", "the nvidia-smi binary (fallback to NVML)"),
        Setting(
            "CUDA_TOGGLE_RAM_MARGIN_MIB",
            "2048",
            "host RAM kept free beyond the checkpointed memory",
            "int",
            0,
            MAX_MIB,
            "MiB",
        ),
        Setting(
            "CUDA_TOGGLE_HOST_RAM_MIB",
            "",
            "host RAM available for checkpoints, instead of the measured MemAvailable (for VMs whose memory"
            " grows on demand and so reads low)",
            "int",
            1,
            MAX_MIB,
            "MiB",
        ),
        Setting(
            "CUDA_TOGGLE_RESTORE_MARGIN_MIB",
            "256",
            "GPU memory kept free beyond what a restore needs",
            "int",
            0,
            MAX_MIB,
            "MiB",
        ),
        Setting(
            "CUDA_TOGGLE_MODE",
            "auto",
            "hybrid first puts vLLM to sleep (level 1: weights to host RAM, KV cache dropped) and checkpoints"
            " only what remains; plain checkpoints everything; auto = hybrid when the server has sleep mode",
            "choice",
            choices=("auto", "plain", "hybrid"),
        ),
        Setting(
            "CUDA_TOGGLE_SERVER_URL",
            "",
            "the vLLM server's own HTTP address for sleep mode (default: --host/--port of its command line)",
        ),
        Setting(
            "CUDA_TOGGLE_QUIESCE",
            "auto",
            "what holds the requests while suspended. scheduler = vLLM's own /pause or /sleep with mode=keep"
            " (vLLM >= 0.17, VLLM_SERVER_DEV_MODE=1); sigstop = freeze the dispatcher (older vLLM, TP >= 2 only);"
            " none = nothing; auto = scheduler when the server has it, else sigstop",
            "choice",
            choices=("auto", "scheduler", "sigstop", "none"),
        ),
        Setting(
            "CUDA_TOGGLE_RESIDUAL_MIB",
            "256",
            "GPU memory a GPU of the server may still hold after a suspend for it to count as released (raise it"
            " on a GPU shared with processes the tool cannot see)",
            "int",
            0,
            1048576,
            "MiB",
        ),
        Setting(
            "CUDA_TOGGLE_SLEEP_TIMEOUT_S",
            "600",
            "timeout of vLLM's /sleep and /wake_up calls",
            "float",
            1,
            DAY_S,
            "seconds",
        ),
        Setting(
            "CUDA_TOGGLE_PROGRESS_S",
            "5",
            "time between progress lines during long phases",
            "float",
            0.1,
            3600,
            "seconds",
        ),
    ]
}


@dataclass(frozen=True)
class Config:
    backend: str
    cuda_checkpoint_bin: str
    libcuda: str
    match: tuple[str, ...]
    supervisor_url: str
    program: str
    dispatcher: tuple[str, ...]
    worker: str
    verify_attempts: int
    verify_sleep_s: float
    lock_timeout_ms: int
    lock_deadline_s: float
    op_timeout_s: float
    state_timeout_s: float
    run_dir: str
    busy_wait_s: float
    converge_wait_s: float
    gpu_query: str
    nvidia_smi: str
    ram_margin_mib: int
    host_ram_mib: int | None
    restore_margin_mib: int
    mode: str
    quiesce: str
    residual_mib: int
    server_url: str
    sleep_timeout_s: float
    progress_s: float
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, value in force, where it came from) for every setting."""
        return describe(SETTINGS.values(), self.sources)


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Parse the environment (os.environ by default) into a Config; a bad value raises ToolError(USAGE)."""
    values, sources = parse_settings(SETTINGS.values(), os.environ if environ is None else environ)
    return Config(**values, sources=sources)


def settings_help() -> str:
    """The CUDA_TOGGLE_* variables for --help."""
    return help_table(SETTINGS.values())
