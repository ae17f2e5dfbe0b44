"""The library API: suspend and resume a server's CUDA processes (status and warm-up: suspend/status.py).

Used by the `cuda-toggle-all` CLI, by `selftest`, and by the gate (never through a subprocess).
This module carries out a plan (suspend/plan.py, pure) in order: it observes (suspend/observe.py), asks the plan, writes
the suspend record, quiesces the server (suspend/quiesce.py: vLLM's own scheduler pause, or the SIGSTOP of a
dispatcher on older vLLM), runs the CUDA transition (suspend/executor.py), and says "ok" only from what it
reads back (suspend/proof.py).

Suspend: record -> quiesce -> lock all -> checkpoint all -> verify states -> prove GPU memory released.
Resume:  restore all -> unlock all -> verify states -> unquiesce -> prove memory back, flags, a completion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loguru import logger

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..base.processes import ProcessInfo, describe, inherited_environ, same_process
from ..base.results import PidResult, ToggleResult
from ..cuda.backend import Backend, BackendError
from ..cuda.choose import select_backend
from ..cuda.gpus import GpuReading, read_gpus
from ..cuda.owned_calls import settle_orphans
from ..server.vllm_control import VllmControl, VllmControlError
from . import safety
from .executor import (
    Inconsistent,
    OverlapHooks,
    RolledBack,
    SignalGuard,
    Transition,
    mark_phase,
)
from .light_sleep import mark_asleep
from .observe import gpu_progress, host_available_mib, observe, record_of
from .plan import Observation, SuspendPlan, dispatcher_candidates, model_holders, plan_suspend
from .proof import proves_per_process_alone, released_proof, returned_proof
from .quiesce import quiesce_server, thaw_all, unquiesce_server, vllm_flags
from .records import FrozenProcess, GpuRecord, ProcessRecord, SuspendRecord, ToolLock

SUSPEND, RESUME = "checkpointed", "running"
TARGET_ALIASES = {"checkpointed": SUSPEND, "suspend": SUSPEND, "running": RESUME, "resume": RESUME}


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


def _fail(result: ToggleResult, message: str, code: ExitCode, started: float, states: dict[int, str]) -> ToolError:
    _finish(result, states, started)
    result.ok, result.error, result.exit_code = False, message, int(code)
    return ToolError(message, code, result)


def move_to(
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

    Returns the result when the server reached the target and that was proven; raises ToolError
    (with `.result`) otherwise. `hooks` let the gate overlap a swap's suspend and resume (suspend/executor.py).
    """
    hooks = hooks or OverlapHooks()
    target = TARGET_ALIASES[target]
    started = time.monotonic()
    # One guard for the whole run: SIGINT/SIGTERM are deferred, and acted on between phases (a phase of the
    # driver is never cut: the driver does not roll back a checkpoint or restore half-way).
    lock = ToolLock(config.run_dir, config.busy_wait_s, f"cuda-toggle-all {target}", config.converge_wait_s)
    with SignalGuard() as guard, lock:
        backend = select_backend(config, backend_name)
        mark_phase(config.run_dir, "settle")
        settled = settle_orphans(config, backend)  # a killed run's driver calls land before we look
        mark_phase(config.run_dir, "observe")
        gone = SuspendRecord.remove_stale(config.run_dir)
        settled += [f"removed the suspend record of server {r.describe_instance()}: that server is gone" for r in gone]
        obs = _observe_after_removal(config, backend, pid, force, gone)
        run = _Run(config, backend, obs, force, started, guard, hooks)
        try:
            if target == SUSPEND:
                requested_quiesce = quiesce or (config.quiesce if freeze_dispatcher else "none")
                result = _suspend(run, mode or config.mode, requested_quiesce)
            else:
                result = _resume(run)
        except ToolError as failure:
            if isinstance(failure.result, ToggleResult):
                failure.result.notes[:0] = settled
            raise
        result.notes[:0] = settled
        return result


def _observe_after_removal(
    config: Config, backend: Backend, pid: int | None, force: bool, gone: list[SuspendRecord]
) -> Observation:
    """observe(), saying what happened when the server it looks for is one whose record was just removed
    (the whole tree died while suspended) rather than blaming the PID it was given."""
    try:
        return observe(config, backend, pid, force=force)
    except ToolError as failure:
        if not gone or failure.result is not None or failure.exit_code != ExitCode.SERVER_NOT_FOUND:
            raise
        names = ", ".join(record.describe_instance() for record in gone)
        # The PID asked for is the dead server's own: the lookup's "check the PID" would blame the caller.
        lookup = "" if pid in {record.root_pid for record in gone} else f" ({failure.message})"
        raise ToolError(
            f"the server ({names}) died while suspended: its suspend record was removed and nothing is left to "
            "resume. supervisord restarts the program (see `supervisorctl status vllm`); the gate serves the new "
            f"instance once it answers, and `cuda-toggle-all running` then proves it{lookup}",
            ExitCode.SERVER_NOT_FOUND,
        ) from None


@dataclass
class _Run:
    """One suspend or resume under way: what its steps read, and the result and CUDA states they fill in (the
    executor updates `states` in place, so every step and every failure reports the same dict)."""

    config: Config
    backend: Backend
    obs: Observation
    force: bool
    started: float
    guard: SignalGuard
    hooks: OverlapHooks
    result: ToggleResult = field(init=False)
    states: dict[int, str | None] = field(init=False, default_factory=dict)

    def fail(self, message: str, code: ExitCode) -> ToolError:
        return _fail(self.result, message, code, self.started, self.states)

    def succeed(self) -> ToggleResult:
        _finish(self.result, self.states, self.started)
        self.result.ok = True
        return self.result

    def go_on_despite(self, refusals: list[str]) -> None:
        """--force: the refusals are overridden, loudly; without it they end the run before anything changed."""
        for reason in refusals:
            logger.warning("--force: going on despite: {}", reason)


def _interrupted_before_any_change(run: _Run) -> None:
    if run.guard.received:
        run.result.interrupted = run.guard.received
        raise run.fail(
            f"interrupted by {run.guard.received} before anything changed: nothing was done", ExitCode.INTERRUPTED
        )


# suspend ----------------------------------------------------------------------------------------------------
def _suspend(run: _Run, mode: str, quiesce: str) -> ToggleResult:
    """The steps of a suspend, after observe (move_to): each ends the run with its own failure."""
    earlier = record_of(run.config, run.obs)
    plan = _plan_suspend(run, earlier, mode, quiesce)
    _refuse_suspend(run, plan)
    control = VllmControl(run.obs.capabilities.url, run.config.sleep_timeout_s)
    _warn_unreachable(run.config, run.obs, plan.quiesce, run.result)
    if all(state == "checkpointed" for state in run.states.values()):
        return _already_checkpointed(run, earlier, control)
    _interrupted_before_any_change(run)
    record = _record_before_any_change(run, plan, earlier, control)
    _quiesce(run, plan, record, control)
    _measure_what_moves(run, plan, record)
    after = _lock_checkpoint_and_prove(run, plan, record, control)
    _record_complete(run, record, after)
    return run.succeed()


def _plan_suspend(run: _Run, earlier: SuspendRecord | None, mode: str, quiesce: str) -> SuspendPlan:
    """plan.py's verdict on the observation, and the result it starts: the PIDs to checkpoint, the dispatcher
    to freeze, the refusals."""
    config, obs = run.config, run.obs
    plan = plan_suspend(
        obs,
        quiesce=quiesce,
        mode=mode,
        dispatcher_titles=config.dispatcher,
        read_environ=inherited_environ,
        host_available_mib=host_available_mib(config),
        ram_margin_mib=config.ram_margin_mib,
        record_mode=earlier.mode if earlier else None,
        proc_status=safety.own_proc_status(),
    )
    result = run.result = _new_result(SUSPEND, obs, run.backend, plan.checkpoint, plan.holders)
    result.forced, result.quiesce, result.mode = run.force, plan.quiesce, plan.mode
    result.dispatchers = [
        {"pid": p.pid, "name": p.title, "frozen_before": p.stopped, "frozen_after": True} for p in plan.freeze
    ]
    run.states = {pid: obs.states[pid] for pid in plan.checkpoint}
    return plan


def _refuse_suspend(run: _Run, plan: SuspendPlan) -> None:
    """Nothing to checkpoint, a blocker, or a refusal without --force: the server is left as it was."""
    if not plan.checkpoint:
        raise run.fail(
            f"no CUDA processes in the tree of PID {run.obs.root_pid} ({run.obs.root_how}): is the model "
            "loaded yet? (cuda-toggle-all status shows every process)",
            ExitCode.NO_CUDA_PROCESSES,
        )
    run.result.refusals = plan.refusals + plan.blockers
    if plan.blockers:
        raise run.fail("refused, nothing changed: " + " | ".join(plan.blockers), ExitCode.REFUSED)
    if plan.refusals and not run.force:
        raise run.fail("refused, nothing changed: " + " | ".join(plan.refusals), ExitCode.REFUSED)
    run.go_on_despite(plan.refusals)


def _already_checkpointed(run: _Run, earlier: SuspendRecord | None, control: VllmControl) -> ToggleResult:
    """Every CUDA process reads checkpointed: nothing to do, and the result says how it was suspended."""
    result = run.result
    result.notes.append("already checkpointed: nothing to do")
    if earlier is not None:
        result.quiesce, result.mode = earlier.quiesce, earlier.mode
    frozen = any(process.matches(run.config.dispatcher) for process in run.obs.stopped)
    result.evidence = {"vllm": vllm_flags(control, engine_frozen=frozen), "gpus": {"already": True}}
    return run.succeed()


def _record_before_any_change(
    run: _Run, plan: SuspendPlan, earlier: SuspendRecord | None, control: VllmControl
) -> SuspendRecord:
    """The suspend record, saved before anything changes: a crash from here on leaves what `running` needs."""
    obs = run.obs
    root = obs.process(obs.root_pid)
    record = SuspendRecord(obs.root_pid, root.create_time, run.backend.name, time.time())
    if earlier is not None:  # a suspend that half-ran: keep what it measured (never overwrite with less)
        record.gpus = earlier.gpus
    record.frozen = [FrozenProcess(p.pid, p.create_time, p.title) for p in plan.freeze]
    record.cuda = [ProcessRecord(pid, obs.process(pid).create_time, obs.title(pid)) for pid in plan.checkpoint]
    record.mode, record.quiesce, record.server_url = plan.mode, plan.quiesce, control.url
    record.save(run.config.run_dir)
    return record


def _quiesce(run: _Run, plan: SuspendPlan, record: SuspendRecord, control: VllmControl) -> None:
    """Hold the requests (vLLM's pause or sleep, or the SIGSTOP of the dispatcher); one that fails lets the server
    go again and removes the record."""
    try:
        mark_phase(run.config.run_dir, "quiesce")
        quiesce_server(plan, control, run.result)
        if record.mode != plan.mode:  # the sleep failed and vLLM was paused instead: `running` must resume it
            record.mode = plan.mode
            record.save(run.config.run_dir)
    except (VllmControlError, ToolError) as error:
        problems = unquiesce_server(control, record, plan.freeze, run.result)
        record.clear(run.config.run_dir)
        message = getattr(error, "message", str(error))
        raise run.fail(
            f"suspend failed before any checkpoint: {message}"
            + (f"; and letting the server go failed: {problems}" if problems else "; the server runs as before"),
            ExitCode.INCONSISTENT if problems else ExitCode.TRANSITION_FAILED,
        )


def _measure_what_moves(run: _Run, plan: SuspendPlan, record: SuspendRecord) -> None:
    """What the checkpoint will move, so that a swap can tell what this server's restore adds (OverlapHooks)."""
    if not proves_per_process_alone(run.obs.gpus, plan.checkpoint):
        return
    quiesced = read_gpus(run.config)
    record.checkpoint_mib = sum(quiesced.pids_mib.get(pid, 0) for pid in plan.checkpoint)
    record.save(run.config.run_dir)
    if run.hooks.memory_released and plan.mode == "hybrid":
        run.hooks.memory_released()  # the weights and KV cache are in host RAM: another server may restore now


def _lock_checkpoint_and_prove(run: _Run, plan: SuspendPlan, record: SuspendRecord, control: VllmControl) -> GpuReading:
    """Lock and checkpoint every PID (the executor), then prove the memory released; what failed is undone."""
    transition = Transition(run.config, run.backend, run.result, run.states, run.guard, gpu_progress(run.config))
    try:
        if run.guard.received:
            raise RolledBack(f"interrupted by {run.guard.received} while quiescing")
        transition.suspend()
        after = _prove_released(run, plan, record, control, transition)
    except RolledBack as failure:
        run.result.interrupted = run.guard.received
        raise _rolled_back(run, plan, record, control, failure)
    except Inconsistent as failure:
        # Some process is not running: the requests stay held (paused or frozen) and the record stays, so
        # that `cuda-toggle-all running` can finish the job; nothing may reach a checkpointed process.
        run.result.interrupted = run.guard.received
        raise run.fail(
            f"suspend failed and could not be undone: {failure}; the requests stay held. Run "
            "`cuda-toggle-all running`; if that fails too, restart the server (supervisorctl restart vllm)",
            ExitCode.INCONSISTENT,
        )
    run.result.interrupted = run.guard.received
    return after


def _prove_released(
    run: _Run, plan: SuspendPlan, record: SuspendRecord, control: VllmControl, transition: Transition
) -> GpuReading:
    """Every process reads checkpointed: the GPU memory must have gone too, else the checkpoint is undone."""
    result, obs = run.result, run.obs
    after = read_gpus(run.config)
    proof = released_proof(obs.gpus, after, plan.checkpoint, run.config.residual_mib, run.hooks.neighbour_restore_mib)
    result.gpus_after = after.to_json()
    result.evidence = {"gpus": proof.to_json(), "vllm": vllm_flags(control, plan.quiesce == "sigstop")}
    if proof.ok or not obs.gpus.gpus:
        return after
    logger.error("the checkpoint did not free the server's GPU memory: {}", proof.failure())
    transition.rollback_to_running()
    if _stays_asleep(run.hooks, plan):
        # After an early wake the target holds the memory the wake-up would take back: stay asleep.
        record.clear(run.config.run_dir)
        mark_asleep(run.config.run_dir)
        raise run.fail(
            f"every process read checkpointed, but {proof.failure()}: the checkpoint was undone and vLLM "
            "stays asleep (light sleep) until there is room for it",
            ExitCode.MEMORY_KEPT,
        )
    problems = unquiesce_server(control, record, plan.freeze, result)
    record.clear(run.config.run_dir)
    raise run.fail(
        f"every process read checkpointed, but {proof.failure()}: the suspend was undone and the "
        "server runs again"
        + (f" (letting it go failed: {problems})" if problems else "")
        + ". See `cuda-toggle-all status`; on a GPU shared with processes the tool cannot see, raise "
        "CUDA_TOGGLE_RESIDUAL_MIB",
        ExitCode.MEMORY_KEPT if not problems else ExitCode.INCONSISTENT,
    )


def _rolled_back(
    run: _Run, plan: SuspendPlan, record: SuspendRecord, control: VllmControl, failure: RolledBack
) -> ToolError:
    """The executor undid the checkpoint: let the requests go (or stay asleep for a swap), and say why."""
    if _stays_asleep(run.hooks, plan):
        record.clear(run.config.run_dir)
        mark_asleep(run.config.run_dir)  # the gate wakes it on its next request, when there is room
        return run.fail(
            f"suspend failed: {failure}; every process is running again and vLLM stays asleep (light sleep)",
            ExitCode.TRANSITION_FAILED,
        )
    problems = unquiesce_server(control, record, plan.freeze, run.result)
    record.clear(run.config.run_dir)
    dead = _dead_while_suspended(record)
    if dead:  # killed during the lock, say: the rollback cannot bring it back
        return run.fail(
            f"suspend failed: {failure}; and {', '.join(dead)} died meanwhile: this server instance cannot "
            "serve again. The requests were let go so that vLLM sees it and exits; supervisord restarts the "
            "program (if it does not, restart it: supervisorctl restart vllm); the gate serves the new instance "
            "once it answers",
            ExitCode.INCONSISTENT,
        )
    hint = problems or "every process is running again and the server takes requests"
    return run.fail(
        f"suspend failed: {failure}; {hint}", ExitCode.INCONSISTENT if problems else ExitCode.TRANSITION_FAILED
    )


def _record_complete(run: _Run, record: SuspendRecord, after: GpuReading) -> None:
    """The record of a proven suspend: what each GPU released, for the resume's proof and its refusals."""
    before_by_uuid = run.obs.gpus.by_uuid()
    record.merge_gpus(
        [
            GpuRecord(g.uuid, g.index, before_by_uuid[g.uuid].used_mib if g.uuid in before_by_uuid else 0, g.used_mib)
            for g in after.gpus
        ]
    )
    record.complete = True
    record.save(run.config.run_dir)


def _stays_asleep(hooks: OverlapHooks, plan: SuspendPlan) -> bool:
    """A rolled-back suspend leaves vLLM asleep instead of waking it, where a swap's target may already be awake
    in the memory the wake-up would take (the gate's early wake): only a light sleep that holds the requests
    (hybrid, scheduler) can stay so."""
    return hooks.stay_asleep_on_rollback and plan.mode == "hybrid" and plan.quiesce == "scheduler"


def _warn_unreachable(config: Config, obs: Observation, quiesce: str, result: ToggleResult) -> None:
    """Say loudly when vLLM does not answer where the tool looks for it (a typo in CUDA_TOGGLE_SERVER_URL,
    say): its own pause and sleep cannot be used, and the suspend falls back to what holds nothing through
    HTTP (the SIGSTOP of the dispatcher, and a plain checkpoint of all the GPU memory: much slower)."""
    if obs.capabilities.reachable:
        return
    where = f"CUDA_TOGGLE_SERVER_URL={config.server_url}" if config.server_url else "the server's --host/--port"
    warning = (
        f"no HTTP server answers at {obs.capabilities.url} ({where}): vLLM's own pause and sleep cannot be used, so "
        f"the requests are held by quiesce={quiesce} and every byte of GPU memory is checkpointed (plain, slow). "
        "If that address is wrong, set CUDA_TOGGLE_SERVER_URL to the server's own address (http://127.0.0.1:8001 "
        "in the image)"
    )
    logger.warning(warning)
    result.notes.append(warning)


# resume -----------------------------------------------------------------------------------------------------
def _dead_while_suspended(record: SuspendRecord | None) -> list[str]:
    if record is None:
        return []
    return [f"PID {p.pid} ({p.title[:40]})" for p in record.cuda if not same_process(p.pid, p.create_time)]


def _resume_control(
    config: Config, record: SuspendRecord | None, obs: Observation, result: ToggleResult
) -> VllmControl:
    """Where the resume talks to vLLM. The rule: the address the suspend paused vLLM through (its record) while
    it answers; else the address of now (CUDA_TOGGLE_SERVER_URL, or the server's --host/--port), with a
    warning. A wrong address at the suspend must not outvote a right one given now."""
    now = VllmControl(obs.capabilities.url, config.sleep_timeout_s)
    if record is None or not record.server_url or record.server_url == now.url:
        return now
    recorded = VllmControl(record.server_url, config.sleep_timeout_s)
    if recorded.answers():
        return recorded
    warning = (
        f"nothing answers at {record.server_url}, the address the suspend used (its record): using {now.url} "
        "(CUDA_TOGGLE_SERVER_URL, or the server's --host/--port) instead"
    )
    logger.warning(warning)
    result.notes.append(warning)
    return now


@dataclass(frozen=True)
class _ResumeScope:
    """What a resume moves: the CUDA processes, the ones holding the model, the dispatchers to continue."""

    moving: list[int]
    holders: list[int]
    dispatchers: list[ProcessInfo]


def _resume(run: _Run) -> ToggleResult:
    """The steps of a resume, after observe (move_to): each ends the run with its own failure."""
    record = record_of(run.config, run.obs)
    scope = _scope_resume(run, record)
    control = _resume_control(run.config, record, run.obs, run.result)
    _refuse_unresumable(run, record, scope)
    _refuse_restore(run, record)
    _interrupted_before_any_change(run)
    _restore_and_unlock(run)
    _unquiesce(run, record, scope, control)
    _prove_serving(run, record, scope, control)
    if record is not None:
        record.clear(run.config.run_dir)
    return run.succeed()


def _scope_resume(run: _Run, record: SuspendRecord | None) -> _ResumeScope:
    """Every CUDA process of the tree, and the frozen dispatchers; the result starts with them."""
    obs, config = run.obs, run.config
    holders = model_holders(obs)
    dispatchers = dispatcher_candidates(obs, config.dispatcher, holders) or [
        p for p in obs.stopped if p.matches(config.dispatcher)
    ]
    moving = sorted(obs.states)
    result = run.result = _new_result(RESUME, obs, run.backend, moving, holders)
    result.forced = run.force
    if record is not None:
        result.quiesce, result.mode = record.quiesce, record.mode
    result.dispatchers = [
        {"pid": p.pid, "name": p.title, "frozen_before": p.stopped, "frozen_after": False}
        for p in dispatchers
        if p.stopped
    ]
    run.states = dict(obs.states)
    return _ResumeScope(moving, holders, dispatchers)


def _refuse_unresumable(run: _Run, record: SuspendRecord | None, scope: _ResumeScope) -> None:
    """A state that cannot be read, a member that died, nothing to resume, a process in state `failed`."""
    obs = run.obs
    if obs.unreadable:
        raise run.fail(
            "cannot read the CUDA state of "
            + "; ".join(f"PID {p}: {e}" for p, e in obs.unreadable.items())
            + ": the server stays suspended (requests held); fix the access (SYS_PTRACE, root) and resume again",
            ExitCode.REFUSED,
        )
    dead = _dead_while_suspended(record)
    if dead:
        # Nothing may stay stopped: a frozen dispatcher would hold requests for good instead of letting vLLM
        # see its dead member and exit (supervisord then restarts it). The record stays while the instance
        # lives, so that the gate keeps answering 503 rather than sending requests to it; it goes with it.
        continued = thaw_all(record, scope.dispatchers)
        run.result.notes += [f"continued the frozen dispatcher PID {pid}" for pid in continued]
        let_go = f"; continued the frozen dispatcher PID {continued} so that vLLM sees it and exits"
        let_go = let_go if continued else ""
        raise run.fail(
            f"{', '.join(dead)} died while the server was suspended: this server instance cannot serve again"
            f"{let_go}. supervisord restarts the program once vLLM exits (if it does not exit, restart it: "
            "supervisorctl restart vllm); the gate serves the new instance once it answers",
            ExitCode.INCONSISTENT,
        )
    if not scope.moving and not run.result.dispatchers:
        raise run.fail(
            f"no CUDA processes in the tree of PID {obs.root_pid} ({obs.root_how})", ExitCode.NO_CUDA_PROCESSES
        )
    stuck = [pid for pid, state in run.states.items() if state == "failed"]
    if stuck:
        raise run.fail(
            f"PID {stuck} is in CUDA state `failed` and cannot be restored: restart the server "
            "(supervisorctl restart vllm)",
            ExitCode.INCONSISTENT,
        )


def _refuse_restore(run: _Run, record: SuspendRecord | None) -> None:
    """safety.py's refusals of a restore (room on the GPUs, the same GPUs), unless --force."""
    if not any(state == "checkpointed" for state in run.states.values()):
        return
    refusals = safety.restore_refusals(
        record, run.obs.gpus, run.config.restore_margin_mib, restore_only=run.hooks.room_made is not None
    )
    run.result.refusals = refusals
    if refusals and not run.force:
        raise run.fail(
            "refused, nothing changed (the server stays suspended): " + " | ".join(refusals), ExitCode.REFUSED
        )
    run.go_on_despite(refusals)


def _restore_and_unlock(run: _Run) -> None:
    """Restore and unlock every PID (the executor); where all run already, only the swap's room is awaited."""
    hooks = run.hooks
    if all(state == "running" for state in run.states.values()):
        run.result.notes.append("every CUDA process was running already")
        if hooks.room_made and not hooks.room_made():
            raise run.fail(
                "the resume was withdrawn before vLLM woke up: the GPU memory it needs was not made free",
                ExitCode.TRANSITION_FAILED,
            )
        return
    transition = Transition(run.config, run.backend, run.result, run.states, run.guard, gpu_progress(run.config))
    try:
        transition.resume(hooks.room_made)
    except RolledBack as failure:
        raise run.fail(f"resume failed: {failure}", ExitCode.TRANSITION_FAILED)
    except Inconsistent as failure:
        raise run.fail(
            f"resume failed: {failure}; the requests stay held. Restart the server (supervisorctl restart vllm)",
            ExitCode.INCONSISTENT,
        )


def _unquiesce(run: _Run, record: SuspendRecord | None, scope: _ResumeScope, control: VllmControl) -> None:
    """Let the requests go: vLLM's resume or wake-up, the dispatcher continued."""
    result = run.result
    began = time.monotonic()
    mark_phase(run.config.run_dir, "unquiesce")
    problems = unquiesce_server(control, record, scope.dispatchers, result)
    result.phases["unquiesce"] = time.monotonic() - began
    result.interrupted = run.guard.received
    for entry in result.dispatchers:
        now = describe(entry["pid"])
        entry["frozen_after"] = bool(now and now.stopped)
    if problems:
        raise run.fail(
            f"every CUDA process runs again, but vLLM was not let go: {'; '.join(problems)}. Run "
            "`cuda-toggle-all running` again (the record is kept)",
            ExitCode.INCONSISTENT,
        )


def _prove_serving(run: _Run, record: SuspendRecord | None, scope: _ResumeScope, control: VllmControl) -> None:
    """The memory came back, vLLM neither paused nor asleep, a one-token completion, no member gone."""
    config, obs, result = run.config, run.obs, run.result
    after = read_gpus(config)
    result.gpus_after = after.to_json()
    memory = returned_proof(after, [g for g in (record.gpus if record else []) if g.released_mib > 0], scope.holders)
    flags = vllm_flags(control)
    result.evidence = {"gpus": memory.to_json(), "vllm": flags}
    failures = []
    if not memory.ok:
        failures.append(memory.failure())
    if obs.capabilities.reachable or control.url != obs.capabilities.url:  # (the record's URL answered)
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
    cuda_processes = [obs.process(pid) for pid in scope.moving]
    gone = [f"PID {p.pid} ({p.short_title(40)})" for p in cuda_processes if not same_process(p.pid, p.create_time)]
    if gone:  # a member died (its tree is ending, say): this instance is not serving, whatever it answered
        failures.append(
            f"{', '.join(gone)} of the server ended meanwhile: supervisord restarts the program once vLLM exits; "
            "run `cuda-toggle-all running` again then"
        )
    if failures:
        raise run.fail(
            "every CUDA process runs again, but the server is not proven to serve: " + "; ".join(failures),
            ExitCode.INCONSISTENT,
        )


__all__ = [
    "move_to",
    "ToggleResult",
    "SUSPEND",
    "RESUME",
    "TARGET_ALIASES",
    "BackendError",
    "GpuReading",
]
