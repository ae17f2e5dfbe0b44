"""Did the GPUs give the server's memory back (suspend), and did it come back (resume)? Pure functions.

How other tenants of a GPU are accounted for:
- Where the GPU query lists the server's own PIDs (NVML or nvidia-smi outside a PID namespace), the
  server's memory is known exactly: the suspend is proven when none of its PIDs holds memory any more,
  and what other processes hold is left out of the sum.
- Where it does not (listed PIDs that match none of the server's, which nvidia-smi in a PID namespace gives;
  NVML of driver 580 lists the namespace's own PIDs, measured), a GPU counts as the server's
  when it held more than CUDA_TOGGLE_RESIDUAL_MIB before the suspend, and it must read at most that
  much after it. A GPU shared with processes the tool cannot see needs that setting raised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..cuda.gpus import GpuReading
from .records import GpuRecord


@dataclass
class GpuProof:
    index: int
    uuid: str
    used_before_mib: int
    used_after_mib: int
    limit_mib: int  # what the GPU may still hold for the check to pass
    ok: bool

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class MemoryProof:
    ok: bool
    how: str  # "per-process" or "whole GPU"
    gpus: list[GpuProof]
    server_pids_left: dict[int, int]  # server PIDs still holding memory (per-process figures only)
    problem: str = ""

    def to_json(self) -> dict:
        return {**asdict(self), "gpus": [gpu.to_json() for gpu in self.gpus]}

    def failure(self) -> str:
        if self.problem:
            return self.problem
        kept = [f"GPU{g.index} {g.used_before_mib} -> {g.used_after_mib} MiB (limit {g.limit_mib})" for g in self.gpus]
        kept = [line for line, g in zip(kept, self.gpus, strict=True) if not g.ok]
        parts = []
        if self.server_pids_left:
            parts.append(f"server PIDs still hold GPU memory: {self.server_pids_left} MiB")
        if kept:
            parts.append("GPU memory not released: " + ", ".join(kept))
        return "; ".join(parts)


def released_proof(
    before: GpuReading, after: GpuReading, server_pids: list[int], residual_mib: int, neighbour_mib: int = 0
) -> MemoryProof:
    """The suspend's proof: the server's memory is gone from every GPU it used.

    `neighbour_mib`: what another server restoring meanwhile may hold without being listed (per-process
    figures only; see OverlapHooks). Had this server kept its memory, the growth would be both together."""
    if not before.gpus or not after.gpus:
        return MemoryProof(False, "none", [], {}, f"GPU memory unknown ({after.problem or before.problem})")
    after_by_uuid = after.by_uuid()
    own_before = {pid: mib for pid, mib in before.pids_mib.items() if pid in server_pids}
    if own_before:
        left = {pid: mib for pid, mib in after.pids_mib.items() if pid in server_pids and mib > 0}
        # The memory no listed process holds (the driver's own, or what the query cannot see) must not have
        # grown: the server's memory cannot hide there. Other listed processes may come and go meanwhile
        # (another server on these GPUs resuming: the gate's swap overlaps the two).
        unlisted_before = sum(g.used_mib for g in before.gpus) - sum(before.pids_mib.values())
        unlisted_after = sum(g.used_mib for g in after.gpus) - sum(after.pids_mib.values())
        grew_mib = unlisted_after - max(0, unlisted_before)
        proofs = []
        for gpu in before.gpus:
            now = after_by_uuid.get(gpu.uuid)
            used_after = now.used_mib if now else 0
            proofs.append(GpuProof(gpu.index, gpu.uuid, gpu.used_mib, used_after, gpu.used_mib, True))
        limit_mib = residual_mib + max(0, neighbour_mib)
        ok = not left and grew_mib <= limit_mib
        problem = ""
        if not left and not ok:
            problem = (
                f"GPU memory that no process is listed for grew by {grew_mib} MiB (limit {limit_mib}"
                + (f", of which {neighbour_mib} for the server restoring meanwhile" if neighbour_mib else "")
                + "): the server's memory may still be held"
            )
        if not ok:  # name the GPUs that still hold more than the residual, for the message
            for proof in proofs:
                proof.ok = proof.used_after_mib <= residual_mib
        return MemoryProof(ok, "per-process", proofs, left, problem)
    proofs = []
    for gpu in before.gpus:
        now = after_by_uuid.get(gpu.uuid)
        used_after = now.used_mib if now else 0
        server_gpu = gpu.used_mib > residual_mib
        limit = residual_mib if server_gpu else max(residual_mib, gpu.used_mib)
        proofs.append(GpuProof(gpu.index, gpu.uuid, gpu.used_mib, used_after, limit, used_after <= limit))
    return MemoryProof(all(p.ok for p in proofs), "whole GPU", proofs, {})


def proves_per_process_alone(reading: GpuReading, server_pids: list[int]) -> bool:
    """Whether the suspend's proof will count the server's own processes in one consistent reading.

    Only then may another server on the same GPUs grow while this one suspends (the gate's overlapped
    swap). NVML reads a GPU's total and its process list together; nvidia-smi needs two calls, between
    which a restoring neighbour could add memory that would count as unlisted.
    """
    return reading.source == "nvml" and any(pid in reading.pids_mib for pid in server_pids)


def returned_proof(
    after: GpuReading, suspended: list[GpuRecord], holders: list[int], share: float = 0.9
) -> MemoryProof:
    """The resume's proof that the memory came back.

    Where the GPU query lists every model holder of the server holding memory again, that is the proof
    (other servers sharing the GPUs may have come and gone meanwhile, so whole-GPU figures would mislead).
    Else each GPU the suspend released memory from must hold at least what it held while suspended plus
    `share` of what was released (vLLM's wake-up sizes its KV cache anew).
    """
    if not suspended:
        return MemoryProof(True, "not recorded", [], {}, "")
    if not after.gpus:
        return MemoryProof(False, "none", [], {}, f"GPU memory unknown ({after.problem})")
    if holders and all(after.pids_mib.get(pid, 0) > 0 for pid in holders):
        return MemoryProof(True, "per-process", [], {}, "")
    after_by_uuid = after.by_uuid()
    proofs = []
    for gpu in suspended:
        now = after_by_uuid.get(gpu.uuid)
        floor = gpu.used_after_mib + int(gpu.released_mib * share)
        used = now.used_mib if now else 0
        proofs.append(GpuProof(gpu.index, gpu.uuid, gpu.used_after_mib, used, floor, now is not None and used >= floor))
    missing = [
        f"GPU{p.index} {p.used_before_mib} -> {p.used_after_mib} MiB (expected >= {p.limit_mib})"
        for p in proofs
        if not p.ok
    ]
    problem = "GPU memory did not come back: " + ", ".join(missing) if missing else ""
    return MemoryProof(not missing, "whole GPU", proofs, {}, problem)
