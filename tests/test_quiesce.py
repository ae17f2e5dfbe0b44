"""Suspend and resume through vLLM's own scheduler pause, at every TP size, and the SIGSTOP fallback for older
vLLM: requests in flight and requests sent meanwhile are kept, and "ok" rests on what was read back."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import requests

from entrypoint.base.errors import ExitCode
from tests.toggle_fixtures import SAFE_ENV, fakegpu

ARGS = ("--disable-custom-all-reduce", "--gpu-memory-utilization", "0.02")
DEV = {**SAFE_ENV, "VLLM_SERVER_DEV_MODE": "1"}
OLD_VLLM = {**SAFE_ENV, "STANDIN_VLLM_VERSION": "0.11.0"}
BASELINE_MIB = 4  # the fake GPU's idle figure: what every GPU reads once the server's memory is gone


def complete(server, prompt: str, max_tokens: int, **extra) -> dict:
    body = {"model": "standin-model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = requests.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def logprobs(server, prompt: str = "the same question") -> list:
    choice = complete(server, prompt, 8, logprobs=3)
    return [choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"]]


class Background:
    """A completion sent on a thread (fire and forget); `.answer` once it came back."""

    def __init__(self, server, prompt: str, max_tokens: int, **extra):
        self.answer: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(server, prompt, max_tokens, extra), daemon=True)
        self.thread.start()

    def _run(self, server, prompt, max_tokens, extra) -> None:
        try:
            self.answer = complete(server, prompt, max_tokens, **extra)
        except BaseException as error:  # reported by wait()
            self.error = error

    def wait(self, timeout: float = 60) -> dict:
        self.thread.join(timeout)
        assert self.error is None and self.answer is not None, self.error
        return self.answer


def metric(server, name: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(name):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def running_requests(server) -> float:
    return metric(server, "vllm:num_requests_running")


def cuda_family(server) -> list[int]:
    """Every process of the server's tree that the fake GPU knows (API server, EngineCore, workers)."""
    family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    return sorted(p.pid for p in family if fakegpu.read_state(p.pid) is not None)


@pytest.mark.parametrize(
    ("tp", "mode"), [(1, "plain"), (1, "hybrid"), (2, "plain"), (2, "hybrid"), (4, "hybrid"), (8, "plain")]
)
def test_scheduler_pause_suspends_any_tp_size_and_keeps_every_request(toggle_env, standin_server, tp, mode):
    """vLLM's own pause (or sleep) holds the requests: every CUDA process is checkpointed, the GPUs read their
    idle figure, a long request in flight finishes whole, one sent meanwhile is answered, logprobs equal."""
    server = standin_server(*ARGS, "--enable-sleep-mode", tensor_parallel_size=tp, env=DEV)
    reference = logprobs(server)
    inflight = Background(server, "a long story", 120, ignore_eos=True)
    server.wait_until(lambda: running_requests(server) >= 1, "running the long request", 20)

    code, down = toggle_env.run_json("checkpointed", "--pid", str(server.pid), "--mode", mode)
    assert code == 0, down
    assert (down["quiesce"], down["mode"]) == ("scheduler", mode)
    assert down["server"]["version"] == "0.20.2" and down["server"]["pause"]
    assert sorted(p["pid"] for p in down["pids"]) == cuda_family(server)
    assert all(toggle_env.state(pid) == "checkpointed" for pid in cuda_family(server))
    assert set(toggle_env.used_mib().values()) == {BASELINE_MIB}
    assert down["evidence"]["gpus"]["ok"] is True
    assert not any(p.status() == psutil.STATUS_STOPPED for p in psutil.Process(server.pid).children(recursive=True))
    holders = [p["pid"] for p in down["pids"] if p["role"] == "model"]
    expected = [server.engine_core().pid] if tp == 1 else sorted(w.pid for w in server.workers())
    assert sorted(holders) == expected

    queued = Background(server, "sent while suspended", 6)
    time.sleep(0.3)
    assert queued.answer is None and queued.error is None, "a request reached a suspended server"

    code, up = toggle_env.run_json("running", "--pid", str(server.pid))
    assert code == 0, up
    assert up["evidence"]["probe"]["ok"] and up["evidence"]["vllm"] == {"is_paused": False, "is_sleeping": False}
    assert all(toggle_env.state(pid) == "running" for pid in cuda_family(server))
    whole = inflight.wait()
    assert whole["finish_reason"] == "length", whole
    assert queued.wait()["finish_reason"] in ("length", "stop")
    assert logprobs(server) == reference
    assert metric(server, "standin:aborted_requests_total") == 0


def test_old_vllm_falls_back_to_freezing_the_dispatcher(toggle_env, standin_server):
    """vLLM without a scheduler pause (0.11): TP=2 is suspended plain with EngineCore frozen; a request sent
    meanwhile waits and is answered after the resume; hybrid is refused there."""
    server = standin_server(*ARGS, "--enable-sleep-mode", env={**OLD_VLLM, "VLLM_SERVER_DEV_MODE": "1"})
    code, refused = toggle_env.run_json("checkpointed", "--pid", str(server.pid), "--mode", "hybrid")
    assert code == ExitCode.REFUSED and "0.17" in refused["error"]
    assert all(toggle_env.state(pid) == "running" for pid in cuda_family(server))

    code, down = toggle_env.run_json("checkpointed", "--pid", str(server.pid))
    assert code == 0, down
    assert (down["quiesce"], down["mode"]) == ("sigstop", "plain")
    assert server.engine_core().status() == psutil.STATUS_STOPPED
    assert [d["pid"] for d in down["dispatchers"]] == [server.engine_core().pid]
    queued = Background(server, "sent while frozen", 6)
    time.sleep(0.3)
    assert queued.answer is None
    code, up = toggle_env.run_json("running", "--pid", str(server.pid))
    assert code == 0, up
    assert server.engine_core().status() != psutil.STATUS_STOPPED
    assert queued.wait()["finish_reason"] in ("length", "stop")


def test_old_vllm_at_tp1_is_refused_with_the_fix(toggle_env, standin_server):
    """At TP=1 EngineCore holds the model, so it cannot be frozen; without a scheduler pause the suspend is
    refused, nothing changes, and the message names the fix."""
    server = standin_server(*ARGS, tensor_parallel_size=1, env=OLD_VLLM)
    code, refused = toggle_env.run_json("checkpointed", "--pid", str(server.pid))
    assert code == ExitCode.REFUSED, refused
    assert "VLLM_SERVER_DEV_MODE=1" in refused["error"] and "tensor parallel size 1" in refused["error"]
    assert all(toggle_env.state(pid) == "running" for pid in cuda_family(server))
    assert complete(server, "still serving", 4)["finish_reason"] in ("length", "stop")


def test_a_suspend_that_frees_nothing_is_a_failure_and_is_undone(toggle_env, standin_server):
    """Every process reads checkpointed but a GPU kept the memory: exit MEMORY_KEPT, never ok; the server runs
    again and answers."""
    server = standin_server(*ARGS, env=DEV)
    fakegpu.add_fault(server.workers()[1].pid, "checkpoint", "keep-memory", root=toggle_env.state_dir)
    code, down = toggle_env.run_json("checkpointed", "--pid", str(server.pid))
    assert code == ExitCode.MEMORY_KEPT, down
    assert not down["ok"] and down["evidence"]["gpus"]["ok"] is False
    assert all(toggle_env.state(pid) == "running" for pid in cuda_family(server))
    assert server.get("/is_paused").json()["is_paused"] is False
    assert complete(server, "still serving", 4)["finish_reason"] in ("length", "stop")


def test_a_worker_that_died_while_suspended_fails_the_resume(toggle_env, standin_server):
    """`running` never says ok over a server whose worker died while it was suspended."""
    server = standin_server(*ARGS, env=DEV)
    assert toggle_env.run("checkpointed", "--pid", str(server.pid)).returncode == 0
    server.workers()[0].kill()
    time.sleep(0.5)
    code, up = toggle_env.run_json("running", "--pid", str(server.pid))
    assert code != 0 and not up["ok"], up


@pytest.mark.parametrize("pid", ["1", "-5", "0"])
def test_a_pid_that_is_no_vllm_server_is_refused(toggle_env, pid):
    """--pid 1 (every process on the host) and PIDs that are no process ID are refused with a clear error."""
    done = toggle_env.run("checkpointed", "--pid", pid)
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "Traceback" not in done.stderr and "--pid" in done.stderr
