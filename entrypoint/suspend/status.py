"""`cuda-toggle-all status` and `warm-up`: what every process of a server is, and one sleep/wake-up cycle
of a fresh server."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..base.results import ToggleResult
from ..cuda.choose import select_backend
from ..server.vllm_control import VllmControl, VllmControlError
from .api import RESUME
from .hold import Hold
from .light_sleep import asleep_since
from .observe import observe, record_of
from .plan import model_holders
from .quiesce import unquiesce_server, vllm_flags
from .records import ToolLock


# status -----------------------------------------------------------------------------------------------------
@dataclass
class StatusResult:
    root_pid: int
    root_how: str
    backend: str
    state: str  # running | checkpointed | locked | mixed | none
    pids: list[dict] = field(default_factory=list)  # {pid, name, role, state, gpu_mib}
    dispatchers: list[dict] = field(default_factory=list)  # {pid, name, frozen}
    skipped: list[dict] = field(default_factory=list)
    gpus: list[dict] = field(default_factory=list)
    gpu_source: str = ""
    server: dict = field(default_factory=dict)  # what the server's endpoints answered
    vllm: dict = field(default_factory=dict)  # is_paused, is_sleeping
    suspend_record: dict | None = None
    hold: dict | None = None  # the operator's hold (suspend/hold.py), None when not held
    asleep_since: float | None = None  # the gate's light sleep (suspend/light_sleep.py), None when not asleep

    def to_json(self) -> dict:
        return asdict(self)


def status(
    config: Config, *, pid: int | None = None, backend_name: str | None = None, force: bool = False
) -> StatusResult:
    """What every process of the server is, whether anything is frozen or paused, and the GPUs' memory.
    A --pid that is no vLLM server's root (PID 1, whose tree is every process) is refused unless `force`."""
    backend = select_backend(config, backend_name)
    obs = observe(config, backend, pid, force=force)
    holders = set(model_holders(obs))
    frozen = [p for p in obs.stopped if p.matches(config.dispatcher)]
    pids = []
    for process in obs.tree:
        if process.pid in obs.states:
            role = "model" if process.pid in holders else "context"
            state = obs.states[process.pid]
        elif process.pid in obs.unreadable:
            role, state = "unknown", f"error: {obs.unreadable[process.pid]}"
        else:
            continue
        pids.append(
            {
                "pid": process.pid,
                "name": process.title,
                "role": role,
                "state": state,
                "gpu_mib": obs.gpus.pids_mib.get(process.pid),
            }
        )
    distinct = {entry["state"] for entry in pids}
    overall = distinct.pop() if len(distinct) == 1 else ("none" if not distinct else "mixed")
    record = record_of(config, obs)
    control = VllmControl(obs.capabilities.url, config.sleep_timeout_s)
    return StatusResult(
        root_pid=obs.root_pid,
        root_how=obs.root_how,
        backend=backend.name,
        state=overall,
        pids=pids,
        dispatchers=[{"pid": p.pid, "name": p.title, "frozen": True} for p in frozen],
        skipped=[{"pid": p.pid, "name": p.title, "reason": "stopped"} for p in obs.stopped if p not in frozen],
        gpus=obs.gpus.to_json(),
        gpu_source=obs.gpus.source if obs.gpus.gpus else obs.gpus.problem,
        server=obs.capabilities.to_json(),
        vllm=vllm_flags(control, engine_frozen=bool(frozen)),
        suspend_record=asdict(record) if record else None,
        hold=held.to_json() if (held := Hold.read(config.run_dir)) else None,
        asleep_since=asleep_since(config.run_dir),
    )


# warm-up ----------------------------------------------------------------------------------------------------
def warm_up(config: Config, *, pid: int | None = None, backend_name: str | None = None) -> dict:
    """One vLLM sleep/wake-up cycle on a fresh server, so that its first suspend is as fast as the later ones
    (vLLM's first sleep pins host memory for the weights: 5.3 s against 0.17 s later, measured on an H200).

    Done once per server instance (a marker in CUDA_TOGGLE_RUN_DIR); requests meanwhile are held by vLLM
    (mode=keep), not lost. Servers without a sleep that pauses the scheduler are left alone.
    """
    with ToolLock(config.run_dir, config.busy_wait_s, purpose="cuda-toggle-all warm-up"):
        backend = select_backend(config, backend_name)
        obs = observe(config, backend, pid)
        root = obs.process(obs.root_pid)
        marker = Path(config.run_dir) / f"warmed-{obs.root_pid}-{root.create_time:.2f}"
        caps = obs.capabilities
        report: dict = {"root_pid": obs.root_pid, "server": caps.to_json()}
        if marker.exists():
            return {**report, "done": False, "reason": "this server was warmed up already"}
        if not (caps.sleep and caps.sleep_pauses_scheduler):
            return {**report, "done": False, "reason": "no sleep mode that pauses the scheduler: nothing to warm up"}
        if any(state != "running" for state in obs.states.values()) or obs.stopped:
            return {**report, "done": False, "reason": "the server is suspended: resume it first"}
        control = VllmControl(caps.url, config.sleep_timeout_s)
        try:
            timings = control.warm_up()
        except VllmControlError as error:
            problems = unquiesce_server(control, None, [], ToggleResult(target=RESUME))
            raise ToolError(
                f"warm-up failed: {error}" + (f"; and waking vLLM up failed: {problems}" if problems else ""),
                ExitCode.INCONSISTENT if problems else ExitCode.TRANSITION_FAILED,
            )
        marker.touch()
        return {**report, "done": True, **{key: round(value, 3) for key, value in timings.items()}}
