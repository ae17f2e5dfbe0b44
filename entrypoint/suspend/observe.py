"""What a server is now: its process tree, every CUDA state, GPU memory, what its endpoints answer, and
its suspend record. Reads only; nothing here changes the server."""

from __future__ import annotations

import psutil
from loguru import logger

from ..base.config import Config
from ..base.processes import describe, walk_tree
from ..cuda.backend import Backend
from ..cuda.gpus import read_gpus
from ..server.discovery import find_server
from ..server.vllm_control import VllmControl, server_url
from . import safety
from .executor import read_states
from .plan import Observation
from .records import SuspendRecord


def observe(config: Config, backend: Backend, pid: int | None, *, force: bool = False) -> Observation:
    """The server's tree, every CUDA state (stopped processes are never asked), GPU memory, and what its
    HTTP endpoints answer."""
    root = find_server(config, pid, force=force)
    tree = walk_tree(root.pid)
    for process in tree:
        if process.stopped and not process.matches(config.dispatcher):
            logger.warning(
                "PID {} ({}) is stopped: left out (a stopped process must never be locked)",
                process.pid,
                process.short_title(40),
            )
    answers, unreadable = read_states(config, backend, [p.pid for p in tree if not p.stopped])
    states = {pid: state for pid, state in answers.items() if state is not None}
    root_process = next(p for p in tree if p.pid == root.pid) if tree else describe(root.pid)
    control = VllmControl(server_url(root_process, config.server_url), config.sleep_timeout_s)
    frozen = any(process.stopped and process.matches(config.dispatcher) for process in tree)
    capabilities = control.capabilities(engine_frozen=frozen)
    return Observation(root.pid, root.how, tree, states, unreadable, read_gpus(config), capabilities)


def gpu_progress(config: Config):
    def line() -> str:
        return read_gpus(config).summary()

    return line


# the suspend record ---------------------------------------------------------------------------------------
def record_of(config: Config, obs: Observation) -> SuspendRecord | None:
    """This server instance's suspend record (root PID and create time); stale or malformed ones are ignored."""
    root = next((p for p in obs.tree if p.pid == obs.root_pid), None)
    if root is None:
        return None
    return SuspendRecord.load(config.run_dir, root.pid, root.create_time)


def host_available_mib(config: Config) -> int:
    """Host RAM available to the server's suspend (CUDA_TOGGLE_HOST_RAM_MIB, else the free RAM within the
    container's cgroup limit)."""
    if config.host_ram_mib is not None:
        return config.host_ram_mib
    available = psutil.virtual_memory().available
    limit = safety.cgroup_available_bytes()
    if limit is not None:
        available = min(available, limit)
    return available // 2**20
