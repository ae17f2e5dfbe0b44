"""The GPU suite's own logic, run against the CPU stand-in over the fake GPU (its CPU part)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.testing import REPO


@pytest.mark.timeout(300)  # about 90 s on 2 idle cores
def test_gpu_suite_runs_its_steps_on_the_cpu_stand_in(tmp_path):
    """tests/gpu/run_all.sh with SUITE_TARGET=cpu passes each step (TP=2, free ports) and records its figures."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "SUITE_TARGET": "cpu",
        "SUITE_WORK": str(tmp_path / "suite"),
        "SUITE_SITE": str(tmp_path / "site"),  # nothing there: the CPU run imports from this venv only
        "SUITE_STEPS": "machine start cycles acceptance stop refusal report",
        "SUITE_TP": "2",
        "SUITE_GB": "2",
        "SUITE_CYCLES": "1",
        "SUITE_LOAD_CYCLES": "1",
        "SUITE_CLIENTS": "2",
        "SUITE_INFLIGHT_TOKENS": "400",
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
        stdout, stderr = suite.communicate(timeout=280)
    finally:
        if suite.poll() is None:
            os.killpg(suite.pid, signal.SIGKILL)
        subprocess.run(
            [sys.executable, "tests/gpu/run_suite.py", "--target", "cpu", "stop"], cwd=REPO, env=env, timeout=120
        )
    assert suite.returncode == 0, stdout[-4000:] + stderr[-4000:]
    assert "GPU suite: every step passed" in stdout
    results = json.loads((tmp_path / "suite" / "results.json").read_text())
    by_step = {step["step"]: step for step in results["steps"]}
    assert {"machine", "start", "cycles", "acceptance", "refusal"} <= set(by_step)
    server = by_step["start"]["server"]
    assert server["tp"] == 2 and {server["vllm_port"], server["gate_port"]}.isdisjoint({8000, 8001})
    assert by_step["start"]["warmup"]["answer_ok"]
    cycles = by_step["cycles"]
    assert {row["mode"] for row in cycles["cycles"]} == {"plain", "hybrid"}
    assert cycles["cycles"][0]["first_of_server"] and not cycles["cycles"][1]["first_of_server"]
    assert all(row["released_gb"] > 0 and row["server_suspended_mib"] == 0 for row in cycles["cycles"])
    assert all(row["answer"]["finish_reason"] == "length" for row in cycles["wake_through_gate"])
    assert all(check["ok"] for check in cycles["equality"])
    acceptance = by_step["acceptance"]
    assert acceptance["passed"] and set(acceptance["parts"]) == {"plain", "hybrid", "load"}
    assert acceptance["totals"]["failed"] == acceptance["totals"]["aborted"] == acceptance["totals"]["truncated"] == 0
    for part in ("plain", "hybrid"):
        assert acceptance["parts"][part]["counts"]["requests"] == 11  # in flight, 2 straight, 8 through the gate
        assert all(cycle["in_flight_at_suspend"] for cycle in acceptance["parts"][part]["cycles"])
    assert by_step["refusal"]["exit_code"] == 5
    assert "| plain | 1 | yes |" in stdout  # the report's cycles table


@pytest.mark.timeout(200)
def test_swap_suite_swaps_two_stand_ins_under_supervisord(tmp_path):
    """tests/gpu/swap_suite.py on the CPU: the gate starts both servers in turn, 3 alternating requests each swap
    and answer as before, each swap's steps come from /gate/status; then 2 clients on random models answer whole,
    never with both resident; the whole tree is gone after."""
    env = {**os.environ, "SUITE_WORK": str(tmp_path / "suite")}
    done = subprocess.run(
        [
            sys.executable,
            "tests/gpu/swap_suite.py",
            "--target",
            "cpu",
            "--swaps",
            "2",
            "--clients",
            "2",
            "--clients-s",
            "4",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (step,) = [step for step in json.loads((tmp_path / "suite" / "results.json").read_text())["steps"]]
    summary = step["summary"]
    assert (summary["requests"], summary["failed"], summary["different_answers"]) == (3, 0, 0)
    assert [row["model"] for row in step["rows"]] == ["qwen3-8b-shaped", "tiny", "qwen3-8b-shaped"]
    for row in step["rows"]:
        resident = {name for name, state in row["states"].items() if state == "running"}
        assert resident == {row["model"]} and row["gate_swap_s"] > 0
        other = "tiny" if row["model"] != "tiny" else "qwen3-8b-shaped"
        assert "wait_for_room" in row["steps"][f"resume {row['model']}"]  # overlapped (the fake NVML)
        assert "checkpoint" in row["steps"][f"suspend {other}"]
    load = step["load"]
    assert load["requests"] >= 2 and load["verdicts"] == {"ok": load["requests"]}, load
    assert load["same_text"] == load["requests"] and load["both_running_samples"] == 0 and load["samples"] > 0
    assert step["after_stop_gpu_mib"] == step["idle_gpu_mib"]
