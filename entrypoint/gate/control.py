"""The gate's power control: is the server running, when must it be woken, when may it be suspended.

One source of truth, shared with `cuda-toggle-all`: the suspend records (RUN_DIR/servers/, there
while the server is suspended or a suspend runs) and the tool's lock (held while any transition runs).
The gate adds what only it knows: its own transition in flight, and the requests it has in flight.
Transitions go through the library (suspend/api.py) in a worker thread, never a subprocess, and take the
same lock as the tool, so the two never transition at once.

Everything here runs on the event loop, so a check and the change it leads to (say, "nothing in flight"
then "suspending") cannot be split by a request: that is what keeps requests away from a suspended worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import aiohttp
from loguru import logger

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..suspend.api import RESUME, SUSPEND, move_to
from ..suspend.executor import OverlapHooks
from ..suspend.hold import Hold
from ..suspend.light_sleep import clear_asleep, is_asleep, light_sleep, light_wake
from ..suspend.records import SuspendRecord
from ..suspend.status import status
from .config import GateConfig
from .metrics import GateMetrics

# A request that keeps finding the server suspended again (someone suspending in a loop) gives up.
MAX_WAKE_ROUNDS = 5
# After a failed resume, the watcher waits this long before trying again for requests in flight;
# a newly arriving request still tries at once.
RESUME_RETRY_S = 5.0


class Phase(str, Enum):
    RUNNING = "running"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESUMING = "resuming"
    ASLEEP = "asleep"  # the gate's light sleep (suspend/light_sleep.py): vLLM asleep, no checkpoint


class ResumeFailed(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Held(ResumeFailed):
    """The operator holds the server suspended (suspend/hold.py): the request gets 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Admission:
    """A request let through: the seconds it waited, and the wake-up from the light sleep it was sent beside.

    vLLM that sleeps with mode=keep queues a request and runs it once awake, so a request for a server in
    light sleep goes upstream at once: its parsing and scheduling overlap the wake-up instead of following
    it. Its answer is passed on only once `wake` ended well (gate/proxy.py)."""

    waited_s: float
    wake: asyncio.Task[TransitionOutcome] | None = None


@dataclass(frozen=True)
class TransitionOutcome:
    transition: str  # suspend | resume | sleep | wake (the light sleep's)
    trigger: str  # why the gate started it: idle, request, in-flight
    ok: bool
    seconds: float
    message: str = ""
    exit_code: int = 0  # the library's ExitCode when it failed
    steps: dict[str, float] = field(default_factory=dict)  # the library's phases and their seconds
    proof: str = ""  # how the library proved the GPU memory released or back: per-process | whole GPU


def tool_lock_purpose(run_dir: str) -> str | None:
    """What the transition that holds the tool's lock does (its purpose, '' if unreadable); None when free.

    Probes with a shared, non-blocking flock that is dropped at once: a cuda-toggle-all starting at that
    instant retries its exclusive lock 50 ms later. Reads the lock file, never creates it.
    """
    path = Path(run_dir) / "lock"
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as error:
        logger.debug("cannot read the tool's lock {}: {}", path, error)
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return str(json.loads(path.read_text() or "{}").get("purpose", ""))
            except (OSError, ValueError):
                return ""  # the holder is writing it right now
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


def phase_of_tool_run(purpose: str) -> Phase:
    # move_to() writes "cuda-toggle-all running" or "cuda-toggle-all checkpointed"; anything else might
    # be a suspend, so requests must wait for it either way.
    return Phase.RESUMING if purpose.endswith(RESUME) else Phase.SUSPENDING


UNREACHABLE = "unreachable"  # /gate/status's state when the power state says running but vLLM does not answer


async def upstream_answers(url: str, timeout_s: float = 2.0) -> bool:
    """vLLM's /health answers below 500 at `url` (it answers while suspended too; 503 once its engine died)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(url.rstrip("/") + "/health") as response:
                return response.status < 500
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return False


class PowerController:
    def __init__(
        self,
        gate: GateConfig,
        toggle_config: Config,
        metrics: GateMetrics,
        *,
        name: str = "",
        find_pid: Callable[[], int | None] | None = None,
    ):
        self.gate = gate
        self.toggle_config = toggle_config
        self.metrics = metrics
        self.name = name  # the model it serves, with GATE_MODELS; "" for the one server
        # Where the server's PID comes from (called in the worker thread): GATE_SERVER_PID, or the library's
        # own lookup, by default; with GATE_MODELS, the process listening on the model's port.
        self.find_pid = find_pid or (lambda: gate.server_pid)
        # With GATE_MODELS: set while a swap waits for this server's requests to finish before suspending
        # it; new requests for it wait for a later swap instead of being forwarded.
        self.draining = False
        # With GATE_MODELS: off until the start-up sequence has started and placed every server.
        self.may_idle_suspend = True
        # One thread: the gate never runs two transitions, and shutdown waits for the one in flight
        # (cutting a transition short could leave the dispatcher frozen).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate-toggle")
        self.transition: asyncio.Task[TransitionOutcome] | None = None
        self.transition_phase: Phase | None = None
        self.transition_light = False  # the transition in flight is the light sleep or its wake-up
        # Called when a resume (or a wake-up from the light sleep) of this server ended well, once the server
        # counts as running: with GATE_MODELS, the fleet lets the requests waiting for a swap go then, though
        # the servers swapped out may still be checkpointed (the early wake).
        self.on_resumed: Callable[[], None] | None = None
        self.in_flight = 0
        self.waiting = 0
        self.idle_since = time.monotonic()
        # Set from status() after a failed transition, when the CUDA states say the workers must not get
        # requests though no record may say so; cleared by the next transition that succeeds.
        self.believed_suspended = False
        self.retry_resume_after = 0.0
        self.last_suspend_s: float | None = None
        self.last_resume_s: float | None = None
        self.last_failure_at: float | None = None  # time.time() of the last transition that failed
        self.last_sleep_s: float | None = None  # the light sleep's, and its wake-up's
        self.last_wake_s: float | None = None
        self.last_proof = ""  # the last suspend's or resume's memory proof
        self.last_steps: dict[str, dict[str, float]] = {}  # the last transition's phases: restore, wake_up, ...
        # Off once a light sleep was refused (no sleep mode that holds requests): the deep stage only.
        self.may_sleep = True
        self.phase = self.observe()
        self.since = time.time()
        self.watcher: asyncio.Task | None = None

    @property
    def label(self) -> str:
        """' of model X' in log lines, with GATE_MODELS; nothing for the one server."""
        return f" of model {self.name}" if self.name else ""

    # -- what state the server is in ------------------------------------------------------------

    def observe(self) -> Phase:
        if self.transition_phase is not None:
            return self.transition_phase
        purpose = tool_lock_purpose(self.toggle_config.run_dir)
        if purpose is not None:
            return phase_of_tool_run(purpose)
        if self.live_record_exists() or self.believed_suspended:
            return Phase.SUSPENDED
        if is_asleep(self.toggle_config.run_dir):
            return Phase.ASLEEP
        return Phase.RUNNING

    def live_record_exists(self) -> bool:
        """A suspend record of a server instance that lives; records of instances that are gone (the server
        died while suspended, and supervisord restarted it) are removed, with a log line: the server there
        now is served, once it answers."""
        run_dir = self.toggle_config.run_dir
        if not SuspendRecord.any(run_dir):
            return False
        for record in SuspendRecord.remove_stale(run_dir):
            logger.warning(
                "the server{} suspended as {} is gone: its record was removed; requests go to the server "
                "supervisord runs now, once it answers",
                self.label,
                record.describe_instance(),
            )
        return SuspendRecord.any(run_dir)

    def held(self) -> Hold | None:
        """The operator's hold on this server (RUN_DIR/hold.json), or None."""
        return Hold.read(self.toggle_config.run_dir)

    def refresh(self) -> Phase:
        """Observe, and note a change made by someone else (cuda-toggle-all run by hand)."""
        phase = self.observe()
        if phase is Phase.SUSPENDED and self.transition is None and is_asleep(self.toggle_config.run_dir):
            clear_asleep(self.toggle_config.run_dir)  # suspended by hand while asleep: its resume wakes vLLM
        if phase is not self.phase:
            if self.transition is None:
                logger.info("the server{} is now {} (changed outside the gate)", self.label, phase.value)
            self.set_phase(phase)
        return phase

    def set_phase(self, phase: Phase) -> None:
        if phase is not self.phase:
            self.phase, self.since = phase, time.time()
            if phase is Phase.RUNNING:
                self.idle_since = time.monotonic()  # the idle period starts when the server is back

    def status_json(self) -> dict:
        """Served on the public port: states and timings only. What failed, and why, is in the log
        (and `cuda-toggle-all status` inside the container): no PIDs, process titles or settings here."""
        return {
            "state": self.refresh().value,
            "since": self.since,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "last_suspend_s": self.last_suspend_s,
            "last_resume_s": self.last_resume_s,
            "last_failure_at": self.last_failure_at,
            "last_sleep_s": self.last_sleep_s,
            "last_wake_s": self.last_wake_s,
            "proof": self.last_proof,
            "last_steps": self.last_steps,
            "hold": hold.to_json() if (hold := self.held()) else None,
        }

    # -- requests --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def request_slot(self, label: str) -> AsyncIterator[Admission]:
        """Hold a request until the server runs (or wakes from its light sleep), then count it in flight
        while it is forwarded.

        Yields its Admission; raises ResumeFailed when the resume it waited for failed.
        """
        admission = await self.admit(label)
        self.in_flight += 1
        try:
            yield admission
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle_since = time.monotonic()

    async def wait_while_held(self, label: str) -> float:
        """Wait up to GATE_HOLD_WAIT_S for the operator's release; raise Held when it does not come.
        Returns the seconds waited (0 without a hold)."""
        if self.held() is None:
            return 0.0
        started = time.monotonic()
        deadline = started + self.gate.hold_wait_s
        self.waiting += 1
        try:
            while self.held() is not None:
                if time.monotonic() >= deadline:
                    self.metrics.record_wait(time.monotonic() - started)
                    logger.info("{}: 503, the server{} is held by the operator", label, self.label)
                    raise Held(
                        f"the server{self.label} is held suspended by the operator", self.gate.hold_retry_after_s
                    )
                await asyncio.sleep(min(self.gate.poll_s, max(0.01, deadline - time.monotonic())))
        finally:
            self.waiting -= 1
        return time.monotonic() - started

    async def admit(self, label: str) -> Admission:
        held_s = await self.wait_while_held(label)
        if self.refresh() is Phase.RUNNING:
            return Admission(held_s)
        wake = self.light_wake_to_go_beside()
        if wake is not None:
            logger.info("{}: sent on while vLLM wakes from its light sleep (it queues the request)", label)
            return Admission(held_s, wake)
        started = time.monotonic()
        self.waiting += 1
        ending = "and went away"  # unless the loop below ends otherwise: the client disconnected
        try:
            rounds = 0
            while self.refresh() is not Phase.RUNNING:
                if rounds == MAX_WAKE_ROUNDS:
                    ending = "and gets a 503: suspended again each time it was resumed"
                    raise ResumeFailed(f"the server was suspended again {rounds} times while this request waited")
                rounds += 1
                if self.held() is not None and self.transition is None:  # held while it waited
                    raise Held(
                        f"the server{self.label} is held suspended by the operator", self.gate.hold_retry_after_s
                    )
                # A transition of cuda-toggle-all in flight, or a suspended server: resume. The resume
                # waits for the tool's lock, so a suspend by the tool finishes first and is then undone.
                task = self.transition or self.start(Phase.RESUMING, "request")
                outcome = await asyncio.shield(task)  # a client that goes away must not cancel it
                if outcome.transition == "resume" and not outcome.ok:
                    ending = "and gets a 503: the resume failed"
                    raise ResumeFailed(outcome.message)
            ending = "for the server to resume"
        finally:
            self.waiting -= 1
            waited_s = time.monotonic() - started
            self.metrics.record_wait(waited_s)
            logger.info("{} waited {:.2f} s {}", label, waited_s, ending)
        return Admission(held_s + waited_s)

    def light_wake_to_go_beside(self) -> asyncio.Task[TransitionOutcome] | None:
        """The wake-up from the light sleep that a request may be sent beside: the one in flight, or one
        started now for a server asleep with nothing else under way. None otherwise (suspended, suspending,
        resuming from a checkpoint: the request must wait, as nothing may reach a checkpointed process)."""
        if self.transition is not None:
            return self.transition if self.transition_light and self.transition_phase is Phase.RESUMING else None
        if self.observe() is not Phase.ASLEEP or self.held() is not None:
            return None
        return self.start(Phase.RESUMING, "request")

    # -- transitions -----------------------------------------------------------------------------

    def start(
        self, phase: Phase, trigger: str, hooks: OverlapHooks | None = None, *, light: bool = False
    ) -> asyncio.Task[TransitionOutcome]:
        """Start the gate's suspend (Phase.SUSPENDING) or resume (Phase.RESUMING); one at a time.

        `hooks` overlap it with another server's transition (a swap, see gate/overlap.py). `light` with
        Phase.SUSPENDING: the light sleep instead of the suspend. A resume of a server in light sleep is its
        wake-up."""
        if self.transition is not None:
            raise RuntimeError("a transition of the gate is already in flight")
        if phase is Phase.RESUMING and self.observe() is Phase.ASLEEP:
            light = True
        self.transition_phase, self.transition_light = phase, light
        self.set_phase(phase)
        self.transition = asyncio.get_running_loop().create_task(self.run_transition(phase, trigger, hooks, light))
        return self.transition

    async def run_transition(
        self, phase: Phase, trigger: str, hooks: OverlapHooks | None, light: bool = False
    ) -> TransitionOutcome:
        transition, target = ("suspend", SUSPEND) if phase is Phase.SUSPENDING else ("resume", RESUME)
        call = functools.partial(self.call_library, move_to, target, hooks=hooks)
        if light:
            transition = "sleep" if phase is Phase.SUSPENDING else "wake"
            call = functools.partial(self.call_library, light_sleep if phase is Phase.SUSPENDING else light_wake)
        started = time.monotonic()
        logger.debug("{}{} started (trigger: {})", transition, self.label, trigger)
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, call)
            notes = "; ".join(result.notes)
            proof = (result.evidence.get("gpus") or {}).get("how", "") if isinstance(result.evidence, dict) else ""
            outcome = TransitionOutcome(
                transition, trigger, True, time.monotonic() - started, notes, steps=dict(result.phases), proof=proof
            )
            if transition == "suspend":  # a deep suspend ends a light sleep
                clear_asleep(self.toggle_config.run_dir)
        except ToolError as failure:
            seconds = time.monotonic() - started
            steps = dict(getattr(failure.result, "phases", {}) or {})
            outcome = TransitionOutcome(
                transition, trigger, False, seconds, failure.message, int(failure.exit_code), steps
            )
        except Exception as error:  # a bug in the library must not leave requests waiting for good
            logger.opt(exception=error).error("{} raised unexpectedly", transition)
            message = f"{transition} failed: {type(error).__name__}: {error}"
            outcome = TransitionOutcome(transition, trigger, False, time.monotonic() - started, message)
        # A step after a resume that succeeded (e.g. warming the model up before requests go on) belongs
        # here: the requests waiting in admit() are let go only when this task ends.
        try:
            await self.account(outcome)
        finally:
            self.transition, self.transition_phase = None, None
            self.idle_since = time.monotonic()  # a refused idle suspend waits a whole idle period again
            self.set_phase(self.observe())
        if outcome.ok and outcome.transition in ("resume", "wake") and self.on_resumed is not None:
            self.on_resumed()
        return outcome

    async def account(self, outcome: TransitionOutcome) -> None:
        self.metrics.record_transition(outcome.transition, outcome.ok, outcome.seconds)
        if outcome.transition == "suspend":
            self.last_suspend_s = outcome.seconds
        elif outcome.transition == "resume":
            self.last_resume_s = outcome.seconds
        elif outcome.transition == "sleep":
            self.last_sleep_s = outcome.seconds
            if not outcome.ok and outcome.exit_code == int(ExitCode.REFUSED):
                self.may_sleep = False  # no sleep mode that holds requests: the deep stage only, from now on
        else:
            self.last_wake_s = outcome.seconds
        if outcome.proof:
            self.last_proof = outcome.proof
        self.last_steps = {outcome.transition: {phase: round(s, 4) for phase, s in outcome.steps.items()}}
        past = {"suspend": "suspended", "resume": "resumed", "sleep": "put to light sleep", "wake": "woken up"}[
            outcome.transition
        ]
        if outcome.ok:
            self.believed_suspended = False  # the record tells the truth again
            self.last_failure_at = None
            extra = f" ({outcome.message})" if outcome.message else ""
            logger.info("{}{} in {:.2f} s (trigger: {}){}", past, self.label, outcome.seconds, outcome.trigger, extra)
            return
        self.last_failure_at = time.time()
        logger.error(
            "{}{} failed after {:.2f} s (trigger: {}): {}",
            outcome.transition,
            self.label,
            outcome.seconds,
            outcome.trigger,
            outcome.message,
        )
        if outcome.transition == "resume":
            self.retry_resume_after = time.monotonic() + RESUME_RETRY_S
        await self.reread_cuda_states()

    async def reread_cuda_states(self) -> None:
        """After a failure the record may not tell the truth: ask the CUDA driver what the server is."""
        call = functools.partial(self.call_library, status)
        try:
            overall = (await asyncio.get_running_loop().run_in_executor(self.executor, call)).state
        except ToolError as failure:
            logger.warning("cannot read the server's CUDA states: {}", failure.message)
            return
        except Exception as error:  # the state stays what the record says
            logger.opt(exception=error).warning("reading the server's CUDA states raised unexpectedly")
            return
        # Anything but `running` (checkpointed, locked, mixed) must not get requests: a resume repairs it.
        self.believed_suspended = overall not in ("running", "none")
        logger.info("CUDA states read after the failure: {}", overall)

    def call_library(self, function: Callable, *args: object, **options: object) -> object:
        """Run move_to() or status() of the library on this server (in the worker thread)."""
        return function(*args, self.toggle_config, pid=self.find_pid(), **options)

    # -- the watcher: suspends by someone else, and idle suspends ---------------------------------

    def start_watching(self) -> None:
        self.watcher = asyncio.get_running_loop().create_task(self.watch())

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.gate.poll_s)
            try:
                self.tick()
            except Exception as error:  # the watcher must outlive any one bad tick
                logger.opt(exception=error).error("the gate's watcher failed; going on")

    def tick(self) -> None:
        phase = self.refresh()
        if self.transition is not None or self.held() is not None:
            return  # held: the operator decides; nothing is resumed or suspended meanwhile
        now = time.monotonic()
        if phase is not Phase.RUNNING and self.in_flight > 0 and now >= self.retry_resume_after:
            # Forwarded before cuda-toggle-all suspended the server: they wait in the frozen dispatcher.
            logger.info("{} request(s) in flight while the server is {}: resuming", self.in_flight, phase.value)
            self.start(Phase.RESUMING, "in-flight")
            return
        idle_s = self.gate.idle_suspend_s
        awake = phase in (Phase.RUNNING, Phase.ASLEEP)
        nothing_to_do = awake and self.in_flight == 0 and self.waiting == 0 and not self.draining
        nothing_to_do = nothing_to_do and self.may_idle_suspend
        if not nothing_to_do:
            return
        idle_for = now - self.idle_since
        if idle_s > 0 and idle_for >= idle_s:
            self.start(Phase.SUSPENDING, f"idle for {idle_for:.1f} s")
        elif self.idle_sleep_due(phase, idle_for):
            self.start(Phase.SUSPENDING, f"idle for {idle_for:.1f} s", light=True)

    def idle_sleep_due(self, phase: Phase, idle_for: float) -> bool:
        """The first stage: a light sleep after GATE_IDLE_SLEEP_S, when it comes before the deep suspend."""
        sleep_s, suspend_s = self.gate.idle_sleep_s, self.gate.idle_suspend_s
        before_suspend = suspend_s == 0 or sleep_s < suspend_s
        return phase is Phase.RUNNING and self.may_sleep and 0 < sleep_s <= idle_for and before_suspend

    async def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
        if self.transition is not None:
            logger.info("waiting for the {} in flight to finish before exiting", self.phase.value)
            await asyncio.shield(self.transition)
        self.executor.shutdown(wait=True)
