"""Small untruths of the tools' edges (issue 21, item 12): each answer says what was observed, and an option
that makes no sense alone is refused with the fix, never acted on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import requests

from entrypoint.base.errors import ExitCode
from tests.test_swap import library_env, start_gate
from tests.testing import REPO, JsonHandler, free_port, serving, wait_until

SELFTEST_CLI = [sys.executable, "-m", "entrypoint.selftest"]
GATE_CLI = [sys.executable, "-m", "entrypoint.gate"]


def test_status_of_pid_1_is_refused_not_shown_as_the_server(toggle_env):
    """`status --pid 1`: PID 1's tree is every process of the machine, not a vLLM server: exit 2 naming the
    fix, instead of listing every process under "running"."""
    done = toggle_env.run("status", "--pid", "1", "--json")
    assert done.returncode == ExitCode.USAGE, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert "init process" in report["error"] and "supervisorctl pid vllm" in report["error"], report["error"]


def test_json_of_an_early_error_names_the_target_as_results_do(toggle_env):
    """`suspend --json` with a bad setting: the JSON says target "checkpointed", as every result of a suspend."""
    done = toggle_env.run("suspend", "--json", env={"CUDA_TOGGLE_VERIFY_ATTEMPTS": "0"})
    assert done.returncode == ExitCode.USAGE
    assert json.loads(done.stdout)["target"] == "checkpointed"


class ModelsButNoAnswers(JsonHandler):
    """Lists a model, and never answers a completion (a server whose engine hangs)."""

    def do_GET(self) -> None:
        self.send_json(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

    def do_POST(self) -> None:
        time.sleep(120)


def run_selftest(url: str, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    done = subprocess.run(
        [*SELFTEST_CLI, "--url", url, "--timeout", str(timeout_s), "--json"],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=REPO,
    )
    return done, time.monotonic() - began


def test_selftest_timeout_bounds_the_first_completion_and_says_why_whole():
    """`selftest --timeout 3` against a server whose completion never answers ends after about 3 s (it took
    the first completion's fixed 60 s), its cause is whole, and its FAIL line is logged as an error."""
    refused, refused_s = run_selftest(f"http://127.0.0.1:{free_port()}", 1)  # the command's own cost
    assert refused.returncode == ExitCode.NOT_READY
    assert "[Errno 111] Connection refused" in json.loads(refused.stdout)["error"], refused.stdout
    assert re.search(r"ERROR\s+FAIL wait for the server", refused.stderr), refused.stderr
    with serving(ModelsButNoAnswers) as url:
        done, seconds = run_selftest(url, 3)
    assert done.returncode == ExitCode.NOT_READY, done.stdout + done.stderr
    assert "a first completion" in json.loads(done.stdout)["error"]
    assert seconds < refused_s + 2 + 15, (seconds, refused_s)  # not the fixed 60 s


def test_gate_json_alone_is_refused_and_starts_no_gate():
    """`vllm-gate --json` without `--print-config`: exit 2 naming the fix; no gate is started."""
    port = free_port()
    env = {**os.environ, "GATE_HOST": "127.0.0.1", "GATE_PORT": str(port)}
    gate = subprocess.Popen([*GATE_CLI, "--json"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        err = gate.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        gate.kill()
        gate.communicate()
        raise AssertionError("vllm-gate --json started a gate") from None
    assert gate.returncode == ExitCode.USAGE and "--print-config --json" in err, err


def test_gate_models_listing_nothing_is_refused():
    """GATE_MODELS="," is no list of models (it was taken as "one server"): exit 2 naming the format."""
    env = {**os.environ, "GATE_MODELS": " , "}
    done = subprocess.run([*GATE_CLI, "--print-config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == ExitCode.USAGE and "lists no model" in done.stderr, done.stderr


def test_gate_status_says_unreachable_when_vllm_does_not_answer(tmp_path, fake_gpu):
    """The upstream does not answer and requests get 503: /gate/status says "unreachable", not "running"."""
    upstream = f"http://127.0.0.1:{free_port()}"
    process = start_gate(tmp_path, {**library_env(fake_gpu, tmp_path / "run"), "GATE_UPSTREAM": upstream})
    url = f"http://127.0.0.1:{process.port}"  # type: ignore[attr-defined]
    try:

        def answers() -> bool:
            assert process.poll() is None, process.log_path.read_text()  # type: ignore[attr-defined]
            try:
                return requests.get(url + "/gate/status", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(answers, "the gate to answer", 30)
        body = {"model": "m", "prompt": "hi", "max_tokens": 1}
        assert requests.post(url + "/v1/completions", json=body, timeout=30).status_code == 503
        assert requests.get(url + "/gate/status", timeout=10).json()["state"] == "unreachable"
    finally:
        process.terminate()
        process.wait(timeout=30)
