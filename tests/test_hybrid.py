"""Hybrid suspend (vLLM sleep level 1, then checkpoint) against the stand-in's sleep mode."""

from __future__ import annotations

import json

import pytest
import requests

from entrypoint.base.errors import ExitCode
from tests.testing import JsonHandler, serving
from tests.toggle_fixtures import SAFE_ENV, fakegpu

ARGS = ("--disable-custom-all-reduce", "--gpu-memory-utilization", "0.02")


@pytest.fixture
def sleepy_server(toggle_env, standin_server):
    """A stand-in TP=2 vLLM with sleep mode and its dev endpoints (as the compose file starts vLLM)."""
    return standin_server(*ARGS, "--enable-sleep-mode", env={**SAFE_ENV, "VLLM_SERVER_DEV_MODE": "1"})


def sleeping(server) -> bool:
    return server.get("/is_sleeping").json()["is_sleeping"]


def greedy(server) -> str:
    body = {
        "model": "standin-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    return server.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def test_auto_mode_sleeps_first_and_wakes_up_after(toggle_env, sleepy_server):
    """With sleep mode, a suspend sleeps vLLM then checkpoints; the resume wakes it: same answer, 0 MiB."""
    reference = greedy(sleepy_server)
    code, down = toggle_env.run_json("checkpointed", "--pid", str(sleepy_server.pid))
    assert code == 0, down
    assert down["mode"] == "hybrid" and "sleep" in down["phases"]
    assert set(toggle_env.used_mib().values()) == {4}
    code, up = toggle_env.run_json("running", "--pid", str(sleepy_server.pid))
    assert code == 0, up
    assert up["mode"] == "hybrid" and "wake_up" in up["phases"]
    assert not sleeping(sleepy_server)
    assert greedy(sleepy_server) == reference


def test_plain_mode_and_servers_without_sleep_mode(toggle_env, sleepy_server, standin_server):
    """--mode plain never sleeps; auto on a server without sleep mode is plain; --mode hybrid there refuses."""
    code, down = toggle_env.run_json("checkpointed", "--pid", str(sleepy_server.pid), "--mode", "plain")
    assert code == 0 and down["mode"] == "plain" and "sleep" not in down["phases"]
    assert toggle_env.run("running", "--pid", str(sleepy_server.pid)).returncode == 0

    plain = standin_server(*ARGS, env=SAFE_ENV)
    code, down = toggle_env.run_json("checkpointed", "--pid", str(plain.pid))
    assert code == 0 and down["mode"] == "plain"
    assert toggle_env.run("running", "--pid", str(plain.pid)).returncode == 0
    code, down = toggle_env.run_json("checkpointed", "--pid", str(plain.pid), "--mode", "hybrid")
    assert code == ExitCode.REFUSED and "--enable-sleep-mode" in down["error"]


class RefusesToSleep(JsonHandler):
    """vLLM 0.20.2's control endpoints in front of a stand-in, except that /sleep fails; the API goes through
    to the stand-in (`upstream`, set by the test)."""

    upstream = ""
    paused = False

    def do_GET(self):  # noqa: N802
        if self.path == "/version":
            self.send_json(200, {"version": "0.20.2"})
        elif self.path in ("/is_paused", "/is_sleeping"):
            self.send_json(200, {self.path[1:]: RefusesToSleep.paused})
        else:
            upstream = requests.get(self.upstream + self.path, timeout=30)
            self.send_json(upstream.status_code, upstream.json())

    def do_POST(self):  # noqa: N802
        if self.path.startswith("/sleep"):
            self.send_json(500, {"error": "sleep failed"})
        elif self.path.startswith(("/pause", "/resume")):
            RefusesToSleep.paused = self.path.startswith("/pause")
            self.send_json(200, {"status": "ok"})
        else:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            upstream = requests.post(self.upstream + self.path, json=body, timeout=30)
            self.send_json(upstream.status_code, upstream.json())


def test_failed_sleep_falls_back_to_plain(toggle_env, sleepy_server):
    """If /sleep fails, the suspend goes on as a plain one (vLLM's scheduler paused instead) and says so."""
    RefusesToSleep.upstream = sleepy_server.url
    with serving(RefusesToSleep) as url:
        code, down = toggle_env.run_json(
            "checkpointed", "--pid", str(sleepy_server.pid), env={"CUDA_TOGGLE_SERVER_URL": url}
        )
        assert code == 0 and (down["mode"], down["quiesce"]) == ("plain", "scheduler"), down
        assert any("sleep failed" in note for note in down["notes"]) and RefusesToSleep.paused
        assert set(toggle_env.used_mib().values()) == {4}
        assert (
            toggle_env.run("running", "--pid", str(sleepy_server.pid), env={"CUDA_TOGGLE_SERVER_URL": url}).returncode
            == 0
        )


def test_checkpoint_failure_after_sleep_rolls_back_and_wakes_up(toggle_env, sleepy_server):
    """A checkpoint that fails after the sleep restores everything and wakes vLLM up again."""
    reference = greedy(sleepy_server)
    fakegpu.add_fault(sleepy_server.workers()[1].pid, "checkpoint", "error", root=toggle_env.state_dir)
    code, down = toggle_env.run_json("checkpointed", "--pid", str(sleepy_server.pid))
    assert code == ExitCode.TRANSITION_FAILED
    assert down["mode"] == "hybrid" and "wake_up" in down["phases"]
    assert not sleeping(sleepy_server)
    assert greedy(sleepy_server) == reference


def test_running_wakes_a_server_left_asleep(toggle_env, sleepy_server):
    """`running` repairs a server left asleep (a tool killed between the sleep and the checkpoint)."""
    assert requests.post(f"{sleepy_server.url}/sleep?level=1", timeout=10).status_code == 200
    assert sleeping(sleepy_server)
    code, up = toggle_env.run_json("running", "--pid", str(sleepy_server.pid))
    assert code == 0 and up["mode"] == "hybrid" and "wake_up" in up["phases"]
    assert not sleeping(sleepy_server)
