"""Several models behind one gate (GATE_MODELS): one vLLM server per model, all on the same GPUs.

Each server has its own PowerController (suspend record and lock in a run directory of its own, idle
suspend of its own). The Fleet decides which servers are resident: those whose memory shares fit in the
GPUs together (sum at most 1). A request for a model that is suspended waits for a swap:

- swaps run one at a time, in the order their first waiting request arrived;
- to make room, the resident servers used longest ago are suspended, each once its requests in flight
  have finished (new requests for it wait meanwhile, and get it back by a later swap);
- then the requested server is resumed, and every request that waited for it is let go at once.

No request is dropped: each is either forwarded to a server that runs, or, when its model's swap failed
(say, the library refused to suspend because host RAM cannot hold the GPU memory), answered 503.

At start the gate starts the servers one after another (vLLM sizes its KV cache from the GPU memory free
when it starts): each is started (through supervisord, when it runs the server's program), waited for,
warmed up, and suspended before the next starts; the default model starts last and stays resident.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
import xmlrpc.client
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
from loguru import logger

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..base.processes import same_process
from ..cuda.gpus import GpuReading, read_gpus
from ..server.discovery import supervisor_program_pid, supervisor_proxy
from ..suspend.executor import OverlapHooks
from ..suspend.observe import host_available_mib
from ..suspend.proof import proves_per_process_alone
from ..suspend.records import SuspendRecord
from ..suspend.status import warm_up
from .config import GateConfig, ModelEntry
from .control import Held, Phase, PowerController, ResumeFailed
from .metrics import PHASES, GateMetrics

# A server the library cannot find, or whose tree has no CUDA process (not started, or gone), holds no GPU
# memory: it is not in the way of a swap.
NOT_HOLDING_GPUS = (ExitCode.SERVER_NOT_FOUND, ExitCode.NO_CUDA_PROCESSES)
# A little room for rounding: shares of 0.5 + 0.5 fit, 0.5 + 0.51 do not.
SHARE_SLACK = 1e-6
DRAIN_POLL_S = 0.01
# How long a resumed server waits, locked, for the servers in its way to finish suspending. Their suspends
# end on their own timeouts; this bound only keeps a worker thread from waiting for good on a gate that
# lost track (when it passes, the resume is withdrawn).
ROOM_WAIT_S = 3600.0
READY_PATH = "/v1/models"


def run_dir_of(base: str, model: ModelEntry) -> str:
    """The default model keeps the library's own run directory (`make suspend` acts on it); the others get
    one each below it, so that no two servers share a suspend record or a lock."""
    return base if model.default else str(Path(base) / "models" / model.name)


def listening_pid(port: int) -> int | None:
    """The process that listens on `port` (vLLM's API server, the root of its tree); None if none does."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    pids = {
        conn.pid
        for conn in connections
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid
    }
    for pid in sorted(pids):
        try:
            if psutil.Process(pid).ppid() not in pids:  # the topmost, if a child shares the socket
                return pid
        except psutil.NoSuchProcess:
            continue
    return None


def host_ram_refusal(models: tuple[ModelEntry, ...], gpus: GpuReading, available_mib: int, margin_mib: int) -> str:
    """Why the suspended servers could not all fit in host RAM ('' when they can). Pure.

    At worst every server but the smallest is suspended, and a suspend copies up to the server's whole
    share of every GPU to host RAM (the plain suspend; the hybrid one copies less).
    """
    gpu_mib = sum(gpu.total_mib for gpu in gpus.gpus)
    shares = sorted(model.share for model in models)
    needed_mib = int(sum(shares[1:]) * gpu_mib)
    if len(models) < 2 or needed_mib + margin_mib <= available_mib:
        return ""
    return (
        f"GATE_MODELS cannot be served: with every model but the smallest suspended, host RAM must hold up to "
        f"{needed_mib} MiB (their memory shares of the {gpu_mib} MiB of {len(gpus.gpus)} GPU(s)) + {margin_mib} MiB "
        f"margin, and {available_mib} MiB is available. Lower the memory shares in GATE_MODELS, serve fewer "
        "models, or give the container more host RAM (or set CUDA_TOGGLE_HOST_RAM_MIB if the figure is wrong)"
    )


def check_host_ram(gate: GateConfig, toggle_config: Config) -> None:
    """Refuse (exit 2) a GATE_MODELS whose suspended servers cannot fit in host RAM."""
    if len(gate.models) < 2:
        return
    gpus = read_gpus(toggle_config)
    if not gpus.gpus:
        logger.warning("GPU memory unknown ({}): host RAM for GATE_MODELS not checked at start", gpus.problem)
        return
    refusal = host_ram_refusal(gate.models, gpus, host_available_mib(toggle_config), toggle_config.ram_margin_mib)
    if refusal:
        raise ToolError(refusal, ExitCode.USAGE)


def requested_model(body: bytes) -> str | None:
    """The `model` of a JSON request body; None when there is none."""
    try:
        value = json.loads(body).get("model") if body else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


@dataclass
class ModelStats:
    swaps: int = 0  # swaps that brought this model in (a resume, after suspending others if needed)
    swap_seconds: float = 0.0
    last_swap_s: float | None = None
    last_swap_steps: dict[str, dict[str, float]] = field(default_factory=dict)  # transition -> phase -> s
    # How the last swap made room: "overlapped: restore at once" (the target's restore fitted beside the
    # resident servers), "overlapped: restore after sleep" (it began once the victims' sleep freed their
    # memory), "serial" (it waited for their suspends), "nothing in the way".
    last_swap_path: str = ""
    failed_swaps: int = 0
    waited_requests: int = 0
    waited_seconds: float = 0.0
    last_used: float = 0.0  # time.monotonic() of its last request


@dataclass
class ModelServer:
    entry: ModelEntry
    upstream: str
    controller: PowerController
    stats: ModelStats = field(default_factory=ModelStats)
    # Requests waiting for this model's swap, oldest first: (arrival, future set when they may go).
    tickets: list[tuple[float, asyncio.Future[None]]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.entry.name


def server_pids(server: ModelServer) -> list[int]:
    """The PIDs of the server's process tree (its root and every descendant); empty when it is not found."""
    try:
        pid = server.controller.find_pid()
        if pid is None:
            return []
        root = psutil.Process(pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]
    except (psutil.Error, ToolError):
        return []


def suspend_record_of(server: ModelServer) -> SuspendRecord | None:
    """The suspended server's record (what its restore brings back: checkpoint_mib); None unless exactly one."""
    records = SuspendRecord.load_all(server.controller.toggle_config.run_dir)
    return records[0] if len(records) == 1 else None


def why_it_cannot_come_back(server: ModelServer) -> str:
    """Why the suspended `server` cannot be resumed ('' when it can, as far as can be seen without touching it):
    no server of the model is found, or a process its suspend moved has died since. A swap checks this before
    it evicts anyone, so that a healthy resident server is never suspended for a target that cannot come back.
    Runs in a worker thread (reads processes and supervisord)."""
    try:
        server.controller.find_pid()
    except ToolError as failure:
        return failure.message
    for record in SuspendRecord.load_all(server.controller.toggle_config.run_dir):
        if not record.instance_alive():  # restarted meanwhile: the new instance is not suspended, nothing to resume
            return (
                f"the server suspended as {record.describe_instance()} is gone; requests go to the server supervisord "
                "runs now, once it answers"
            )
        dead = [f"PID {p.pid} ({p.title[:40]})" for p in record.cuda if not same_process(p.pid, p.create_time)]
        if dead:
            return (
                f"{', '.join(dead)} died while it was suspended: this server instance cannot serve again; supervisord "
                "restarts the program once vLLM exits (else: supervisorctl restart the model's program)"
            )
    return ""


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
            find_pid = functools.partial(self.server_pid, entry, config)
            controller = PowerController(gate, config, metrics, name=entry.name, find_pid=find_pid)
            controller.may_idle_suspend = False  # until start_servers() has placed every server
            self.servers[entry.name] = ModelServer(entry, gate.model_upstream(entry), controller)
        self.default = next(server for server in self.servers.values() if server.entry.default)
        self.ready = False  # set once the start-up sequence is over
        self.swap_task: asyncio.Task | None = None  # the start-up sequence, then each swap
        self.session: aiohttp.ClientSession | None = None

    # -- finding each server ------------------------------------------------------------------------

    @staticmethod
    def server_pid(entry: ModelEntry, config: Config) -> int:
        """Its supervisord program's PID when supervisord runs it, else the process on its port."""
        pid = supervisor_program_pid(config.supervisor_url, entry.program)
        if pid is None:
            pid = listening_pid(entry.port)
        if pid is None:
            raise ToolError(
                f"no server of model {entry.name} found: supervisord has no program {entry.program!r} and no "
                f"process listens on port {entry.port}",
                ExitCode.SERVER_NOT_FOUND,
            )
        return pid

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
            for server in order:
                await self.start_program(server)
                if not await self.wait_ready(server):
                    continue
                await self.warm_up(server)
                if server is self.default or server.controller.refresh() is not Phase.RUNNING:
                    continue
                outcome = await asyncio.shield(server.controller.start(Phase.SUSPENDING, "start-up: next server"))
                if not outcome.ok:
                    logger.error("model {} could not be suspended at start-up: {}", server.name, outcome.message)
            logger.info("all {} model servers started; {} is resident", len(order), self.default.name)
        finally:
            self.ready = True
            for server in self.servers.values():
                server.controller.may_idle_suspend = True
            self.swap_task = None
            self.schedule()

    async def start_program(self, server: ModelServer) -> None:
        """Ask supervisord to start the server's program, when supervisord runs it and it is not running."""
        url = self.toggle_config.supervisor_url

        def start() -> str:
            if url.startswith("unix://") and not Path(url[len("unix://") :]).exists():
                return "no supervisord"
            try:
                rpc = supervisor_proxy(url).supervisor
                state = rpc.getProcessInfo(server.entry.program)["statename"]
                if state in ("RUNNING", "STARTING"):
                    return state
                rpc.startProcess(server.entry.program, False)
                return "started"
            except xmlrpc.client.Fault as fault:
                return f"not started ({fault.faultString})"
            except OSError as error:
                return f"not started (supervisord: {error})"

        outcome = await asyncio.get_running_loop().run_in_executor(None, start)
        logger.info("model {}: supervisord program {}: {}", server.name, server.entry.program, outcome)

    async def wait_ready(self, server: ModelServer) -> bool:
        assert self.session is not None
        deadline = time.monotonic() + self.gate.start_timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with self.session.get(server.upstream + READY_PATH) as response:
                    if response.status == 200:
                        return True
            await asyncio.sleep(self.gate.poll_s)
        logger.error("model {} did not load within {:g} s; going on without it", server.name, self.gate.start_timeout_s)
        return False

    async def warm_up(self, server: ModelServer) -> None:
        """One sleep/wake-up cycle of a fresh server, so that its first suspend is as fast as the later ones."""
        controller = server.controller
        call = functools.partial(controller.call_library, warm_up)
        try:
            report = await asyncio.get_running_loop().run_in_executor(controller.executor, call)
            logger.info("model {} warm-up: {}", server.name, report.get("reason") or "done")
        except ToolError as failure:
            logger.warning("model {} warm-up failed: {}", server.name, failure.message)

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
    async def request_slot(self, server: ModelServer, label: str) -> AsyncIterator[float]:
        """Hold a request until its model's server is resident and runs; count it in flight meanwhile.

        Yields the seconds it waited; raises ResumeFailed when the swap it waited for failed.
        """
        controller = server.controller
        waited_s = await controller.wait_while_held(label)  # raises Held when the hold outlasts GATE_HOLD_WAIT_S
        if self.admissible(server):
            controller.in_flight += 1
        else:
            waited_s += await self.wait_for_swap(server, label)  # counts it in flight when it may go
        server.stats.last_used = time.monotonic()
        try:
            yield waited_s
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
        waiting = [server for server in self.servers.values() if server.tickets]
        if not waiting:
            return
        target = min(waiting, key=lambda server: server.tickets[0][0])
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

    # -- swaps --------------------------------------------------------------------------------------

    def victims_for(self, target: ModelServer) -> list[ModelServer]:
        """The resident servers to suspend so that `target` fits: least recently used first."""
        others = [server for server in self.servers.values() if server is not target]
        resident = [server for server in others if server.controller.refresh() is not Phase.SUSPENDED]
        used = sum(server.entry.share for server in resident)
        victims = []
        for server in sorted(resident, key=lambda s: s.stats.last_used):
            if used + target.entry.share <= 1 + SHARE_SLACK:
                break
            victims.append(server)
            used -= server.entry.share
        return victims

    async def swap_in(self, target: ModelServer) -> None:
        started = time.monotonic()
        controller = target.controller
        try:
            if controller.transition is not None:  # an idle suspend of its own, say
                await asyncio.shield(controller.transition)
            if controller.held() is not None:  # held since its requests began to wait
                raise Held(f"model {target.name} is held suspended by the operator", self.gate.hold_retry_after_s)
            if controller.refresh() is not Phase.RUNNING:
                await self.check_it_can_come_back(target)
                steps = await self.overlapped_swap(target)
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
            self.swap_task = None
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

    async def overlapped_swap(self, target: ModelServer) -> dict[str, dict[str, float]]:
        """Suspend the servers in the way and resume `target`, overlapping the two where that is safe.

        The target's restore brings back only its CUDA contexts (its record's checkpoint_mib); vLLM's wake-up
        takes the rest. So where that restore fits beside the resident servers now, it starts at once, while
        they drain, sleep and are checkpointed; else it starts when a victim's suspend reports that vLLM's
        sleep freed its weights and KV cache (OverlapHooks.memory_released). Either way the target stays
        locked (no CUDA call of its runs) until every victim's suspend has ended and proven its memory
        released; only then does it unlock and wake up, so the two are never resident together. A victim
        whose suspend fails (and so runs again) withdraws the target's resume: its restored processes are
        checkpointed again, without having woken. Without per-process GPU figures (NVML), without sleep mode,
        or without the size of the target's restore, nothing overlaps.

        Returns the steps of every transition (name -> phase -> seconds), for the status and the log.
        """
        victims = self.victims_for(target)
        sleepers = [victim for victim in victims if victim.controller.refresh() is Phase.ASLEEP]
        if victims and sleepers == victims and await self.fits_awake(target, beside_sleep=True):
            # The cheapest way: those in the way sleep lightly already, and the target fits beside their residual.
            logger.info("swap to model {}: fits beside {} asleep", target.name, ", ".join(v.name for v in victims))
            victims = []
            target.stats.last_swap_path = "beside the light sleep"
        logger.info("swap to model {}: suspending {}", target.name, ", ".join(v.name for v in victims) or "nothing")
        steps: dict[str, dict[str, float]] = {}
        suspending: list[asyncio.Task[dict[str, float]]] = []
        room = threading.Event()
        room_ok: list[bool] = []

        def room_made() -> bool:  # in the target's worker thread, between its restore and its unlock
            return room.wait(ROOM_WAIT_S) and bool(room_ok)

        record = suspend_record_of(target)
        restore_mib = record.checkpoint_mib if record else 0  # 0: unknown, so nothing overlaps
        resuming = None
        woke_early = False
        for victim in victims:  # before any await: from now on their new requests wait for a later swap
            victim.controller.draining = True
        try:
            try:
                if victims and record and await self.restore_fits_now(record, victims):
                    names = ", ".join(v.name for v in victims)
                    logger.info("model {}: restoring it while {} is suspended", target.name, names)
                    resuming = target.controller.start(
                        Phase.RESUMING, "request (swap)", OverlapHooks(room_made=room_made)
                    )
                    target.stats.last_swap_path = "overlapped: restore at once"
                for victim in victims:
                    suspending.append(await self.evict(victim, target, restore_mib))
            finally:
                if resuming is None and any(not task.done() for task in suspending):
                    resuming = target.controller.start(
                        Phase.RESUMING, "request (swap)", OverlapHooks(room_made=room_made)
                    )
                    target.stats.last_swap_path = "overlapped: restore after sleep"
            if resuming is not None and any(not task.done() for task in suspending) and await self.fits_awake(target):
                # Early wake: every victim sleeps, and the target's whole share fits beside what their sleep left:
                # it unlocks and wakes up while their checkpoints go on (a victim whose checkpoint fails stays
                # asleep: see evict).
                woke_early = True
                room_ok.append(True)
                room.set()
                target.stats.last_swap_path += ", woken before the checkpoint ended"
                names = ", ".join(v.name for v in victims)
                logger.info("model {}: waking it up while {} is checkpointed", target.name, names)
            ended = await asyncio.gather(*suspending, return_exceptions=True)
            failures = [result for result in ended if isinstance(result, BaseException)]
            if woke_early and failures:  # the target is up; the victims that failed stay asleep
                for failure in failures:
                    logger.warning("after the early wake of model {}: {}", target.name, failure)
                failures = []
            if not failures:
                room_ok.append(True)
        finally:
            for victim in victims[len(suspending) :]:  # never reached: its suspend did not start
                victim.controller.draining = False
            room.set()  # cancelled or failed: the target's resume is withdrawn, never left waiting
            if not room_ok:
                await asyncio.gather(*suspending, return_exceptions=True)
                if resuming is not None:
                    await asyncio.shield(resuming)  # withdrawn: its processes are checkpointed again
        for victim, result in zip(victims, ended, strict=True):
            if isinstance(result, dict):
                steps[f"suspend {victim.name}"] = result
        for failure in failures:
            if isinstance(failure, ResumeFailed):
                raise failure
            raise ResumeFailed(f"{type(failure).__name__}: {failure}")
        if resuming is None:  # nothing overlapped: the victims are suspended, resume plainly
            resuming = target.controller.start(Phase.RESUMING, "request (swap)")
            if victims or target.stats.last_swap_path != "beside the light sleep":
                target.stats.last_swap_path = "serial" if victims else "nothing in the way"
        outcome = await asyncio.shield(resuming)
        steps[f"resume {target.name}"] = outcome.steps
        if not outcome.ok:
            raise ResumeFailed(f"resuming model {target.name} failed: {outcome.message}")
        return steps

    async def restore_fits_now(self, record: SuspendRecord, victims: list[ModelServer]) -> bool:
        """Whether the target's restore alone (its `record`) fits in the GPU memory free now, beside the resident
        servers, and every victim's suspend will prove its release per process (else the target's restore
        would count as the victim's memory, and fail its proof)."""
        need = record.restore_need_mib()
        if not need:
            return False

        def look() -> tuple[GpuReading, bool]:
            reading = read_gpus(self.toggle_config)
            listed = all(proves_per_process_alone(reading, server_pids(victim)) for victim in victims)
            return reading, listed

        reading, listed = await asyncio.get_running_loop().run_in_executor(None, look)
        free = {gpu.uuid: gpu.free_mib for gpu in reading.gpus}
        margin = self.toggle_config.restore_margin_mib
        return listed and all(free.get(uuid, 0) >= mib + margin for uuid, mib in need.items())

    async def fits_awake(self, target: ModelServer, beside_sleep: bool = False) -> bool:
        """Whether the target's whole share of every GPU (what its wake-up takes) fits in the memory free now,
        beside what the victims' sleep left and its own restored contexts hold. For the early wake
        (GATE_SWAP_EARLY_WAKE), or `beside_sleep`: for a swap that leaves servers in light sleep as they are."""
        if not (self.gate.swap_early_wake or beside_sleep):
            return False
        reading = await asyncio.get_running_loop().run_in_executor(None, read_gpus, self.toggle_config)
        margin = self.toggle_config.restore_margin_mib
        return bool(reading.gpus) and all(
            gpu.free_mib >= int(target.entry.share * gpu.total_mib) + margin for gpu in reading.gpus
        )

    async def evict(self, victim: ModelServer, target: ModelServer, restore_mib: int) -> asyncio.Task[dict[str, float]]:
        """Start suspending `victim` once its requests in flight are done (new ones wait for it meanwhile).

        Returns when its GPU memory is free for `target`: when its suspend has ended, or earlier, when the
        suspend says vLLM's sleep released it (see overlapped_swap). The task returned ends with the
        suspend, with its steps; raises ResumeFailed when the suspend failed. `restore_mib`: what the target's
        restore brings back (0 unknown: nothing overlaps).
        """
        loop = asyncio.get_running_loop()
        released = asyncio.Event()
        hooks = OverlapHooks()
        if restore_mib > 0:  # known: the victim's proof can allow for it, so the two may overlap
            hooks = OverlapHooks(
                memory_released=lambda: loop.call_soon_threadsafe(released.set),
                neighbour_restore_mib=restore_mib,
                stay_asleep_on_rollback=self.gate.swap_early_wake,
            )
        suspending = loop.create_task(self.suspend_victim(victim, target, hooks))
        waiting = loop.create_task(released.wait())
        await asyncio.wait({suspending, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if suspending.done():
            suspending.result()  # raises ResumeFailed when it failed
        else:
            logger.info("model {}: memory released, checkpointing it while {} restores", victim.name, target.name)
        return suspending

    async def suspend_victim(self, victim: ModelServer, target: ModelServer, hooks: OverlapHooks) -> dict[str, float]:
        controller = victim.controller
        controller.draining = True
        try:
            if controller.in_flight:
                logger.info("model {}: waiting for its {} request(s) in flight", victim.name, controller.in_flight)
            while controller.in_flight:
                await asyncio.sleep(DRAIN_POLL_S)
            if controller.transition is not None:
                await asyncio.shield(controller.transition)
            if controller.refresh() not in (Phase.RUNNING, Phase.ASLEEP):
                return {}
            outcome = await asyncio.shield(controller.start(Phase.SUSPENDING, f"swap to {target.name}", hooks))
            if not outcome.ok and outcome.exit_code in NOT_HOLDING_GPUS:
                logger.warning("model {}: no server on the GPUs, not in the way ({})", victim.name, outcome.message)
            elif not outcome.ok:
                raise ResumeFailed(f"suspending model {victim.name} to make room failed: {outcome.message}")
            return outcome.steps
        finally:
            controller.draining = False

    # -- what the gate shows ------------------------------------------------------------------------

    def status_json(self) -> dict:
        models = {}
        for server in self.servers.values():
            controller, stats = server.controller, server.stats
            models[server.name] = {
                "default": server.entry.default,
                "state": controller.refresh().value,
                "since": controller.since,
                "in_flight": controller.in_flight,
                "waiting": controller.waiting,
                "swaps": stats.swaps,
                "swap_seconds": round(stats.swap_seconds, 6),
                "last_swap_s": stats.last_swap_s,
                "last_swap_steps": {
                    name: {phase: round(seconds, 4) for phase, seconds in phases.items()}
                    for name, phases in stats.last_swap_steps.items()
                },
                "failed_swaps": stats.failed_swaps,
                "waited_requests": stats.waited_requests,
                "waited_seconds": round(stats.waited_seconds, 6),
                "last_suspend_s": controller.last_suspend_s,
                "last_resume_s": controller.last_resume_s,
                "last_failure_at": controller.last_failure_at,
                "last_sleep_s": controller.last_sleep_s,
                "last_wake_s": controller.last_wake_s,
                "proof": controller.last_proof,
                "last_swap_path": stats.last_swap_path,
                "hold": hold.to_json() if (hold := controller.held()) else None,
            }
        return {"started": self.ready, "models": models}

    def render_metrics(self) -> str:
        out: list[str] = []
        per_model = [
            ("vllm_gate_model_swaps_total", "counter", "Swaps that brought the model in.", lambda s: s.stats.swaps),
            (
                "vllm_gate_model_swap_seconds_total",
                "counter",
                "Seconds of those swaps (from the start of the swap to the model resumed), all together.",
                lambda s: round(s.stats.swap_seconds, 6),
            ),
            ("vllm_gate_model_failed_swaps_total", "counter", "Swaps that failed.", lambda s: s.stats.failed_swaps),
            (
                "vllm_gate_model_waited_requests_total",
                "counter",
                "Requests that waited for the model to be swapped in.",
                lambda s: s.stats.waited_requests,
            ),
            (
                "vllm_gate_model_waited_seconds_total",
                "counter",
                "Seconds those requests waited, all together.",
                lambda s: round(s.stats.waited_seconds, 6),
            ),
            ("vllm_gate_model_in_flight", "gauge", "Requests in flight.", lambda s: s.controller.in_flight),
            ("vllm_gate_model_waiting", "gauge", "Requests waiting for a swap.", lambda s: s.controller.waiting),
        ]
        for name, kind, help_text, value in per_model:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            out += [f'{name}{{model="{s.name}"}} {value(s)}' for s in self.servers.values()]
        out += ["# HELP vllm_gate_model_state 1 for the state of the model's server."]
        out += ["# TYPE vllm_gate_model_state gauge"]
        for server in self.servers.values():
            phase = server.controller.refresh().value
            out += [f'vllm_gate_model_state{{model="{server.name}",state="{p}"}} {int(p == phase)}' for p in PHASES]
        return "\n".join(out) + "\n"

    async def list_models(self) -> dict:
        """vLLM's /v1/models of every server, resident or not (a suspended server still answers it)."""
        assert self.session is not None

        async def models_of(server: ModelServer) -> list[dict]:
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
                async with self.session.get(server.upstream + "/v1/models") as response:
                    if response.status == 200:
                        data = (await response.json()).get("data")
                        if isinstance(data, list) and data:
                            return data
            # Not started yet, or not answering: listed from the configuration.
            return [{"id": server.name, "object": "model", "owned_by": "vllm", "root": server.entry.model}]

        lists = await asyncio.gather(*(models_of(server) for server in self.servers.values()))
        return {"object": "list", "data": [entry for entries in lists for entry in entries]}
