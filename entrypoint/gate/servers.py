"""The model servers of GATE_MODELS, one by one: where each runs (its run directory, its PID), what the gate
counts of it, whether a suspended one can come back, and whether the suspended ones fit in host RAM."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from loguru import logger

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..base.processes import same_process
from ..cuda.gpus import GpuReading, read_gpus
from ..server.discovery import supervisor_program_pid
from ..suspend.observe import host_available_mib
from ..suspend.records import SuspendRecord
from .config import GateConfig, ModelEntry
from .control import PowerController


def run_dir_of(base: str, model: ModelEntry) -> str:
    """The default model keeps the library's own run directory (`make suspend` acts on it); the others get
    one each below it, so that no two servers share a suspend record or a lock."""
    return base if model.default else str(Path(base) / "models" / model.name)


def listening_pid(port: int) -> int | None:
    """The process that listens on `port` (vLLM's API server, the root of its tree); None if none does."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    pids = {
        conn.pid
        for conn in connections
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid
    }
    for pid in sorted(pids):
        try:
            if psutil.Process(pid).ppid() not in pids:  # the topmost, if a child shares the socket
                return pid
        except psutil.NoSuchProcess:
            continue
    return None


def server_pid(entry: ModelEntry, config: Config) -> int:
    """Its supervisord program's PID when supervisord runs it, else the process on its port."""
    pid = supervisor_program_pid(config.supervisor_url, entry.program)
    if pid is None:
        pid = listening_pid(entry.port)
    if pid is None:
        raise ToolError(
            f"no server of model {entry.name} found: supervisord has no program {entry.program!r} and no "
            f"process listens on port {entry.port}",
            ExitCode.SERVER_NOT_FOUND,
        )
    return pid


def host_ram_refusal(models: tuple[ModelEntry, ...], gpus: GpuReading, available_mib: int, margin_mib: int) -> str:
    """Why the suspended servers could not all fit in host RAM ('' when they can). Pure.

    At worst every server but the smallest is suspended, and a suspend copies up to the server's whole
    share of every GPU to host RAM (the plain suspend; the hybrid one copies less).
    """
    gpu_mib = sum(gpu.total_mib for gpu in gpus.gpus)
    shares = sorted(model.share for model in models)
    needed_mib = int(sum(shares[1:]) * gpu_mib)
    if len(models) < 2 or needed_mib + margin_mib <= available_mib:
        return ""
    return (
        f"GATE_MODELS cannot be served: with every model but the smallest suspended, host RAM must hold up to "
        f"{needed_mib} MiB (their memory shares of the {gpu_mib} MiB of {len(gpus.gpus)} GPU(s)) + {margin_mib} MiB "
        f"margin, and {available_mib} MiB is available. Lower the memory shares in GATE_MODELS, serve fewer "
        "models, or give the container more host RAM (or set CUDA_TOGGLE_HOST_RAM_MIB if the figure is wrong)"
    )


def check_host_ram(gate: GateConfig, toggle_config: Config) -> None:
    """Refuse (exit 2) a GATE_MODELS whose suspended servers cannot fit in host RAM."""
    if len(gate.models) < 2:
        return
    gpus = read_gpus(toggle_config)
    if not gpus.gpus:
        logger.warning("GPU memory unknown ({}): host RAM for GATE_MODELS not checked at start", gpus.problem)
        return
    refusal = host_ram_refusal(gate.models, gpus, host_available_mib(toggle_config), toggle_config.ram_margin_mib)
    if refusal:
        raise ToolError(refusal, ExitCode.USAGE)


@dataclass
class ModelStats:
    swaps: int = 0  # swaps that brought this model in (a resume, after suspending others if needed)
    swap_seconds: float = 0.0
    last_swap_s: float | None = None
    last_swap_steps: dict[str, dict[str, float]] = field(default_factory=dict)  # transition -> phase -> s
    # How the last swap made room: "overlapped: restore at once" (the target's restore fitted beside the
    # resident servers), "overlapped: restore after sleep" (it began once the victims' sleep freed their
    # memory), "serial" (it waited for their suspends), "nothing in the way".
    last_swap_path: str = ""
    failed_swaps: int = 0
    waited_requests: int = 0
    waited_seconds: float = 0.0
    last_used: float = 0.0  # time.monotonic() of its last request


@dataclass
class ModelServer:
    entry: ModelEntry
    upstream: str
    controller: PowerController
    stats: ModelStats = field(default_factory=ModelStats)
    # Requests waiting for this model's swap, oldest first: (arrival, future set when they may go).
    tickets: list[tuple[float, asyncio.Future[None]]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.entry.name


def server_pids(server: ModelServer) -> list[int]:
    """The PIDs of the server's process tree (its root and every descendant); empty when it is not found."""
    try:
        pid = server.controller.find_pid()
        if pid is None:
            return []
        root = psutil.Process(pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]
    except (psutil.Error, ToolError):
        return []


def suspend_record_of(server: ModelServer) -> SuspendRecord | None:
    """The suspended server's record (what its restore brings back: checkpoint_mib); None unless exactly one."""
    records = SuspendRecord.load_all(server.controller.toggle_config.run_dir)
    return records[0] if len(records) == 1 else None


def why_it_cannot_come_back(server: ModelServer) -> str:
    """Why the suspended `server` cannot be resumed ('' when it can, as far as can be seen without touching it):
    no server of the model is found, or a process its suspend moved has died since. A swap checks this before
    it evicts anyone, so that a healthy resident server is never suspended for a target that cannot come back.
    Runs in a worker thread (reads processes and supervisord)."""
    try:
        server.controller.find_pid()
    except ToolError as failure:
        return failure.message
    for record in SuspendRecord.load_all(server.controller.toggle_config.run_dir):
        if not record.instance_alive():  # restarted meanwhile: the new instance is not suspended, nothing to resume
            return (
                f"the server suspended as {record.describe_instance()} is gone; requests go to the server supervisord "
                "runs now, once it answers"
            )
        dead = [f"PID {p.pid} ({p.title[:40]})" for p in record.cuda if not same_process(p.pid, p.create_time)]
        if dead:
            return (
                f"{', '.join(dead)} died while it was suspended: this server instance cannot serve again; supervisord "
                "restarts the program once vLLM exits (else: supervisorctl restart the model's program)"
            )
    return ""
