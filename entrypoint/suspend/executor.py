"""The executor: moves CUDA processes to a target state, all in parallel, and rolls back what half-failed.

Suspend = freeze the dispatcher, lock every PID (rounds with a short timeout, retried), checkpoint
every PID, verify. Resume = restore every PID, unlock every PID, verify, continue the dispatcher.
Restoring every process before unlocking any (and locking all before checkpointing any) matters:
acting on one NCCL peer while the other is locked can hang (NVIDIA/cuda-checkpoint issues).

A call that has not returned is never acted on again: the driver cannot cancel it and may still carry
it out, so the PID is `in-flight` until it returns, and a run that cannot wait it out ends INCONSISTENT
(its journal entry tells the next run to wait for it, see cuda/owned_calls.py).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from loguru import logger

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..base.processes import ProcessInfo, describe, same_process
from ..base.results import ToggleResult
from ..cuda.backend import Backend
from ..cuda.parallel import run_parallel
from .records import FrozenProcess


class RolledBack(Exception):
    """The transition failed; every process was put back (see the message for where)."""


class Inconsistent(Exception):
    """The transition failed and could not be rolled back."""


@dataclass(frozen=True)
class OverlapHooks:
    """Let a caller overlap one server's suspend with another's resume on the same GPUs (the gate's swap).

    Both are called from the thread that runs the transition.
    - memory_released: a suspend calls it once vLLM's sleep has handed the weights and KV cache back,
      when its memory proof counts per process (so the other server growing meanwhile cannot fail it);
      the checkpoint of what is left (the CUDA contexts) goes on while the other server restores.
    - neighbour_restore_mib: what the other server's restore may add to the GPUs meanwhile (its record's
      checkpoint_mib). NVML does not list a process while it is restored and still locked (measured on an
      H200, driver 580: ~0.9 GiB unlisted), so the suspend's proof allows that much unlisted growth.
    - room_made: a resume calls it between restore and unlock and waits for its answer; False withdraws
      the resume (the restored processes, still locked, are checkpointed again; vLLM never woke up).
    - stay_asleep_on_rollback: see below (the gate's early wake, gate/overlap.py).
    """

    memory_released: Callable[[], None] | None = None
    neighbour_restore_mib: int = 0
    room_made: Callable[[], bool] | None = None
    # A suspend whose checkpoint fails after vLLM's sleep leaves vLLM asleep (its processes running again,
    # ~0.9 GiB held) instead of waking it: the gate may have woken another server into the room meanwhile.
    stay_asleep_on_rollback: bool = False


# The phases of a suspend and of a resume, in order (the executor and suspend/api.py mark each with
# mark_phase, so a crash can be placed): settle = wait for calls a killed run left in flight, observe =
# read the tree and every state and run the safety checks, quiesce = keep work from the workers (sleep,
# pause or freeze). "rollback" may follow any phase that failed.
SUSPEND_PHASES = ("settle", "observe", "quiesce", "lock", "checkpoint", "verify")
RESUME_PHASES = ("settle", "observe", "restore", "unlock", "verify", "unquiesce")
PHASE_FILE = "phase"


def mark_phase(run_dir: str, phase: str) -> None:
    """Write the phase this run is in to RUN_DIR/phase (and log it at DEBUG); never fails the run."""
    logger.debug("phase: {}", phase)
    path = Path(run_dir) / PHASE_FILE
    try:
        tmp = path.with_name(f"{PHASE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"phase": phase, "pid": os.getpid(), "at": time.time()}) + "\n")
        tmp.replace(path)
    except OSError as error:
        logger.debug("cannot write {}: {}", path, error)


def read_phase(run_dir: str) -> str | None:
    """The phase the last run marked (None when there is none)."""
    try:
        return json.loads((Path(run_dir) / PHASE_FILE).read_text())["phase"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


STATE_READ_TRIES = 3


def read_states(
    config: Config, backend: Backend, pids: list[int], tries: int = STATE_READ_TRIES
) -> tuple[dict[int, str | None], dict[int, str]]:
    """Read every PID's state (None: no CUDA context or gone), retrying failed reads with a short back-off.

    Returns (states, unreadable): a PID counts as unreadable only after `tries` failed reads, and the
    caller must treat it as unknown, never skip it.
    """
    states: dict[int, str | None] = {}
    errors: dict[int, str] = {}
    pending = list(pids)
    for attempt in range(tries):
        if not pending:
            break
        if attempt:
            time.sleep(0.05 * 2**attempt)
        answers: dict[int, str | None] = {}

        def ask(pid: int, answers: dict[int, str | None] = answers) -> None:
            answers[pid] = backend.get_state(pid)

        outcomes = run_parallel("get-state", pending, ask, config.state_timeout_s)
        failed = []
        for pid in pending:
            if outcomes[pid].ok:
                states[pid] = answers.get(pid)
                errors.pop(pid, None)
            elif describe(pid) is None:
                states[pid] = None
                errors.pop(pid, None)
            else:
                errors[pid] = outcomes[pid].error.message if outcomes[pid].error else "no answer"
                failed.append(pid)
        if failed and attempt + 1 < tries:
            logger.info("get-state of {} failed ({}): reading again", failed, "; ".join(errors[p] for p in failed))
        pending = failed
    return states, errors


class SignalGuard:
    """Defers SIGINT and SIGTERM while a transition runs: the phase is finished or rolled back, never cut.

    Only the main thread can install handlers; elsewhere (a library caller's thread) it does nothing.
    """

    def __init__(self) -> None:
        self.received = ""
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = signal.Signals(signum).name
        logger.warning("{} received: finishing or rolling back the current phase before exiting", self.received)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def freeze(process: ProcessInfo, wait_s: float = 5.0) -> None:
    """SIGSTOP the dispatcher and wait until the kernel shows it stopped.

    A stop that has not taken effect in `wait_s` (a process in uninterruptible sleep) is cancelled with
    SIGCONT, which discards a pending stop, so it cannot land later behind our back.
    """
    os.kill(process.pid, signal.SIGSTOP)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        current = describe(process.pid)
        if current is None or current.stopped:
            return
        time.sleep(0.01)
    try:
        os.kill(process.pid, signal.SIGCONT)
        undone = "SIGCONT sent, so it keeps running as before"
    except ProcessLookupError:
        undone = "it is gone now"
    raise ToolError(
        f"PID {process.pid} ({process.short_title(40)}) did not stop within {wait_s:g} s after SIGSTOP; {undone}",
        ExitCode.TRANSITION_FAILED,
    )


def thaw(frozen: FrozenProcess) -> bool:
    """SIGCONT a process we froze, if it is still that process; True when it was continued."""
    if not same_process(frozen.pid, frozen.create_time):
        return False
    try:
        os.kill(frozen.pid, signal.SIGCONT)
    except ProcessLookupError:
        return False
    return True


class Transition:
    """Runs the phases of one suspend or resume over known CUDA processes, updating `result`."""

    def __init__(
        self,
        config: Config,
        backend: Backend,
        result: ToggleResult,
        states: dict[int, str],
        guard: SignalGuard,
        progress: Callable[[], str] | None = None,
    ):
        self.config = config
        self.backend = backend
        self.result = result
        self.states = states  # the state of every CUDA process being moved, kept current
        self.guard = guard
        self.progress = progress
        self.gone: set[int] = set()
        self.in_flight: dict[int, tuple[str, threading.Thread]] = {}

    def mark(self, phase: str) -> None:
        mark_phase(self.config.run_dir, phase)

    # one phase: the operation on every PID at once ------------------------------------------------
    def _phase(
        self,
        op: str,
        pids: list[int],
        call: Callable[[int], None],
        timeout_s: float,
        new_state: str,
        slow: bool = False,
    ) -> list[int]:
        """Run one operation on `pids` in parallel; returns the PIDs that failed (their state re-read).

        A call that does not return in `timeout_s` is waited for (see _await_in_flight) before anything
        else happens: the phase ends only when every call has returned.
        """
        if not pids:
            return []
        began = time.monotonic()
        outcomes = run_parallel(op, pids, call, timeout_s, self.progress if slow else None, self.config.progress_s)
        failed = []
        for pid, outcome in outcomes.items():
            record = self.result.record(pid)
            record.seconds += outcome.seconds
            if outcome.ok:
                self.states[pid] = new_state
            elif outcome.in_flight:
                self.states[pid] = "in-flight"
                self.in_flight[pid] = (op, outcome.thread)
                record.error = str(outcome.error)
                failed.append(pid)
                logger.warning("{}: it may still land, so PID {} is left alone until it returns", outcome.error, pid)
            else:
                failed.append(pid)
                record.error = str(outcome.error)
                logger.warning("{} failed: {}", op, outcome.error)
        if self.in_flight:
            self._await_in_flight(began + self.config.op_timeout_s)
        self.result.phases[op] = self.result.phases.get(op, 0.0) + time.monotonic() - began
        if failed:
            self._reread(failed)
        return sorted(failed)

    def _await_in_flight(self, deadline: float) -> None:
        """Wait for calls that have not returned (never acting on their PIDs meanwhile); Inconsistent when
        one is still running at `deadline`: it may land at any time, so nothing can be rolled back."""
        deadline = max(deadline, time.monotonic() + self.config.state_timeout_s)
        next_progress = time.monotonic() + self.config.progress_s
        while True:
            for pid, (_op, thread) in list(self.in_flight.items()):
                if not thread.is_alive():
                    del self.in_flight[pid]
                    self.states[pid] = "unknown"  # re-read by the caller
            if not self.in_flight:
                return
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_progress:
                logger.info("waiting for calls that have not returned: {}", self._in_flight_names())
                next_progress = now + self.config.progress_s
            for _op, thread in list(self.in_flight.values()):
                thread.join(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        self.result.in_flight = sorted(self.in_flight)
        raise Inconsistent(
            f"{self._in_flight_names()} did not return within CUDA_TOGGLE_OP_TIMEOUT_S={self.config.op_timeout_s:g} s "
            "and may still land: nothing was rolled back; the next cuda-toggle-all waits for it first"
        )

    def _in_flight_names(self) -> str:
        return ", ".join(f"{op} of PID {pid}" for pid, (op, _) in sorted(self.in_flight.items()))

    def _reread(self, pids: list[int]) -> None:
        """Refresh the recorded state of PIDs (a failed call may or may not have acted); reads that keep
        failing leave the PID `unknown`, which nothing skips: it fails the verify and the rollback."""
        pids = [pid for pid in pids if pid not in self.in_flight]
        if not pids:
            return
        read, unreadable = read_states(self.config, self.backend, pids)
        for pid in pids:
            if pid in unreadable:
                self.states[pid] = "unknown"
                logger.warning("cannot read the state of PID {}: {}", pid, unreadable[pid])
            elif read.get(pid) is None:
                self.gone.add(pid)
                self.states.pop(pid, None)
            else:
                self.states[pid] = read[pid]

    def _pids_in(self, *states: str) -> list[int]:
        return sorted(pid for pid, state in self.states.items() if state in states)

    # verify loop ----------------------------------------------------------------------------------
    def verify(self, target: str) -> bool:
        """Re-read every state until all are `target`: CUDA_TOGGLE_VERIFY_ATTEMPTS reads, SLEEP_S apart."""
        self.mark("verify")
        began = time.monotonic()
        pids = sorted(self.states)
        for attempt in range(1, self.config.verify_attempts + 1):
            self._reread(pids)
            pids = sorted(self.states)
            if all(self.states[pid] == target for pid in pids):
                self.result.phases["verify"] = self.result.phases.get("verify", 0.0) + time.monotonic() - began
                return True
            if attempt < self.config.verify_attempts:
                time.sleep(self.config.verify_sleep_s)
        self.result.phases["verify"] = self.result.phases.get("verify", 0.0) + time.monotonic() - began
        lagging = {pid: state for pid, state in self.states.items() if state != target}
        logger.warning("verify: after {} reads, not {}: {}", self.config.verify_attempts, target, lagging)
        return False

    # suspend ---------------------------------------------------------------------------------------
    def lock_all(self) -> None:
        """Lock every running PID; a round where any PID fails is undone and retried until the deadline.

        Under load, one worker's lock can wait on a collective whose peer is already locked: unlocking
        the locked ones lets that collective finish, and the next round usually locks both at once.
        """
        self.mark("lock")
        deadline = time.monotonic() + self.config.lock_deadline_s
        timeout_ms = self.config.lock_timeout_ms
        while True:
            self.result.lock_rounds += 1
            pending = self._pids_in("running")
            failed = self._phase(
                "lock",
                pending,
                lambda pid: self.backend.lock(pid, timeout_ms),
                timeout_ms / 1000.0 + self.config.state_timeout_s,
                "locked",
            )
            if not failed and not self._pids_in("running", "unknown"):
                return
            errors = "; ".join(self.result.record(pid).error for pid in failed)
            unknown = self._pids_in("unknown")
            if unknown:
                self.rollback_to_running()
                raise RolledBack(f"the state of PID {unknown} could not be read while locking: {errors}")
            self._unlock_for_retry()
            if self.guard.received:
                self.rollback_to_running()
                raise RolledBack(f"interrupted by {self.guard.received} while locking")
            if time.monotonic() >= deadline:
                self.rollback_to_running()
                raise RolledBack(
                    f"could not lock every PID within CUDA_TOGGLE_LOCK_DEADLINE_S={self.config.lock_deadline_s:g} s "
                    f"({self.result.lock_rounds} rounds); last errors: {errors}"
                )
            logger.info(
                "lock round {}: {} did not lock; unlocked the others, trying again",
                self.result.lock_rounds,
                failed,
            )
            time.sleep(min(0.05 * self.result.lock_rounds, 0.5))

    def _unlock_for_retry(self) -> None:
        failed = self._phase(
            "unlock", self._pids_in("locked"), self.backend.unlock, self.config.state_timeout_s, "running"
        )
        if failed:
            self.rollback_to_running()
            raise RolledBack(f"unlock of {failed} failed between lock rounds")

    def _checkpoint_locked(self) -> list[int]:
        """Checkpoint every locked PID at once; returns the ones that failed."""
        self.mark("checkpoint")
        return self._phase(
            "checkpoint",
            self._pids_in("locked"),
            self.backend.checkpoint,
            self.config.op_timeout_s,
            "checkpointed",
            slow=True,
        )

    def _restore_checkpointed(self) -> list[int]:
        """Restore every checkpointed PID at once (they stay locked); returns the ones that failed."""
        return self._phase(
            "restore",
            self._pids_in("checkpointed"),
            self.backend.restore,
            self.config.op_timeout_s,
            "locked",
            slow=True,
        )

    def checkpoint_all(self) -> None:
        failed = self._checkpoint_locked()
        if failed:
            errors = "; ".join(self.result.record(pid).error for pid in failed)
            self.rollback_to_running()
            raise RolledBack(f"checkpoint failed: {errors}")

    def rollback_to_running(self, rounds: int = 3) -> None:
        """Restore every checkpointed PID, then unlock every locked one; Inconsistent if that fails.

        Rounds repeat while a PID is left in a state a round can act on (one whose state read failed
        before is read again each round): no PID is skipped because a read once failed.
        """
        logger.warning("rolling back: every process back to running")
        self.mark("rollback")
        for _ in range(rounds):
            self._reread(self._pids_in("unknown"))
            self._restore_checkpointed()
            self._phase("unlock", self._pids_in("locked"), self.backend.unlock, self.config.state_timeout_s, "running")
            if self.verify("running"):
                return
            if not self._pids_in("checkpointed", "locked", "unknown"):
                break
        stuck = {pid: state for pid, state in self.states.items() if state != "running"}
        raise Inconsistent(f"rollback failed, processes not running: {stuck}")

    def _back_to_checkpointed(self, why: str, advice: str = "") -> NoReturn:
        """Checkpoint the restored (still locked) processes again: a consistent suspend, to be resumed later."""
        self.mark("rollback")
        again = self._checkpoint_locked()
        if again or not self.verify("checkpointed"):
            raise Inconsistent(f"{why}, and the restored processes could not be checkpointed again")
        raise RolledBack(f"{why}; every process is checkpointed again: the server is still suspended{advice}")

    def suspend(self) -> None:
        self.lock_all()
        if self.guard.received:
            self.rollback_to_running()
            raise RolledBack(f"interrupted by {self.guard.received} after locking")
        self.checkpoint_all()
        if self.guard.received:  # Ctrl-C on a suspend means "cancel it": undo the finished phase
            self.rollback_to_running()
            raise RolledBack(f"interrupted by {self.guard.received}; the checkpoint was undone")
        if not self.verify("checkpointed"):
            self.rollback_to_running()
            raise RolledBack("not every process reached checkpointed")
        if self.gone:  # a server with a dead member is not suspended, whatever the others read
            self.rollback_to_running()
            raise RolledBack(f"PID {sorted(self.gone)} ended during the suspend")

    # resume ----------------------------------------------------------------------------------------
    def resume(self, room_made: Callable[[], bool] | None = None) -> None:
        """Restore all, then unlock all. A restore that fails without leaving its PID `failed` is rolled
        back to a consistent suspend (the restored ones are checkpointed again), so it can be retried.

        `room_made` (see OverlapHooks) is asked between the two: while it waits, the restored processes
        stay locked, so no CUDA call of theirs runs; when it says no, they are checkpointed again."""
        self.mark("restore")
        failed = self._restore_checkpointed()
        if failed:
            errors = "; ".join(self.result.record(pid).error for pid in failed)
            stuck = self._pids_in("failed", "unknown")
            if stuck:
                raise Inconsistent(f"restore failed and left {stuck} stuck or unreadable ({errors})")
            if self._pids_in("checkpointed"):  # the restore did not act: go back to a consistent suspend
                self._back_to_checkpointed(f"restore failed ({errors})", ", fix the cause and resume again")
            # the call failed but every PID is restored by now (e.g. it landed late): carry on
        if room_made is not None:
            began = time.monotonic()
            made = room_made()
            self.result.phases["wait_for_room"] = time.monotonic() - began
            if not made:
                self._back_to_checkpointed("the resume was withdrawn: the GPU memory it needs was not made free")
        self.mark("unlock")
        for _ in range(3):  # an unlock that fails once is retried: every worker is restored by now
            self._reread(self._pids_in("unknown"))
            if not self._phase(
                "unlock", self._pids_in("locked"), self.backend.unlock, self.config.state_timeout_s, "running"
            ) and not self._pids_in("unknown"):
                break
        if not self.verify("running"):
            stuck = {pid: state for pid, state in self.states.items() if state != "running"}
            raise Inconsistent(f"resume did not bring every process back to running: {stuck}")
