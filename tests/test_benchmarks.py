"""benchmarks/: the seed's protocol over a fake tree, and the benchmark script in its fast mode."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.seed_protocol import seed_cuda_pids, seed_toggle_all
from entrypoint.base.config import load_config
from entrypoint.cuda.cli_backend import CliBackend
from entrypoint.cuda.driver_backend import DriverBackend
from tests.testing import REPO

BACKENDS = {"cli": CliBackend, "driver": DriverBackend}  # the driver one has no `toggle`: it is emulated


def processes_using(state_dir: str) -> list[psutil.Process]:
    """Live processes whose environment names this fake GPU: those a benchmark run started and left behind."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE and process.environ().get("FAKE_CUDA_STATE_DIR") == state_dir:
                found.append(process)
    return found


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
def test_seed_toggles_blindly(toggle_env, fake_tree, backend_name):
    """The seed's toggle reaches the target, and a second call with the same target toggles everything back."""
    tree = fake_tree(workers=2)
    backend = BACKENDS[backend_name](load_config())
    pids = seed_cuda_pids(backend, tree.root)
    assert pids == sorted([tree.root, tree.dispatcher, *tree.workers])  # every CUDA process, dispatcher too

    first = seed_toggle_all(backend, pids, "checkpointed", verify_attempts=3, verify_sleep_s=0.01)
    assert first["converged"] and first["verify_reads"] == 1 and not first["errors"]
    assert {toggle_env.state(pid) for pid in pids} == {"checkpointed"}

    # cuda-toggle-all's `checkpointed` is idempotent; the seed's suspend, run twice, resumes the server
    again = seed_toggle_all(backend, pids, "checkpointed", verify_attempts=3, verify_sleep_s=0.01)
    assert not again["converged"] and again["verify_reads"] == 3
    assert {toggle_env.state(pid) for pid in pids} == {"running"}
    assert set(again["states"].values()) == {"running"}


def test_seed_ignores_a_failed_toggle(toggle_env, fake_tree):
    """Like the seed's `|| true`: a PID whose toggle fails is reported, and the next PIDs are toggled anyway."""
    tree = fake_tree(workers=2)
    backend = CliBackend(load_config())
    failing, *others = tree.workers
    (toggle_env.state_dir / "pids" / str(failing) / "faults" / "checkpoint").write_text("error\n")
    outcome = seed_toggle_all(backend, [failing, *others], "checkpointed", verify_attempts=2, verify_sleep_s=0.01)
    assert list(outcome["errors"]) == [failing] and not outcome["converged"]
    assert toggle_env.state(failing) == "locked"  # the seed never unlocks it: that worker stays blocked
    assert all(toggle_env.state(pid) == "checkpointed" for pid in others)


def test_benchmark_fast_mode(tmp_path: Path):
    """One repetition with 2 workers writes every field, and the sequential seed is slower than move_to()."""
    out = tmp_path / "bench.json"
    # 3 s per transfer: the seed pays 2 x 3 s, move_to() 3 s plus its fixed cost (about 1.4 s on 2 idle CPU
    # cores, up to 3 s while the rest of the suite runs beside it: with 2 s per transfer the ratio fell to 0.97)
    command = [sys.executable, "-m", "benchmarks.bench_toggle", "--repetitions", "1", "--workers", "2"]
    done = subprocess.run(
        [*command, "--transfer-s", "3", "--quiet", "--json-out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,  # 30 s alone; under pytest's own limit of 120 s
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert "| workers |" in done.stdout
    assert {"date", "repetitions", "workers", "transfer_s", "backends", "seed_verify_sleep_s"} <= report["meta"].keys()

    assert {(r["backend"], r["direction"]) for r in report["overhead"]} == {
        (backend, direction) for backend in ("cli", "driver") for direction in ("suspend", "resume")
    }
    for row in report["overhead"]:
        assert row["workers"] == 2 and row["runs"] == 1
        assert row["backend_ops_s"] >= 3.0  # checkpoint or restore alone takes the transfer time
        assert row["overhead_s"] == pytest.approx(row["wall_s"] - row["backend_ops_s"])
        assert 0 < row["verify_s"] < row["overhead_s"]

    assert [r["direction"] for r in report["comparison"]] == ["suspend", "resume"]
    for row in report["comparison"]:
        assert row["seed_pids"] == 4  # root, EngineCore, 2 workers
        assert row["seed_s"] >= 6.0  # two 3 s transfers, one after the other
        assert row["ratio"] == pytest.approx(row["seed_s"] / row["ours_s"])
        assert row["ratio"] > 1, row
        assert row["ratio_with_seed_discovery"] > row["ratio"]
    assert not processes_using(report["meta"]["fake_gpu_dir"])


def test_benchmark_cleans_up_on_ctrl_c(tmp_path: Path):
    """Ctrl-C in the middle of a run: exit 130 (or 1 if a transition failed of it), no process left behind."""
    benchmark = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_toggle", "--repetitions", "1", "--workers", "2"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so that the "terminal" Ctrl-C below reaches only it
    )
    try:
        state_dir = benchmark.stderr.readline().removeprefix("fake GPU: ").strip()
        assert state_dir.startswith("/"), state_dir
        deadline = time.monotonic() + 30
        while not any(len(p.children()) >= 2 for p in psutil.Process(benchmark.pid).children()):
            assert time.monotonic() < deadline, "the fake tree did not start"
            time.sleep(0.05)
        time.sleep(1.0)  # into the first transition
        os.killpg(benchmark.pid, signal.SIGINT)  # what a Ctrl-C in the terminal sends: the whole group
        benchmark.wait(timeout=30)
        assert benchmark.returncode in (130, 1), benchmark.stderr.read()
        assert not processes_using(state_dir)
        assert not Path(state_dir).exists()
    finally:
        if benchmark.poll() is None:
            benchmark.kill()
            benchmark.wait()
