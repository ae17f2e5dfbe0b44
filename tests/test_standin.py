"""The stand-in vLLM server (tests/fakes/standin_vllm.py) behaves like vLLM where our tools care."""

from __future__ import annotations

import contextlib
import json
import math
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
from tests.testing import wait_until as wait_for

QUESTION = [{"role": "user", "content": "What does the fake GPU say?"}]
SLEEP_PATHS = [
    ("POST", "/sleep?level=1"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/collective_rpc"),
    ("POST", "/reset_prefix_cache"),
]


DEV_MODE = {"VLLM_SERVER_DEV_MODE": "1"}
PAUSE_PATHS = [("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused")]


def completion(server, prompt: str, **fields) -> dict:
    """A greedy (temperature 0) text completion's JSON, unless `fields` say otherwise."""
    body = {"model": STANDIN_MODEL, "prompt": prompt, "temperature": 0, **fields}
    response = server.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


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
        wait_for(lambda: metrics(server)["vllm:num_requests_running"] == 1, what="the request to run")
        assert stays_pending(answer)
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
    assert server.get("/version").json() == {"version": "0.20.2"}


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
    """/sleep drops workers' memory to ~2% and holds requests back; /wake_up restores memory and answers."""
    server = standin_server("--enable-sleep-mode", env=DEV_MODE)
    reference = chat(server)
    awake_mib = nvidia_smi_used_mib()
    assert server.get("/is_sleeping").json() == {"is_sleeping": False}

    assert server.post("/sleep?level=1").status_code == 200
    assert server.get("/is_sleeping").json() == {"is_sleeping": True}
    assert server.get("/is_paused").json() == {"is_paused": True}  # sleep pauses the scheduler first
    worker_mib = awake_mib[0] - FAKE_GPU_BASELINE_MIB
    residual_mib = round(worker_mib * 0.02)
    assert nvidia_smi_used_mib() == {i: FAKE_GPU_BASELINE_MIB + residual_mib for i in range(FAKE_GPU_COUNT)}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(chat, server)
        wait_for(lambda: metrics(server)["vllm:num_requests_waiting"] == 1, what="a waiting request")
        time.sleep(0.2)
        assert not answer.done()
        assert server.post("/wake_up").status_code == 200
        assert answer.result(timeout=10) == reference
    assert server.get("/is_sleeping").json() == {"is_sleeping": False}
    assert server.get("/is_paused").json() == {"is_paused": False}
    assert nvidia_smi_used_mib() == awake_mib
    for path in ("/reset_prefix_cache", "/collective_rpc"):
        response = server.post(path, json={})
        assert (response.status_code, response.json()) == (200, {})


def test_resume_without_wake_up_computes_on_released_weights(fake_gpu, standin_server):
    """/resume after /sleep lets steps run on the released weights: answers and logprobs go wrong."""
    server = standin_server("--enable-sleep-mode", env=DEV_MODE)
    reference = completion(server, "weights", logprobs=2)["choices"][0]
    assert server.post("/sleep?level=1").status_code == 200
    assert server.post("/resume").json() == {"status": "resumed"}
    assert server.get("/is_sleeping").json() == {"is_sleeping": True}  # the workers still sleep
    asleep = completion(server, "weights", logprobs=2)["choices"][0]
    assert asleep["text"] != reference["text"]
    assert asleep["logprobs"]["token_logprobs"] != reference["logprobs"]["token_logprobs"]
    assert server.post("/wake_up").status_code == 200
    assert completion(server, "weights", logprobs=2)["choices"][0] == reference


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
    wait_for(server.answers_health, "/health to answer")
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


# --- vLLM 0.20.2's pause and sleep modes, an older vLLM, TP shapes, logprobs, EOS --------------------


def start_long_request(pool, server, prompt: str = "a long story", max_tokens: int = 300):
    """Submits a greedy completion that runs to max_tokens; returns its future once EngineCore runs it."""
    future = pool.submit(completion, server, prompt, max_tokens=max_tokens, ignore_eos=True)
    wait_for(lambda: metrics(server)["vllm:num_requests_running"] == 1, what="the request to run")
    return future


def stays_pending(future, seconds: float = 0.3) -> bool:
    time.sleep(seconds)
    return not future.done()


def cuda_processes(server) -> list[psutil.Process]:
    """The processes of the server that hold the model: the workers, or EngineCore at TP=1."""
    return server.workers() or [server.engine_core()]


def test_pause_keep_freezes_requests_and_no_cuda_is_touched_until_resume(fake_gpu, standin_server):
    """/pause?mode=keep stops stepping (checkpointed workers survive), queues new requests; /resume ends both."""
    server = standin_server("--enable-sleep-mode", env=DEV_MODE)
    reference = completion(server, "a long story", max_tokens=300, ignore_eos=True)
    with ThreadPoolExecutor(2) as pool:
        in_flight = start_long_request(pool, server)
        assert server.post("/pause?mode=keep").json() == {"status": "paused"}
        assert server.get("/is_paused").json() == {"is_paused": True}
        assert server.get("/is_sleeping").json() == {"is_sleeping": True}  # vLLM 0.20.2: paused counts
        for process in cuda_processes(server):
            fakegpu.write_state(process.pid, "checkpointed")  # a step now would segfault it
        queued = pool.submit(chat, server)
        wait_for(lambda: metrics(server)["vllm:num_requests_waiting"] == 1, what="a queued request")
        assert stays_pending(in_flight) and not queued.done()
        for process in cuda_processes(server):
            fakegpu.write_state(process.pid, "running")
        assert server.post("/resume").json() == {"status": "resumed"}
        answer = in_flight.result(timeout=10)
        assert (answer["choices"], answer["usage"]) == (reference["choices"], reference["usage"])
        assert queued.result(timeout=10) == chat(server)
    assert server.get("/is_paused").json() == {"is_paused": False}


def test_pause_abort_finishes_in_flight_requests_with_abort(standin_server):
    """/pause (mode abort by default) ends running requests at once: HTTP 200, truncated, "abort"."""
    server = standin_server(tensor_parallel_size=1, env=DEV_MODE)
    body = {"model": STANDIN_MODEL, "prompt": "streamed", "max_tokens": 300, "temperature": 0, "stream": True}
    with ThreadPoolExecutor(2) as pool:
        whole = start_long_request(pool, server)
        with server.post("/v1/completions", json=body, stream=True) as response:
            events = stream_events(response)
            next(events)
            assert server.post("/pause").json() == {"status": "paused"}
            chunks = list(events)
        answer = whole.result(timeout=10)
        queued = pool.submit(chat, server)
        assert stays_pending(queued)
        assert server.post("/resume").status_code == 200
        assert queued.result(timeout=10) == chat(server)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "abort"
    assert 0 < answer["usage"]["completion_tokens"] < 300
    assert len(choice["text"].split()) == answer["usage"]["completion_tokens"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])


def test_pause_wait_returns_once_in_flight_requests_finished(standin_server):
    """/pause?mode=wait lets running requests finish whole first; new ones wait until /resume."""
    server = standin_server(env=DEV_MODE)
    with ThreadPoolExecutor(2) as pool:
        in_flight = start_long_request(pool, server, max_tokens=150)
        assert server.post("/pause?mode=wait").status_code == 200
        # The pause answered only after the request finished (its last token came first).
        assert metrics(server)["vllm:num_requests_running"] == 0
        answer = in_flight.result(timeout=10)
        queued = pool.submit(chat, server)
        assert stays_pending(queued)
        assert server.post("/resume").status_code == 200
        assert queued.result(timeout=10) == chat(server)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 150
    assert server.post("/pause?mode=later").status_code == 422


@pytest.mark.parametrize("mode", ["abort", "wait", "keep"])
def test_sleep_modes_at_tp1(fake_gpu, standin_server, mode):
    """/sleep?mode=: abort truncates, wait finishes first, keep preempts and recomputes the same answer."""
    server = standin_server("--enable-sleep-mode", tensor_parallel_size=1, env=DEV_MODE)
    (engine,) = cuda_processes(server)
    loaded_mib = fakegpu.gpu_holding(engine.pid)[1]
    reference = completion(server, "a long story", max_tokens=300, ignore_eos=True)["choices"][0]
    with ThreadPoolExecutor(2) as pool:
        in_flight = start_long_request(pool, server)
        assert server.post(f"/sleep?level=1&mode={mode}").status_code == 200
        assert fakegpu.gpu_holding(engine.pid) == (0, round(loaded_mib * 0.02))
        assert server.get("/is_sleeping").json() == {"is_sleeping": True}
        fakegpu.write_state(engine.pid, "checkpointed")  # what a suspend does next: safe while paused
        queued = pool.submit(chat, server)
        assert stays_pending(queued)
        fakegpu.write_state(engine.pid, "running")
        assert server.post("/wake_up").status_code == 200
        answer = in_flight.result(timeout=10)["choices"][0]
        assert queued.result(timeout=10) == chat(server)
    assert fakegpu.gpu_holding(engine.pid) == (0, loaded_mib)
    if mode == "abort":
        assert answer["finish_reason"] == "abort" and reference["text"].startswith(answer["text"])
        assert len(answer["text"]) < len(reference["text"])
    else:
        assert answer == reference  # kept requests are recomputed: the same continuation, just later
    assert server.get("/is_paused").json() == {"is_paused": False}


def test_sleep_level_0_pauses_without_releasing_memory(fake_gpu, standin_server):
    """/sleep?level=0 only pauses the scheduler: memory stays, requests wait, /wake_up resumes them."""
    server = standin_server("--enable-sleep-mode", env=DEV_MODE)
    awake_mib = nvidia_smi_used_mib()
    reference = chat(server)
    assert server.post("/sleep?level=0&mode=keep").status_code == 200
    assert server.get("/is_sleeping").json() == {"is_sleeping": True}
    assert nvidia_smi_used_mib() == awake_mib
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(chat, server)
        assert stays_pending(queued)
        assert server.post("/wake_up").status_code == 200
        assert queued.result(timeout=10) == reference
    assert server.get("/is_sleeping").json() == {"is_sleeping": False}


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_older_vllm_has_no_pause_and_a_step_during_its_sleep_kills_the_engine(
    fake_gpu, standin_server, tensor_parallel_size
):
    """STANDIN_VLLM_VERSION=0.11.0: no /pause; /sleep does not pause, so a request while asleep kills it."""
    env = {**DEV_MODE, "STANDIN_VLLM_VERSION": "0.11.0"}
    server = standin_server("--enable-sleep-mode", tensor_parallel_size=tensor_parallel_size, env=env)
    assert server.get("/version").json() == {"version": "0.11.0"}
    for method, path in PAUSE_PATHS:
        assert requests.request(method, server.url + path, timeout=5).status_code == 404, path
    reference = chat(server)
    assert server.post("/sleep?level=1&mode=keep").status_code == 200  # mode is ignored
    assert server.get("/is_sleeping").json() == {"is_sleeping": True}
    assert server.post("/wake_up").status_code == 200
    assert chat(server) == reference  # sleeping with nothing in flight is safe

    assert server.post("/sleep?level=1").status_code == 200
    with contextlib.suppress(requests.ConnectionError):
        assert server.post("/v1/chat/completions", json={"messages": QUESTION}).status_code == 500
    assert server.process.wait(timeout=10) == 1
    log = server.log()
    if tensor_parallel_size == 1:
        assert "EngineCore encountered a fatal error" in log
    else:
        assert re.search(r"Worker proc VllmWorker-\d died unexpectedly \(exit code 1\)", log)
    assert "illegal memory access" in log and "Engine core died unexpectedly" in log


def test_tp1_engine_core_holds_the_model_and_segfaults_when_stepping_checkpointed(fake_gpu, standin_server):
    """At TP=1 there are no workers: EngineCore holds GPU 0's model memory and computes each step itself."""
    server = standin_server("--gpu-memory-utilization", "0.5", tensor_parallel_size=1)
    engine = server.engine_core()
    assert engine.children() == []
    model_mib = int(0.5 * FAKE_GPU_TOTAL_MIB)
    assert fakegpu.gpu_holding(engine.pid) == (0, model_mib)
    assert fakegpu.gpu_holding(server.pid) == (-1, 0)
    assert nvidia_smi_used_mib() == {0: FAKE_GPU_BASELINE_MIB + model_mib, 1: FAKE_GPU_BASELINE_MIB}
    reference = chat(server)
    fakegpu.write_state(engine.pid, "locked")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(chat, server)
        assert stays_pending(answer)
        fakegpu.write_state(engine.pid, "running")
        assert answer.result(timeout=10) == reference

    fakegpu.write_state(engine.pid, "checkpointed")
    with contextlib.suppress(requests.ConnectionError):
        assert server.post("/v1/chat/completions", json={"messages": QUESTION}).status_code == 500
    assert server.process.wait(timeout=10) == 1
    assert "Engine core died unexpectedly (killed by SIGSEGV)" in server.log()
    assert wait_until_dead(server.family) == []


@pytest.mark.parametrize("tensor_parallel_size", [4, 8])
def test_tp4_and_tp8_put_worker_i_on_gpu_i(fake_gpu, standin_server, tensor_parallel_size):
    """TP=4 and TP=8: one Worker_TPi per rank, each on GPU i; EngineCore holds no model memory."""
    gpus = [(i, f"GPU-{i}", FAKE_GPU_TOTAL_MIB, FAKE_GPU_BASELINE_MIB) for i in range(8)]
    fakegpu.write_gpus(fake_gpu, gpus)
    server = standin_server(tensor_parallel_size=tensor_parallel_size)
    workers = server.workers()
    assert [process_title(w) for w in workers] == [f"VLLM::Worker_TP{i}" for i in range(tensor_parallel_size)]
    model_mib = int(0.9 * FAKE_GPU_TOTAL_MIB)
    assert [fakegpu.gpu_holding(w.pid) for w in workers] == [(i, model_mib) for i in range(tensor_parallel_size)]
    assert fakegpu.gpu_holding(server.engine_core().pid) == (-1, 0)
    assert chat(server) == chat(server)
    fakegpu.write_state(workers[-1].pid, "checkpointed")
    with contextlib.suppress(requests.ConnectionError):
        server.post("/v1/chat/completions", json={"messages": QUESTION})
    assert server.process.wait(timeout=10) == 1
    assert f"Worker proc VllmWorker-{tensor_parallel_size - 1} died unexpectedly (killed by SIGSEGV)" in server.log()


def test_completion_logprobs_have_vllm_shape_and_are_deterministic(fake_gpu, standin_server):
    """logprobs=k: tokens, token_logprobs, top_logprobs (k each), text_offset; repeatable, varied, negative."""
    server = standin_server()
    answer = completion(server, "logprobs please", max_tokens=12, logprobs=5)
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert [choice["text"][offset:] for offset in logprobs["text_offset"]][-1] == logprobs["tokens"][-1]
    values = logprobs["token_logprobs"]
    assert len(values) == 12 and len(set(values)) == 12
    assert all(math.isfinite(value) and value < 0 for value in values)
    for token, value, top in zip(logprobs["tokens"], values, logprobs["top_logprobs"], strict=True):
        assert len(top) == 5 and top[token] == value == max(top.values())
    assert completion(server, "logprobs please", max_tokens=12, logprobs=5)["choices"][0] == choice
    other = completion(server, "other prompt", max_tokens=12, logprobs=5)["choices"][0]["logprobs"]
    assert other["token_logprobs"] != values

    body = {"model": STANDIN_MODEL, "prompt": "logprobs please", "max_tokens": 12, "logprobs": 5,
            "temperature": 0, "stream": True}  # fmt: skip
    with server.post("/v1/completions", json=body, stream=True) as response:
        chunks = [chunk["choices"][0]["logprobs"] for chunk in stream_events(response)]
    assert [key for chunk in chunks for key in chunk["tokens"]] == logprobs["tokens"]
    assert [value for chunk in chunks for value in chunk["token_logprobs"]] == values
    assert [offset for chunk in chunks for offset in chunk["text_offset"]] == logprobs["text_offset"]

    (fakegpu.pid_dir(server.workers()[0].pid) / "corrupt").write_text("1\n")
    corrupt = completion(server, "logprobs please", max_tokens=12, logprobs=5)["choices"][0]["logprobs"]
    assert corrupt["token_logprobs"] != values
    for bad in (21, -1, "5", True):
        body = {"model": STANDIN_MODEL, "prompt": "x", "logprobs": bad}
        assert server.post("/v1/completions", json=body).status_code == 400, bad


def test_chat_logprobs_have_vllm_shape(standin_server):
    """Chat logprobs=true, top_logprobs=k: content[i] = token, logprob, bytes and k top_logprobs."""
    server = standin_server(tensor_parallel_size=1)
    body = {"model": STANDIN_MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 6,
            "logprobs": True, "top_logprobs": 3}  # fmt: skip
    choice = server.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(item["token"] for item in content) == choice["message"]["content"]
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert item["bytes"] == list(item["token"].encode()) and item["logprob"] < 0
        assert len(item["top_logprobs"]) == 3 and item["top_logprobs"][0]["token"] == item["token"]
        assert all(set(top) == {"token", "logprob", "bytes"} for top in item["top_logprobs"])
    assert server.post("/v1/chat/completions", json=body).json()["choices"][0] == choice
    with server.post("/v1/chat/completions", json={**body, "stream": True}, stream=True) as response:
        chunks = [chunk["choices"][0]["logprobs"] for chunk in stream_events(response)]
    streamed = [item for chunk in chunks if chunk for item in chunk["content"]]
    assert streamed == content
    without = server.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None}).json()
    assert without["choices"][0]["logprobs"] is None
    assert server.post("/v1/chat/completions", json={**body, "logprobs": False}).status_code == 400


def test_greedy_answers_stop_at_eos_unless_ignore_eos(standin_server):
    """A long greedy answer ends with "stop" after 20+ tokens; with ignore_eos it runs to max_tokens."""
    server = standin_server(env={"STANDIN_STEP_S": "0.001"})
    stopped = completion(server, "Once upon a time", max_tokens=500)
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert 20 < stopped["usage"]["completion_tokens"] < 500
    whole = completion(server, "Once upon a time", max_tokens=500, ignore_eos=True)
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 500
    # The end-of-sequence token counts as a token but adds no text.
    assert len(choice["text"].split()) == stopped["usage"]["completion_tokens"] - 1
    assert whole["choices"][0]["text"].startswith(choice["text"])
    assert completion(server, "Once upon a time", max_tokens=20)["choices"][0]["finish_reason"] == "length"


def test_nvidia_smi_lists_compute_apps_holding_memory(fake_gpu, standin_server):
    """--query-compute-apps=pid,used_memory lists the processes whose memory is on a GPU now."""
    server = standin_server()
    workers = server.workers()

    def compute_apps() -> dict[int, int]:
        output = subprocess.run(
            [str(FAKES_DIR / "nvidia-smi"), "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {int(pid): int(mib) for pid, mib in (line.split(",") for line in output.splitlines())}

    model_mib = int(0.9 * FAKE_GPU_TOTAL_MIB)
    assert compute_apps() == {worker.pid: model_mib for worker in workers}
    fakegpu.write_state(workers[0].pid, "checkpointed")
    assert compute_apps() == {workers[1].pid: model_mib}
    (fakegpu.pid_dir(workers[0].pid) / "kept").write_text("")
    assert compute_apps() == {worker.pid: model_mib for worker in workers}
