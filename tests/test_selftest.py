"""selftest against the stand-in vLLM (real processes, real HTTP) over the fake GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from entrypoint.errors import ExitCode
from entrypoint.selftest import SELFTEST_EXIT_CODES
from tests.toggle_fixtures import REPO, SAFE_ENV, fakegpu

SAFE_ARGS = ("--disable-custom-all-reduce", "--gpu-memory-utilization", "0.02")


def run_selftest(server, *args: str, timeout: float = 90) -> tuple[int, dict, str]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "entrypoint.selftest",
            "--url",
            server.url,
            "--pid",
            str(server.pid),
            "--max-tokens",
            "8",
            "--timeout",
            "20",
            "--inflight-wait",
            "1",
            "--json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"no JSON report (rc {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.returncode, report, done.stderr


@pytest.fixture
def server(toggle_env, standin_server):
    """A stand-in TP=2 vLLM configured as suspend/resume needs it."""
    return standin_server(*SAFE_ARGS, env=SAFE_ENV)


def assert_left_running(toggle_env, server):
    """The server is running again: every CUDA process running, the dispatcher not frozen, and it answers."""
    code, result = toggle_env.run_json("status", "--pid", str(server.pid))
    assert code == 0 and result["state"] == "running", result
    assert not any(d["frozen"] for d in result["dispatchers"])
    answer = server.post(
        "/v1/chat/completions",
        json={
            "model": "standin-model",
            "max_tokens": 4,
            "temperature": 0,
            "messages": [{"role": "user", "content": "still there?"}],
        },
    )
    assert answer.status_code == 200


def test_happy_path_proves_suspend_and_resume(toggle_env, server, tmp_path):
    """The whole cycle passes: memory freed and back, same answer, the request sent while suspended answered."""
    report_file = tmp_path / "report.json"
    code, report, err = run_selftest(server, "--cycles", "2", "--report", str(report_file))
    assert code == 0, err
    assert report["ok"] and report["model"] == "standin-model"
    assert report["answer_before"] and report["answer_before"] == report["answer_after"]
    assert report["inflight_answer"] == report["answer_before"]
    assert report["inflight_seconds"] >= 1.0, "it must have waited for the resume"
    assert [s["name"] for s in report["steps"]][:5] == [
        "wait for the server",
        "list models",
        "chat",
        "suspend #1",
        "request while suspended",
    ]
    assert all(step["ok"] for step in report["steps"])
    assert len(report["cycles"]) == 2
    for gpu in report["gpus"]:
        assert gpu["suspended_mib"] <= 64 and gpu["after_mib"] == gpu["before_mib"] and gpu["released_gb"] > 1.5
    for cycle in report["cycles"]:
        assert cycle["suspend_s"] > 0 and cycle["resume_gb_s_per_gpu"] > 0
    assert json.loads(report_file.read_text()) == report
    assert "selftest PASSED" in err


def test_server_that_never_becomes_ready(toggle_env, standin_server):
    """A server whose model never loads fails NOT_READY, saying what it waited for."""
    server = standin_server(*SAFE_ARGS, env={**SAFE_ENV, "STANDIN_NEVER_READY": "1"}, wait_ready=False)
    code, report, _ = run_selftest(server, "--timeout", "3")
    assert code == ExitCode.NOT_READY
    assert "not ready after 3 s" in report["error"] and "/v1/models" in report["error"]


def test_model_that_is_not_served(toggle_env, server):
    """A --model the server does not list fails MODEL_NOT_SERVED and names what is served."""
    code, report, _ = run_selftest(server, "--model", "qwen3-8b-awq")
    assert code == ExitCode.MODEL_NOT_SERVED
    assert "standin-model" in report["error"] and "--model" in report["error"]


def test_suspend_that_does_not_free_memory(toggle_env, server):
    """Memory left on a GPU after the checkpoint fails NOT_SUSPENDED, and the server is resumed first."""
    fakegpu.add_fault(server.workers()[1].pid, "checkpoint", "keep-memory", root=toggle_env.state_dir)
    code, report, _ = run_selftest(server)
    assert code == ExitCode.NOT_SUSPENDED
    assert "GPU1" in report["error"] and "not released" in report["error"]
    assert report["resumed_after_failure"].startswith("resumed")
    assert_left_running(toggle_env, server)


def test_worker_that_will_not_resume(toggle_env, server):
    """A restore that fails is reported with the tool's exit code; the server is resumed before the report."""
    fakegpu.add_fault(server.workers()[0].pid, "restore", "error", root=toggle_env.state_dir)
    code, report, _ = run_selftest(server, "--no-inflight")
    assert code == ExitCode.TRANSITION_FAILED
    assert "restore failed" in report["error"]
    assert report["resumed_after_failure"].startswith("resumed")
    assert_left_running(toggle_env, server)


def test_answers_that_differ_fail_unless_allowed(toggle_env, server):
    """A different answer after resume fails ANSWER_CHANGED with both texts; --allow-different lets it pass."""
    fakegpu.add_fault(server.workers()[0].pid, "restore", "corrupt", root=toggle_env.state_dir)
    code, report, _ = run_selftest(server, "--no-inflight")
    assert code == ExitCode.ANSWER_CHANGED
    assert report["answer_before"] in report["error"] and report["answer_after"] in report["error"]
    assert report["answer_before"] != report["answer_after"]
    code, report, _ = run_selftest(server, "--no-inflight", "--allow-different")
    assert code == 0


def test_refused_suspend_changes_nothing(toggle_env, standin_server):
    """A server without the NCCL settings is refused: REFUSED, nothing suspended, still answering."""
    server = standin_server(*SAFE_ARGS, env={**SAFE_ENV, "NCCL_SHM_DISABLE": "0"})
    code, report, _ = run_selftest(server)
    assert code == ExitCode.REFUSED and "NCCL_SHM_DISABLE=1" in report["error"]
    assert report["resumed_after_failure"] == ""
    assert_left_running(toggle_env, server)


def test_help_lists_exit_codes():
    """--help documents every exit code selftest can return."""
    text = subprocess.run(
        [sys.executable, "-m", "entrypoint.selftest", "--help"], capture_output=True, text=True, cwd=REPO
    ).stdout
    for code in SELFTEST_EXIT_CODES:
        assert f"{int(code):>2}  {code.meaning}" in text
