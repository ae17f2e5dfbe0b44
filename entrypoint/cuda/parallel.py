"""A backend operation on every PID at once, one thread each, each bounded by a timeout.

The executor's every step and the settling of calls a killed run left in flight (owned_calls.py) share it:
a driver call cannot be cancelled, so a call past its timeout is reported with its thread (in flight)
and never acted on again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from .backend import BackendError


@dataclass
class Outcome:
    ok: bool
    seconds: float
    error: BackendError | None = None
    thread: threading.Thread | None = None  # set while the call has not returned (in flight)

    @property
    def in_flight(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


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
    for thread, pid in zip(threads, pids, strict=True):
        if pid not in final:
            final[pid] = Outcome(
                False,
                timeout_s,
                BackendError(op, pid, f"did not return in {timeout_s:g} s", timed_out=True),
                thread,
            )
    return final
