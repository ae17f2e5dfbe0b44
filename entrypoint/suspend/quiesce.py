"""Keeping work away from a server while its GPU state is away, and letting it through again: vLLM's own
scheduler pause or sleep (mode=keep), or the SIGSTOP of a dispatcher on older vLLM."""

from __future__ import annotations

import time

from loguru import logger

from ..base.processes import ProcessInfo
from ..base.results import ToggleResult
from ..server.vllm_control import VllmControl, VllmControlError
from .executor import freeze, thaw
from .plan import SuspendPlan
from .records import FrozenProcess, SuspendRecord


def quiesce_server(plan: SuspendPlan, control: VllmControl, result: ToggleResult) -> None:
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


def unquiesce_server(
    control: VllmControl, record: SuspendRecord | None, dispatchers: list[ProcessInfo], result: ToggleResult
) -> list[str]:
    """Let work reach the server again: continue what we froze, wake vLLM up or resume its scheduler.

    Whatever the record says, vLLM's own flags decide (a run killed mid-sleep left no complete record).
    Returns the problems (empty when the server was let go).
    """
    problems = []
    for pid in thaw_all(record, dispatchers):
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


def thaw_all(record: SuspendRecord | None, dispatchers: list[ProcessInfo]) -> list[int]:
    """Continue every dispatcher we (or an earlier run) froze; returns the PIDs continued."""
    frozen = {f.pid: f for f in (record.frozen if record else [])}
    for process in dispatchers:
        if process.stopped or process.pid in frozen:
            frozen.setdefault(process.pid, FrozenProcess(process.pid, process.create_time, process.title))
    return [pid for pid, f in frozen.items() if thaw(f)]


def vllm_flags(control: VllmControl, engine_frozen: bool = False) -> dict[str, bool | None]:
    """vLLM's /is_paused and /is_sleeping; None (unknown) while its dispatcher is frozen: both are answered
    through EngineCore, so each would only wait out its timeout."""
    if engine_frozen:
        return {"is_paused": None, "is_sleeping": None}
    return {"is_paused": control.is_paused(), "is_sleeping": control.is_sleeping()}
