"""The stand-in vLLM server (tests/fakes/standin_vllm.py) behaves like vLLM where our tools care."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from tests.conftest import (
    FAKE_GPU_BASELINE_MIB,
    FAKE_GPU_COUNT,
    FAKE_GPU_TOTAL_MIB,
    FAKES_DIR,
    STANDIN_MODEL,
    fakegpu,
    process_title,
    wait_until_dead,
)

QUESTION = [{"role": "user", "content": "What does the fake GPU say?"}]
SLEEP_PATHS = [
    ("POST", "/sleep?level=1"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/collective_rpc"),
    ("POST", "/reset_prefix_cache"),
]


def chat(server, messages=QUESTION, **fields) -> str:
    """The text of a greedy (temperature 0) chat completion, unless `fields` say otherwise."""
    body = {"model": STANDIN_MODEL, "messages": messages, "temperature": 0, **fields}
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def stream_events(response: requests.Response):
    """The JSON payloads of a Server-Sent Events response, up to [DONE]."""
    for line in response.iter_lines():
        if not line:
            continue
        payload = line.decode().removeprefix("data: ")
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def metrics(server) -> dict[str, float]:
    values = {}
    for line in server.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[re.sub(r"\{.*\}", "", name)] = float(value)
    return values


def nvidia_smi_used_mib() -> dict[int, int]:
    output = subprocess.run(
        [str(FAKES_DIR / "nvidia-smi"), "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(index): int(used) for index, used in (line.split(",") for line in output.splitlines())}


def wait_for(condition, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


def test_process_tree_and_titles_match_vllm_v1(standin_server):
    """API server (vLLM's command line) -> VLLM::EngineCore -> VLLM::Worker_TP0/1, unknown args ignored."""
    server = standin_server("--enable-prefix-caching", "--max-num-seqs", "8")
    api_server = psutil.Process(server.pid)
    title = process_title(api_server)
    assert title.startswith("python3 -m vllm.entrypoints.openai.api_server ")
    assert "--tensor-parallel-size 2" in title and "--max-num-seqs 8" in title
    engine = server.engine_core()
    assert process_title(engine) == "VLLM::EngineCore"
    assert engine.name().startswith("VLLM::EngineCor")  # comm holds 15 characters
    assert [process_title(worker) for worker in server.workers()] == ["VLLM::Worker_TP0", "VLLM::Worker_TP1"]
    assert all(worker.children() == [] for worker in server.workers())


def test_workers_hold_fake_gpu_memory(fake_gpu, standin_server):
    """Each worker registers on its GPU with its share of memory; nvidia-smi shows it; the rest hold none."""
    server = standin_server("--gpu-memory-utilization", "0.5")
    worker_mib = int(0.5 * FAKE_GPU_TOTAL_MIB)
    for rank, worker in enumerate(server.workers()):
        assert fakegpu.read_state(worker.pid) == "running"
        assert fakegpu.gpu_holding(worker.pid) == (rank, worker_mib)
    for process in (psutil.Process(server.pid), server.engine_core()):
        assert fakegpu.read_state(process.pid) == "running"
        assert fakegpu.gpu_holding(process.pid) == (-1, 0)
    expected = {index: FAKE_GPU_BASELINE_MIB + worker_mib for index in range(FAKE_GPU_COUNT)}
    assert nvidia_smi_used_mib() == expected


def test_greedy_answers_repeat_and_streams_concatenate_to_them(standin_server):
    """Greedy/seeded answers are deterministic (also when batched together); streamed pieces join to them."""
    server = standin_server()
    reference = chat(server)
    assert len(reference.split()) == 16
    assert chat(server) == reference
    assert chat(server, max_tokens=5) == " ".join(reference.split()[:5])
    assert chat(server, messages=[{"role": "user", "content": "Another question"}]) != reference
    assert chat(server, temperature=1.0) != chat(server, temperature=1.0)  # sampling
    assert chat(server, temperature=1.0, seed=7) == chat(server, temperature=1.0, seed=7)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: chat(server), range(4))) == [reference] * 4

    body = {"model": STANDIN_MODEL, "messages": QUESTION, "temperature": 0, "stream": True}
    with server.post("/v1/chat/completions", json=body, stream=True) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        chunks = list(stream_events(response))
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks) == reference
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    completion = {"model": STANDIN_MODEL, "prompt": "Once upon a time", "max_tokens": 7, "temperature": 0}
    whole = server.post("/v1/completions", json=completion).json()
    assert whole["usage"] == {"prompt_tokens": 16, "completion_tokens": 7, "total_tokens": 23}
    with server.post("/v1/completions", json={**completion, "stream": True}, stream=True) as response:
        streamed = "".join(chunk["choices"][0]["text"] for chunk in stream_events(response))
    assert streamed == whole["choices"][0]["text"]


def test_locked_worker_blocks_requests_until_running(fake_gpu, standin_server):
    """A request waits while a worker is `locked` and gets the usual answer once it runs again."""
    server = standin_server()
    reference = chat(server)
    worker = server.workers()[1]
    fakegpu.write_state(worker.pid, "locked")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(chat, server)
        time.sleep(0.5)
        assert not answer.done()
        assert metrics(server)["vllm:num_requests_running"] == 1
        fakegpu.write_state(worker.pid, "running")
        assert answer.result(timeout=10) == reference


def test_request_to_checkpointed_worker_segfaults_it_and_server_exits(fake_gpu, standin_server):
    """A request reaching a `checkpointed` worker kills it with SIGSEGV; EngineCore and the API server die."""
    server = standin_server()
    fakegpu.write_state(server.workers()[0].pid, "checkpointed")
    try:
        response = server.post("/v1/chat/completions", json={"model": STANDIN_MODEL, "messages": QUESTION})
        assert response.status_code == 500
    except requests.ConnectionError:
        pass  # the server may be gone before it answers
    assert server.process.wait(timeout=10) != 0
    log = server.log()
    assert "Worker proc VllmWorker-0 died unexpectedly (killed by SIGSEGV)" in log
    assert "Engine core died unexpectedly" in log
    assert wait_until_dead(server.family) == []


def test_stopped_engine_core_queues_requests_until_continued(standin_server):
    """While EngineCore is SIGSTOPped, requests wait (the API stays responsive); SIGCONT answers them."""
    server = standin_server()
    reference = chat(server)
    engine = server.engine_core()
    engine.send_signal(signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(chat, server)
            wait_for(lambda: metrics(server)["vllm:num_requests_waiting"] == 1, what="a waiting request")
            assert server.get("/health", timeout=2).status_code == 200
            assert server.get("/v1/models", timeout=2).status_code == 200
            assert not answer.done()
            engine.send_signal(signal.SIGCONT)
            assert answer.result(timeout=10) == reference
    finally:
        engine.send_signal(signal.SIGCONT)


def test_corrupt_worker_changes_the_answer(fake_gpu, standin_server):
    """A worker with the `corrupt` mark (a bad restore) makes the answer differ until the mark is gone."""
    server = standin_server()
    reference = chat(server)
    mark = fakegpu.pid_dir(server.workers()[1].pid) / "corrupt"
    mark.write_text("1\n")
    assert chat(server) != reference
    mark.unlink()
    assert chat(server) == reference


def test_unknown_model_is_404_and_tokenizer_round_trips(standin_server):
    """A wrong model name answers vLLM's 404 error; /tokenize and /detokenize invert each other."""
    server = standin_server()
    for path, field in (("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")):
        response = server.post(path, json={"model": "no-such-model", field: QUESTION})
        assert response.status_code == 404
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("NotFoundError", 404)
        assert "no-such-model" in error["message"]
    tokens = server.post("/tokenize", json={"model": STANDIN_MODEL, "prompt": "héllo"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
    detokenized = server.post("/detokenize", json={"model": STANDIN_MODEL, "tokens": tokens["tokens"]})
    assert detokenized.json() == {"prompt": "héllo"}
    assert server.get("/version").json() == {"version": "0.0.0-standin"}


@pytest.mark.parametrize(
    ("args", "env"),
    [(("--enable-sleep-mode",), {}), ((), {"VLLM_SERVER_DEV_MODE": "1"})],
    ids=["no-dev-mode", "no-sleep-flag"],
)
def test_sleep_endpoints_need_dev_mode_and_sleep_flag(standin_server, monkeypatch, args, env):
    """Without both VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode, the sleep endpoints are 404."""
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    server = standin_server(*args, env=env)
    for method, path in SLEEP_PATHS:
        assert requests.request(method, server.url + path, timeout=5).status_code == 404, path


def test_sleep_releases_memory_and_wake_up_restores_answers(fake_gpu, standin_server):
    """/sleep drops workers' memory to ~2% and spoils answers; /wake_up brings back memory and answers."""
    server = standin_server("--enable-sleep-mode", env={"VLLM_SERVER_DEV_MODE": "1"})
    reference = chat(server)
    awake_mib = nvidia_smi_used_mib()
    assert server.get("/is_sleeping").json() == {"is_sleeping": False}

    assert server.post("/sleep?level=1").status_code == 200
    assert server.get("/is_sleeping").json() == {"is_sleeping": True}
    worker_mib = awake_mib[0] - FAKE_GPU_BASELINE_MIB
    residual_mib = round(worker_mib * 0.02)
    assert nvidia_smi_used_mib() == {i: FAKE_GPU_BASELINE_MIB + residual_mib for i in range(FAKE_GPU_COUNT)}
    assert chat(server) != reference

    assert server.post("/wake_up").status_code == 200
    assert server.get("/is_sleeping").json() == {"is_sleeping": False}
    assert nvidia_smi_used_mib() == awake_mib
    assert chat(server) == reference
    for path in ("/reset_prefix_cache", "/collective_rpc"):
        response = server.post(path, json={})
        assert (response.status_code, response.json()) == (200, {})


def test_client_disconnect_mid_stream_aborts_the_request(standin_server):
    """Closing a stream mid-way aborts the request in EngineCore and counts it in /metrics."""
    server = standin_server()
    body = {"model": STANDIN_MODEL, "prompt": "Tell a long story", "max_tokens": 1500, "stream": True}
    with server.post("/v1/completions", json=body, stream=True) as response:
        events = stream_events(response)
        for _ in range(3):
            next(events)
    counters = wait_for(
        lambda: (values := metrics(server))["standin:aborted_requests_total"] == 1 and values,
        what="the abort to be counted",
    )
    assert counters["standin:requests_total"] == 1
    assert counters["vllm:num_requests_running"] == 0
    assert "Aborted request" in server.log()


def test_health_answers_while_the_model_never_loads(standin_server):
    """With STANDIN_NEVER_READY=1, /health is 200 but /v1/models and completions stay 503."""
    server = standin_server(env={"STANDIN_NEVER_READY": "1"}, wait_ready=False)
    time.sleep(0.5)
    assert server.get("/health").status_code == 200
    assert server.get("/v1/models").status_code == 503
    assert server.post("/v1/chat/completions", json={"messages": QUESTION}).status_code == 503
    assert "standin: ready" not in server.log()


def test_sigterm_shuts_the_tree_down_with_exit_0(fake_gpu, standin_server):
    """SIGTERM to the API server stops EngineCore and the workers and exits 0."""
    server = standin_server()
    assert len(server.family) == 4
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=10) == 0
    assert wait_until_dead(server.family) == []


def test_children_die_with_their_parent(standin_server):
    """SIGKILL of the API server takes EngineCore and the workers with it (PR_SET_PDEATHSIG)."""
    server = standin_server()
    server.process.kill()
    server.process.wait(timeout=5)
    assert wait_until_dead(server.family) == []
