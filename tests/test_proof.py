"""The memory proofs (entrypoint/suspend/proof.py): pure functions over GPU readings."""

from __future__ import annotations

from entrypoint.cuda.gpus import GpuMemory, GpuReading
from entrypoint.suspend.proof import proves_per_process_alone, released_proof, returned_proof
from entrypoint.suspend.records import GpuRecord

SERVER = [101, 102]


def reading(used_mib: int, pids_mib: dict[int, int], source: str = "nvml") -> GpuReading:
    return GpuReading(source, (GpuMemory(0, "GPU-0", used_mib, 143771),), pids_mib=pids_mib)


def test_per_process_suspend_proof_lets_another_listed_server_grow():
    """Server PIDs gone and no unlisted memory appeared: proven, though another server restored meanwhile."""
    before = reading(61_000 + 500, {101: 60_000, 102: 1_000})  # 500 MiB the driver holds, listed for nobody
    after = reading(2_000 + 500, {303: 2_000})  # the other server's restore added 2 GB, listed as its own
    proof = released_proof(before, after, SERVER, residual_mib=256)
    assert proof.ok and proof.how == "per-process"


def test_per_process_suspend_proof_fails_when_memory_hides_unlisted():
    """The server's PIDs read 0, but the memory nobody is listed for grew past the residual: not proven."""
    before = reading(61_500, {101: 60_000, 102: 1_000})
    after = reading(500 + 900, {})
    proof = released_proof(before, after, SERVER, residual_mib=256)
    assert not proof.ok and "grew by 900 MiB" in proof.failure()
    assert released_proof(before, reading(500 + 200, {}), SERVER, residual_mib=256).ok


def test_per_process_suspend_proof_names_a_server_pid_that_kept_memory():
    """A server PID still listed with memory fails the proof, naming it."""
    proof = released_proof(reading(61_500, {101: 60_000, 102: 1_000}), reading(1_500, {102: 1_000}), SERVER, 256)
    assert not proof.ok and proof.server_pids_left == {102: 1_000} and "102" in proof.failure()


def test_whole_gpu_suspend_proof_when_no_pid_of_the_server_is_listed():
    """No per-process figures for the server (a container's PID namespace): the GPU must read at most the residual."""
    before = reading(61_500, {9999: 61_000}, source="nvidia-smi")
    assert released_proof(before, reading(200, {}, "nvidia-smi"), SERVER, 256).how == "whole GPU"
    assert released_proof(before, reading(200, {}, "nvidia-smi"), SERVER, 256).ok
    assert not released_proof(before, reading(2_200, {}, "nvidia-smi"), SERVER, 256).ok


def test_overlap_only_with_a_consistent_per_process_reading():
    """A swap may overlap only where NVML lists the server's PIDs (one reading; nvidia-smi needs two calls)."""
    assert proves_per_process_alone(reading(61_500, {101: 60_000}), SERVER)
    assert not proves_per_process_alone(reading(61_500, {101: 60_000}, "nvidia-smi"), SERVER)
    assert not proves_per_process_alone(reading(61_500, {9999: 60_000}), SERVER)


def test_resume_proof_per_process_or_by_the_floor_of_the_record():
    """Every holder listed with memory proves the resume; else each GPU must reach its recorded floor."""
    record = [GpuRecord("GPU-0", 0, 61_500, 500)]  # released 61000 MiB
    assert returned_proof(reading(61_000, {101: 60_000, 102: 1_000}), record, SERVER).how == "per-process"
    floor_ok = returned_proof(reading(60_000, {}, "nvidia-smi"), record, SERVER)
    assert floor_ok.ok and floor_ok.how == "whole GPU"
    short = returned_proof(reading(20_000, {}, "nvidia-smi"), record, SERVER)
    assert not short.ok and "did not come back" in short.failure()


def test_a_neighbour_restoring_meanwhile_is_allowed_for_but_not_this_servers_own_memory():
    """Unlisted growth up to what the other server's restore adds passes; the two together (this one kept its
    memory as well) fail."""
    before = reading(61_500, {101: 60_000, 102: 1_000})
    neighbour_restored = reading(500 + 900, {})  # restored and locked: NVML does not list it
    assert not released_proof(before, neighbour_restored, SERVER, 256).ok
    assert released_proof(before, neighbour_restored, SERVER, 256, neighbour_mib=900).ok
    both = reading(500 + 900 + 1_000, {})  # and this server's 1000 MiB hidden too
    failed = released_proof(before, both, SERVER, 256, neighbour_mib=900)
    assert not failed.ok and "of which 900 for the server restoring meanwhile" in failed.failure()
