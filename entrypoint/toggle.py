"""The library API: suspend, resume and status of a server's CUDA processes.

Used by the `cuda-toggle-all` CLI, by `selftest`, and by the gate (never through a subprocess).
Everything here observes, plans and refuses; the side effects happen in transition.py.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import psutil
from loguru import logger

from . import safety
from .backends import Backend, BackendError, select_backend
from .config import Config
from .discovery import ServerRoot, find_server
from .errors import ExitCode, SuspendError
from .gpus import GpuReading, read_gpus
from .operations import settle_orphans
from .processes import ProcessInfo, describe, inherited_environ, walk_tree
from .runstate import FrozenProcess, GpuRecord, ProcessRecord, SuspendRecord, ToolLock
from .sleep_mode import SleepClient, SleepModeError, server_url
from .transition import (
    Inconsistent,
    PidResult,
    RolledBack,
    SignalGuard,
    ToggleResult,
    Transition,
    freeze,
    mark_phase,
    read_states,
    thaw,
)

SUSPEND, RESUME = "checkpointed", "running"
TARGET_ALIASES = {"checkpointed": SUSPEND, "suspend": SUSPEND, "running": RESUME, "resume": RESUME}


@dataclass
class Observation:
    """What the server looks like right now: its tree, who is frozen, and every CUDA state."""

    root: ServerRoot
    tree: list[ProcessInfo]
    states: dict[int, str]  # CUDA processes (not stopped) -> state
    unreadable: dict[int, str]  # PIDs whose state could not be read -> error
    stopped: list[ProcessInfo]
    dispatchers: list[ProcessInfo]  # processes titled like the dispatcher (stopped or not)

    def title(self, pid: int) -> str:
        return next((p.title for p in self.tree if p.pid == pid), "?")

    def process(self, pid: int) -> ProcessInfo:
        return next(p for p in self.tree if p.pid == pid)


def observe(config: Config, backend: Backend, pid: int | None) -> Observation:
    root = find_server(config, pid)
    tree = walk_tree(root.pid)
    stopped = [p for p in tree if p.stopped]
    for process in stopped:
        if not process.matches(config.dispatcher):
            logger.warning(
                "PID {} ({}) is stopped: left out (a stopped process must never be locked)",
                process.pid,
                process.short_title(40),
            )
    asked = [p.pid for p in tree if not p.stopped]
    answers, unreadable = read_states(config, backend, asked)
    states = {pid: state for pid, state in answers.items() if state is not None}
    dispatchers = [p for p in tree if p.matches(config.dispatcher)]
    return Observation(root, tree, states, unreadable, stopped, dispatchers)


def _gpu_progress(config: Config):
    def line() -> str:
        return read_gpus(config).summary()

    return line


def _new_result(
    target: str, observation: Observation, backend: Backend, transitioned: list[int], worker_pids: set[int]
) -> ToggleResult:
    result = ToggleResult(
        target=target, root_pid=observation.root.pid, root_how=observation.root.how, backend=backend.name
    )
    dispatcher_pids = {p.pid for p in observation.dispatchers}
    for pid in transitioned:
        role = "worker" if pid in worker_pids else "disp." if pid in dispatcher_pids else "cuda"
        result.pids.append(PidResult(pid, observation.title(pid), role, observation.states[pid]))
    result.skipped = [{"pid": p.pid, "name": p.title, "reason": "stopped"} for p in observation.stopped]
    return result


def _finish(result: ToggleResult, states: dict[int, str], started: float) -> ToggleResult:
    for record in result.pids:
        record.after = states.get(record.pid, "gone")
    result.seconds = time.monotonic() - started
    return result


def toggle(
    target: str,
    config: Config,
    *,
    pid: int | None = None,
    force: bool = False,
    freeze_dispatcher: bool = True,
    backend_name: str | None = None,
    mode: str | None = None,
) -> ToggleResult:
    """Move every CUDA process of the server to `target` (checkpointed or running).

    Returns the result when the server reached the target; raises SuspendError (with `.result`) otherwise.
    """
    target = TARGET_ALIASES[target]
    started = time.monotonic()
    with ToolLock(config.run_dir, config.busy_wait_s, purpose=f"cuda-toggle-all {target}"):
        backend = select_backend(config, backend_name)
        mark_phase(config.run_dir, "settle")
        settled = settle_orphans(config, backend)
        mark_phase(config.run_dir, "observe")
        observation = observe(config, backend, pid)
        try:
            if target == SUSPEND:
                result = _suspend(config, backend, observation, force, freeze_dispatcher, started, mode or config.mode)
            else:
                result = _resume(config, backend, observation, force, started)
        except SuspendError as failure:
            if isinstance(failure.result, ToggleResult):
                failure.result.notes[:0] = settled
            raise
        result.notes[:0] = settled
        return result


def _load_record(config: Config, obs: Observation) -> SuspendRecord | None:
    root = obs.process(obs.root.pid)
    return SuspendRecord.load(config.run_dir, root.pid, root.create_time)


def _fail(result: ToggleResult, message: str, code: ExitCode, started: float, states: dict[int, str]) -> SuspendError:
    _finish(result, states, started)
    result.ok, result.error, result.exit_code = False, message, int(code)
    return SuspendError(message, code, result)


def _sleep_client(config: Config, obs: Observation, record: SuspendRecord | None = None) -> SleepClient:
    url = (
        record.server_url if record and record.server_url else server_url(obs.process(obs.root.pid), config.server_url)
    )
    return SleepClient(url, config.sleep_timeout_s)


def _suspend(
    config: Config, backend: Backend, obs: Observation, force: bool, freeze_on: bool, started: float, mode: str
) -> ToggleResult:
    dispatchers = obs.dispatchers if freeze_on else []
    dispatcher_pids = {p.pid for p in dispatchers}
    moving = sorted(pid for pid in obs.states if pid not in dispatcher_pids)
    workers = safety.workers_of(obs.tree, moving, config.worker)
    result = _new_result(SUSPEND, obs, backend, moving, {w.pid for w in workers})
    result.forced = force
    states = {pid: obs.states[pid] for pid in moving}
    if not moving:
        raise _fail(
            result,
            f"no CUDA processes in the tree of PID {obs.root.pid} ({obs.root.how}): is the model "
            "loaded yet? (cuda-toggle-all status shows every process)",
            ExitCode.NO_CUDA_PROCESSES,
            started,
            states,
        )

    refusals = []
    if obs.unreadable:
        refusals += [
            f"cannot read the CUDA state of PID {p} ({obs.title(p)[:40]}): {e}; the container needs "
            "SYS_PTRACE and seccomp=unconfined, and the tool must run as root"
            for p, e in obs.unreadable.items()
        ]
    stuck = [pid for pid, state in states.items() if state == "failed"]
    if stuck:
        raise _fail(
            result,
            f"PID {stuck} is in CUDA state `failed` (a failed restore cannot be undone): restart the server",
            ExitCode.INCONSISTENT,
            started,
            states,
        )
    if freeze_on and not dispatchers and len(workers) > 0:
        refusals.append(
            f"no dispatcher process titled {list(config.dispatcher)} in the server's tree: a request reaching a "
            "suspended worker kills the server. Set CUDA_TOGGLE_DISPATCHER to the process that hands work to the "
            "workers, or pass --no-freeze if nothing can send work while suspended"
        )
    refusals += safety.nccl_refusals(workers, inherited_environ)
    refusals += safety.vllm_all_reduce_refusals(obs.tree, workers, inherited_environ)
    gpus = read_gpus(config)
    result.gpus_before, result.gpu_source = gpus.to_json(), gpus.source
    to_copy = [pid for pid in moving if states[pid] != "checkpointed"]
    if gpus.gpus and to_copy:
        available = psutil.virtual_memory().available
        limit = safety.cgroup_available_bytes()
        if limit is not None:
            available = min(available, limit)
        if config.host_ram_mib is not None:
            available = config.host_ram_mib * 2**20
        refusals += safety.host_memory_refusals(
            safety.memory_to_copy_mib(gpus, to_copy), available // 2**20, config.ram_margin_mib
        )
    result.refusals = refusals
    if refusals and not force:
        raise _fail(result, "refused, nothing changed: " + " | ".join(refusals), ExitCode.REFUSED, started, states)
    for reason in refusals:
        logger.warning("--force: going on despite: {}", reason)

    mark_phase(config.run_dir, "quiesce")
    client = _sleep_client(config, obs)
    if mode != "plain" and not all(state == "checkpointed" for state in states.values()):
        sleeping = client.is_sleeping() if not any(p.stopped for p in dispatchers) else None
        if sleeping is None:
            if mode == "hybrid":
                raise _fail(
                    result,
                    f"refused, nothing changed: --mode hybrid, but {client.url} has no sleep mode "
                    "(/is_sleeping): start vLLM with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (behind "
                    "the gate), set CUDA_TOGGLE_SERVER_URL, or use --mode plain",
                    ExitCode.REFUSED,
                    started,
                    states,
                )
            mode = "plain"
        elif not sleeping:
            began = time.monotonic()
            try:
                client.sleep(level=1)
                result.phases["sleep"] = time.monotonic() - began
                logger.info(
                    "vLLM sleeps (level 1) after {:.2f} s: the checkpoint copies only what remains",
                    result.phases["sleep"],
                )
                mode = "hybrid"
            except SleepModeError as error:
                logger.warning("sleep failed ({}): falling back to a plain suspend", error)
                result.notes.append(f"sleep failed ({error}): plain suspend")
                mode = "plain"
        else:
            mode = "hybrid"
    else:
        mode = "plain" if mode == "plain" else ((_load_record(config, obs) or SuspendRecord(0, 0, "", 0)).mode)
    result.mode = mode

    already_frozen = [p for p in dispatchers if p.stopped]
    result.dispatchers = [
        {"pid": p.pid, "name": p.title, "frozen_before": p.stopped, "frozen_after": True} for p in dispatchers
    ]
    record = _load_record(config, obs)
    if record is None:
        root = obs.process(obs.root.pid)
        record = SuspendRecord(obs.root.pid, root.create_time, backend.name, time.time())
    known = {f.pid for f in record.frozen}
    record.frozen += [FrozenProcess(p.pid, p.create_time, p.title) for p in dispatchers if p.pid not in known]
    moved = {p.pid for p in record.cuda}
    record.cuda += [
        ProcessRecord(p.pid, p.create_time, p.title) for p in obs.tree if p.pid in states and p.pid not in moved
    ]
    record.complete = False
    record.mode, record.server_url = mode, client.url
    record.quiesce = "sigstop" if dispatchers else "none"
    record.save(config.run_dir)  # before freezing: a crash from here on leaves what `running` needs to repair

    with SignalGuard() as guard:
        for process in dispatchers:
            if process not in already_frozen:
                freeze(process)
                logger.info("froze the dispatcher PID {} ({})", process.pid, process.short_title(40))
        if all(state == "checkpointed" for state in states.values()):
            result.notes.append("already checkpointed: nothing to do")
        else:
            transition = Transition(config, backend, result, states, guard, _gpu_progress(config))
            try:
                transition.suspend()
            except (RolledBack, Inconsistent) as failure:
                result.interrupted = guard.received
                _thaw_all(record, dispatchers)
                record.clear(config.run_dir)
                if mode == "hybrid":
                    _wake(client, result)
                code = ExitCode.TRANSITION_FAILED if isinstance(failure, RolledBack) else ExitCode.INCONSISTENT
                hint = (
                    "every process is running again and the dispatcher continued"
                    if code == ExitCode.TRANSITION_FAILED
                    else "restart the server (supervisorctl restart vllm)"
                )
                raise _fail(result, f"suspend failed: {failure}; {hint}", code, started, states)
        # still under the guard: a signal now must not cut the record short of `complete`
        after = read_gpus(config)
        result.gpus_after = after.to_json()
        before_by_uuid = gpus.by_uuid()
        record.merge_gpus(
            [
                GpuRecord(
                    g.uuid,
                    g.index,
                    before_by_uuid[g.uuid].used_mib if g.uuid in before_by_uuid else g.used_mib,
                    g.used_mib,
                )
                for g in after.gpus
            ]
        )
        record.complete = True
        record.save(config.run_dir)
        result.interrupted = guard.received
    _finish(result, states, started)
    result.ok = True
    return result


def _thaw_all(record: SuspendRecord | None, dispatchers: list[ProcessInfo]) -> list[int]:
    """Continue every dispatcher we (or an earlier run) froze; returns the PIDs continued."""
    frozen = {f.pid: f for f in (record.frozen if record else [])}
    for process in dispatchers:
        if process.stopped or process.pid in frozen:
            frozen.setdefault(process.pid, FrozenProcess(process.pid, process.create_time, process.title))
    continued = [pid for pid, f in frozen.items() if thaw(f)]
    for pid in continued:
        logger.info("continued the dispatcher PID {}", pid)
    return continued


def _resume(config: Config, backend: Backend, obs: Observation, force: bool, started: float) -> ToggleResult:
    moving = sorted(obs.states)
    workers = safety.workers_of(obs.tree, moving, config.worker)
    result = _new_result(RESUME, obs, backend, moving, {w.pid for w in workers})
    result.forced = force
    states = dict(obs.states)
    record = _load_record(config, obs)
    frozen = [p for p in obs.dispatchers if p.stopped]
    result.dispatchers = [
        {"pid": p.pid, "name": p.title, "frozen_before": p.stopped, "frozen_after": False} for p in obs.dispatchers
    ]
    if obs.unreadable:
        raise _fail(
            result,
            "cannot read the CUDA state of "
            + "; ".join(f"PID {p}: {e}" for p, e in obs.unreadable.items())
            + ": the dispatcher stays frozen; fix the access "
            "(SYS_PTRACE, root) and resume again",
            ExitCode.REFUSED,
            started,
            states,
        )
    if not moving and not frozen:
        raise _fail(
            result,
            f"no CUDA processes in the tree of PID {obs.root.pid} ({obs.root.how})",
            ExitCode.NO_CUDA_PROCESSES,
            started,
            states,
        )
    stuck = [pid for pid, state in states.items() if state == "failed"]
    if stuck:
        _thaw_all(record, obs.dispatchers)
        raise _fail(
            result,
            f"PID {stuck} is in CUDA state `failed` and cannot be restored: restart the server "
            "(supervisorctl restart vllm)",
            ExitCode.INCONSISTENT,
            started,
            states,
        )
    gpus = read_gpus(config)
    result.gpus_before, result.gpu_source = gpus.to_json(), gpus.source
    if any(state == "checkpointed" for state in states.values()):
        refusals = safety.restore_refusals(record, gpus, config.restore_margin_mib)
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

    with SignalGuard() as guard:
        if all(state == "running" for state in states.values()):
            result.notes.append("already running" + (": continued the frozen dispatcher" if frozen else ""))
        else:
            transition = Transition(config, backend, result, states, guard, _gpu_progress(config))
            try:
                transition.resume()
            except RolledBack as failure:
                raise _fail(result, f"resume failed: {failure}", ExitCode.TRANSITION_FAILED, started, states)
            except Inconsistent as failure:
                _thaw_all(record, obs.dispatchers)
                if record is not None:
                    record.clear(config.run_dir)
                raise _fail(
                    result,
                    f"resume failed: {failure}; restart the server (supervisorctl restart vllm)",
                    ExitCode.INCONSISTENT,
                    started,
                    states,
                )
        mark_phase(config.run_dir, "unquiesce")
        _thaw_all(record, obs.dispatchers)
        result.interrupted = guard.received
        client = _sleep_client(config, obs, record)
        if (record is not None and record.mode == "hybrid") or client.is_sleeping():
            result.mode = "hybrid"
            if not _wake(client, result):
                if record is not None:
                    record.clear(config.run_dir)
                raise _fail(
                    result,
                    f"the CUDA processes run again but vLLM did not wake up: {result.notes[-1]}; "
                    "run `cuda-toggle-all running` again",
                    ExitCode.TRANSITION_FAILED,
                    started,
                    states,
                )
        for entry in result.dispatchers:  # still under the guard: the record goes with the last step
            entry["frozen_after"] = bool(describe(entry["pid"]) and describe(entry["pid"]).stopped)
        if record is not None:
            record.clear(config.run_dir)
        result.gpus_after = read_gpus(config).to_json()
        result.interrupted = guard.received
    _finish(result, states, started)
    result.ok = True
    return result


def _wake(client: SleepClient, result: ToggleResult) -> bool:
    """POST /wake_up (after the dispatcher runs again: the wake-up goes through it); False on failure."""
    began = time.monotonic()
    try:
        client.wake_up()
    except SleepModeError as error:
        result.notes.append(f"wake-up failed: {error}")
        logger.error("wake-up failed: {}", error)
        return False
    result.phases["wake_up"] = time.monotonic() - began
    logger.info("vLLM woke up in {:.2f} s", result.phases["wake_up"])
    return True


@dataclass
class StatusResult:
    root_pid: int
    root_how: str
    backend: str
    state: str  # running | checkpointed | locked | mixed
    pids: list[dict] = field(default_factory=list)  # {pid, name, role, state}
    dispatchers: list[dict] = field(default_factory=list)  # {pid, name, frozen}
    skipped: list[dict] = field(default_factory=list)
    gpus: list[dict] = field(default_factory=list)
    gpu_source: str = ""
    suspend_record: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def status(config: Config, *, pid: int | None = None, backend_name: str | None = None) -> StatusResult:
    """What every process of the server is, whether the dispatcher is frozen, and the GPUs' memory."""
    backend = select_backend(config, backend_name)
    obs = observe(config, backend, pid)
    workers = {w.pid for w in safety.workers_of(obs.tree, sorted(obs.states), config.worker)}
    dispatcher_pids = {p.pid for p in obs.dispatchers}
    pids = []
    for process in obs.tree:
        if process.pid in obs.states:
            role = "worker" if process.pid in workers else "dispatcher" if process.pid in dispatcher_pids else "cuda"
            pids.append({"pid": process.pid, "name": process.title, "role": role, "state": obs.states[process.pid]})
        elif process.pid in obs.unreadable:
            pids.append(
                {
                    "pid": process.pid,
                    "name": process.title,
                    "role": "unknown",
                    "state": f"error: {obs.unreadable[process.pid]}",
                }
            )
    distinct = {entry["state"] for entry in pids if entry["role"] != "dispatcher"}
    overall = distinct.pop() if len(distinct) == 1 else ("none" if not distinct else "mixed")
    gpus = read_gpus(config)
    record = _load_record(config, obs)
    return StatusResult(
        root_pid=obs.root.pid,
        root_how=obs.root.how,
        backend=backend.name,
        state=overall,
        pids=pids,
        dispatchers=[{"pid": p.pid, "name": p.title, "frozen": p.stopped} for p in obs.dispatchers],
        skipped=[
            {"pid": p.pid, "name": p.title, "reason": "stopped"} for p in obs.stopped if p.pid not in dispatcher_pids
        ],
        gpus=gpus.to_json(),
        gpu_source=gpus.source if gpus.gpus else gpus.problem,
        suspend_record=asdict(record) if record else None,
    )


__all__ = [
    "toggle",
    "status",
    "StatusResult",
    "ToggleResult",
    "SUSPEND",
    "RESUME",
    "TARGET_ALIASES",
    "BackendError",
    "GpuReading",
]
