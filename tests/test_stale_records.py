"""Records that outlive their server, and callers that meet: a server that dies while suspended (the whole
tree, or one process of it), a suspend record of an instance that is gone, a wrong server URL at a suspend,
and two callers of `cuda-toggle-all` at once. On the fake GPU with the stand-in vLLM, through the real CLI
and the real gate; the fault matrix under supervisord is in test_fault_matrix.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from entrypoint.base.errors import ExitCode
from entrypoint.suspend.records import ToolLock
from tests.test_faults import SERVER_ARGS, Rig, assert_running_gets_there
from tests.test_gate import gate, run_dir  # noqa: F401 (fixtures used here)
from tests.test_swap import swapped  # noqa: F401 (a fixture used here)
from tests.testing import fakegpu, free_port, wait_until
from tests.toggle_fixtures import SAFE_ENV


def start_rig(toggle_env, standin_server, quiesce: str = "scheduler", tp: int = 2) -> Rig:
    server = standin_server(
        *SERVER_ARGS,
        "--enable-sleep-mode",
        tensor_parallel_size=tp,
        env={**SAFE_ENV, "VLLM_SERVER_DEV_MODE": "1"},
    )
    return Rig(toggle_env, server, quiesce)


def records(rig: Rig) -> list[Path]:
    return sorted((rig.env.run_dir / "servers").glob("*.json"))


def kill_tree(rig: Rig) -> None:
    """SIGKILL every process of the server at once (a crash), and reap them."""
    rig.server.kill_tree()


def stopped_members(pids: list[int]) -> list[int]:
    stopped = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                stopped.append(pid)
        except psutil.NoSuchProcess:
            pass
    return stopped


@pytest.mark.parametrize("tp", [1, 2])
def test_running_removes_the_record_of_a_server_that_died_while_suspended(toggle_env, standin_server, tp):
    """The server died while suspended and a new one runs: `running` acts on the new one, removes the dead
    instance's record and says so (it used to leave the record, which kept the gate answering 503)."""
    old = start_rig(toggle_env, standin_server, tp=tp)
    code, result, err = old.run("checkpointed")
    assert code == 0, (result["error"], err)
    assert len(records(old)) == 1
    kill_tree(old)
    new = start_rig(toggle_env, standin_server, tp=tp)
    code, result, err = new.run("running")
    assert code == 0, (result["error"], err)
    assert records(new) == [], "the dead instance's record outlived it"
    assert any(f"PID {old.server.pid}" in note and "gone" in note for note in result["notes"]), result["notes"]
    assert "that server is gone" in err
    assert new.answer()


def test_whole_tree_died_while_suspended_is_named_and_its_record_removed(toggle_env, standin_server):
    """The whole tree died while suspended: `running --pid` of it says the server died while suspended (not
    "check the PID given with --pid"), names the fix, and removes the record."""
    rig = start_rig(toggle_env, standin_server)
    code, result, err = rig.run("checkpointed")
    assert code == 0, (result["error"], err)
    kill_tree(rig)
    code, result, err = rig.run("running")
    assert code == ExitCode.SERVER_NOT_FOUND, (result, err)
    assert "died while suspended" in result["error"] and "supervisord" in result["error"], result["error"]
    assert "--pid" not in result["error"], result["error"]
    assert records(rig) == []


def test_worker_killed_while_suspended_on_the_sigstop_path_leaves_nothing_stopped(toggle_env, standin_server):
    """A worker killed while suspended with EngineCore frozen: `running` fails honestly (exit 7, naming what
    died and that supervisord restarts the program) and continues EngineCore, so vLLM sees the death and
    exits instead of holding every request for good."""
    rig = start_rig(toggle_env, standin_server, quiesce="sigstop")
    code, result, err = rig.run("checkpointed")
    assert code == 0, (result["error"], err)
    engine, dead = rig.engine, rig.workers[1]
    assert stopped_members([engine]) == [engine]
    os.kill(dead, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(dead) or psutil.Process(dead).status() == "zombie", "the worker dead")
    code, result, err = rig.run("running")
    assert code == ExitCode.INCONSISTENT, (result, err)
    assert f"PID {dead}" in result["error"] and "supervisord restarts" in result["error"], result["error"]
    assert stopped_members([engine]) == [], "EngineCore left stopped"
    # vLLM (the stand-in) sees its dead worker and exits: supervisord would restart it
    wait_until(lambda: rig.server.process.poll() is not None, "the server to exit", timeout=30)
    code, result, err = rig.run("running")
    assert code == ExitCode.SERVER_NOT_FOUND and "died while suspended" in result["error"], (result, err)
    assert records(rig) == []


def test_worker_killed_during_the_lock_is_not_reported_as_rolled_back(toggle_env, standin_server):
    """A worker killed while the suspend locks: the rollback says the worker died and the instance cannot
    serve (exit 7), never "every process is running again"; the next `running` does not say ok either."""
    rig = start_rig(toggle_env, standin_server, quiesce="sigstop")
    survivor, victim = rig.workers
    engine = rig.engine
    rig.fault(survivor, "lock", "slow:3")
    tool = rig.start("checkpointed")
    wait_until(lambda: survivor in rig.started_calls("lock"), "the slow lock to start", timeout=30)
    os.kill(victim, signal.SIGKILL)
    out, err = tool.communicate(timeout=90)
    result = json.loads(out)
    assert tool.returncode == ExitCode.INCONSISTENT, (result["error"], err)
    assert f"PID {victim}" in result["error"] and "died" in result["error"], result["error"]
    assert "every process is running again" not in result["error"]
    assert records(rig) == [] and stopped_members([engine]) == []
    code, result, err = rig.run("running")
    assert code != 0, result


def test_wrong_server_url_at_suspend_warns_and_the_right_url_resumes(toggle_env, standin_server):
    """A CUDA_TOGGLE_SERVER_URL where nothing answers: the suspend warns loudly that it falls back to SIGSTOP
    and a plain checkpoint; a `running` given the right address (here: the server's own --port) uses it, not
    the record's dead one, and proves the server serves."""
    rig = start_rig(toggle_env, standin_server, quiesce="auto")
    wrong = f"http://127.0.0.1:{free_port()}"
    code, result, err = rig.run("checkpointed", {"CUDA_TOGGLE_SERVER_URL": wrong})
    assert code == 0, (result["error"], err)
    assert result["quiesce"] == "sigstop"
    assert any(wrong in note and "CUDA_TOGGLE_SERVER_URL" in note for note in result["notes"]), result["notes"]
    assert f"no HTTP server answers at {wrong}" in err
    code, result, err = rig.run("running")
    assert code == 0, (result["error"], err)
    assert any(wrong in note for note in result["notes"]), result["notes"]
    assert_running_gets_there(rig)


def hold_lock(folder: Path, purpose: str, release: threading.Event) -> threading.Thread:
    """Another caller: holds the tool's lock for `purpose` (as move_to names it) until `release` is set (at most
    120 s): held for as long as the test needs, however slowly the caller under test starts."""
    taken = threading.Event()

    def hold() -> None:
        with ToolLock(str(folder), 0, purpose):
            taken.set()
            release.wait(120)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(10)
    return thread


def test_second_caller_for_the_same_target_waits_and_proves_it(toggle_env, standin_server):
    """Another caller is reaching `running` (the gate's resume, say) for longer than CUDA_TOGGLE_BUSY_WAIT_S:
    `running` waits for it, then proves the state and exits 0 (it used to exit 8)."""
    rig = start_rig(toggle_env, standin_server)
    release = threading.Event()
    holder = hold_lock(rig.env.run_dir, "cuda-toggle-all running", release)
    tool = rig.start("running", {"CUDA_TOGGLE_BUSY_WAIT_S": "0.2"})
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(tool.stderr), daemon=True)
    reader.start()
    wait_until(lambda: any("reaching the same state" in line for line in err_lines), "the caller to wait", 60)
    time.sleep(1.0)  # five times CUDA_TOGGLE_BUSY_WAIT_S: a caller for the other state would have given up
    assert tool.poll() is None, "".join(err_lines)  # still waiting for the holder
    release.set()
    holder.join()
    out = tool.stdout.read()
    code = tool.wait(timeout=60)
    reader.join(10)
    result = json.loads(out)
    assert code == 0, (result["error"], "".join(err_lines))
    assert result["evidence"]["probe"]["ok"]


def test_second_caller_for_the_other_target_is_busy(toggle_env, standin_server):
    """Another caller is suspending: `running` waits only CUDA_TOGGLE_BUSY_WAIT_S, then exits 8 naming it;
    and a same-target caller waits no longer than CUDA_TOGGLE_CONVERGE_WAIT_S."""
    rig = start_rig(toggle_env, standin_server)
    release = threading.Event()
    holder = hold_lock(rig.env.run_dir, "cuda-toggle-all checkpointed", release)
    code, result, err = rig.run("running", {"CUDA_TOGGLE_BUSY_WAIT_S": "0"})
    assert code == ExitCode.BUSY and "cuda-toggle-all checkpointed" in result["error"], (result, err)
    release.set()
    holder.join()
    release = threading.Event()
    holder = hold_lock(rig.env.run_dir, "cuda-toggle-all running", release)
    code, result, err = rig.run("running", {"CUDA_TOGGLE_BUSY_WAIT_S": "0", "CUDA_TOGGLE_CONVERGE_WAIT_S": "0.2"})
    assert code == ExitCode.BUSY, (result, err)
    release.set()
    holder.join()


# --- the gate ---------------------------------------------------------------------------------------------


def dead_instance() -> tuple[int, float]:
    """The PID and create time of a process that has ended (a server instance that is gone)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    create_time = psutil.Process(process.pid).create_time()
    process.wait()
    return process.pid, create_time


def write_record(folder: Path, root_pid: int, root_create_time: float, server_url: str = "") -> Path:
    record = {
        "root_pid": root_pid,
        "root_create_time": root_create_time,
        "backend": "cli",
        "started_at": time.time(),
        "frozen": [],
        "cuda": [{"pid": root_pid, "create_time": root_create_time, "title": "VLLM::EngineCore"}],
        "gpus": [],
        "complete": True,
        "mode": "hybrid",
        "quiesce": "scheduler",
        "server_url": server_url,
    }
    path = folder / "servers" / f"{root_pid}-{root_create_time:.2f}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def test_gate_serves_the_server_there_now_and_removes_a_dead_instances_record(run_dir, standin_server, gate):  # noqa: F811
    """A record left by a server instance that died while suspended (supervisord restarted it): the gate
    removes it, says so, and serves the server there now (it used to answer 503 for good)."""
    server = standin_server(*SERVER_ARGS, env={**SAFE_ENV, "VLLM_SERVER_DEV_MODE": "1"})
    pid, create_time = dead_instance()
    path = write_record(run_dir, pid, create_time, server.url)
    front = gate(server)
    body = {"model": "standin-model", "prompt": "hi", "max_tokens": 3, "temperature": 0}
    response = requests.post(front.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert not path.exists()
    assert f"suspended as PID {pid}" in front.log() and "is gone" in front.log()
    assert front.status()["state"] == "running"


# --- GATE_MODELS: a swap checks its target first ----------------------------------------------------------


def alpha_holds_the_gpu(fleet) -> bool:
    return all(fakegpu.read_state(pid, fleet.fake_gpu) == "running" for pid in fleet.cuda_pids("alpha"))


@pytest.mark.parametrize("death", ["tree", "engine-of-a-live-root"])
def test_a_request_for_a_dead_suspended_model_never_evicts_the_resident_one(swapped, death):  # noqa: F811
    """beta died while suspended (its whole tree; or its EngineCore, its API server still there): a request
    for beta gets an error, and alpha, resident and healthy, is not suspended for it (it used to be, leaving
    nothing resident)."""
    fleet = swapped()
    wait_until(lambda: fleet.model_status("beta")["state"] == "suspended", "beta suspended at start-up", 20)
    beta = fleet.servers["beta"]
    if death == "tree":
        beta.kill_tree()
    else:
        api = psutil.Process(beta.pid)
        engine = beta.engine_core()
        api.suspend()  # keeps the API server from exiting when its engine dies: the record's root lives
        engine.kill()
        wait_until(lambda: not psutil.pid_exists(engine.pid) or engine.status() == "zombie", "EngineCore dead")
    response = fleet.ask("beta", "anyone there")
    assert response.status_code in (502, 503), response.text
    assert alpha_holds_the_gpu(fleet), "alpha was evicted for a model that cannot come back"
    assert fleet.text("alpha", "still here") and fleet.model_status("alpha")["swaps"] == 0
    if death != "tree":
        assert "cannot come back, nothing was suspended for it" in fleet.gate.log()
