"""Several models behind one gate (GATE_MODELS): one vLLM server per model, all on the same GPUs.

Each server has its own PowerController (suspend record and lock in a run directory of its own, idle
suspend of its own). The Fleet decides which servers are resident: those whose memory shares fit in the
GPUs together (sum at most 1). A request for a model that is suspended waits for a swap:

- swaps run one at a time, in the order their first waiting request arrived;
- to make room, the resident servers used longest ago are suspended, each once its requests in flight
  have finished (new requests for it wait meanwhile, and get it back by a later swap);
- then the requested server is resumed, and every request that waited for it is let go as soon as that
  resume ended well, though the servers swapped out may still be checkpointed (the early wake).

No request is dropped: each is either forwarded to a server that runs, or, when its model's swap failed
(say, the library refused to suspend because host RAM cannot hold the GPU memory), answered 503.

The parts: servers.py (each server: where it runs, what is counted of it, whether it can come back),
startup.py (the servers started one after another), swap_policy.py (which swap next, who makes room),
overlap.py (the handshake of a swap's suspends and resume), fleet_status.py (status, metrics, /v1/models).
This module routes the requests, holds them while their swap runs, and runs the swaps one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator

import aiohttp
from loguru import logger

from ..base.config import Config
from .config import GateConfig
from .control import Admission, Held, Phase, PowerController, ResumeFailed
from .fleet_status import list_models, render_metrics, status_json
from .metrics import GateMetrics
from .overlap import OverlappedSwap
from .servers import ModelServer, run_dir_of, server_pid, why_it_cannot_come_back
from .startup import start_one_after_another
from .swap_policy import next_to_swap_in, victims_for


def requested_model(body: bytes) -> str | None:
    """The `model` of a JSON request body; None when there is none."""
    try:
        value = json.loads(body).get("model") if body else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def describe_steps(steps: dict[str, dict[str, float]]) -> str:
    """'suspend a: sleep 0.20, checkpoint 0.75; resume b: restore 0.80, ...' for the log."""
    return "; ".join(
        f"{name}: " + ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in phases.items())
        for name, phases in steps.items()
    )


class Fleet:
    def __init__(self, gate: GateConfig, toggle_config: Config, metrics: GateMetrics):
        self.gate = gate
        self.toggle_config = toggle_config
        self.servers: dict[str, ModelServer] = {}
        for entry in gate.models:
            config = toggle_config.replace(
                program=entry.program,
                run_dir=run_dir_of(toggle_config.run_dir, entry),
                server_url=gate.model_upstream(entry),
            )
            find_pid = functools.partial(server_pid, entry, config)
            controller = PowerController(gate, config, metrics, name=entry.name, find_pid=find_pid)
            controller.may_idle_suspend = False  # until start_servers() has placed every server
            server = self.servers[entry.name] = ModelServer(entry, gate.model_upstream(entry), controller)
            controller.on_resumed = functools.partial(self.let_go_once_resumed, server)
        self.default = next(server for server in self.servers.values() if server.entry.default)
        self.ready = False  # set once the start-up sequence is over
        self.swap_task: asyncio.Task | None = None  # the start-up sequence, then each swap
        self.swapping_in: ModelServer | None = None  # the target of the swap in flight
        self.session: aiohttp.ClientSession | None = None
        self.swapper = OverlappedSwap(gate, toggle_config)

    # -- life cycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for server in self.servers.values():
            server.controller.start_watching()
        self.swap_task = asyncio.get_running_loop().create_task(self.start_servers())

    async def close(self) -> None:
        if self.swap_task is not None and not self.ready:
            self.swap_task.cancel()  # the start-up sequence; a swap finishes (its transitions are shielded)
        if self.swap_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.swap_task
        for server in self.servers.values():
            await server.controller.close()
        if self.session is not None:
            await self.session.close()

    async def start_servers(self) -> None:
        """Start the servers one after another, each suspended once ready; the default one last, left running."""
        try:
            order = [s for s in self.servers.values() if not s.entry.default] + [self.default]
            assert self.session is not None
            await start_one_after_another(order, self.session, self.gate, self.toggle_config.supervisor_url)
            logger.info("all {} model servers started; {} is resident", len(order), self.default.name)
        finally:
            self.ready = True
            for server in self.servers.values():
                server.controller.may_idle_suspend = True
            self.swap_task = None
            self.schedule()

    # -- routing and admission ----------------------------------------------------------------------

    def route(self, model: str | None) -> ModelServer | None:
        """The server of the requested model (the default one without a model); None for an unknown model."""
        return self.default if model is None else self.servers.get(model)

    def admissible(self, server: ModelServer) -> bool:
        controller = server.controller
        return (
            self.ready
            and controller.refresh() is Phase.RUNNING
            and controller.transition is None
            and not controller.draining
        )

    @contextlib.asynccontextmanager
    async def request_slot(self, server: ModelServer, label: str) -> AsyncIterator[Admission]:
        """Hold a request until its model's server is resident and runs; count it in flight meanwhile.

        Yields its Admission (a swap resumes its target, proven, before any request goes); raises ResumeFailed
        when the swap it waited for failed.
        """
        controller = server.controller
        waited_s = await controller.wait_while_held(label)  # raises Held when the hold outlasts GATE_HOLD_WAIT_S
        if self.admissible(server):
            controller.in_flight += 1
        else:
            waited_s += await self.wait_for_swap(server, label)  # counts it in flight when it may go
        server.stats.last_used = time.monotonic()
        try:
            yield Admission(waited_s)
        finally:
            controller.in_flight -= 1
            server.stats.last_used = time.monotonic()
            if controller.in_flight == 0:
                controller.idle_since = time.monotonic()

    async def wait_for_swap(self, server: ModelServer, label: str) -> float:
        started = time.monotonic()
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        server.tickets.append((started, ticket))
        server.controller.waiting += 1
        ending = "and went away"
        try:
            self.schedule()
            try:
                await ticket
            except asyncio.CancelledError:
                if ticket.done() and not ticket.cancelled() and ticket.exception() is None:
                    server.controller.in_flight -= 1  # let go, but its client left: it was counted in flight
                raise
            except ResumeFailed:
                ending = "and gets a 503: its swap failed"
                raise
            ending = "for its model to be swapped in"
        finally:
            server.tickets = [(when, t) for when, t in server.tickets if t is not ticket]
            server.controller.waiting -= 1
            waited_s = time.monotonic() - started
            server.stats.waited_requests += 1
            server.stats.waited_seconds += waited_s
            server.controller.metrics.record_wait(waited_s)
            logger.info("{} (model {}) waited {:.2f} s {}", label, server.name, waited_s, ending)
        return waited_s

    def schedule(self) -> None:
        """Start the next swap: for the model whose oldest waiting request came first."""
        if self.swap_task is not None or not self.ready:
            return
        target = next_to_swap_in(list(self.servers.values()))
        if target is None:
            return
        self.swap_task = asyncio.get_running_loop().create_task(self.swap_in(target))

    def let_go(self, server: ModelServer, failure: ResumeFailed | None = None) -> None:
        """Answer every request waiting for `server`: forward them all (counted in flight now), or fail them."""
        for _, ticket in server.tickets:
            if ticket.done():
                continue
            if failure is None:
                server.controller.in_flight += 1
                ticket.set_result(None)
            else:
                ticket.set_exception(failure)
        server.tickets = []

    def let_go_once_resumed(self, server: ModelServer) -> None:
        """`server`'s resume ended well: when it is the swap in flight's target, the requests waiting for it go
        now, while the swap may still wait for the servers it swapped out to finish their checkpoint."""
        if self.swapping_in is server and not server.controller.draining:
            self.let_go(server)

    # -- swaps --------------------------------------------------------------------------------------

    def victims_for(self, target: ModelServer) -> list[ModelServer]:
        return victims_for(list(self.servers.values()), target)

    async def swap_in(self, target: ModelServer) -> None:
        started = time.monotonic()
        controller = target.controller
        self.swapping_in = target
        try:
            if controller.transition is not None:  # an idle suspend of its own, say
                await asyncio.shield(controller.transition)
            if controller.held() is not None:  # held since its requests began to wait
                raise Held(f"model {target.name} is held suspended by the operator", self.gate.hold_retry_after_s)
            if controller.refresh() is not Phase.RUNNING:
                await self.check_it_can_come_back(target)
                steps = await self.swapper.overlapped_swap(target, self.victims_for(target))
                seconds = time.monotonic() - started
                target.stats.swaps += 1
                target.stats.swap_seconds += seconds
                target.stats.last_swap_s = seconds
                target.stats.last_swap_steps = steps
                logger.info("swapped model {} in after {:.2f} s ({})", target.name, seconds, describe_steps(steps))
        except ResumeFailed as failure:
            target.stats.failed_swaps += 1
            logger.error("swap to model {} failed: {}", target.name, failure.message)
            self.let_go(target, failure)
        except Exception as error:  # a bug must not leave requests waiting for good
            target.stats.failed_swaps += 1
            logger.opt(exception=error).error("swap to model {} raised unexpectedly", target.name)
            self.let_go(target, ResumeFailed(f"{type(error).__name__}: {error}"))
        else:
            self.let_go(target)
        finally:
            self.swap_task = self.swapping_in = None
            self.schedule()

    async def check_it_can_come_back(self, target: ModelServer) -> None:
        """Raise ResumeFailed, before anyone is evicted, when `target` cannot come back (why_it_cannot_come_back).
        The servers in its way take no new requests meanwhile (as overlapped_swap wants from its first await on):
        marked draining during the check, unmarked right after it; overlapped_swap, called without an await in
        between, marks its own victims again."""
        in_the_way = self.victims_for(target)
        for victim in in_the_way:
            victim.controller.draining = True
        try:
            reason = await asyncio.get_running_loop().run_in_executor(None, why_it_cannot_come_back, target)
        finally:
            for victim in in_the_way:
                victim.controller.draining = False
        if reason:
            raise ResumeFailed(f"model {target.name} cannot come back, nothing was suspended for it: {reason}")

    # -- what the gate shows ------------------------------------------------------------------------

    def status_json(self) -> dict:
        return status_json(list(self.servers.values()), self.ready)

    def render_metrics(self) -> str:
        return render_metrics(list(self.servers.values()))

    async def list_models(self) -> dict:
        assert self.session is not None
        return await list_models(self.session, list(self.servers.values()))
