"""The pure planning layer: what the server is made of, and what a suspend will do to it, or why not.

Nothing here acts or reads the system: it takes an observation (the process tree, every CUDA state,
GPU memory, what the server's HTTP endpoints answered) and returns a plan or the reasons to refuse.

Roles come from facts, not titles: every process of the server's tree that has a CUDA context is
checkpointed, whatever it is called; a process is a *model holder* when it holds GPU memory (per-process
figures, where the GPU query can see the server's PIDs) or when it is a leaf of the tree's CUDA processes
(vLLM's workers at TP>=2, EngineCore itself at TP=1, where it has no workers). A model holder is never
stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..base.processes import ProcessInfo
from ..cuda.gpus import GpuReading
from ..server.vllm_control import Capabilities
from . import safety

QUIESCE_CHOICES = ("auto", "scheduler", "sigstop", "none")
MODE_CHOICES = ("auto", "plain", "hybrid")


@dataclass
class Observation:
    """What the server looks like right now: its tree, who is stopped, and every CUDA state."""

    root_pid: int
    root_how: str
    tree: list[ProcessInfo]
    states: dict[int, str]  # CUDA processes (not stopped) -> state
    unreadable: dict[int, str]  # PIDs whose state could not be read -> error
    gpus: GpuReading
    capabilities: Capabilities

    def title(self, pid: int) -> str:
        return next((p.title for p in self.tree if p.pid == pid), "?")

    def process(self, pid: int) -> ProcessInfo:
        return next(p for p in self.tree if p.pid == pid)

    @property
    def stopped(self) -> list[ProcessInfo]:
        return [p for p in self.tree if p.stopped]


def model_holders(obs: Observation) -> list[int]:
    """The CUDA processes that hold (or may hold) the model's GPU memory: those the per-process figures show
    holding memory, and the leaves of the tree's CUDA processes (the figures can miss processes: a PID
    namespace, a GPU the query does not list). A process that may hold memory is never frozen."""
    cuda = set(obs.states) | {p.pid for p in obs.stopped if p.pid in obs.gpus.pids_mib}
    listed = {pid for pid, mib in obs.gpus.pids_mib.items() if pid in cuda and mib > 0}
    parents = {p.pid: p.ppid for p in obs.tree}
    has_cuda_descendant = set()
    for pid in cuda:
        parent = parents.get(pid)
        while parent in parents:
            has_cuda_descendant.add(parent)
            parent = parents.get(parent)
    return sorted(listed | {pid for pid in cuda if pid not in has_cuda_descendant})


def dispatcher_candidates(obs: Observation, titles: tuple[str, ...], holders: list[int]) -> list[ProcessInfo]:
    """Processes that hand work to the model holders and hold no GPU memory themselves: the only ones that
    may be frozen (SIGSTOP). Titled like vLLM's EngineCore, an ancestor of every holder, not a holder."""
    parents = {p.pid: p.ppid for p in obs.tree}

    def ancestors(pid: int) -> set[int]:
        found = set()
        parent = parents.get(pid)
        while parent in parents:
            found.add(parent)
            parent = parents.get(parent)
        return found

    if not holders:
        return []
    common = set.intersection(*(ancestors(pid) for pid in holders))
    return [p for p in obs.tree if p.matches(titles) and p.pid in common and p.pid not in holders]


@dataclass
class SuspendPlan:
    quiesce: str  # scheduler | sigstop | none
    mode: str  # plain | hybrid
    checkpoint: list[int]  # every CUDA process to lock and checkpoint
    holders: list[int]
    freeze: list[ProcessInfo] = field(default_factory=list)  # sigstop only
    mode_fallback: bool = False  # mode was auto: a hybrid whose sleep fails may go on plain
    refusals: list[str] = field(default_factory=list)  # going on needs --force
    blockers: list[str] = field(default_factory=list)  # cannot go on, even with --force
    notes: list[str] = field(default_factory=list)


def _choose_quiesce(
    obs: Observation, requested: str, mode: str, dispatchers: list[ProcessInfo], holders: list[int]
) -> tuple[str, list[str]]:
    """(quiesce path, blockers). The scheduler pause is preferred: nothing is stopped, requests are kept."""
    caps = obs.capabilities
    scheduler_ok = caps.pause if mode == "plain" else (caps.sleep and caps.sleep_pauses_scheduler)
    if mode == "auto":
        scheduler_ok = caps.pause or (caps.sleep and caps.sleep_pauses_scheduler)
    frozen_holders = [pid for pid in holders if any(p.pid == pid for p in obs.stopped)]
    if frozen_holders:
        return "none", [
            f"PID {frozen_holders} holds GPU memory and is stopped (SIGSTOP): a stopped process must never be "
            "locked; continue it (kill -CONT) or restart the server"
        ]
    if requested in ("auto", "scheduler") and scheduler_ok:
        return "scheduler", []
    if requested == "scheduler":
        return "scheduler", [
            f"--quiesce scheduler, but {caps.url} has no scheduler pause (/is_paused did not answer"
            + (f"; vLLM {caps.version}" if caps.version else "")
            + "): start vLLM >= 0.17 with VLLM_SERVER_DEV_MODE=1 (behind the gate), or use --quiesce sigstop"
        ]
    if requested == "none":
        return "none", []
    if dispatchers:
        return "sigstop", []
    why = (
        "it holds the model itself (no workers: tensor parallel size 1)"
        if holders and all(obs.process(pid).matches(("VLLM::EngineCore",)) for pid in holders)
        else "no process that hands work to the GPU processes holds no GPU memory itself"
    )
    return "none", [
        f"nothing can hold the requests while the GPU state is away: {caps.url} has no scheduler pause "
        f"(/pause, vLLM >= 0.17 with VLLM_SERVER_DEV_MODE=1), and the dispatcher cannot be frozen instead: {why}. "
        "A request that reached a checkpointed process would kill the server. Fix: run vLLM >= 0.17 with "
        "VLLM_SERVER_DEV_MODE=1 on a loopback address behind the gate (the image's default); or, at tensor "
        "parallel size >= 2, set CUDA_TOGGLE_DISPATCHER to the title of the process that hands work to the "
        "GPU processes; or --quiesce none if nothing can send the server work while suspended"
    ]


def _choose_mode(obs: Observation, requested: str, quiesce: str) -> tuple[str, list[str]]:
    caps = obs.capabilities
    hybrid_ok = caps.sleep and caps.sleep_pauses_scheduler and quiesce == "scheduler"
    if requested == "plain":
        return "plain", []
    if requested == "hybrid" and not hybrid_ok:
        reason = (
            f"{caps.url} has no sleep mode (/is_sleeping did not answer): start vLLM with --enable-sleep-mode "
            "and VLLM_SERVER_DEV_MODE=1"
            if not caps.sleep
            else f"vLLM {caps.version or '(version unknown)'} sleeps without pausing its scheduler (that came with "
            "vLLM 0.17): a request during its sleep crashes the engine"
            if not caps.sleep_pauses_scheduler
            else f"the requests are held by --quiesce {quiesce}, and a sleeping server must be paused by vLLM itself"
        )
        return "hybrid", [f"--mode hybrid, but {reason}; use --mode plain"]
    return ("hybrid" if hybrid_ok else "plain"), []


def plan_suspend(
    obs: Observation,
    *,
    quiesce: str,
    mode: str,
    dispatcher_titles: tuple[str, ...],
    read_environ: Callable[[int], Mapping[str, str] | None],
    host_available_mib: int | None,
    ram_margin_mib: int,
    record_mode: str | None = None,
    proc_status: str = "",
) -> SuspendPlan:
    """What a suspend does to this server, or why it must not (refusals) or cannot (blockers).
    proc_status: the caller's /proc/self/status, for the container's capabilities."""
    holders = model_holders(obs)
    dispatchers = dispatcher_candidates(obs, dispatcher_titles, holders)
    if all(state == "checkpointed" for state in obs.states.values()) and obs.states:
        # Already suspended (by an earlier run): nothing to decide; keep what that run chose.
        return SuspendPlan("none", record_mode or "plain", sorted(obs.states), holders)
    chosen_quiesce, blockers = _choose_quiesce(obs, quiesce, mode, dispatchers, holders)
    chosen_mode, mode_blockers = _choose_mode(obs, mode, chosen_quiesce)
    blockers += mode_blockers
    freeze = dispatchers if chosen_quiesce == "sigstop" else []
    frozen_pids = {p.pid for p in freeze}
    checkpoint = sorted(pid for pid in obs.states if pid not in frozen_pids)
    plan = SuspendPlan(chosen_quiesce, chosen_mode, checkpoint, holders, freeze, blockers=blockers)
    plan.mode_fallback = mode == "auto" and obs.capabilities.pause
    if not checkpoint:
        return plan
    stuck = [pid for pid in checkpoint if obs.states[pid] == "failed"]
    if stuck:
        plan.blockers.append(
            f"PID {stuck} is in CUDA state `failed` (a failed restore cannot be undone): restart the server"
        )
    plan.refusals += [
        f"cannot read the CUDA state of PID {pid} ({obs.title(pid)[:40]}): {error}; the container needs "
        "SYS_PTRACE and seccomp=unconfined, and the tool must run as root"
        for pid, error in obs.unreadable.items()
    ]
    plan.refusals += safety.ptrace_capability_refusals(proc_status)
    holder_processes = [obs.process(pid) for pid in holders]
    plan.refusals += safety.nccl_refusals(holder_processes, read_environ)
    plan.refusals += safety.vllm_all_reduce_refusals(obs.tree, holder_processes, read_environ)
    if not obs.gpus.gpus:
        plan.refusals.append(
            f"cannot read GPU memory ({obs.gpus.problem or 'no GPUs listed'}), so the suspend could not be "
            "proven: install nvidia-ml-py or nvidia-smi in the container (or --force to go on unproven)"
        )
    to_copy = [pid for pid in checkpoint if obs.states[pid] != "checkpointed"]
    if obs.gpus.gpus and to_copy and host_available_mib is not None:
        plan.refusals += safety.host_memory_refusals(
            safety.memory_to_copy_mib(obs.gpus, to_copy), host_available_mib, ram_margin_mib
        )
    return plan
