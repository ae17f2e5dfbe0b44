"""The GPU suite's own logic, run whole against the CPU stand-in over the fake GPU (its CPU part)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.toggle_fixtures import REPO


@pytest.mark.timeout(540)  # the whole suite: ~2 minutes on 2 idle cores
def test_gpu_suite_runs_every_scenario_on_the_cpu_stand_in(tmp_path):
    """tests/gpu/run_all.sh with SUITE_TARGET=cpu passes every step and records each scenario's figures."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "SUITE_TARGET": "cpu",
        "SUITE_WORK": str(tmp_path / "suite"),
        "SUITE_SIZES": "2 3",
        "SUITE_CYCLES": "1",
        "SUITE_LOAD_CYCLES": "2",
        "SUITE_CLIENTS": "2",
    }
    suite = subprocess.Popen(
        ["bash", "tests/gpu/run_all.sh"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = suite.communicate(timeout=480)
    finally:
        if suite.poll() is None:
            os.killpg(suite.pid, signal.SIGKILL)
        subprocess.run(
            [sys.executable, "tests/gpu/run_suite.py", "--target", "cpu", "stop"], cwd=REPO, env=env, timeout=120
        )
    done = subprocess.CompletedProcess(suite.args, suite.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "GPU suite: every step passed" in done.stdout
    results = json.loads((tmp_path / "suite" / "results.json").read_text())
    steps = {step["step"] for step in results["steps"]}
    assert {"machine", "start", "selftest", "protocols", "load", "gate", "hybrid", "refusal"} <= steps
    by_step = {step["step"]: step for step in results["steps"]}
    assert by_step["load"]["failed"] == 0 and by_step["load"]["dead_processes"] == []
    assert by_step["refusal"]["exit_code"] == 5
    assert all(d["same_answers"] == d["requests"] for d in by_step["hybrid"]["requests_during_suspend"])
    assert by_step["hybrid"]["summary"]["hybrid"]["suspend_median_s"] > 0
