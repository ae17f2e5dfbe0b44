"""The gate's light sleep: the first of its two stages of idleness (GATE_IDLE_SLEEP_S, then GATE_IDLE_SUSPEND_S).

A light sleep is vLLM's own sleep, level 1 with mode=keep, and no checkpoint: the weights go to host RAM,
the KV cache is dropped, and the CUDA context (~0.9 GiB at the 8B-AWQ shape) stays on the GPU. Through the
gate it wakes to a first token in 0.34-0.39 s, against about 1.0 s from the deep suspend (0 MiB). Measured on
one H100, docs/gpu-results.md section 17.

RUN_DIR/asleep.json marks a server that the gate put to light sleep, so that a gate started again (or
`cuda-toggle-all status`) knows vLLM waits for a wake-up: while it sleeps vLLM queues every request and
answers none. The deep suspend of a sleeping server is the library's hybrid suspend: its /sleep finds vLLM
asleep already (a no-op, 0.01 s) and it checkpoints what remains; its resume wakes vLLM up.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..server.vllm_control import VllmControl, VllmControlError
from .records import SuspendRecord, ToolLock

ASLEEP_FILE = "asleep.json"
# What the tool's lock says while the gate sleeps or wakes a server: a wake-up ends like a resume
# ("running"), so that another reader of the lock waits for it as for a resume (gate/control.py: phase_of_tool_run).
SLEEP_PURPOSE = "vllm-gate light sleep"
WAKE_PURPOSE = "vllm-gate wake-up from light sleep: running"


@dataclass
class LightResult:
    """What a light sleep or wake-up did, shaped like the library's ToggleResult where the gate reads it."""

    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    evidence: dict = field(default_factory=dict)


def asleep_path(run_dir: str) -> Path:
    return Path(run_dir) / ASLEEP_FILE


def is_asleep(run_dir: str) -> bool:
    """The gate put the server to light sleep and has not woken it (a suspend record overrides it)."""
    return asleep_path(run_dir).exists()


def asleep_since(run_dir: str) -> float | None:
    try:
        return float(json.loads(asleep_path(run_dir).read_text())["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_asleep(run_dir: str) -> None:
    asleep_path(run_dir).write_text(json.dumps({"since": time.time()}))


def clear_asleep(run_dir: str) -> None:
    with contextlib.suppress(OSError):
        asleep_path(run_dir).unlink()


def _control(config: Config) -> VllmControl:
    if not config.server_url:
        raise ToolError("the light sleep needs the server's address (CUDA_TOGGLE_SERVER_URL)", ExitCode.USAGE)
    return VllmControl(config.server_url, config.sleep_timeout_s)


def light_sleep(config: Config, *, pid: int | None = None) -> LightResult:
    """vLLM's sleep level 1 with mode=keep, no checkpoint; refused where the sleep could lose requests."""
    with ToolLock(config.run_dir, config.busy_wait_s, purpose=SLEEP_PURPOSE):
        if SuspendRecord.any(config.run_dir):
            raise ToolError("the server is suspended: nothing to put to sleep", ExitCode.REFUSED)
        control = _control(config)
        caps = control.capabilities()
        if not (caps.sleep and caps.sleep_pauses_scheduler):
            raise ToolError(
                "GATE_IDLE_SLEEP_S needs vLLM >= 0.17 with sleep mode (VLLM_SLEEP_MODE=1): this server has "
                f"{'a sleep that does not hold requests' if caps.sleep else 'no sleep mode'}",
                ExitCode.REFUSED,
            )
        began = time.monotonic()
        try:
            control.sleep(level=1)
        except VllmControlError as error:
            raise ToolError(f"light sleep failed: {error}", ExitCode.TRANSITION_FAILED)
        mark_asleep(config.run_dir)
        return LightResult(phases={"sleep": time.monotonic() - began}, notes=["vLLM sleeps (level 1), no checkpoint"])


def light_wake(config: Config, *, pid: int | None = None) -> LightResult:
    """vLLM's wake-up (weights back, KV cache anew), then the marker goes."""
    with ToolLock(config.run_dir, config.busy_wait_s, purpose=WAKE_PURPOSE):
        control = _control(config)
        began = time.monotonic()
        try:
            control.wake_up()
        except VllmControlError as error:
            raise ToolError(f"wake-up from the light sleep failed: {error}", ExitCode.TRANSITION_FAILED)
        clear_asleep(config.run_dir)
        return LightResult(phases={"wake_up": time.monotonic() - began}, notes=["woke vLLM up from its light sleep"])
