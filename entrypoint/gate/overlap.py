"""The overlap handshake of a swap: the servers in the way are suspended and the target resumed, the two
overlapping where that is safe (the target's restore while they drain, sleep and are checkpointed; its wake-up
only once their memory is proven released, or, with GATE_SWAP_EARLY_WAKE, once its whole share fits)."""

from __future__ import annotations

import asyncio
import threading

from loguru import logger

from ..base.config import Config
from ..base.errors import ExitCode
from ..cuda.gpus import GpuReading, read_gpus
from ..suspend.executor import OverlapHooks
from ..suspend.proof import proves_per_process_alone
from ..suspend.records import SuspendRecord
from .config import GateConfig
from .control import Phase, ResumeFailed
from .servers import ModelServer, server_pids, suspend_record_of

# A server the library cannot find, or whose tree has no CUDA process (not started, or gone), holds no GPU
# memory: it is not in the way of a swap.
NOT_HOLDING_GPUS = (ExitCode.SERVER_NOT_FOUND, ExitCode.NO_CUDA_PROCESSES)
DRAIN_POLL_S = 0.01
# How long a resumed server waits, locked, for the servers in its way to finish suspending. Their suspends
# end on their own timeouts; this bound only keeps a worker thread from waiting for good on a gate that
# lost track (when it passes, the resume is withdrawn).
ROOM_WAIT_S = 3600.0


class OverlappedSwap:
    """One gate's swaps: suspend the victims a swap names, resume its target, overlapped where safe."""

    def __init__(self, gate: GateConfig, toggle_config: Config):
        self.gate = gate
        self.toggle_config = toggle_config

    async def overlapped_swap(self, target: ModelServer, victims: list[ModelServer]) -> dict[str, dict[str, float]]:
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
