"""The library API: suspend, resume and status of a server's CUDA processes.

Used by the `cuda-toggle-all` CLI, by `selftest`, and by the gate (never through a subprocess).
This module carries out a plan (plan.py, pure) in order: it observes, asks the plan, writes the suspend
record, quiesces the server (vLLM's own scheduler pause, or the SIGSTOP of a dispatcher on older vLLM),
runs the CUDA transition (transition.py), and says "ok" only from what it reads back (proof.py).

Suspend: record -> quiesce -> lock all -> checkpoint all -> verify states -> prove GPU memory released.
Resume:  restore all -> unlock all -> verify states -> unquiesce -> prove memory back, flags, a completion.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from loguru import logger

from . import safety
from .backends import Backend, BackendError, select_backend
from .config import Config
from .discovery import find_server
from .errors import ExitCode, SuspendError
from .gpus import GpuReading, read_gpus
from .operations import settle_orphans
from .plan import Observation, SuspendPlan, dispatcher_candidates, model_holders, plan_suspend
from .processes import ProcessInfo, describe, inherited_environ, same_process, walk_tree
from .proof import proves_per_process_alone, released_proof, returned_proof
from .results import PidResult, ToggleResult
from .runstate import FrozenProcess, GpuRecord, ProcessRecord, SuspendRecord, ToolLock
from .transition import (
    Inconsistent,
    OverlapHooks,
    RolledBack,
    SignalGuard,
    Transition,
    freeze,
    mark_phase,
    read_states,
    thaw,
)
from .vllm_control import VllmControl, VllmControlError, server_url

SUSPEND, RESUME = "checkpointed", "running"
TARGET_ALIASES = {"checkpointed": SUSPEND, "suspend": SUSPEND, "running": RESUME, "resume": RESUME}


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
    return Observation(root.pid, root.how, tree, states, unreadable, read_gpus(config), control.capabilities())


def _gpu_progress(config: Config):
    def line() -> str:
        return read_gpus(config).summary()

    return line


def _new_result(target: str, obs: Observation, backend: Backend, pids: list[int], holders: list[int]) -> ToggleResult:
    result = ToggleResult(
        target=target,
        root_pid=obs.root_pid,
        root_how=obs.root_how,
        backend=backend.name,
        server=obs.capabilities.to_json(),
        gpus_before=obs.gpus.to_json(),
        gpu_source=obs.gpus.source if obs.gpus.gpus else obs.gpus.problem,
    )
    for pid in pids:
        role = "model" if pid in holders else "context"
        result.pids.append(
            PidResult(pid, obs.title(pid), role, obs.states.get(pid), gpu_mib=obs.gpus.pids_mib.get(pid))
        )
    result.skipped = [{"pid": p.pid, "name": p.title, "reason": "stopped"} for p in obs.stopped]
    return result


def _finish(result: ToggleResult, states: dict[int, str], started: float) -> ToggleResult:
    for record in result.pids:
        record.after = states.get(record.pid, "gone")
    result.evidence.setdefault("states", {str(r.pid): r.after for r in result.pids})
    result.seconds = time.monotonic() - started
    return result


def _fail(result: ToggleResult, message: str, code: ExitCode, started: float, states: dict[int, str]) -> SuspendError:
    _finish(result, states, started)
    result.ok, result.error, result.exit_code = False, message, int(code)
    return SuspendError(message, code, result)


def toggle(
    target: str,
    config: Config,
    *,
    pid: int | None = None,
    force: bool = False,
    freeze_dispatcher: bool = True,
    backend_name: str | None = None,
    mode: str | None = None,
    quiesce: str | None = None,
    hooks: OverlapHooks | None = None,
) -> ToggleResult:
    """Move every CUDA process of the server to `target` (checkpointed or running).

    Returns the result when the server reached the target and that was proven; raises SuspendError
    (with `.result`) otherwise. `hooks` let the gate overlap a swap's suspend and resume (transition.py).
    """
    hooks = hooks or OverlapHooks()
    target = TARGET_ALIASES[target]
    started = time.monotonic()
    # One guard for the whole run: SIGINT/SIGTERM are deferred, and acted on between phases (a phase of the
    # driver is never cut: the driver does not roll back a checkpoint or restore half-way).
    with SignalGuard() as guard, ToolLock(config.run_dir, config.busy_wait_s, purpose=f"cuda-toggle-all {target}"):
        backend = select_backend(config, backend_name)
        mark_phase(config.run_dir, "settle")
        settled = settle_orphans(config, backend)  # a killed run's driver calls land before we look
        mark_phase(config.run_dir, "observe")
        obs = observe(config, backend, pid, force=force)
        try:
            if target == SUSPEND:
                requested_quiesce = quiesce or (config.quiesce if freeze_dispatcher else "none")
                result = _suspend(
                    config, backend, obs, force, started, mode or config.mode, requested_quiesce, guard, hooks
                )
            else:
                result = _resume(config, backend, obs, force, started, guard, hooks)
        except SuspendError as failure:
            if isinstance(failure.result, ToggleResult):
                failure.result.notes[:0] = settled
            raise
        result.notes[:0] = settled
        return result


def _interrupted_before_any_change(guard: SignalGuard, result: ToggleResult, started: float, states: dict) -> None:
    if guard.received:
        result.interrupted = guard.received
        raise _fail(
            result,
            f"interrupted by {guard.received} before anything changed: nothing was done",
            ExitCode.INTERRUPTED,
            started,
            states,
        )


# the suspend record ---------------------------------------------------------------------------------------
def _record_of(config: Config, obs: Observation) -> SuspendRecord | None:
    """This server instance's suspend record (root PID and create time); stale or malformed ones are ignored."""
    root = next((p for p in obs.tree if p.pid == obs.root_pid), None)
    if root is None:
        return None
    return SuspendRecord.load(config.run_dir, root.pid, root.create_time)


def _host_available_mib(config: Config) -> int:
    if config.host_ram_mib is not None:
        return config.host_ram_mib
    available = psutil.virtual_memory().available
    limit = safety.cgroup_available_bytes()
    if limit is not None:
        available = min(available, limit)
    return available // 2**20


# quiescing: what keeps work away from a process while it is not running -----------------------------------
def _quiesce(plan: SuspendPlan, control: VllmControl, result: ToggleResult) -> None:
    began = time.monotonic()
    if plan.quiesce == "scheduler":
        if plan.mode == "hybrid":
            try:
                control.sleep(level=1)  # mode=keep: pauses the scheduler, weights to host RAM, KV cache dropped
                result.phases["sleep"] = time.monotonic() - began
                logger.info("vLLM sleeps (level 1, requests kept) after {:.2f} s", result.phases["sleep"])
                return
            except VllmControlError as error:
                if not plan.mode_fallback or control.is_sleeping() and not control.is_paused():
                    raise
                logger.warning("sleep failed ({}): a plain suspend instead, vLLM's scheduler paused", error)
                result.notes.append(f"sleep failed ({error}): plain suspend")
                plan.mode = result.mode = "plain"
                began = time.monotonic()
        if plan.mode == "plain":
            control.pause()
            result.phases["pause"] = time.monotonic() - began
            logger.info("vLLM's scheduler paused (requests kept) after {:.2f} s", result.phases["pause"])
    elif plan.quiesce == "sigstop":
        for process in plan.freeze:
            if not process.stopped:
                freeze(process)
                logger.info("froze the dispatcher PID {} ({})", process.pid, process.short_title(40))
        result.phases["freeze"] = time.monotonic() - began


def _unquiesce(
    control: VllmControl, record: SuspendRecord | None, dispatchers: list[ProcessInfo], result: ToggleResult
) -> list[str]:
    """Let work reach the server again: continue what we froze, wake vLLM up or resume its scheduler.

    Whatever the record says, vLLM's own flags decide (a run killed mid-sleep left no complete record).
    Returns the problems (empty when the server was let go).
    """
    problems = []
    for pid in _thaw_all(record, dispatchers):
        logger.info("continued the dispatcher PID {}", pid)
        result.notes.append(f"continued the frozen dispatcher PID {pid}")
    try:
        # vLLM 0.20.2 answers is_sleeping true while merely paused too, so the flags cannot tell a sleep from a
        # pause: the record says which we did; without one (a run killed early), a server with sleep mode
        # gets /wake_up, which also resumes a paused scheduler.
        paused, sleeping = control.is_paused(), control.is_sleeping()
        slept = record.mode == "hybrid" if record is not None and record.quiesce == "scheduler" else sleeping
        if (paused or sleeping) and slept:
            began = time.monotonic()
            control.wake_up()
            result.phases["wake_up"] = time.monotonic() - began
            result.mode = "hybrid"
            result.notes.append("woke vLLM up (its scheduler runs again)")
        elif paused or sleeping:
            began = time.monotonic()
            control.resume()
            result.phases["resume_scheduler"] = time.monotonic() - began
            result.notes.append("resumed vLLM's scheduler")
    except VllmControlError as error:
        problems.append(str(error))
    return problems


def _thaw_all(record: SuspendRecord | None, dispatchers: list[ProcessInfo]) -> list[int]:
    """Continue every dispatcher we (or an earlier run) froze; returns the PIDs continued."""
    frozen = {f.pid: f for f in (record.frozen if record else [])}
    for process in dispatchers:
        if process.stopped or process.pid in frozen:
            frozen.setdefault(process.pid, FrozenProcess(process.pid, process.create_time, process.title))
    return [pid for pid, f in frozen.items() if thaw(f)]


def _vllm_flags(control: VllmControl) -> dict[str, bool | None]:
    return {"is_paused": control.is_paused(), "is_sleeping": control.is_sleeping()}


# suspend ----------------------------------------------------------------------------------------------------
def _suspend(
    config: Config,
    backend: Backend,
    obs: Observation,
    force: bool,
    started: float,
    mode: str,
    quiesce: str,
    guard: SignalGuard,
    hooks: OverlapHooks,
) -> ToggleResult:
    record = _record_of(config, obs)
    plan = plan_suspend(
        obs,
        quiesce=quiesce,
        mode=mode,
        dispatcher_titles=config.dispatcher,
        read_environ=inherited_environ,
        host_available_mib=_host_available_mib(config),
        ram_margin_mib=config.ram_margin_mib,
        record_mode=record.mode if record else None,
    )
    result = _new_result(SUSPEND, obs, backend, plan.checkpoint, plan.holders)
    result.forced, result.quiesce, result.mode = force, plan.quiesce, plan.mode
    result.dispatchers = [
        {"pid": p.pid, "name": p.title, "frozen_before": p.stopped, "frozen_after": True} for p in plan.freeze
    ]
    states = {pid: obs.states[pid] for pid in plan.checkpoint}
    if not plan.checkpoint:
        raise _fail(
            result,
            f"no CUDA processes in the tree of PID {obs.root_pid} ({obs.root_how}): is the model "
            "loaded yet? (cuda-toggle-all status shows every process)",
            ExitCode.NO_CUDA_PROCESSES,
            started,
            states,
        )
    result.refusals = plan.refusals + plan.blockers
    if plan.blockers:
        raise _fail(result, "refused, nothing changed: " + " | ".join(plan.blockers), ExitCode.REFUSED, started, states)
    if plan.refusals and not force:
        raise _fail(result, "refused, nothing changed: " + " | ".join(plan.refusals), ExitCode.REFUSED, started, states)
    for reason in plan.refusals:
        logger.warning("--force: going on despite: {}", reason)
    control = VllmControl(obs.capabilities.url, config.sleep_timeout_s)
    if all(state == "checkpointed" for state in states.values()):
        result.notes.append("already checkpointed: nothing to do")
        if record is not None:
            result.quiesce, result.mode = record.quiesce, record.mode
        result.evidence = {"vllm": _vllm_flags(control), "gpus": {"already": True}}
        _finish(result, states, started)
        result.ok = True
        return result

    _interrupted_before_any_change(guard, result, started, states)
    root = obs.process(obs.root_pid)
    earlier = record
    record = SuspendRecord(obs.root_pid, root.create_time, backend.name, time.time())
    if earlier is not None:  # a suspend that half-ran: keep what it measured (never overwrite with less)
        record.gpus = earlier.gpus
    record.frozen = [FrozenProcess(p.pid, p.create_time, p.title) for p in plan.freeze]
    record.cuda = [ProcessRecord(pid, obs.process(pid).create_time, obs.title(pid)) for pid in plan.checkpoint]
    record.mode, record.quiesce, record.server_url = plan.mode, plan.quiesce, control.url
    record.save(config.run_dir)  # before anything changes: a crash from here on leaves what `running` needs

    try:
        mark_phase(config.run_dir, "quiesce")
        _quiesce(plan, control, result)
        if record.mode != plan.mode:  # the sleep failed and vLLM was paused instead: `running` must resume it
            record.mode = plan.mode
            record.save(config.run_dir)
    except (VllmControlError, SuspendError) as error:
        problems = _unquiesce(control, record, plan.freeze, result)
        record.clear(config.run_dir)
        message = getattr(error, "message", str(error))
        raise _fail(
            result,
            f"suspend failed before any checkpoint: {message}"
            + (f"; and letting the server go failed: {problems}" if problems else "; the server runs as before"),
            ExitCode.INCONSISTENT if problems else ExitCode.TRANSITION_FAILED,
            started,
            states,
        )
    if proves_per_process_alone(obs.gpus, plan.checkpoint):
        # What the checkpoint will move, so that a swap can tell what this server's restore adds (OverlapHooks).
        quiesced = read_gpus(config)
        record.checkpoint_mib = sum(quiesced.pids_mib.get(pid, 0) for pid in plan.checkpoint)
        record.save(config.run_dir)
        if hooks.memory_released and plan.mode == "hybrid":
            hooks.memory_released()  # the weights and KV cache are in host RAM: another server may restore now
    transition = Transition(config, backend, result, states, guard, _gpu_progress(config))
    try:
        if guard.received:
            raise RolledBack(f"interrupted by {guard.received} while quiescing")
        transition.suspend()
        after = read_gpus(config)
        proof = released_proof(obs.gpus, after, plan.checkpoint, config.residual_mib, hooks.neighbour_restore_mib)
        result.gpus_after = after.to_json()
        result.evidence = {"gpus": proof.to_json(), "vllm": _vllm_flags(control)}
        if not proof.ok and obs.gpus.gpus:
            logger.error("the checkpoint did not free the server's GPU memory: {}", proof.failure())
            transition.rollback_to_running()
            problems = _unquiesce(control, record, plan.freeze, result)
            record.clear(config.run_dir)
            raise _fail(
                result,
                f"every process read checkpointed, but {proof.failure()}: the suspend was undone and the "
                "server runs again"
                + (f" (letting it go failed: {problems})" if problems else "")
                + ". See `cuda-toggle-all status`; on a GPU shared with processes the tool cannot see, raise "
                "CUDA_TOGGLE_RESIDUAL_MIB",
                ExitCode.MEMORY_KEPT if not problems else ExitCode.INCONSISTENT,
                started,
                states,
            )
    except RolledBack as failure:
        result.interrupted = guard.received
        problems = _unquiesce(control, record, plan.freeze, result)
        record.clear(config.run_dir)
        hint = problems or "every process is running again and the server takes requests"
        raise _fail(
            result,
            f"suspend failed: {failure}; {hint}",
            ExitCode.INCONSISTENT if problems else ExitCode.TRANSITION_FAILED,
            started,
            states,
        )
    except Inconsistent as failure:
        # Some process is not running: the requests stay held (paused or frozen) and the record stays, so
        # that `cuda-toggle-all running` can finish the job; nothing may reach a checkpointed process.
        result.interrupted = guard.received
        raise _fail(
            result,
            f"suspend failed and could not be undone: {failure}; the requests stay held. Run "
            "`cuda-toggle-all running`; if that fails too, restart the server (supervisorctl restart vllm)",
            ExitCode.INCONSISTENT,
            started,
            states,
        )
    result.interrupted = guard.received

    before_by_uuid = obs.gpus.by_uuid()
    record.merge_gpus(
        [
            GpuRecord(g.uuid, g.index, before_by_uuid[g.uuid].used_mib if g.uuid in before_by_uuid else 0, g.used_mib)
            for g in after.gpus
        ]
    )
    record.complete = True
    record.save(config.run_dir)
    _finish(result, states, started)
    result.ok = True
    return result


# resume -----------------------------------------------------------------------------------------------------
def _dead_while_suspended(record: SuspendRecord | None) -> list[str]:
    if record is None:
        return []
    return [f"PID {p.pid} ({p.title[:40]})" for p in record.cuda if not same_process(p.pid, p.create_time)]


def _resume(
    config: Config,
    backend: Backend,
    obs: Observation,
    force: bool,
    started: float,
    guard: SignalGuard,
    hooks: OverlapHooks,
) -> ToggleResult:
    record = _record_of(config, obs)
    holders = model_holders(obs)
    dispatchers = dispatcher_candidates(obs, config.dispatcher, holders) or [
        p for p in obs.stopped if p.matches(config.dispatcher)
    ]
    moving = sorted(obs.states)
    result = _new_result(RESUME, obs, backend, moving, holders)
    result.forced = force
    if record is not None:
        result.quiesce, result.mode = record.quiesce, record.mode
    result.dispatchers = [
        {"pid": p.pid, "name": p.title, "frozen_before": p.stopped, "frozen_after": False}
        for p in dispatchers
        if p.stopped
    ]
    states = dict(obs.states)
    control = VllmControl(
        record.server_url if record and record.server_url else obs.capabilities.url, config.sleep_timeout_s
    )
    if obs.unreadable:
        raise _fail(
            result,
            "cannot read the CUDA state of "
            + "; ".join(f"PID {p}: {e}" for p, e in obs.unreadable.items())
            + ": the server stays suspended (requests held); fix the access (SYS_PTRACE, root) and resume again",
            ExitCode.REFUSED,
            started,
            states,
        )
    dead = _dead_while_suspended(record)
    if dead:
        raise _fail(
            result,
            f"{', '.join(dead)} died while the server was suspended: the server cannot serve again; restart it "
            "(supervisorctl restart vllm)",
            ExitCode.INCONSISTENT,
            started,
            states,
        )
    if not moving and not result.dispatchers:
        raise _fail(
            result,
            f"no CUDA processes in the tree of PID {obs.root_pid} ({obs.root_how})",
            ExitCode.NO_CUDA_PROCESSES,
            started,
            states,
        )
    stuck = [pid for pid, state in states.items() if state == "failed"]
    if stuck:
        raise _fail(
            result,
            f"PID {stuck} is in CUDA state `failed` and cannot be restored: restart the server "
            "(supervisorctl restart vllm)",
            ExitCode.INCONSISTENT,
            started,
            states,
        )
    if any(state == "checkpointed" for state in states.values()):
        refusals = safety.restore_refusals(
            record, obs.gpus, config.restore_margin_mib, restore_only=hooks.room_made is not None
        )
        result.refusals = refusals
        if refusals and not force:
            raise _fail(
                result,
                "refused, nothing changed (the server stays suspended): " + " | ".join(refusals),
                ExitCode.REFUSED,
                started,
                states,
            )
        for reason in refusals:
            logger.warning("--force: going on despite: {}", reason)

    _interrupted_before_any_change(guard, result, started, states)
    if all(state == "running" for state in states.values()):
        result.notes.append("every CUDA process was running already")
        if hooks.room_made and not hooks.room_made():
            raise _fail(
                result,
                "the resume was withdrawn before vLLM woke up: the GPU memory it needs was not made free",
                ExitCode.TRANSITION_FAILED,
                started,
                states,
            )
    else:
        transition = Transition(config, backend, result, states, guard, _gpu_progress(config))
        try:
            transition.resume(hooks.room_made)
        except RolledBack as failure:
            raise _fail(result, f"resume failed: {failure}", ExitCode.TRANSITION_FAILED, started, states)
        except Inconsistent as failure:
            raise _fail(
                result,
                f"resume failed: {failure}; the requests stay held. Restart the server (supervisorctl restart vllm)",
                ExitCode.INCONSISTENT,
                started,
                states,
            )
    began = time.monotonic()
    mark_phase(config.run_dir, "unquiesce")
    problems = _unquiesce(control, record, dispatchers, result)
    result.phases["unquiesce"] = time.monotonic() - began
    result.interrupted = guard.received
    for entry in result.dispatchers:
        now = describe(entry["pid"])
        entry["frozen_after"] = bool(now and now.stopped)
    if problems:
        raise _fail(
            result,
            f"every CUDA process runs again, but vLLM was not let go: {'; '.join(problems)}. Run "
            "`cuda-toggle-all running` again (the record is kept)",
            ExitCode.INCONSISTENT,
            started,
            states,
        )

    after = read_gpus(config)
    result.gpus_after = after.to_json()
    memory = returned_proof(after, [g for g in (record.gpus if record else []) if g.released_mib > 0], holders)
    flags = _vllm_flags(control)
    result.evidence = {"gpus": memory.to_json(), "vllm": flags}
    failures = []
    if not memory.ok:
        failures.append(memory.failure())
    if obs.capabilities.reachable:
        began = time.monotonic()
        probe = control.probe(timeout_s=config.sleep_timeout_s)
        result.phases["probe"] = time.monotonic() - began
        result.evidence["probe"] = probe.to_json()
        if not probe.ok:
            failures.append(f"a one-token completion failed: {probe.error}")
    else:  # nothing answers HTTP there, so nothing can send the server work either
        result.notes.append(f"no HTTP server answers at {control.url}: no completion could prove the resume")
    if flags["is_paused"] or flags["is_sleeping"]:
        failures.append(f"vLLM still says {flags}")
    if failures:
        raise _fail(
            result,
            "every CUDA process runs again, but the server is not proven to serve: " + "; ".join(failures),
            ExitCode.INCONSISTENT,
            started,
            states,
        )
    if record is not None:
        record.clear(config.run_dir)
    _finish(result, states, started)
    result.ok = True
    return result


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

    def to_json(self) -> dict:
        return asdict(self)


def status(config: Config, *, pid: int | None = None, backend_name: str | None = None) -> StatusResult:
    """What every process of the server is, whether anything is frozen or paused, and the GPUs' memory."""
    backend = select_backend(config, backend_name)
    obs = observe(config, backend, pid, force=True)
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
    record = _record_of(config, obs)
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
        vllm=_vllm_flags(control),
        suspend_record=asdict(record) if record else None,
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
            problems = _unquiesce(control, None, [], ToggleResult(target=RESUME))
            raise SuspendError(
                f"warm-up failed: {error}" + (f"; and waking vLLM up failed: {problems}" if problems else ""),
                ExitCode.INCONSISTENT if problems else ExitCode.TRANSITION_FAILED,
            )
        marker.touch()
        return {**report, "done": True, **{key: round(value, 3) for key, value in timings.items()}}


__all__ = [
    "toggle",
    "warm_up",
    "status",
    "StatusResult",
    "ToggleResult",
    "SUSPEND",
    "RESUME",
    "TARGET_ALIASES",
    "BackendError",
    "GpuReading",
]
