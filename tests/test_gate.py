"""The gate (entrypoint/gate/app.py) in front of the stand-in vLLM on the fake GPU: real processes, real HTTP.

The gate runs as a subprocess (`python -m entrypoint.gate`), the stand-in as its upstream; suspends and
resumes go through the real library and the fake cuda-checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
from aiohttp import web

from benchmarks.bench_gate_attacks import (
    PARTIAL_HEAD,
    Attack,
    promised_body_head,
    scenarios,
    serving,
    time_requests,
)
from entrypoint.base.config import Config, load_config
from entrypoint.suspend.api import move_to
from entrypoint.suspend.safety import REQUIRED_SERVER_ENV
from tests.conftest import STANDIN_MODEL, StandinServer, fakegpu
from tests.testing import REPO, TOGGLE_ALL_CLI, free_port, wait_until

# What a TP=2 vLLM must run with for cuda-toggle-all's safety checks to let it suspend (docs/facts.md).
# SPT_NOENV keeps setproctitle off the stand-in's environ, which the checks read in /proc/PID/environ.
SAFE_ENV = {**REQUIRED_SERVER_ENV, "SPT_NOENV": "1"}
# 1% of a fake H100 per worker: the host-RAM check must pass on a small CI machine.
SAFE_ARGS = ("--disable-custom-all-reduce", "--gpu-memory-utilization", "0.01")
# vLLM's admin and dev endpoints (vLLM 0.20.2, vllm/entrypoints/serve/): never forwarded.
DEV_ENDPOINTS = [
    ("POST", "/sleep?level=1"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/collective_rpc"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/reset_encoder_cache"),
    ("GET", "/server_info"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/init_weight_transfer_engine"),
    ("GET", "/get_world_size"),
    ("POST", "/abort_requests"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("GET", "/is_paused"),
]


def chat_body(prompt: str, max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": STANDIN_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,  # greedy: the same prompt gives the same words, before and after a suspend
        "max_tokens": max_tokens,
        "stream": stream,
    }


def stream_deltas(base_url: str, prompt: str, max_tokens: int, timeout: float = 30) -> list[str]:
    """The content deltas of one streamed chat completion, in order; fails on anything but a clean stream."""
    deltas: list[str] = []
    body = chat_body(prompt, max_tokens, stream=True)
    with requests.post(f"{base_url}/v1/chat/completions", json=body, stream=True, timeout=timeout) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                continue
            assert line.startswith(b"data: "), line
            if line == b"data: [DONE]":
                return deltas
            event = json.loads(line[len(b"data: ") :])
            assert "error" not in event, event
            deltas.append(event["choices"][0]["delta"].get("content", ""))
    raise AssertionError(f"the stream ended without [DONE] after {deltas}")


def chat_answer(base_url: str, prompt: str, max_tokens: int, timeout: float = 30) -> requests.Response:
    return requests.post(f"{base_url}/v1/chat/completions", json=chat_body(prompt, max_tokens), timeout=timeout)


def answer_text(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            values[series] = float(value)
    return values


def series(name: str, **labels: str) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in labels.items()) + "}"


@dataclass
class Gate:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        response = requests.get(self.url + "/gate/status", timeout=5)
        assert response.status_code == 200, response.text
        return response.json()

    def metrics(self) -> dict[str, float]:
        response = requests.get(self.url + "/gate/metrics", timeout=5)
        assert response.status_code == 200, response.text
        return parse_metrics(response.text)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics()[series(name, **labels)]

    def wait_for_state(self, state: str, timeout: float = 10.0) -> dict:
        wait_until(lambda: self.status()["state"] == state, f"the gate to report {state}", timeout)
        return self.status()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@pytest.fixture
def run_dir(fake_gpu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The library's environment over the fake GPU (inherited by the gate and the CLI); returns RUN_DIR."""
    run_dir = tmp_path / "run"
    settings = {
        "CUDA_TOGGLE_BACKEND": "cli",
        "CUDA_TOGGLE_GPU_QUERY": "nvidia-smi",
        "CUDA_TOGGLE_RUN_DIR": str(run_dir),
        "CUDA_TOGGLE_SUPERVISOR_URL": "unix:///nonexistent",
        "CUDA_TOGGLE_VERIFY_SLEEP_S": "0.05",
        "CUDA_TOGGLE_PROGRESS_S": "1",
        "CUDA_TOGGLE_BUSY_WAIT_S": "30",  # the test's own cuda-toggle-all waits for the gate's transition
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return run_dir


@pytest.fixture
def server(run_dir: Path, standin_server) -> Callable[..., StandinServer]:
    """Factory: a stand-in vLLM the library can suspend; step_s sets the seconds per generated token."""

    def start(*args: str, step_s: float = 0.01, env: dict[str, str] | None = None) -> StandinServer:
        environ = {**SAFE_ENV, "STANDIN_STEP_S": str(step_s), **(env or {})}
        return standin_server(*SAFE_ARGS, *args, env=environ)

    return start


@pytest.fixture
def gate(run_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Gate]]:
    """Factory: gate(server, GATE_X=value, ...) starts the gate in front of `server` (a StandinServer, or
    the URL of another upstream); stopped at teardown."""
    started: list[Gate] = []

    def start(upstream: StandinServer | Recorder | str, nofile: int | None = None, **settings: str) -> Gate:
        port = free_port()
        log_path = tmp_path / f"gate-{port}.log"
        environ = {
            **os.environ,
            "GATE_HOST": "127.0.0.1",
            "GATE_PORT": str(port),
            "GATE_UPSTREAM": upstream if isinstance(upstream, str) else upstream.url,
            "GATE_SERVER_PID": str(upstream.pid) if isinstance(upstream, StandinServer) else "",
            "GATE_POLL_S": "0.1",
            "GATE_BUSY_WAIT_S": "60",
            **settings,
        }
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "entrypoint.gate", "--verbose"],
                cwd=REPO,
                env=environ,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=None
                if nofile is None
                else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
            )
        running = Gate(process, port, log_path)
        started.append(running)

        def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the gate exited ({process.returncode}):\n{running.log()}")
            try:
                return requests.get(running.url + "/gate/status", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(answers, "the gate to answer", timeout=15)
        return running

    yield start
    for running in started:
        running.stop()


@dataclass
class Recorder:
    """A real HTTP upstream that records every request it gets and answers with it."""

    url: str
    received: list[dict]


@pytest.fixture
def echo_upstream() -> Iterator[Recorder]:
    """A tiny real HTTP server that answers with what it received (headers, path, body), in a thread;
    `?sleep=S` makes it wait S seconds first (a slow generation)."""
    received_log: list[dict] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        received = {
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": [[name, value] for name, value in request.headers.items()],
            "body": (await request.read()).decode(errors="replace"),
        }
        received_log.append(received)
        await asyncio.sleep(float(request.query.get("sleep", "0")))
        response = web.Response(body=gzip.compress(json.dumps(received).encode()), status=201)
        response.headers["Content-Type"] = "application/json"
        response.headers["Content-Encoding"] = "gzip"
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        response.headers["X-Upstream"] = "yes"
        response.headers["Connection"] = "keep-alive, X-Hop"
        response.headers["X-Hop"] = "must not pass"
        return response

    with serving(echo) as url:
        yield Recorder(url, received_log)


def library_config() -> Config:
    """The library's settings for calls the test makes itself; waits for a transition of the gate."""
    return load_config().replace(busy_wait_s=30)


def assert_server_healthy(upstream: StandinServer) -> None:
    """No worker died, nothing stays frozen or suspended."""
    assert upstream.process.poll() is None, upstream.log()
    engine, workers = upstream.engine_core(), upstream.workers()
    started_with = {member.pid for member in upstream.family} - {upstream.pid, engine.pid}
    assert {w.pid for w in workers} == started_with, "a worker was replaced"
    assert all(w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert engine.status() != psutil.STATUS_STOPPED
    assert all(fakegpu.read_state(w.pid) == "running" for w in workers)
    log = upstream.log()
    assert "segmentation fault" not in log and "died" not in log, log


def assert_transitions_never_overlapped(fake_gpu: Path) -> None:
    """Every suspend locked all its PIDs and checkpointed them before any restore, and every resume restored
    and unlocked all before the next lock: two transitions at once would interleave or hit illegal states."""
    calls = [(op, pid, result) for _, op, pid, result in fakegpu.read_calls(fake_gpu) if op != "get-state"]
    assert all(result == "ok" for _, _, result in calls), calls
    letters = "".join({"lock": "L", "checkpoint": "C", "restore": "R", "unlock": "U"}[op] for op, _, _ in calls)
    runs = re.sub(r"(.)\1*", r"\1", letters)  # LLLCCCRRRUUU -> LCRU
    assert re.fullmatch(r"(LCRU)*", runs), letters
    assert runs, "nothing was suspended"


def test_streams_survive_forced_suspend_resume_cycles(server, gate, fake_gpu):
    """Four clients stream through the gate while the library and the CLI suspend: none fails or differs."""
    upstream = server(step_s=0.02)
    prompts = [f"client {index}: tell me a story" for index in range(4)]
    reference = {prompt: stream_deltas(upstream.url, prompt, 25) for prompt in prompts}
    front = gate(upstream)
    stop = threading.Event()
    completed: dict[str, int] = dict.fromkeys(prompts, 0)
    failures: list[str] = []

    def client(prompt: str) -> None:
        while not stop.is_set():
            try:
                deltas = stream_deltas(front.url, prompt, 25)
            except (AssertionError, requests.RequestException) as error:
                failures.append(f"{prompt}: {error!r}")
                return
            if deltas != reference[prompt]:
                failures.append(f"{prompt}: {deltas} != {reference[prompt]}")
                return
            completed[prompt] += 1

    late_answers: list[str] = []
    with ThreadPoolExecutor(max_workers=len(prompts) + 1) as pool:
        clients = [pool.submit(client, prompt) for prompt in prompts]
        for cycle in range(2):
            time.sleep(0.3)
            if cycle == 1:
                done = subprocess.run([*TOGGLE_ALL_CLI, "checkpointed", "--pid", str(upstream.pid)],
                                      capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
                assert done.returncode == 0, done.stderr
            else:
                move_to("checkpointed", library_config(), pid=upstream.pid)
            # Sent while the server is suspended (or the gate is already resuming it): it must wait.
            late = pool.submit(chat_answer, front.url, prompts[0], 25)
            if cycle == 0:
                move_to("running", library_config(), pid=upstream.pid)  # the gate may have resumed it first
            late_answers.append(answer_text(late.result(timeout=30)))
        stop.set()
        for future in clients:
            future.result(timeout=30)
    assert not failures, failures
    assert all(count >= 2 for count in completed.values()), completed
    assert late_answers == ["".join(reference[prompts[0]])] * 2
    assert_server_healthy(upstream)
    assert_transitions_never_overlapped(fake_gpu)
    metrics = front.metrics()
    assert metrics[series("vllm_gate_waited_requests_total")] >= 2
    assert metrics[series("vllm_gate_errors_total", reason="resume_failed")] == 0
    assert metrics[series("vllm_gate_in_flight")] == 0


def test_idle_server_is_suspended_and_the_next_request_wakes_it(server, gate, fake_gpu, run_dir):
    """GATE_IDLE_SUSPEND_S=1: no suspend while a request streams, a suspend 1 s after, a request wakes it."""
    upstream = server(step_s=0.025)
    reference = stream_deltas(upstream.url, "wake me", 50)  # about 1.25 s of streaming
    front = gate(upstream, GATE_IDLE_SUSPEND_S="1")
    assert stream_deltas(front.url, "wake me", 50) == reference
    assert front.metric("vllm_gate_transitions_total", transition="suspend", outcome="ok") == 0

    status = front.wait_for_state("suspended", timeout=10)
    assert status["last_suspend_s"] > 0 and status["last_failure_at"] is None
    assert list((run_dir / "servers").glob("*.json")), "the suspend record of the server"
    assert [fakegpu.read_state(w.pid) for w in upstream.workers()] == ["checkpointed"] * 2
    assert upstream.engine_core().status() == psutil.STATUS_STOPPED
    baseline = {index: mib for index, _, _, mib in fakegpu.read_gpus(fake_gpu)}
    assert fakegpu.used_mib(fake_gpu) == baseline, "the GPUs were not handed back"

    # max_tokens only cuts a greedy answer: the first 10 words are the reference's first 10.
    assert answer_text(chat_answer(front.url, "wake me", 10)) == "".join(reference[:11])
    status = front.status()
    assert status["state"] == "running" and status["last_resume_s"] > 0
    metrics = front.metrics()
    assert metrics[series("vllm_gate_transitions_total", transition="suspend", outcome="ok")] >= 1
    assert metrics[series("vllm_gate_transitions_total", transition="resume", outcome="ok")] == 1
    assert metrics[series("vllm_gate_waited_requests_total")] == 1
    assert "suspended in" in front.log() and "waited" in front.log()


def test_dev_endpoints_and_unknown_paths_are_404_and_never_reach_vllm(server, gate):
    """/sleep, /collective_rpc and the like (served upstream in dev mode) are 404; the API passes."""
    upstream = server("--enable-sleep-mode", env={"VLLM_SERVER_DEV_MODE": "1"})
    assert upstream.get("/is_sleeping").json() == {"is_sleeping": False}  # upstream does serve them
    front = gate(upstream)
    log_before = len(upstream.log())
    sneaky = [
        "/v1/../sleep",
        "/v1/%2e%2e/sleep",
        "//sleep",
        "/health/",
        "/gate/other",
        "/docs",
        "/openapi.json",
    ]
    for method, path in [*DEV_ENDPOINTS, *(("POST", path) for path in sneaky)]:
        connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=5)  # sends the path as it is
        connection.request(method, path, body=b"{}", headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = json.loads(response.read())
        connection.close()
        assert response.status == 404, (path, body)
        assert body["error"]["type"] == "NotFoundError", (path, body)
    assert requests.post(front.url + "/gate/status", timeout=5).status_code == 404
    access_log = upstream.log()[log_before:]
    for name in (
        "sleep",
        "wake_up",
        "collective_rpc",
        "reset_prefix_cache",
        "server_info",
        "docs",
        "openapi",
    ):
        assert name not in access_log, f"{name} reached the upstream:\n{access_log}"
    assert upstream.get("/is_sleeping").json() == {"is_sleeping": False}

    # What the gate forwards, and upstream's own status codes and bodies passing through.
    assert requests.get(front.url + "/health", timeout=5).status_code == 200
    assert requests.get(front.url + "/version", timeout=5).json() == upstream.get("/version").json()
    assert "vllm:num_requests_running" in requests.get(front.url + "/metrics", timeout=5).text
    tokens = requests.post(front.url + "/tokenize", json={"prompt": "hi"}, timeout=5).json()["tokens"]
    detokenized = requests.post(front.url + "/detokenize", json={"tokens": tokens}, timeout=5)
    assert detokenized.json() == {"prompt": "hi"}
    assert requests.get(front.url + "/v1/models", timeout=5).json()["data"][0]["id"] == STANDIN_MODEL
    unknown_model = requests.post(front.url + "/v1/chat/completions", json={**chat_body("x", 2), "model": "nope"})
    assert unknown_model.status_code == 404 and "`nope` does not exist" in unknown_model.json()["error"]["message"]
    bad_request = requests.post(front.url + "/v1/completions", json={"model": STANDIN_MODEL}, timeout=5)
    assert bad_request.status_code == 400 and "'prompt' is required" in bad_request.text
    ping = requests.get(front.url + "/ping", timeout=5)  # forwarded: the stand-in has no /ping (FastAPI's 404)
    assert ping.status_code == 404 and ping.json() == {"detail": "Not Found"}
    metrics = front.metrics()
    assert metrics[series("vllm_gate_requests_total", path_class="blocked")] == len(DEV_ENDPOINTS) + len(sneaky) + 1


def test_passive_paths_do_not_wake_and_waking_requests_share_one_resume(server, gate, fake_gpu):
    """/health, /metrics, /v1/models (+ GATE_PASSIVE_PATHS) answer while suspended; six chats share a resume."""
    upstream = server()
    reference = answer_text(chat_answer(upstream.url, "together", 12))
    front = gate(upstream, GATE_PASSIVE_PATHS="/health,/metrics,/v1/models,/tokenize")
    move_to("checkpointed", library_config(), pid=upstream.pid)
    front.wait_for_state("suspended")
    assert requests.get(front.url + "/health", timeout=5).status_code == 200
    assert "vllm:num_requests_waiting" in requests.get(front.url + "/metrics", timeout=5).text
    assert requests.get(front.url + "/v1/models", timeout=5).status_code == 200
    assert requests.post(front.url + "/tokenize", json={"prompt": "hi"}, timeout=5).status_code == 200
    time.sleep(0.3)  # several watcher ticks
    status = front.status()
    assert status["state"] == "suspended" and status["last_resume_s"] is None
    assert [fakegpu.read_state(w.pid) for w in upstream.workers()] == ["checkpointed"] * 2
    metrics = front.metrics()
    assert metrics[series("vllm_gate_transitions_total", transition="resume", outcome="ok")] == 0
    assert metrics[series("vllm_gate_requests_total", path_class="passive")] == 4
    assert metrics[series("vllm_gate_waited_requests_total")] == 0

    (fake_gpu / "speed_mib_per_s").write_text("800")  # a 1 s restore: all six requests arrive during it
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: answer_text(chat_answer(front.url, "together", 12)), range(6)))
    assert answers == [reference] * 6
    metrics = front.metrics()
    assert metrics[series("vllm_gate_transitions_total", transition="resume", outcome="ok")] == 1
    assert metrics[series("vllm_gate_waited_requests_total")] == 6
    assert metrics[series("vllm_gate_request_wait_seconds_count")] == 6
    assert front.status()["waiting"] == 0
    assert_server_healthy(upstream)


def test_client_disconnect_aborts_the_upstream_request(server, gate):
    """A client gone mid-stream (or mid non-streamed answer) aborts vLLM's request; one gone while waiting
    for a resume never reaches vLLM."""
    upstream = server(step_s=0.05)
    front = gate(upstream)

    def upstream_counter(name: str) -> float:
        return parse_metrics(upstream.get("/metrics").text)[name]

    body = chat_body("a long story", 200, stream=True)  # 10 s of streaming
    with requests.post(f"{front.url}/v1/chat/completions", json=body, stream=True, timeout=10) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert front.status()["in_flight"] == 1
    wait_until(lambda: upstream_counter("standin:aborted_requests_total") == 1, "the upstream abort", 5)
    wait_until(lambda: front.status()["in_flight"] == 0, "in_flight back to 0", 5)
    with pytest.raises(requests.ReadTimeout):
        chat_answer(front.url, "a long answer", 200, timeout=0.5)  # not streamed: 10 s until the first byte
    wait_until(lambda: upstream_counter("standin:aborted_requests_total") == 2, "the second upstream abort", 5)
    wait_until(lambda: front.status()["in_flight"] == 0, "in_flight back to 0", 5)

    move_to("checkpointed", library_config(), pid=upstream.pid)
    handed_over = upstream_counter("standin:requests_total")
    with pytest.raises(requests.ReadTimeout):
        chat_answer(front.url, "impatient", 4, timeout=0.3)  # gives up while the gate resumes
    front.wait_for_state("running")
    wait_until(lambda: front.status()["waiting"] == 0, "waiting back to 0", 5)
    # Only the one-token completion with which the library proves its resume reached vLLM.
    assert upstream_counter("standin:requests_total") == handed_over + 1
    assert front.metric("vllm_gate_transitions_total", transition="resume", outcome="ok") == 1
    assert_server_healthy(upstream)


def test_tool_suspend_while_requests_flow_is_seen_and_undone_by_the_gate(server, gate, fake_gpu, tmp_path):
    """cuda-toggle-all suspends under streaming clients: the gate waits for it, then resumes for them."""
    pace = (
        tmp_path / "step-seconds"
    )  # the streams crawl (a step a second) until the tool is done, however slow the machine
    upstream = server(env={"STANDIN_STEP_S_FILE": str(pace)})
    prompts = [f"tool test {index}" for index in range(3)]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        references = pool.map(lambda prompt: stream_deltas(upstream.url, prompt, 60), prompts)
        reference = dict(zip(prompts, references, strict=True))
    front = gate(upstream)
    pace.write_text("1.0")
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        streams = [pool.submit(stream_deltas, front.url, prompt, 60) for prompt in prompts]
        wait_until(lambda: front.status()["in_flight"] == len(prompts), "the streams to start", 10)
        tool = subprocess.run([*TOGGLE_ALL_CLI, "checkpointed", "--pid", str(upstream.pid)],
                              capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
        assert tool.returncode == 0, tool.stderr
        assert not any(stream.done() for stream in streams)
        pace.unlink()
        results = {prompt: future.result(timeout=30) for prompt, future in zip(prompts, streams, strict=True)}
    assert results == reference
    # The gate saw the tool's suspend (its lock, then its record) with streams in flight, and resumed.
    assert re.search(r"\d request\(s\) in flight while the server is (suspending|suspended)", front.log())
    status = front.wait_for_state("running")
    assert status["last_resume_s"] > 0
    assert front.metric("vllm_gate_transitions_total", transition="resume", outcome="ok") == 1
    assert_server_healthy(upstream)
    assert_transitions_never_overlapped(fake_gpu)


def test_failed_resume_answers_503_and_the_next_request_retries(server, gate):
    """A resume that fails gives the waiting requests a generic 503 (the reason goes to the gate's log, not
    to clients or /gate/status); the next request resumes."""
    upstream = server()
    reference = answer_text(chat_answer(upstream.url, "retry", 6))
    front = gate(upstream)
    move_to("checkpointed", library_config(), pid=upstream.pid)
    front.wait_for_state("suspended")
    first_worker, second_worker = upstream.workers()
    fakegpu.add_fault(first_worker.pid, "restore", "error")
    fakegpu.add_fault(second_worker.pid, "restore", "slow:1")  # all three requests arrive while it fails
    handed_over = parse_metrics(upstream.get("/metrics").text)["standin:requests_total"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        failed = list(pool.map(lambda _: chat_answer(front.url, "retry", 6), range(3)))
    # The restore was rolled back before any unlock: none of them was sent to vLLM beside the resume.
    assert parse_metrics(upstream.get("/metrics").text)["standin:requests_total"] == handed_over
    for response in failed:
        assert response.status_code == 503, response.text
        assert response.json()["error"] == {
            "message": "the model is not available right now; try again later",
            "type": "ServiceUnavailableError",
            "param": None,
            "code": 503,
        }
    status = front.wait_for_state("suspended")
    assert status["last_failure_at"] > 0 and "pid" not in json.dumps(status).lower()
    assert "the resume failed: resume failed" in front.log() and str(first_worker.pid) in front.log()
    assert [fakegpu.read_state(w.pid) for w in upstream.workers()] == ["checkpointed"] * 2

    assert answer_text(chat_answer(front.url, "retry", 6)) == reference
    status = front.status()
    assert status["state"] == "running" and status["last_failure_at"] is None
    metrics = front.metrics()
    assert metrics[series("vllm_gate_transitions_total", transition="resume", outcome="failed")] == 1
    assert metrics[series("vllm_gate_transitions_total", transition="resume", outcome="ok")] == 1
    assert metrics[series("vllm_gate_errors_total", reason="resume_failed")] == 3
    assert_server_healthy(upstream)


def test_gate_status_and_metrics_describe_state_and_traffic(server, gate):
    """/gate/status has every field; /gate/metrics is Prometheus text; both follow a suspend and a stream."""
    upstream = server(step_s=0.03)
    started = time.time()
    front = gate(upstream, GATE_IDLE_SUSPEND_S="600")
    status = front.status()
    assert set(status) == {"state", "since", "in_flight", "waiting", "last_suspend_s", "last_resume_s",
                           "last_failure_at", "last_sleep_s", "last_wake_s", "proof", "last_steps", "hold"}  # fmt: skip
    assert status["state"] == "running" and started - 1 <= status["since"] <= time.time()
    assert (status["in_flight"], status["waiting"]) == (0, 0)
    assert (status["last_suspend_s"], status["last_resume_s"], status["last_failure_at"]) == (None, None, None)

    response = requests.get(front.url + "/gate/metrics", timeout=5)
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = re.findall(r"^# TYPE (\S+) (\S+)$", response.text, flags=re.MULTILINE)
    assert {name for name, _ in families} >= {
        "vllm_gate_requests_total", "vllm_gate_transitions_total", "vllm_gate_transition_seconds",
        "vllm_gate_waited_requests_total", "vllm_gate_waited_seconds_total", "vllm_gate_request_wait_seconds",
        "vllm_gate_in_flight", "vllm_gate_waiting", "vllm_gate_suspended",
    }  # fmt: skip
    metrics = parse_metrics(response.text)
    assert metrics[series("vllm_gate_in_flight")] == 0 and metrics[series("vllm_gate_suspended")] == 0

    move_to("checkpointed", library_config(), pid=upstream.pid)
    status = front.wait_for_state("suspended")
    assert status["since"] > started and status["last_suspend_s"] is None  # not the gate's own suspend
    assert front.metric("vllm_gate_suspended") == 1
    assert front.metric("vllm_gate_state", state="suspended") == 1

    body = chat_body("status", 30, stream=True)
    with requests.post(f"{front.url}/v1/chat/completions", json=body, stream=True, timeout=30) as stream:
        lines = stream.iter_lines()  # one generator: dropping one closes the connection
        next(lines)  # the first event arrives after the resume
        status = front.status()
        assert status["state"] == "running" and status["in_flight"] == 1
        assert front.metric("vllm_gate_in_flight") == 1
        for _ in lines:
            pass
    metrics = front.metrics()
    assert metrics[series("vllm_gate_in_flight")] == 0 and metrics[series("vllm_gate_suspended")] == 0
    assert metrics[series("vllm_gate_transitions_total", transition="resume", outcome="ok")] == 1
    assert metrics[series("vllm_gate_transition_seconds_sum", transition="resume", outcome="ok")] > 0
    assert metrics[series("vllm_gate_requests_total", path_class="waking")] == 1
    assert metrics[series("vllm_gate_request_wait_seconds_bucket", le="+Inf")] == 1
    assert metrics[series("vllm_gate_waited_seconds_total")] > 0


def test_headers_bodies_and_status_pass_through(echo_upstream, gate):
    """End-to-end headers (not hop-by-hop ones), the raw query, the body, gzip and status pass unchanged;
    X-Forwarded-* are the gate's own, whatever the client sent under those names."""
    front = gate(echo_upstream)
    response = requests.post(
        front.url + "/v1/chat/completions?x=1&y=%2F",
        data=b'{"q": 1}',
        headers={
            "Authorization": "Bearer secret",
            "Content-Type": "application/json",
            "Accept-Encoding": "gzip",
            "X-Custom": "kept",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped",
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "forged.example",
            "Forwarded": "for=6.6.6.6",
            "X-Real-IP": "6.6.6.6",
        },
        timeout=10,
    )
    assert response.status_code == 201
    assert response.headers["Content-Encoding"] == "gzip" and response.headers["X-Upstream"] == "yes"
    assert response.raw.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    assert "X-Hop" not in response.headers
    received = response.json()  # requests undoes the gzip the upstream applied: the bytes passed as they were
    headers = {name.lower(): value for name, value in received["headers"]}
    assert (received["method"], received["path_qs"], received["body"]) == (
        "POST",
        "/v1/chat/completions?x=1&y=%2F",
        '{"q": 1}',
    )
    assert headers["authorization"] == "Bearer secret" and headers["x-custom"] == "kept"
    assert headers["content-type"] == "application/json" and headers["accept-encoding"] == "gzip"
    assert "x-hop" not in headers and "forwarded" not in headers and "x-real-ip" not in headers
    assert [value for name, value in received["headers"] if name.lower() == "x-forwarded-for"] == ["127.0.0.1"]
    assert (headers["x-forwarded-proto"], headers["x-forwarded-host"]) == ("http", f"127.0.0.1:{front.port}")
    assert headers["host"] == echo_upstream.url.removeprefix("http://")

    # A client that sends no Accept-Encoding (nor User-Agent) must not get the gate's own added upstream.
    connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
    connection.putrequest("GET", "/v1/models", skip_accept_encoding=True)
    connection.endheaders()
    received = json.loads(gzip.decompress(connection.getresponse().read()))
    connection.close()
    assert {name.lower() for name, _ in received["headers"]} == {
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    }


def test_unreachable_upstream_is_a_generic_503_with_retry_after(gate):
    """With nothing listening upstream (vLLM still loading, or restarted by supervisord), requests get a JSON 503
    with Retry-After instead of hanging or a 502; the body names no host or port (the log does)."""
    port = free_port()
    front = gate(f"http://127.0.0.1:{port}")
    for response in (
        requests.post(front.url + "/v1/chat/completions", json=chat_body("anyone?", 2), timeout=10),
        requests.get(front.url + "/health", timeout=10),
    ):
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) > 0
        assert response.json()["error"]["type"] == "ServiceUnavailableError"
        assert "starting or restarting" in response.json()["error"]["message"]
        assert str(port) not in response.text and "127.0.0.1" not in response.text
    assert front.metric("vllm_gate_errors_total", reason="upstream_unreachable") == 2
    assert front.status()["in_flight"] == 0
    assert f"127.0.0.1:{port}" in front.log()


def test_idle_suspend_is_hybrid_when_vllm_has_sleep_mode(server, gate, run_dir):
    """With sleep mode, the idle suspend puts vLLM to sleep on its loopback address (never through the
    gate's front), and the wake-on-request wakes it: the answer is the reference, not a sleeping model's."""
    upstream = server("--enable-sleep-mode", env={"VLLM_SERVER_DEV_MODE": "1"})
    reference = answer_text(chat_answer(upstream.url, "hybrid", 8))
    front = gate(upstream, GATE_IDLE_SUSPEND_S="0.5")
    front.wait_for_state("suspended")
    (record,) = (run_dir / "servers").glob("*.json")
    assert json.loads(record.read_text())["mode"] == "hybrid"
    assert requests.post(front.url + "/wake_up", timeout=5).status_code == 404  # still private

    assert answer_text(chat_answer(front.url, "hybrid", 8)) == reference
    assert upstream.get("/is_sleeping").json() == {"is_sleeping": False}
    access_log = upstream.log()
    assert '"POST /sleep?level=1&mode=keep HTTP/1.1" 200' in access_log  # requests in flight are kept
    assert '"POST /wake_up HTTP/1.1" 200' in access_log
    assert front.metric("vllm_gate_requests_total", path_class="blocked") == 1
    assert_server_healthy(upstream)


def raw_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes on a new connection and read until the gate closes it (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        chunks = []
        try:
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_junk_is_refused_without_waking_the_server(server, gate, fake_gpu):
    """Unknown routes (404), wrong methods (405), bodies that are not JSON (400) and the WebSocket (501)
    are answered by the gate while the server stays suspended: no resume, nothing reaches vLLM."""
    upstream = server()
    front = gate(upstream)
    move_to("checkpointed", library_config(), pid=upstream.pid)
    front.wait_for_state("suspended")
    requests_before = parse_metrics(upstream.get("/metrics").text)["standin:requests_total"]
    junk = [
        ("POST", "/v1/nope", b"{}", {}, 404),
        ("POST", "/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "/etc"}', {}, 404),
        ("DELETE", "/v1/completions", b"", {}, 405),
        ("GET", "/v1/chat/completions", b"", {}, 405),
        ("POST", "/v1/completions", b'{"model": ', {}, 400),
        ("POST", "/v1/chat/completions", b"[1, 2]", {}, 400),
        ("POST", "/v1/chat/completions", b"\xff\xfe", {}, 400),
        ("POST", "/v1/audio/transcriptions", b"{}", {"Content-Type": "application/json"}, 400),
        ("GET", "/v1/realtime", b"", {"Upgrade": "websocket", "Connection": "Upgrade",
                                      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                      "Sec-WebSocket-Version": "13"}, 501),
    ]  # fmt: skip
    for method, path, body, headers, status in junk:
        response = requests.request(method, front.url + path, data=body, headers=headers, timeout=5)
        assert response.status_code == status, (method, path, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        if status == 405:
            assert "POST" in response.headers["Allow"] or "GET" in response.headers["Allow"]
    time.sleep(0.3)  # several watcher ticks
    assert front.status()["state"] == "suspended"
    assert [fakegpu.read_state(w.pid) for w in upstream.workers()] == ["checkpointed"] * 2
    assert front.metric("vllm_gate_transitions_total", transition="resume", outcome="ok") == 0
    assert front.metric("vllm_gate_requests_total", path_class="blocked") == 5
    assert answer_text(chat_answer(front.url, "now for real", 4))  # a served request wakes it
    assert front.metric("vllm_gate_transitions_total", transition="resume", outcome="ok") == 1
    # The request, and the one-token completion with which the library proves its resume: no junk.
    assert parse_metrics(upstream.get("/metrics").text)["standin:requests_total"] == requests_before + 2
    assert_server_healthy(upstream)


def test_malformed_requests_log_one_line_without_traceback(echo_upstream, gate):
    """Garbage on the wire gets a 400 from aiohttp and one log line, not a traceback; nothing goes upstream."""
    front = gate(echo_upstream)
    for garbage in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS spoken to plain HTTP
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    ):
        answer = raw_exchange(front.port, garbage)
        assert re.match(rb"HTTP/1\.[01] 400 ", answer), answer
    assert requests.get(front.url + "/gate/status", timeout=5).status_code == 200
    log = front.log()
    assert "Traceback" not in log and "File " not in log, log
    assert log.count("Error handling request") >= 2
    assert echo_upstream.received == []


def test_busy_connections_over_the_limit_get_a_fast_503(echo_upstream, gate):
    """GATE_MAX_CONNECTIONS=2 with two slow requests in flight: a third connection gets 503 at once;
    when they finish, new clients are served again."""
    front = gate(echo_upstream, GATE_MAX_CONNECTIONS="2")
    slow = f"{front.url}/v1/chat/completions?sleep=5"
    with ThreadPoolExecutor(max_workers=2) as pool:
        busy = [pool.submit(requests.post, slow, json={"n": n}, timeout=30) for n in range(2)]
        wait_until(lambda: len(echo_upstream.received) == 2, "both slow requests upstream")
        refused = requests.post(front.url + "/v1/chat/completions", json={}, timeout=30)
        assert not any(future.done() for future in busy), "the refusal waited for a busy connection to end"
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "ServiceUnavailableError"
        assert refused.headers["Server"] == "vllm-gate"
        assert [future.result().status_code for future in busy] == [201, 201]
    assert requests.post(front.url + "/v1/chat/completions", json={}, timeout=5).status_code == 201
    assert len(echo_upstream.received) == 3


def test_idle_connections_are_closed_after_the_keepalive_timeout(echo_upstream, gate):
    """A keep-alive connection left idle, or one that never sends a request, is closed after GATE_KEEPALIVE_S."""
    front = gate(echo_upstream, GATE_KEEPALIVE_S="1")
    opened = time.monotonic()
    idle = socket.create_connection(("127.0.0.1", front.port), timeout=30)
    kept = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    kept.request("GET", "/v1/models")
    assert kept.getresponse().read()
    answered = time.monotonic()
    assert idle.recv(1) == b""  # closed by the gate
    assert time.monotonic() - opened > 0.9  # not before its time (the gate's timer starts after `opened`)
    assert kept.sock is not None and kept.sock.recv(1) == b""
    assert time.monotonic() - answered > 0.9
    idle.close()
    kept.close()


def test_connection_flood_under_a_low_open_file_limit_leaves_room_for_others(echo_upstream, gate):
    """600 idle connections to a gate with 256 open files: idle ones are closed to make room, another client
    is still served at once, and the gate never runs out of files."""
    # Deadlines far away: only closing idle connections can make room for the client.
    front = gate(echo_upstream, nofile=256, GATE_MAX_CONNECTIONS="96", GATE_KEEPALIVE_S="600",
                 GATE_HEADER_TIMEOUT_S="600")  # fmt: skip
    flood = []
    try:
        for index in range(600):
            connection = socket.socket()
            connection.settimeout(5)
            connection.connect(("127.0.0.1", front.port))
            if index % 2:
                connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
            flood.append(connection)
        for _ in range(5):
            response = requests.post(front.url + "/v1/completions", json={"prompt": "x"}, timeout=60)
            assert response.status_code == 201
        assert requests.get(front.url + "/gate/status", timeout=5).status_code == 200
    finally:
        for connection in flood:
            connection.close()
    assert "Too many open files" not in front.log()
    assert "idle connection(s) to make room" in front.log()


def test_too_low_open_file_limit_is_refused_at_start(echo_upstream, tmp_path):
    """GATE_MAX_CONNECTIONS that cannot fit the open-file limit stops the gate with exit 2 and the fix."""
    done = subprocess.run(
        [sys.executable, "-m", "entrypoint.gate"],
        cwd=REPO,
        env={**os.environ, "GATE_HOST": "127.0.0.1", "GATE_PORT": str(free_port()), "GATE_MAX_CONNECTIONS": "1000"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "GATE_MAX_CONNECTIONS=1000 needs 2064 open files, but the limit is 256" in done.stderr
    assert "lower GATE_MAX_CONNECTIONS to at most 96" in done.stderr and "Traceback" not in done.stderr


def test_request_bodies_are_capped_each_and_in_total(echo_upstream, gate):
    """A body over GATE_MAX_REQUEST_MIB gets 413; bodies held together over GATE_MAX_BODIES_MIB get 503;
    both without reaching vLLM, and with room again once the held ones are done."""
    front = gate(echo_upstream, GATE_MAX_REQUEST_MIB="1", GATE_MAX_BODIES_MIB="2")
    body = b'{"pad": "' + b"x" * 900_000 + b'"}'  # 0.86 MiB
    too_large = requests.post(front.url + "/v1/completions", data=body * 2, timeout=10)
    assert too_large.status_code == 413
    chunked = requests.post(front.url + "/v1/completions", data=iter([body, body]), timeout=10)
    assert chunked.status_code == 413
    slow = f"{front.url}/v1/completions?sleep=1.5"
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = [pool.submit(requests.post, slow, data=body, timeout=10) for _ in range(2)]
        wait_until(lambda: len(echo_upstream.received) == 2, "both bodies upstream")
        over = requests.post(front.url + "/v1/completions", data=body, timeout=10)
        assert over.status_code == 503 and "MiB" not in over.text
        assert [future.result().status_code for future in held] == [201, 201]
    assert requests.post(front.url + "/v1/completions", data=body, timeout=10).status_code == 201
    assert len(echo_upstream.received) == 3
    assert front.metric("vllm_gate_errors_total", reason="body_refused") == 3


def test_nothing_refused_ever_reaches_the_upstream(echo_upstream, gate):
    """Every private endpoint with every method, even listed in GATE_EXTRA_PATHS' neighbourhood, and every
    kind of junk stays at the gate: the recording upstream gets only the one request that is served."""
    front = gate(echo_upstream, GATE_EXTRA_PATHS="/rerank,/score")
    methods = ("GET", "POST", "PUT", "DELETE", "PATCH")
    private = [(method, path) for method in methods for _, path in DEV_ENDPOINTS]
    junk = [("POST", "/v1/nope"), ("PUT", "/v1/chat/completions"), ("GET", "/rerank"), ("POST", "/pooling")]
    for method, path in private + junk:
        response = requests.request(method, front.url + path, json={"x": 1}, timeout=5)
        assert response.status_code in (404, 405), (method, path, response.status_code)
        assert "127.0.0.1" not in response.text and "aiohttp" not in response.headers.get("Server", "")
    assert echo_upstream.received == []
    assert requests.post(front.url + "/rerank", json={"query": "q"}, timeout=5).status_code == 201
    assert [(r["method"], r["path_qs"]) for r in echo_upstream.received] == [("POST", "/rerank")]


def read_answer(connection: socket.socket) -> bytes:
    """What the gate sends on `connection` until it closes it (the connection's timeout bounds the wait).

    A reset ends it too: a connection closed with bytes of ours still unread (a body being trickled) is reset
    by the kernel after what the gate sent."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def trickle_until_answered(connection: socket.socket, most: int) -> bytes:
    """Send a byte every 0.2 s, at most `most` of them, until the gate answers; returns the answer's beginning."""
    connection.settimeout(0.2)
    try:
        for _ in range(most):
            connection.sendall(b" ")
            try:
                return connection.recv(65536)
            except TimeoutError:
                continue
        return b""
    finally:
        connection.settimeout(30)


def test_bodies_are_charged_for_the_bytes_received_not_the_bytes_promised(echo_upstream, gate):
    """Connections whose heads promise all of GATE_MAX_BODIES_MIB and send no body reserve nothing: other
    clients' bodies, up to the whole budget, are served. (Bodies that do arrive are charged: the test of
    GATE_MAX_BODIES_MIB above.)"""
    front = gate(echo_upstream, GATE_MAX_REQUEST_MIB="2", GATE_MAX_BODIES_MIB="5")
    promising = []
    try:
        for size in (2, 2, 1):  # 5 MiB promised
            connection = socket.create_connection(("127.0.0.1", front.port), timeout=30)
            connection.sendall(promised_body_head(size * 2**20))
            promising.append(connection)
        body = b'{"pad": "' + b"x" * 900_000 + b'"}'  # 0.86 MiB (the upstream takes at most 1 MiB)
        with ThreadPoolExecutor(max_workers=5) as pool:  # 4.3 MiB at once, with 5 MiB promised
            answers = pool.map(lambda _: requests.post(f"{front.url}/v1/completions?sleep=0.5", data=body,
                                                       timeout=30), range(5))  # fmt: skip
            assert [answer.status_code for answer in answers] == [201] * 5
        for connection in promising:  # still open and unanswered: nothing refused them to make room
            connection.setblocking(False)
            with pytest.raises(BlockingIOError):
                connection.recv(1)
    finally:
        for connection in promising:
            connection.close()
    assert len(echo_upstream.received) == 5


def test_a_request_head_or_body_that_does_not_arrive_in_time_is_dropped(echo_upstream, gate):
    """GATE_HEADER_TIMEOUT_S: a head not whole in time closes the connection; GATE_BODY_TIMEOUT_S: a body not
    whole in time (none sent, or trickled) gets a generic 408 and the connection is closed; nothing reaches vLLM."""
    front = gate(echo_upstream, GATE_HEADER_TIMEOUT_S="1", GATE_BODY_TIMEOUT_S="1")
    sent = time.monotonic()
    with socket.create_connection(("127.0.0.1", front.port), timeout=30) as partial:
        partial.sendall(PARTIAL_HEAD)
        assert read_answer(partial) == b""
    assert time.monotonic() - sent > 0.9

    for trickle in (False, True):
        with socket.create_connection(("127.0.0.1", front.port), timeout=30) as stalled:
            stalled.sendall(promised_body_head(100))
            sent = time.monotonic()
            answer = trickle_until_answered(stalled, 99) if trickle else b""
            answer += read_answer(stalled)
        assert time.monotonic() - sent > 0.9
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"\r\nServer: vllm-gate\r\n" in head + b"\r\n", answer
        assert json.loads(body)["error"]["type"] == "RequestTimeoutError"
    assert echo_upstream.received == []
    assert "within GATE_BODY_TIMEOUT_S" in front.log()
    assert front.metric("vllm_gate_errors_total", reason="body_refused") == 2


ATTACKS = [attack for attack in scenarios(20, 2, 5, 400) if attack[0] != "baseline"]


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack[0] for attack in ATTACKS])
def test_a_client_stays_answered_while_others_try_to_starve_it(echo_upstream, gate, attack):
    """Connections that promise all of GATE_MAX_BODIES_MIB, or fill GATE_MAX_CONNECTIONS with heads whose
    bodies never come (held open and reopened when dropped, or a flood of new ones), or never finish their
    heads: another client's requests, each on a new connection, are all answered. Prints its latencies."""
    name, heads, hold, flood, total = attack
    # Deadlines far away: what keeps the client answered is the charging and the making of room, not a timer.
    front = gate(echo_upstream, GATE_MAX_CONNECTIONS="20", GATE_MAX_REQUEST_MIB="2", GATE_MAX_BODIES_MIB="5",
                 GATE_HEADER_TIMEOUT_S="600", GATE_BODY_TIMEOUT_S="600", GATE_KEEPALIVE_S="600")  # fmt: skip
    attacker = Attack(front.port, heads, hold, total, flood).start()
    try:
        attacker.wait_until_all_open()
        latencies = time_requests(front.url, 20, timeout=60)
    finally:
        attacker.stop()
    print(f"{name}: {latencies.summary()}, attacker connections {attacker.opened}")
    assert latencies.statuses() == {"201": 20}, latencies.answers
    assert requests.get(front.url + "/gate/status", timeout=30).status_code == 200


def test_aiohttps_own_answers_are_generic_and_name_the_gate(echo_upstream, gate):
    """Requests aiohttp's parser refuses get a JSON 400 saying `Server: vllm-gate`, without aiohttp's or
    Python's version and without the request line; so does every answer of the gate's own."""
    front = gate(echo_upstream, GATE_MAX_CONNECTIONS="1")
    for garbage in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET /v1/models?secret=SECRET HTTP/1.1\r\nHost: x\r\nContent-Length: SECRET\r\n\r\n",
        b"GET /" + b"SECRET" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a request line over aiohttp's limit
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Long: " + b"SECRET" * 2000 + b"\r\n\r\n",
        b"SECRET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        answer = raw_exchange(front.port, garbage, timeout=30)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.[01] 400 ", head), answer
        assert b"\r\nServer: vllm-gate\r\n" in head + b"\r\n" and b"aiohttp" not in answer and b"Python" not in answer
        assert b"SECRET" not in answer and json.loads(body)["error"]["type"] == "BadRequestError", answer
    for response in (
        requests.get(front.url + "/gate/status", timeout=30),
        requests.post(front.url + "/sleep", timeout=30),
        requests.post(front.url + "/v1/completions", data=b"[", timeout=30),
        requests.post(front.url + "/v1/completions", data=b"x" * (2 * 2**20), timeout=30),
    ):
        assert response.headers["Server"] == "vllm-gate", response.headers
    with socket.create_connection(("127.0.0.1", front.port), timeout=30) as holder:
        holder.sendall(b"GET /v1/models?sleep=5 HTTP/1.1\r\nHost: x\r\n\r\n")  # the one connection, busy
        wait_until(lambda: echo_upstream.received, "the busy request upstream", timeout=30)
        refused = raw_exchange(front.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", timeout=30)
    assert refused.startswith(b"HTTP/1.1 503 ") and b"\r\nServer: vllm-gate\r\n" in refused, refused


def test_long_client_values_are_cut_in_answers_and_in_the_log(gate):
    """A 1 MB model name or request path is never echoed whole: the 404 body and the log lines show its
    first characters and how many more there were."""
    port = free_port()  # nothing there: the one model never loads, the gate serves without it
    front = gate(f"http://127.0.0.1:{port}", GATE_MODELS=f"only:m:{port}:0.5", GATE_START_TIMEOUT_S="1")
    wait_until(lambda: front.status()["started"], "the gate to give up on the model", timeout=60)
    name = "m" * 1_000_000
    response = requests.post(front.url + "/v1/completions", json={"model": name, "prompt": "x"}, timeout=30)
    assert response.status_code == 404 and len(response.content) < 1000, len(response.content)
    assert "m" * 100 + "...[999900 more characters]" in response.json()["error"]["message"]
    path = "/v1/" + "p" * 8000  # within aiohttp's limit for a request line
    assert requests.get(front.url + path, timeout=30).status_code == 404
    log = front.log()
    assert "m" * 101 not in log and "p" * 101 not in log
    assert "...[999900 more characters]" in log and "...[7904 more characters]" in log
