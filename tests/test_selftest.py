"""selftest against the stand-in vLLM (real processes, real HTTP) over the fake GPU, and small real upstreams."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer

import pytest
import requests
from click.testing import CliRunner

from entrypoint.base.errors import ExitCode, ToolError
from entrypoint.cycle.checks import fair_reference, same_as_reference
from entrypoint.cycle.openai_client import TokenTrace
from entrypoint.selftest import SELFTEST_EXIT_CODES, cli
from tests.testing import REPO, JsonHandler, free_port
from tests.toggle_fixtures import SAFE_ENV, fakegpu

SAFE_ARGS = ("--disable-custom-all-reduce", "--gpu-memory-utilization", "0.02")
# Seconds per generated token: the request in flight (300 tokens) streams for 3 s, longer than the library
# takes to quiesce the server on a busy 2-core machine, so it really runs across the suspend.
STEP_S = "0.01"
FAST_ARGS = ("--max-tokens", "8", "--timeout", "60", "--inflight-tokens", "300", "--inflight-wait", "0.5")


def run_selftest(url: str, *args: str, pid: int | None = None, timeout: float = 90) -> tuple[int, dict, str]:
    command = [sys.executable, "-m", "entrypoint.selftest", "--url", url, *FAST_ARGS, "--json", *args]
    if pid is not None:
        command += ["--pid", str(pid)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"no JSON report (rc {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.returncode, report, done.stderr


def selftest_with_fault(toggle_env, server, worker: int, op: str, fault: str) -> tuple[object, int, dict]:
    """selftest on a fresh stand-in whose worker number `worker` is told `fault` for `op`: (stand-in, code, report)."""
    standin = server()
    fakegpu.add_fault(standin.workers()[worker].pid, op, fault, root=toggle_env.state_dir)
    code, report, _ = run_selftest(standin.url, pid=standin.pid)
    return standin, code, report


@pytest.fixture
def server(toggle_env, standin_server):
    """Factory: a stand-in vLLM (TP=2 unless told) configured as suspend/resume needs it."""

    def start(tensor_parallel_size: int = 2, env: dict[str, str] | None = None, extra_args=(), **kwargs):
        environ = {**SAFE_ENV, "STANDIN_STEP_S": STEP_S, **(env or {})}
        args = (*SAFE_ARGS, *extra_args)
        return standin_server(*args, tensor_parallel_size=tensor_parallel_size, env=environ, **kwargs)

    return start


def assert_left_running(toggle_env, server):
    """The server is running again: every CUDA process running, the dispatcher not frozen, and it answers."""
    code, result = toggle_env.run_json("status", "--pid", str(server.pid))
    assert code == 0 and result["state"] == "running", result
    assert not any(d["frozen"] for d in result["dispatchers"])
    body = {"model": "standin-model", "max_tokens": 4, "temperature": 0, "prompt": "still there?"}
    assert server.post("/v1/completions", json=body).status_code == 200


# --- small real upstreams ------------------------------------------------------------------------------------


class Upstream(ThreadingHTTPServer):
    """A real HTTP server on a free port whose handler is a function of (method, path, body) -> reply.

    A reply is (status, JSON body), or an iterator of SSE payloads (a stream)."""

    daemon_threads = True

    def __init__(self, answer: Callable[[str, str, dict | None], object]):
        super().__init__(("127.0.0.1", 0), UpstreamHandler)
        self.answer = answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class UpstreamHandler(JsonHandler):
    protocol_version = "HTTP/1.0"  # the end of a stream is the end of the connection

    def do_GET(self) -> None:
        self.reply(self.server.answer("GET", self.path, None))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self.reply(self.server.answer("POST", self.path, json.loads(raw) if raw else None))

    def reply(self, reply: object) -> None:
        if isinstance(reply, tuple):
            self.send_json(*reply)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for payload in reply:
            self.wfile.write(f"data: {payload}\n\n".encode())
            self.wfile.flush()


@pytest.fixture
def upstream() -> Iterator[Callable[..., Upstream]]:
    """Factory: upstream(answer) serves `answer` on a free port in a thread; shut down at teardown."""
    started: list[Upstream] = []

    def start(answer: Callable[[str, str, dict | None], object]) -> Upstream:
        server = Upstream(answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def forward(target: str, method: str, path: str, body: dict | None) -> tuple[int, dict]:
    response = requests.request(method, target + path, json=body, timeout=30)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"text": response.text}


def forward_stream(target: str, body: dict, cut_after: int | None = None) -> Iterator[str]:
    """Pass a stream through; with `cut_after`, end it there as vLLM ends an aborted request."""
    with requests.post(target + "/v1/completions", json=body, stream=True, timeout=30) as response:
        tokens = 0
        for line in response.iter_lines(decode_unicode=True):
            if not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            if tokens == cut_after:
                break
            yield payload
            if payload == "[DONE]":
                return
            tokens += 1
    yield json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "abort"}]})
    yield json.dumps({"choices": [], "usage": {"completion_tokens": tokens}})
    yield "[DONE]"


def answer_with_logprobs(values: list[float], tokens: int = 4) -> Callable[[str, str, dict | None], object]:
    """A one-model server whose greedy answers carry these logprob values (cycled)."""

    def value(index: int) -> float:
        return values[index % len(values)]

    def answer(method: str, path: str, body: dict | None) -> object:
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]}
        if path == "/v1/completions":
            legacy = {
                "tokens": [f"t{i}" for i in range(tokens)],
                "token_logprobs": [value(i) for i in range(tokens)],
                "top_logprobs": [{f"t{i}": value(i), "x": value(i + 1)} for i in range(tokens)],
                "text_offset": list(range(tokens)),
            }
            choice = {"index": 0, "text": "t" * tokens, "finish_reason": "length", "logprobs": legacy}
            return 200, {"choices": [choice], "usage": {"completion_tokens": tokens}}
        if path == "/v1/chat/completions":
            content = [
                {
                    "token": f"t{i}",
                    "logprob": value(i),
                    "top_logprobs": [{"token": f"t{i}", "logprob": value(i)}, {"token": "x", "logprob": value(i + 1)}],
                }
                for i in range(tokens)
            ]
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": "t" * tokens},
                "finish_reason": "length",
                "logprobs": {"content": content},
            }
            return 200, {"choices": [choice], "usage": {"completion_tokens": tokens}}
        return 404, {"error": {"message": "not found"}}

    return answer


# --- passing runs --------------------------------------------------------------------------------------------


def assert_passed(report: dict, cycles: int, inflight_tokens: int = 300) -> None:
    assert report["ok"] and report["exit_code"] == 0, report["error"]
    assert len(report["cycles"]) == cycles
    references = report["references"]
    assert set(references) == {"completion 1", "completion 2", "chat"}
    for evidence in references.values():
        assert evidence["logprobs"] > evidence["tokens"] > 0, "top candidates are compared too"
        assert evidence["min"] < evidence["max"] < 0 and evidence["distinct"] > 1
    for cycle in report["cycles"]:
        assert cycle["mode"] and cycle["quiesce"] and cycle["resumed_by"] == "selftest"
        assert cycle["suspend_s"] > 0 and cycle["resume_s"] > 0 and cycle["released_gb_per_gpu"] > 1.0
        for gpu in cycle["gpus"]:
            assert gpu["suspended_mib"] <= 64 and gpu["after_mib"] == gpu["before_mib"] and gpu["released_gb"] > 1.0
        inflight = cycle["checks"]["inflight"]
        assert inflight["finish_reason"] == "length" and inflight["completion_tokens"] == inflight_tokens
        assert 0 < inflight["tokens_when_suspended"] < inflight_tokens, "it ran across the suspend"
        assert cycle["checks"]["held"]["inflight_tokens_while_suspended"] == 0
        assert cycle["checks"]["queued"]["answered"] == 2 and len(cycle["queued"]) == 2
        assert all(q["status"] == 200 and q["finish_reason"] in ("length", "stop") for q in cycle["queued"])
        assert cycle["queued_first_answer_s"] >= 0.5, "sent while suspended, it waited for the resume"
        for name in references:
            assert cycle["checks"][f"same: {name}"]["logprobs"] == references[name]["logprobs"]


def test_passing_run_at_tp2(toggle_env, server, tmp_path):
    """Two cycles at TP=2: memory freed and back, the request in flight whole, queued ones answered, logprobs equal."""
    standin = server()
    report_file = tmp_path / "report.json"
    code, report, err = run_selftest(standin.url, "--cycles", "2", "--report", str(report_file), pid=standin.pid)
    assert code == 0, err
    assert_passed(report, cycles=2)
    assert report["vllm_url"] == standin.url and not report["gate"]
    assert [gpu["index"] for gpu in report["cycles"][0]["gpus"]] == [0, 1]
    assert json.loads(report_file.read_text()) == report
    assert "selftest PASSED" in err and "quiesce" in err


def test_passing_run_at_tp1(toggle_env, server):
    """At TP=1 EngineCore holds the model: vLLM's scheduler pause holds the requests, EngineCore is
    checkpointed, GPU0 freed, and every check passes."""
    standin = server(tensor_parallel_size=1, env={"VLLM_SERVER_DEV_MODE": "1"})
    code, report, err = run_selftest(standin.url, pid=standin.pid)
    assert code == 0, err
    assert_passed(report, cycles=1)
    assert [gpu["index"] for gpu in report["cycles"][0]["gpus"]] == [0]


def test_passing_hybrid_run_holds_the_request_in_flight(toggle_env, server):
    """With vLLM's sleep mode (hybrid), the scheduler holds the request in flight (mode=keep): it comes back whole."""
    standin = server(extra_args=("--enable-sleep-mode",), env={"VLLM_SERVER_DEV_MODE": "1"})
    code, report, err = run_selftest(standin.url, pid=standin.pid)
    assert code == 0, err
    assert_passed(report, cycles=1)
    (cycle,) = report["cycles"]
    assert cycle["mode"] == "hybrid" and cycle["quiesce"] == "scheduler"
    assert cycle["checks"]["resumed"]["vllm"] == {"is_paused": False, "is_sleeping": False}


@pytest.fixture
def gate_in_front(tmp_path) -> Iterator[Callable[..., str]]:
    """Factory: gate_in_front(standin) starts the real gate (vllm-gate) in front of it; returns the gate's URL."""
    started: list[subprocess.Popen] = []

    def start(standin) -> str:
        port = free_port()
        environ = {
            **os.environ,
            "GATE_HOST": "127.0.0.1",
            "GATE_PORT": str(port),
            "GATE_UPSTREAM": standin.url,
            "GATE_SERVER_PID": str(standin.pid),
            "GATE_POLL_S": "0.1",
            "GATE_BUSY_WAIT_S": "60",
        }
        with (tmp_path / "gate.log").open("wb") as log_file:
            gate = subprocess.Popen(
                [sys.executable, "-m", "entrypoint.gate"], cwd=REPO, env=environ, stdout=log_file, stderr=log_file
            )
        started.append(gate)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert gate.poll() is None, (tmp_path / "gate.log").read_text()
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url + "/gate/status", timeout=1).status_code == 200:
                    return url
            assert time.monotonic() < deadline, "the gate did not answer"
            time.sleep(0.05)

    yield start
    for gate in started:
        gate.terminate()
        gate.wait(timeout=15)


def test_behind_a_gate_the_gate_wakes_the_server(toggle_env, server, gate_in_front):
    """Behind the gate, requests sent through it while suspended make the gate resume; selftest does not."""
    standin = server()
    gate_url = gate_in_front(standin)
    code, report, err = run_selftest(gate_url, "--gate-requests", "3", pid=standin.pid)
    assert code == 0, err
    assert report["gate"] and report["vllm_url"] == standin.url
    (cycle,) = report["cycles"]
    assert cycle["resumed_by"] == "gate" and "resume" not in cycle["evidence"], "selftest must not resume itself"
    assert cycle["resume_s"] > 0, "the gate's own resume time, from /gate/status"
    assert cycle["checks"]["queued"]["answered"] == 5
    assert [q["label"] for q in cycle["queued"]].count("request 1 through the gate") == 1
    assert cycle["checks"]["inflight"]["completion_tokens"] == 300
    assert_left_running(toggle_env, standin)


# --- failures the checks must catch --------------------------------------------------------------------------


def test_aborted_request_in_flight_fails(toggle_env, server, upstream, monkeypatch):
    """A request in flight that comes back with finish_reason abort fails INFLIGHT_CUT, naming the abort."""
    standin = server()

    def answer(method: str, path: str, body: dict | None) -> object:
        if method == "POST" and body and body.get("stream"):
            return forward_stream(standin.url, body, cut_after=20)
        return forward(standin.url, method, path, body)

    proxy = upstream(answer)
    monkeypatch.setenv("CUDA_TOGGLE_SERVER_URL", proxy.url)  # vLLM's own address: the request in flight goes there
    code, report, _ = run_selftest(proxy.url, pid=standin.pid)
    assert code == ExitCode.INFLIGHT_CUT, report["error"]
    assert "aborted after 20 of 300 tokens" in report["error"]
    assert_left_running(toggle_env, standin)


def test_logprobs_that_differ_fail(toggle_env, server, upstream):
    """Same tokens but one logprob changed in its last digits after the resume fails LOGPROBS_DIFFER."""
    standin = server()
    seen = {"logprobs": 0}

    def answer(method: str, path: str, body: dict | None) -> object:
        if method == "POST" and body and body.get("stream"):
            return forward_stream(standin.url, body)
        status, data = forward(standin.url, method, path, body)
        if body and body.get("logprobs") and status == 200:
            seen["logprobs"] += 1
            if seen["logprobs"] > 3:  # the three references before the suspend pass untouched
                logprobs = data["choices"][0]["logprobs"]
                if "content" in logprobs:
                    logprobs["content"][0]["logprob"] += 1e-9
                else:
                    logprobs["token_logprobs"][0] += 1e-9
        return status, data

    proxy = upstream(answer)
    code, report, _ = run_selftest(proxy.url, pid=standin.pid)
    assert code == ExitCode.LOGPROBS_DIFFER, report["error"]
    assert "token 0" in report["error"] and "logprob" in report["error"]
    assert_left_running(toggle_env, standin)


def test_request_sent_while_suspended_that_fails_is_lost(toggle_env, server, upstream, monkeypatch):
    """A request sent straight to vLLM while suspended that fails instead of waiting: INFLIGHT_LOST."""
    standin = server()

    def answer(method: str, path: str, body: dict | None) -> object:
        if body and str(body.get("prompt", "")).startswith("selftest sent while suspended"):
            return 503, {"error": {"message": "the engine is not running"}}
        if method == "POST" and body and body.get("stream"):
            return forward_stream(standin.url, body)
        return forward(standin.url, method, path, body)

    # vLLM's own address, where selftest sends the requests while suspended, is this stand-in's proxy
    monkeypatch.setenv("CUDA_TOGGLE_SERVER_URL", upstream(answer).url)
    code, report, _ = run_selftest(standin.url, pid=standin.pid)
    assert code == ExitCode.INFLIGHT_LOST, report["error"]
    assert "request 1 straight to vLLM failed while the server was suspended" in report["error"]
    assert report["resumed_after_failure"].startswith("resumed")
    assert_left_running(toggle_env, standin)


def test_state_changed_by_the_checkpoint_fails(toggle_env, server):
    """A worker that computes differently after its restore fails LOGPROBS_DIFFER; the server stays running."""
    standin, code, report = selftest_with_fault(toggle_env, server, 0, "restore", "corrupt")
    assert code == ExitCode.LOGPROBS_DIFFER, report["error"]
    assert "differs after the resume" in report["error"]


@pytest.mark.parametrize(
    "values, words",
    [
        ([-0.5, -9999.0, -1.25], "not finite"),
        ([-0.7], "all 12 logprobs are equal"),
    ],
    ids=["minus-infinity-as-vllm-writes-it", "all-equal"],
)
def test_references_that_prove_nothing_fail_before_any_suspend(upstream, values, words):
    """Reference logprobs that are not finite or all equal fail LOGPROBS_UNFIT before anything is suspended."""
    bare = upstream(answer_with_logprobs(values))
    began = time.monotonic()
    code, report, _ = run_selftest(bare.url)
    assert code == ExitCode.LOGPROBS_UNFIT, report["error"]
    assert words in report["error"] and not report["cycles"]
    assert time.monotonic() - began < 60  # before an answer could time out (FAST_ARGS' --timeout)


def test_server_without_logprobs_fails_before_any_suspend(upstream):
    """A server that answers without logprobs gives nothing to compare: LOGPROBS_UNFIT."""
    answer = answer_with_logprobs([-0.1, -2.0])

    def without(method: str, path: str, body: dict | None) -> object:
        status, data = answer(method, path, body)
        if "choices" in data:
            data["choices"][0]["logprobs"] = None
        return status, data

    code, report, _ = run_selftest(upstream(without).url)
    assert code == ExitCode.LOGPROBS_UNFIT and "no per-token logprobs" in report["error"]


def test_server_that_never_becomes_ready(toggle_env, server):
    """A server whose model never loads fails NOT_READY, saying what it waited for."""
    standin = server(env={"STANDIN_NEVER_READY": "1"}, wait_ready=False)
    code, report, _ = run_selftest(standin.url, "--timeout", "3", pid=standin.pid)
    assert code == ExitCode.NOT_READY
    assert "not ready after 3 s" in report["error"] and "/v1/models" in report["error"]


def test_model_that_is_not_served(toggle_env, server):
    """A --model the server does not list fails MODEL_NOT_SERVED and names what is served."""
    standin = server()
    code, report, _ = run_selftest(standin.url, "--model", "qwen3-8b-awq", pid=standin.pid)
    assert code == ExitCode.MODEL_NOT_SERVED
    assert "standin-model" in report["error"] and "--model" in report["error"]


def test_suspend_that_does_not_free_memory(toggle_env, server):
    """Memory left on a GPU after the checkpoint is never success; the server is resumed before the report."""
    standin, code, report = selftest_with_fault(toggle_env, server, 1, "checkpoint", "keep-memory")
    assert code in (ExitCode.NOT_SUSPENDED, ExitCode.MEMORY_KEPT), report["error"]
    assert "GPU1" in report["error"]
    assert_left_running(toggle_env, standin)


def test_worker_that_will_not_resume(toggle_env, server):
    """A restore that fails is reported with the tool's exit code; the server is resumed before the report."""
    standin, code, report = selftest_with_fault(toggle_env, server, 0, "restore", "error")
    assert code == ExitCode.TRANSITION_FAILED, report["error"]
    assert "restore failed" in report["error"]
    assert report["resumed_after_failure"].startswith("resumed")
    assert_left_running(toggle_env, standin)


def test_refused_suspend_changes_nothing(toggle_env, server):
    """A server without the NCCL settings is refused: REFUSED, nothing suspended, still answering."""
    standin = server(env={"NCCL_SHM_DISABLE": "0"})
    code, report, _ = run_selftest(standin.url, pid=standin.pid)
    assert code == ExitCode.REFUSED and "NCCL_SHM_DISABLE=1" in report["error"]
    assert report["resumed_after_failure"] == ""
    assert_left_running(toggle_env, standin)


# --- options -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (("--timeout", "nan"), "give a number from 1 to 86400"),
        (("--timeout", "inf"), "give a number from 1 to 86400"),
        (("--timeout", "-1"), "give a number from 1 to 86400"),
        (("--inflight-wait", "nan"), "give a number from 0.1 to 3600"),
        (("--cycles", "0"), "give an integer from 1 to 1000"),
        (("--queued", "-1"), "give an integer from 0 to 64"),
        (("--max-tokens", "many"), "is not an integer"),
        (("--pid", "-5"), "give an integer from 1"),
        (("--url", "garbage"), "give http://HOST[:PORT]"),
        (("--url", "ftp://127.0.0.1:8000"), "give http://HOST[:PORT]"),
        (("--url", "http://127.0.0.1:99999"), "give http://HOST[:PORT]"),
        (("--url", "http://127.0.0.1:8000/v1"), "more than a scheme, host and port"),
        (("--report", "/nonexistent/x.json"), "the folder /nonexistent does not exist"),
        (("--report", "/"), "is a folder"),
    ],
)
def test_bad_options_exit_2_at_once_naming_the_fix(args, words):
    """Each bad option exits 2 at once (nothing sent) with a message naming the fix, and no traceback."""
    began = time.monotonic()
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == ExitCode.USAGE, result.output
    assert isinstance(result.exception, SystemExit), "a traceback, not a usage error"
    assert words in result.output and "waiting for the server" not in result.output
    assert time.monotonic() - began < 60  # long before the default --timeout (1800 s) could have passed


def test_garbage_url_fails_at_once_as_a_command():
    """`selftest --url garbage` exits 2 at once, without waiting for --timeout."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "entrypoint.selftest", "--url", "garbage", "--timeout", "600"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert done.returncode == ExitCode.USAGE and "give http://HOST[:PORT]" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - began < 300  # half of --timeout 600


def test_unwritable_report_is_refused_before_the_run():
    """--report where no file can be written (sysfs refuses even root) exits 2 before anything runs."""
    result = CliRunner().invoke(cli, ["--report", "/sys/selftest.json"])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "cannot be written" in result.output and "waiting for the server" not in result.output


def test_help_lists_every_exit_code_it_can_return():
    """--help lists every code selftest can return (2 included), and its code uses no other."""
    text = subprocess.run(
        [sys.executable, "-m", "entrypoint.selftest", "--help"], capture_output=True, text=True, cwd=REPO
    ).stdout
    assert ExitCode.USAGE in SELFTEST_EXIT_CODES
    for code in SELFTEST_EXIT_CODES:
        assert f"{int(code):>2}  {code.meaning}" in text
    used = set()
    for module in ("selftest.py", "cycle/run.py", "cycle/checks.py"):
        used |= set(re.findall(r"ExitCode\.([A-Z_]+)", (REPO / "entrypoint" / module).read_text()))
    assert {ExitCode[name] for name in used} <= set(SELFTEST_EXIT_CODES)


# --- the comparisons themselves (pure functions, no server) --------------------------------------------------


def trace(logprobs: list[float], top: list[list[tuple[str, float]]]) -> TokenTrace:
    tokens = [f"t{i}" for i in range(len(logprobs))]
    return TokenTrace("".join(tokens), tokens, logprobs, top, "length", len(tokens), 0.1)


def test_a_difference_in_a_top_candidate_alone_is_caught():
    """Same tokens and chosen logprobs, one candidate's logprob changed: LOGPROBS_DIFFER naming the position."""
    reference = trace([-0.1, -0.2], [[("t0", -0.1), ("x", -2.0)], [("t1", -0.2), ("y", -3.0)]])
    again = trace([-0.1, -0.2], [[("t0", -0.1), ("x", -2.0)], [("t1", -0.2), ("y", -3.0000001)]])
    assert same_as_reference("chat", reference, reference)["logprobs"] == 6
    with pytest.raises(ToolError) as failure:
        same_as_reference("chat", reference, again)
    assert failure.value.exit_code == ExitCode.LOGPROBS_DIFFER and "token 1" in failure.value.message


def test_a_candidate_at_minus_9999_is_not_finite():
    """A top candidate at vLLM's -9999.0 (its -inf) makes the reference unfit, even with every chosen one finite."""
    with pytest.raises(ToolError) as failure:
        fair_reference("completion 1", trace([-0.1, -0.2], [[("t0", -0.1)], [("t1", -0.2), ("z", -9999.0)]]))
    assert failure.value.exit_code == ExitCode.LOGPROBS_UNFIT
    evidence = fair_reference("completion 1", trace([-0.1, -0.2], [[("t0", -0.1)], [("t1", -0.2), ("z", -9998.5)]]))
    assert evidence == {"tokens": 2, "logprobs": 5, "min": -9998.5, "max": -0.1, "distinct": 3}
