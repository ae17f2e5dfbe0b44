"""The operator's hold (gate/hold.py) and the gate's two stages of idleness (suspend/light_sleep.py), on the stand-in
vLLM over the fake GPU, through the real gate and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests import test_gate
from tests.conftest import fakegpu
from tests.test_gate import (
    answer_text,
    assert_server_healthy,
    assert_transitions_never_overlapped,
    chat_answer,
    parse_metrics,
    stream_deltas,
)
from tests.testing import REPO, TOGGLE_ALL_CLI, wait_until

# The gate's fixtures (tests/test_gate.py), shared
run_dir, server, gate = test_gate.run_dir, test_gate.server, test_gate.gate

SLEEP_MODE = ("--enable-sleep-mode",)
DEV_MODE = {"VLLM_SERVER_DEV_MODE": "1"}


def toggle_all(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> dict:
    """Run cuda-toggle-all with --json; its JSON object (the run must succeed)."""
    environ = {**os.environ, **(env or {})}
    done = subprocess.run(
        [*TOGGLE_ALL_CLI, *args, "--json"], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=environ
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def pause_for_ticks(front, ticks: int = 5) -> None:
    """Give the gate's watcher several polls (GATE_POLL_S=0.1) in which it could act."""
    time.sleep(ticks * 0.1)


def test_hold_keeps_the_server_suspended_with_requests_in_flight_until_release(server, gate, fake_gpu, tmp_path):
    """hold --inflight keep with streams in flight: the gate resumes nothing, new requests get 503 with
    Retry-After, the hold shows in both status views and the metrics; release resumes and the streams end whole."""
    pace = tmp_path / "step-seconds"  # the streams crawl (a step a second) until the release, however slow the machine
    upstream = server(env={"STANDIN_STEP_S_FILE": str(pace)})
    prompts = [f"hold {index}" for index in range(2)]
    references = {prompt: stream_deltas(upstream.url, prompt, 120) for prompt in prompts}
    front = gate(upstream, GATE_HOLD_RETRY_AFTER_S="7")
    pace.write_text("1.0")
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        streams = {prompt: pool.submit(stream_deltas, front.url, prompt, 120) for prompt in prompts}
        wait_until(lambda: front.status()["in_flight"] == len(prompts), "the streams to start", 10)
        held = toggle_all("hold", "--pid", str(upstream.pid))
        assert held["held"] and held["suspend"]["ok"] and held["inflight"] == "keep"

        refused = chat_answer(front.url, "while held", 4)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "7"
        assert "held" in refused.json()["error"]["message"]
        pause_for_ticks(front)
        status = front.status()
        assert status["state"] == "suspended" and status["hold"]["inflight"] == "keep"
        kept = [prompt for prompt, stream in streams.items() if not stream.done()]
        assert kept, "no stream was in flight across the hold (the machine was too slow for this test)"
        assert status["in_flight"] == len(kept)
        assert front.metric("vllm_gate_held") == 1
        assert front.metric("vllm_gate_transitions_total", transition="resume", outcome="ok") == 0
        assert front.metric("vllm_gate_errors_total", reason="held") == 1
        assert toggle_all("status", "--pid", str(upstream.pid))["hold"]["inflight"] == "keep"
        assert [fakegpu.read_state(w.pid) for w in upstream.workers()] == ["checkpointed"] * 2

        assert not any(streams[prompt].done() for prompt in kept)  # frozen until the release
        pace.unlink()
        released = toggle_all("release", "--pid", str(upstream.pid))
        assert released["released"] and released["resume"]["ok"]
        results = {prompt: stream.result(timeout=30) for prompt, stream in streams.items()}
    assert results == references  # held across the suspend, whole
    assert front.status()["hold"] is None and front.metric("vllm_gate_held") == 0
    assert answer_text(chat_answer(front.url, "hold 0", 5)) == "".join(references["hold 0"][:6])
    assert_server_healthy(upstream)
    assert_transitions_never_overlapped(fake_gpu)


def test_hold_drains_first_and_a_waiting_request_is_answered_after_the_release(server, gate, fake_gpu):
    """hold --inflight drain: the stream in flight finishes before the suspend; with GATE_HOLD_WAIT_S a request
    sent while held waits and is answered once released, never before."""
    upstream = server(step_s=0.02)
    reference = stream_deltas(upstream.url, "drain me", 40)
    front = gate(upstream, GATE_HOLD_WAIT_S="60")
    events: list[str] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        stream = pool.submit(stream_deltas, front.url, "drain me", 40)
        wait_until(lambda: front.status()["in_flight"] == 1, "the stream to start", 10)
        held = toggle_all("hold", "--inflight", "drain", "--pid", str(upstream.pid))
        assert stream.done() and stream.result() == reference  # finished before the suspend began
        assert held["drain"]["drained"] and held["suspend"]["ok"]

        def waiting_request() -> str:
            text = answer_text(chat_answer(front.url, "after release", 4))
            events.append("answered")
            return text

        queued = pool.submit(waiting_request)
        wait_until(lambda: front.status()["waiting"] == 1, "the request to wait for the release", 10)
        pause_for_ticks(front)
        assert front.status()["state"] == "suspended" and not queued.done()
        events.append("release")
        toggle_all("release", "--no-resume", "--pid", str(upstream.pid))
        assert queued.result(timeout=30)
    assert events == ["release", "answered"]
    assert front.metric("vllm_gate_transitions_total", transition="resume", outcome="ok") == 1  # the gate woke it
    assert_server_healthy(upstream)


def test_hold_is_not_reachable_through_the_gate(server, gate, run_dir):
    """Nothing on the public port sets or ends a hold: every try is a 404 and leaves no hold file."""
    upstream = server()
    front = gate(upstream)
    for method, path in [("POST", "/gate/hold"), ("POST", "/gate/release"), ("PUT", "/gate/status"), ("POST", "/hold")]:
        assert requests.request(method, front.url + path, timeout=5).status_code in (404, 405)
    assert not (run_dir / "hold.json").exists()


def test_a_failed_hold_leaves_no_hold(server, gate, run_dir):
    """A hold whose suspend cannot run (no such server) exits non-zero and removes its hold again."""
    front = gate(server())
    done = subprocess.run([*TOGGLE_ALL_CLI, "hold", "--pid", "999999"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0
    assert not (run_dir / "hold.json").exists()
    assert front.status()["hold"] is None


def test_two_idle_stages_light_sleep_then_suspend_and_requests_wake_from_each(server, gate, fake_gpu, run_dir):
    """GATE_IDLE_SLEEP_S then GATE_IDLE_SUSPEND_S: asleep (vLLM asleep, no checkpoint, a residual on the GPU),
    then suspended (0 MiB); a request wakes from the light sleep with a wake-up only, and from the suspend."""
    upstream = server(*SLEEP_MODE, env=DEV_MODE)
    reference = answer_text(chat_answer(upstream.url, "stages", 8))
    # The asleep stage must outlast the checks below (a `cuda-toggle-all status` among them): its length is
    # derived from how long one status takes on this machine now.
    began = time.monotonic()
    toggle_all("status", "--pid", str(upstream.pid))
    idle_suspend_s = max(6.0, 4 * (time.monotonic() - began) + 3)
    front = gate(upstream, GATE_IDLE_SLEEP_S="0.3", GATE_IDLE_SUSPEND_S=f"{idle_suspend_s:.1f}")
    front.wait_for_state("asleep")

    # A request wakes it from the light sleep: a wake-up, no resume.
    assert answer_text(chat_answer(front.url, "stages", 8)) == reference
    assert front.metric("vllm_gate_transitions_total", transition="wake", outcome="ok") == 1
    assert front.metric("vllm_gate_transitions_total", transition="resume", outcome="ok") == 0
    assert not (run_dir / "asleep.json").exists()

    # Idle again: asleep (the workers still running, a residual on the GPU), then suspended (0 MiB left by the
    # server), in that order.
    front.wait_for_state("asleep")
    assert (run_dir / "asleep.json").exists() and not list((run_dir / "servers").glob("*.json"))
    assert [fakegpu.read_state(w.pid) for w in upstream.workers()] == ["running"] * 2
    residual = fakegpu.used_mib(fake_gpu)
    assert toggle_all("status", "--pid", str(upstream.pid))["asleep_since"] > 0
    seen: list[str] = []
    wait_until(
        lambda: seen.append(front.status()["state"]) or seen[-1] == "suspended", "the deep suspend", idle_suspend_s + 20
    )
    assert seen[0] == "asleep"
    assert front.metric("vllm_gate_transitions_total", transition="sleep", outcome="ok") == 2
    assert [fakegpu.read_state(w.pid) for w in upstream.workers()] == ["checkpointed"] * 2
    baseline = {index: mib for index, _, _, mib in fakegpu.read_gpus(fake_gpu)}
    assert fakegpu.used_mib(fake_gpu) == baseline and residual != baseline, "the residual was not freed"
    assert not (run_dir / "asleep.json").exists()
    assert front.status()["proof"] in ("per-process", "whole GPU")

    assert answer_text(chat_answer(front.url, "stages", 8)) == reference
    assert front.metric("vllm_gate_transitions_total", transition="resume", outcome="ok") == 1
    assert_server_healthy(upstream)


def upstream_counter(upstream, name: str) -> float:
    return parse_metrics(upstream.get("/metrics").text)[name]


def standin_with_a_wake_hold(server, tmp_path, prompt: str):
    """A stand-in with sleep mode whose wake-up a file holds back or fails (STANDIN_WAKE_HOLD_FILE), and its
    answer to `prompt`: (the hold file, the server, the answer)."""
    hold = tmp_path / "wake-hold"
    upstream = server(*SLEEP_MODE, env={**DEV_MODE, "STANDIN_WAKE_HOLD_FILE": str(hold)})
    return hold, upstream, answer_text(chat_answer(upstream.url, prompt, 8))


def asleep_with_a_wake_hold(server, gate, tmp_path, prompt: str):
    """standin_with_a_wake_hold, and a gate that has put it to light sleep: (the hold file, the server, the
    answer, the gate)."""
    hold, upstream, reference = standin_with_a_wake_hold(server, tmp_path, prompt)
    front = gate(upstream, GATE_IDLE_SLEEP_S="0.3")
    front.wait_for_state("asleep")
    return hold, upstream, reference, front


def test_a_request_goes_to_vllm_while_it_wakes_from_the_light_sleep(server, gate, tmp_path):
    """From the light sleep the request is sent on at once (vLLM queues it while asleep), beside the wake-up,
    and its answer is passed on only after the wake-up ended: identical to the one before the sleep."""
    hold, upstream, reference, front = asleep_with_a_wake_hold(server, gate, tmp_path, "beside")
    handed_over = upstream_counter(upstream, "standin:requests_total")
    hold.write_text("hold")  # the wake-up cannot end until the file goes
    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(chat_answer, front.url, "beside", 8)
        wait_until(
            lambda: upstream_counter(upstream, "standin:requests_total") == handed_over + 1, "the request upstream", 20
        )
        assert front.status()["state"] == "resuming" and not answer.done()  # there while vLLM still wakes
        pause_for_ticks(front)
        assert not answer.done(), "an answer went out before the wake-up ended"
        hold.unlink()
        assert answer_text(answer.result(timeout=30)) == reference
    assert front.metric("vllm_gate_transitions_total", transition="wake", outcome="ok") == 1
    assert "sent on while vLLM wakes from its light sleep" in front.log()
    assert_server_healthy(upstream)


def test_a_failed_wake_up_takes_back_the_request_sent_beside_it(server, gate, tmp_path):
    """The wake-up fails: the client gets 503, and the request sent beside it is aborted in vLLM (not left
    queued to run at some later wake-up); the next request wakes the server and is answered."""
    hold, upstream, reference, front = asleep_with_a_wake_hold(server, gate, tmp_path, "failed wake")
    aborted = upstream_counter(upstream, "standin:aborted_requests_total")
    hold.write_text("fail")
    refused = chat_answer(front.url, "failed wake", 8)
    assert refused.status_code == 503, refused.text
    assert front.metric("vllm_gate_transitions_total", transition="wake", outcome="failed") == 1
    wait_until(
        lambda: upstream_counter(upstream, "standin:aborted_requests_total") == aborted + 1, "the upstream abort", 10
    )
    metrics = parse_metrics(upstream.get("/metrics").text)
    assert metrics['vllm:num_requests_waiting{model_name="standin-model"}'] == 0
    hold.unlink()
    assert answer_text(chat_answer(front.url, "failed wake", 8)) == reference
    assert_server_healthy(upstream)


def test_a_request_for_a_suspended_server_reaches_vllm_only_once_the_resume_ended(server, gate, tmp_path):
    """From the deep suspend the request is not sent beside vLLM's wake-up (measured slower on a GPU: the resume's
    checks after the wake-up wait for the request's steps; docs/gate.md): nothing reaches vLLM while the resume's
    wake-up is held back, and the request is answered, identical to before, once the resume ended."""
    hold, upstream, reference = standin_with_a_wake_hold(server, tmp_path, "after the resume")
    front = gate(upstream)
    test_gate.move_to("checkpointed", test_gate.library_config(), pid=upstream.pid)
    front.wait_for_state("suspended")
    handed_over = upstream_counter(upstream, "standin:requests_total")
    hold.write_text("hold")
    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(chat_answer, front.url, "after the resume", 8)
        running = lambda: {fakegpu.read_state(w.pid) for w in upstream.workers()} == {"running"}  # noqa: E731
        wait_until(running, "the restore and unlock", 20)
        pause_for_ticks(front)
        assert front.status()["state"] == "resuming" and not answer.done()
        assert upstream_counter(upstream, "standin:requests_total") == handed_over, "sent before the resume ended"
        hold.unlink()
        assert answer_text(answer.result(timeout=30)) == reference
    assert front.metric("vllm_gate_transitions_total", transition="resume", outcome="ok") == 1
    assert_server_healthy(upstream)


def test_no_light_sleep_while_clients_keep_requests_in_flight(server, gate, fake_gpu):
    """Four clients one request after another: the idle stages never start while requests flow; then they do."""
    upstream = server(*SLEEP_MODE, env=DEV_MODE, step_s=0.02)
    references = {index: answer_text(chat_answer(upstream.url, f"load {index}", 6)) for index in range(4)}
    front = gate(upstream, GATE_IDLE_SLEEP_S="0.3")

    def client(index: int) -> int:
        answered = 0
        for _ in range(6):
            assert answer_text(chat_answer(front.url, f"load {index}", 6)) == references[index]
            answered += 1
        return answered

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert sum(pool.map(client, range(4))) == 24
    front.wait_for_state("asleep")
    assert answer_text(chat_answer(front.url, "load 0", 6)) == references[0]
    assert front.metric("vllm_gate_transitions_total", transition="wake", outcome="ok") >= 1
    assert_server_healthy(upstream)


def test_light_sleep_is_refused_without_sleep_mode_and_the_deep_stage_still_runs(server, gate, fake_gpu):
    """A server without sleep mode cannot sleep lightly: refused once, then the idle suspend alone."""
    upstream = server()
    front = gate(upstream, GATE_IDLE_SLEEP_S="0.2", GATE_IDLE_SUSPEND_S="1")
    front.wait_for_state("suspended", timeout=20)
    assert front.metric("vllm_gate_transitions_total", transition="sleep", outcome="failed") == 1
    assert "needs vLLM >= 0.17 with sleep mode" in front.log()
    reference = answer_text(chat_answer(front.url, "plain", 4))
    assert reference and front.metric("vllm_gate_transitions_total", transition="resume", outcome="ok") == 1


def test_warm_up_also_sends_a_chat_with_logprobs(server, gate):
    """cuda-toggle-all warm-up: a sleep/wake-up, a plain completion, then a chat with logprobs (vLLM's first
    one pays for paths the plain completion leaves cold), each timed."""
    upstream = server(*SLEEP_MODE, env=DEV_MODE)
    report = toggle_all("warm-up", "--pid", str(upstream.pid))
    assert report["done"]
    assert report["sleep_s"] >= 0 and report["first_completion_s"] > 0 and report["first_chat_s"] > 0
    access_log = upstream.log()
    assert access_log.index('"POST /v1/completions') < access_log.index('"POST /v1/chat/completions')


def test_the_proof_is_chosen_at_run_time_by_whether_the_listed_pids_are_the_servers(server, fake_gpu):
    """Where the GPU query lists the server's own PIDs the proof is per process; where it lists PIDs of another
    namespace (none of the server's) it counts whole GPUs; the JSON says which, each time."""
    upstream = server()
    pid = str(upstream.pid)
    mapped = toggle_all("checkpointed", "--pid", pid)
    assert mapped["ok"] and mapped["proof"] == "per-process"
    assert toggle_all("running", "--pid", pid)["proof"] == "per-process"
    foreign = {"FAKE_GPU_LISTED_PID_OFFSET": "1000000"}
    unmapped = toggle_all("checkpointed", "--pid", pid, env=foreign)
    assert unmapped["ok"] and unmapped["proof"] == "whole GPU"
    assert toggle_all("running", "--pid", pid, env=foreign)["proof"] == "whole GPU"
    assert_server_healthy(upstream)
