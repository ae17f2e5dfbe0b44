"""Configuration: read once from the environment into a frozen dataclass, by one pure function."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ExitCode, SuspendError

DEFAULT_MATCH = ("vllm.entrypoints.openai.api_server", "vllm serve")


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    help: str


# Every environment variable the tools read, with its default and meaning (shown by --help and `config`).
SETTINGS: dict[str, Setting] = {
    s.env: s
    for s in [
        Setting("CUDA_TOGGLE_BACKEND", "auto", "auto | cli | driver: how to talk to the CUDA driver"),
        Setting("CUDA_CHECKPOINT_BIN", "cuda-checkpoint", "the cuda-checkpoint binary (cli backend)"),
        Setting("CUDA_TOGGLE_LIBCUDA", "libcuda.so.1", "the CUDA driver library (driver backend)"),
        Setting(
            "CUDA_TOGGLE_MATCH",
            ",".join(DEFAULT_MATCH),
            "comma-separated command-line substrings that find the server when supervisord cannot",
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
        ),
        Setting("CUDA_TOGGLE_WORKER", "VLLM::Worker", "title of the GPU worker processes"),
        Setting("CUDA_TOGGLE_VERIFY_ATTEMPTS", "50", "verify loop: state reads until all reach the target"),
        Setting("CUDA_TOGGLE_VERIFY_SLEEP_S", "0.2", "verify loop: seconds between reads"),
        Setting("CUDA_TOGGLE_LOCK_TIMEOUT_MS", "500", "timeout of one lock round (ms)"),
        Setting("CUDA_TOGGLE_LOCK_DEADLINE_S", "60", "give up locking (and roll back) after this many s"),
        Setting("CUDA_TOGGLE_OP_TIMEOUT_S", "1800", "timeout of one checkpoint or restore call (s)"),
        Setting("CUDA_TOGGLE_STATE_TIMEOUT_S", "15", "timeout of one get-state / unlock call (s)"),
        Setting("CUDA_TOGGLE_RUN_DIR", "/run/cuda-toggle-all", "lock file and suspend record"),
        Setting("CUDA_TOGGLE_BUSY_WAIT_S", "5", "how long a second cuda-toggle-all waits for the lock"),
        Setting("CUDA_TOGGLE_GPU_QUERY", "auto", "auto | nvml | nvidia-smi | none: GPU memory figures"),
        Setting("CUDA_TOGGLE_NVIDIA_SMI", "nvidia-smi", "the nvidia-smi binary (fallback to NVML)"),
        Setting("CUDA_TOGGLE_RAM_MARGIN_MIB", "2048", "host RAM kept free beyond the checkpointed memory"),
        Setting(
            "CUDA_TOGGLE_HOST_RAM_MIB",
            "",
            "host RAM available for checkpoints, instead of the measured MemAvailable (for VMs whose memory"
            " grows on demand and so reads low)",
        ),
        Setting("CUDA_TOGGLE_RESTORE_MARGIN_MIB", "256", "GPU memory kept free beyond what a restore needs"),
        Setting(
            "CUDA_TOGGLE_MODE",
            "auto",
            "plain | hybrid | auto: hybrid first puts vLLM to sleep (level 1: weights to host RAM, KV cache"
            " dropped) and checkpoints only what remains; auto = hybrid when the server has sleep mode",
        ),
        Setting(
            "CUDA_TOGGLE_SERVER_URL",
            "",
            "the vLLM server's own HTTP address for sleep mode (default: --host/--port of its command line)",
        ),
        Setting(
            "CUDA_TOGGLE_QUIESCE",
            "auto",
            "auto | scheduler | sigstop | none: what holds the requests while suspended. scheduler = vLLM's own"
            " /pause or /sleep with mode=keep (vLLM >= 0.17, VLLM_SERVER_DEV_MODE=1); sigstop = freeze the"
            " dispatcher (older vLLM, TP >= 2 only); auto = scheduler when the server has it, else sigstop",
        ),
        Setting(
            "CUDA_TOGGLE_RESIDUAL_MIB",
            "256",
            "GPU memory a GPU of the server may still hold after a suspend for it to count as released (raise it"
            " on a GPU shared with processes the tool cannot see)",
        ),
        Setting("CUDA_TOGGLE_SLEEP_TIMEOUT_S", "600", "timeout of vLLM's /sleep and /wake_up calls (s)"),
        Setting("CUDA_TOGGLE_PROGRESS_S", "5", "seconds between progress lines during long phases"),
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
        rows = []
        for env, setting in SETTINGS.items():
            value = self.sources.get(env, setting.default)
            rows.append((env, value, "environment" if env in self.sources else "default"))
        return rows


def _choice(env: str, value: str, choices: tuple[str, ...]) -> str:
    value = value.strip().lower()
    if value not in choices:
        raise SuspendError(f"{env}={value!r} is not one of {', '.join(choices)}: fix or unset it", ExitCode.USAGE)
    return value


def _number(env: str, value: str, kind: type, minimum: float) -> float:
    try:
        number = kind(value)
    except ValueError:
        raise SuspendError(f"{env}={value!r} is not a {kind.__name__}: fix or unset it", ExitCode.USAGE)
    if number < minimum:
        raise SuspendError(f"{env}={value!r} must be at least {minimum}: fix or unset it", ExitCode.USAGE)
    return number


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Parse the environment (os.environ by default) into a Config; a bad value raises SuspendError."""
    environ = os.environ if environ is None else environ
    sources = {env: environ[env] for env in SETTINGS if environ.get(env, "") != ""}

    def get(env: str) -> str:
        return sources.get(env, SETTINGS[env].default)

    return Config(
        backend=_choice("CUDA_TOGGLE_BACKEND", get("CUDA_TOGGLE_BACKEND"), ("auto", "cli", "driver")),
        cuda_checkpoint_bin=get("CUDA_CHECKPOINT_BIN"),
        libcuda=get("CUDA_TOGGLE_LIBCUDA"),
        match=_list(get("CUDA_TOGGLE_MATCH")),
        supervisor_url=get("CUDA_TOGGLE_SUPERVISOR_URL"),
        program=get("CUDA_TOGGLE_PROGRAM"),
        dispatcher=_list(get("CUDA_TOGGLE_DISPATCHER")),
        worker=get("CUDA_TOGGLE_WORKER"),
        verify_attempts=int(_number("CUDA_TOGGLE_VERIFY_ATTEMPTS", get("CUDA_TOGGLE_VERIFY_ATTEMPTS"), int, 1)),
        verify_sleep_s=_number("CUDA_TOGGLE_VERIFY_SLEEP_S", get("CUDA_TOGGLE_VERIFY_SLEEP_S"), float, 0),
        lock_timeout_ms=int(_number("CUDA_TOGGLE_LOCK_TIMEOUT_MS", get("CUDA_TOGGLE_LOCK_TIMEOUT_MS"), int, 1)),
        lock_deadline_s=_number("CUDA_TOGGLE_LOCK_DEADLINE_S", get("CUDA_TOGGLE_LOCK_DEADLINE_S"), float, 0),
        op_timeout_s=_number("CUDA_TOGGLE_OP_TIMEOUT_S", get("CUDA_TOGGLE_OP_TIMEOUT_S"), float, 0.1),
        state_timeout_s=_number("CUDA_TOGGLE_STATE_TIMEOUT_S", get("CUDA_TOGGLE_STATE_TIMEOUT_S"), float, 0.1),
        run_dir=get("CUDA_TOGGLE_RUN_DIR"),
        busy_wait_s=_number("CUDA_TOGGLE_BUSY_WAIT_S", get("CUDA_TOGGLE_BUSY_WAIT_S"), float, 0),
        gpu_query=_choice(
            "CUDA_TOGGLE_GPU_QUERY", get("CUDA_TOGGLE_GPU_QUERY"), ("auto", "nvml", "nvidia-smi", "none")
        ),
        nvidia_smi=get("CUDA_TOGGLE_NVIDIA_SMI"),
        ram_margin_mib=int(_number("CUDA_TOGGLE_RAM_MARGIN_MIB", get("CUDA_TOGGLE_RAM_MARGIN_MIB"), int, 0)),
        host_ram_mib=int(_number("CUDA_TOGGLE_HOST_RAM_MIB", get("CUDA_TOGGLE_HOST_RAM_MIB"), int, 1))
        if get("CUDA_TOGGLE_HOST_RAM_MIB")
        else None,
        restore_margin_mib=int(
            _number("CUDA_TOGGLE_RESTORE_MARGIN_MIB", get("CUDA_TOGGLE_RESTORE_MARGIN_MIB"), int, 0)
        ),
        mode=_choice("CUDA_TOGGLE_MODE", get("CUDA_TOGGLE_MODE"), ("auto", "plain", "hybrid")),
        quiesce=_choice("CUDA_TOGGLE_QUIESCE", get("CUDA_TOGGLE_QUIESCE"), ("auto", "scheduler", "sigstop", "none")),
        residual_mib=int(_number("CUDA_TOGGLE_RESIDUAL_MIB", get("CUDA_TOGGLE_RESIDUAL_MIB"), int, 0)),
        server_url=get("CUDA_TOGGLE_SERVER_URL"),
        sleep_timeout_s=_number("CUDA_TOGGLE_SLEEP_TIMEOUT_S", get("CUDA_TOGGLE_SLEEP_TIMEOUT_S"), float, 1),
        progress_s=_number("CUDA_TOGGLE_PROGRESS_S", get("CUDA_TOGGLE_PROGRESS_S"), float, 0.1),
        sources=sources,
    )


def settings_help() -> str:
    lines = ["\b", "Environment variables (default):"]
    for setting in SETTINGS.values():
        lines.append(f"  {setting.env} ({setting.default})")
        lines.append(f"      {setting.help}")
    return "\n".join(lines)
