"""The executor: moves CUDA processes to a target state, all in parallel, and rolls back what half-failed.

Suspend = freeze the dispatcher, lock every PID (rounds with a short timeout, retried), checkpoint
every PID, verify. Resume = restore every PID, unlock every PID, verify, continue the dispatcher.
Restoring every process before unlocking any (and locking all before checkpointing any) matters:
acting on one NCCL peer while the other is locked can hang (NVIDIA/cuda-checkpoint issues).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from .backends import Backend, BackendError
from .config import Config
from .errors import ExitCode, SuspendError
from .processes import ProcessInfo, describe, same_process
from .results import ToggleResult
from .runstate import FrozenProcess


class RolledBack(Exception):
    """The transition failed; every process was put back (see the message for where)."""


class Inconsistent(Exception):
    """The transition failed and could not be rolled back."""


@dataclass
class Outcome:
    ok: bool
    seconds: float
    error: BackendError | None = None


def run_parallel(
    op: str,
    pids: list[int],
    call: Callable[[int], None],
    timeout_s: float,
    progress: Callable[[], str] | None = None,
    progress_s: float = 5.0,
) -> dict[int, Outcome]:
    """Run `call(pid)` for every PID at once, one thread each; a call past `timeout_s` counts as failed.

    Threads are daemons: a driver call that never returns cannot be cancelled, but must not keep the
    tool from reporting and exiting.
    """
    outcomes: dict[int, Outcome] = {}
    guard = threading.Lock()
    started = time.monotonic()

    def work(pid: int) -> None:
        begin = time.monotonic()
        try:
            call(pid)
            outcome = Outcome(True, time.monotonic() - begin)
        except BackendError as error:
            outcome = Outcome(False, time.monotonic() - begin, error)
        except Exception as error:  # a bug or an OS error in one thread must not hide the others' results
            outcome = Outcome(False, time.monotonic() - begin, BackendError(op, pid, repr(error)))
        with guard:
            outcomes[pid] = outcome

    threads = [threading.Thread(target=work, args=(pid,), name=f"{op}-{pid}", daemon=True) for pid in pids]
    for thread in threads:
        thread.start()
    deadline = started + timeout_s
    next_progress = started + progress_s
    while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
        for thread in threads:
            thread.join(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        now = time.monotonic()
        if progress is not None and now >= next_progress:
            with guard:
                done = len(outcomes)
            logger.info("{}: {}/{} PIDs done after {:.0f} s; {}", op, done, len(pids), now - started, progress())
            next_progress = now + progress_s
    with guard:
        final = dict(outcomes)
    for pid in pids:
        if pid not in final:
            final[pid] = Outcome(
                False, timeout_s, BackendError(op, pid, f"did not return in {timeout_s:g} s", timed_out=True)
            )
    return final


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
    """SIGSTOP the dispatcher and wait until the kernel shows it stopped."""
    os.kill(process.pid, signal.SIGSTOP)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        current = describe(process.pid)
        if current is None or current.stopped:
            return
        time.sleep(0.01)
    raise SuspendError(
        f"PID {process.pid} ({process.short_title(40)}) did not stop within {wait_s:g} s after SIGSTOP",
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
        """Run one operation on `pids` in parallel; returns the PIDs that failed (their state re-read)."""
        if not pids:
            return []
        began = time.monotonic()
        outcomes = run_parallel(op, pids, call, timeout_s, self.progress if slow else None, self.config.progress_s)
        self.result.phases[op] = self.result.phases.get(op, 0.0) + time.monotonic() - began
        failed = []
        for pid, outcome in outcomes.items():
            record = self.result.record(pid)
            record.seconds += outcome.seconds
            if outcome.ok:
                self.states[pid] = new_state
            else:
                failed.append(pid)
                record.error = str(outcome.error)
                logger.warning("{} failed: {}", op, outcome.error)
        if failed:
            self._reread(failed)
        return sorted(failed)

    def _reread(self, pids: list[int]) -> None:
        """Refresh the recorded state of PIDs after a failure (a failed call may or may not have acted)."""
        if not pids:
            return
        read: dict[int, str | None] = {}

        def get(pid: int) -> None:
            read[pid] = self.backend.get_state(pid)

        outcomes = run_parallel("get-state", pids, get, self.config.state_timeout_s)
        for pid in pids:
            if outcomes[pid].ok:
                if read[pid] is None:
                    self.gone.add(pid)
                    self.states.pop(pid, None)
                else:
                    self.states[pid] = read[pid]
            else:
                self.states[pid] = "unknown"

    def _pids_in(self, *states: str) -> list[int]:
        return sorted(pid for pid, state in self.states.items() if state in states)

    # verify loop ----------------------------------------------------------------------------------
    def verify(self, target: str) -> bool:
        """Re-read every state until all are `target`: CUDA_TOGGLE_VERIFY_ATTEMPTS reads, SLEEP_S apart."""
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
            if not failed:
                return
            errors = "; ".join(self.result.record(pid).error for pid in failed)
            unknown = [pid for pid in failed if self.states.get(pid) == "unknown"]
            if unknown:
                self.rollback_to_running()
                raise RolledBack(f"lock of PID {unknown} did not return: {errors}")
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
        return self._phase(
            "checkpoint",
            self._pids_in("locked"),
            self.backend.checkpoint,
            self.config.op_timeout_s,
            "checkpointed",
            slow=True,
        )

    def checkpoint_all(self) -> None:
        failed = self._checkpoint_locked()
        if failed:
            errors = "; ".join(self.result.record(pid).error for pid in failed)
            self.rollback_to_running()
            raise RolledBack(f"checkpoint failed: {errors}")

    def rollback_to_running(self) -> None:
        """Restore every checkpointed PID, then unlock every locked one; Inconsistent if that fails."""
        logger.warning("rolling back: every process back to running")
        self._phase(
            "restore",
            self._pids_in("checkpointed"),
            self.backend.restore,
            self.config.op_timeout_s,
            "locked",
            slow=True,
        )
        self._phase("unlock", self._pids_in("locked"), self.backend.unlock, self.config.state_timeout_s, "running")
        if not self.verify("running"):
            stuck = {pid: state for pid, state in self.states.items() if state != "running"}
            raise Inconsistent(f"rollback failed, processes not running: {stuck}")

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

    # resume ----------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Restore all, then unlock all. A restore that fails without leaving its PID `failed` is rolled
        back to a consistent suspend (the restored ones are checkpointed again), so it can be retried."""
        failed = self._phase(
            "restore",
            self._pids_in("checkpointed"),
            self.backend.restore,
            self.config.op_timeout_s,
            "locked",
            slow=True,
        )
        if failed:
            errors = "; ".join(self.result.record(pid).error for pid in failed)
            stuck = self._pids_in("failed", "unknown")
            if stuck:
                raise Inconsistent(f"restore failed and left {stuck} stuck ({errors})")
            again = self._checkpoint_locked()
            if again or not self.verify("checkpointed"):
                raise Inconsistent(
                    f"restore failed ({errors}) and the restored processes could not be checkpointed again"
                )
            raise RolledBack(
                f"restore failed ({errors}); every process is checkpointed again: the server is "
                "still suspended, fix the cause and resume again"
            )
        for _ in range(3):  # an unlock that fails once is retried: every worker is restored by now
            if not self._phase(
                "unlock", self._pids_in("locked"), self.backend.unlock, self.config.state_timeout_s, "running"
            ):
                break
        if not self.verify("running"):
            stuck = {pid: state for pid, state in self.states.items() if state != "running"}
            raise Inconsistent(f"resume did not bring every process back to running: {stuck}")
