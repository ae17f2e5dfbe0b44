"""cuda-toggle-all against real process trees and the fake GPU (tests/fakes/README.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from entrypoint.base.config import SETTINGS
from entrypoint.base.errors import TOGGLE_EXIT_CODES, ExitCode
from entrypoint.suspend.records import ToolLock
from tests.toggle_fixtures import REPO, SAFE_ENV, fakegpu, kill_hung_fakes, sleep_until


def ops(env, *names: str) -> list[tuple[str, int]]:
    """The fake's logged calls of the given operations, in order, as (op, pid)."""
    return [(op, pid) for _, op, pid, _ in env.calls() if op in names]


def assert_all(env, pids, state):
    assert {pid: env.state(pid) for pid in pids} == {pid: state for pid in pids}


# --- the protocol ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cli", "driver"])
def test_suspend_and_resume_move_every_cuda_process(toggle_env, fake_tree, backend):
    """Suspend checkpoints every CUDA process and frees the GPUs; resume brings all back; both backends."""
    tree = fake_tree()
    code, result = toggle_env.run_json("checkpointed", "--backend", backend)
    assert code == 0, result
    assert result["ok"] and result["backend"] == backend and result["root_pid"] == tree.root
    assert sorted(p["pid"] for p in result["pids"]) == tree.cuda_pids
    assert all(p["before"] == "running" and p["after"] == "checkpointed" for p in result["pids"])
    assert_all(toggle_env, tree.cuda_pids, "checkpointed")
    assert set(toggle_env.used_mib().values()) == {4}  # the idle baseline: the workers' memory is gone
    assert tree.status_letter(tree.dispatcher) == "T", "the dispatcher must stay frozen while suspended"

    code, result = toggle_env.run_json("running", "--backend", backend)
    assert code == 0, result
    assert all(p["before"] == "checkpointed" and p["after"] == "running" for p in result["pids"])
    assert_all(toggle_env, tree.cuda_pids, "running")
    assert set(toggle_env.used_mib().values()) == {1004}
    assert tree.status_letter(tree.dispatcher) != "T"
    assert not (toggle_env.state_dir / "cuinit").exists(), "the driver backend must never call cuInit"


def test_lock_all_before_checkpoint_and_restore_all_before_unlock(toggle_env, fake_tree):
    """Every PID is locked before any is checkpointed, and every PID restored before any is unlocked."""
    tree = fake_tree(workers=3)
    assert toggle_env.run("suspend").returncode == 0
    assert toggle_env.run("resume").returncode == 0
    sequence = [op for op, _ in ops(toggle_env, "lock", "checkpoint", "restore", "unlock")]
    n = len(tree.cuda_pids)
    assert sequence == ["lock"] * n + ["checkpoint"] * n + ["restore"] * n + ["unlock"] * n


def test_pids_move_in_parallel(toggle_env, fake_tree):
    """Checkpoints of all workers overlap in time: 3 workers of 2 s each could not have run one after the
    other, which would space their ends by 2 s each (a bound that a loaded machine only widens)."""
    workers, transfer_s = 3, 2.0
    tree = fake_tree(workers=workers, mib=2000)
    (toggle_env.state_dir / "speed_mib_per_s").write_text("1000")
    code, result = toggle_env.run_json("checkpointed")
    assert code == 0
    calls = fakegpu.read_calls(toggle_env.state_dir)
    ends = [stamp for stamp, op, pid, _ in calls if op == "checkpoint" and pid in tree.workers]
    assert len(ends) == workers
    assert (max(ends) - min(ends)) / 1e9 < (workers - 1) * transfer_s, result["phases"]
    assert result["phases"]["checkpoint"] > transfer_s * 0.9
    toggle_env.run("running")


def test_frozen_dispatcher_is_never_asked_or_locked(toggle_env, fake_tree):
    """The dispatcher is frozen before the locks and left out of every CUDA call while it is stopped."""
    tree = fake_tree()
    assert toggle_env.run("checkpointed").returncode == 0
    assert toggle_env.run("status").returncode == 0
    assert toggle_env.run("running").returncode == 0
    dispatcher_calls = [op for _, op, pid, _ in toggle_env.calls() if pid == tree.dispatcher]
    # asked once, before it was frozen (the suspend's first look); never locked, never while stopped
    assert dispatcher_calls == ["get-state"], dispatcher_calls


def test_idempotent_in_both_directions(toggle_env, fake_tree):
    """A second suspend or resume changes nothing (the seed's blind --toggle would flip them back)."""
    tree = fake_tree()
    toggle_env.run("checkpointed")
    before = len(ops(toggle_env, "lock", "checkpoint"))
    code, result = toggle_env.run_json("checkpointed")
    assert code == 0 and "already checkpointed" in " ".join(result["notes"])
    assert len(ops(toggle_env, "lock", "checkpoint")) == before
    assert_all(toggle_env, tree.cuda_pids, "checkpointed")
    toggle_env.run("running")
    code, result = toggle_env.run_json("running")
    assert code == 0 and result["notes"][0] == "every CUDA process was running already"
    assert "--toggle" not in (toggle_env.state_dir / "argv.log").read_text()


def test_partial_state_at_start_is_completed(toggle_env, fake_tree):
    """A server left half-suspended (one worker checkpointed, one locked) is finished in either direction."""
    tree = fake_tree()
    checkpoint = str(REPO / "tests" / "fakes" / "cuda-checkpoint")
    w0, w1 = tree.workers
    subprocess.run([checkpoint, "--toggle", "--pid", str(w0)], check=True)
    subprocess.run([checkpoint, "--action", "lock", "--pid", str(w1)], check=True)
    code, result = toggle_env.run_json("checkpointed")
    assert code == 0, result
    assert {p["pid"]: p["before"] for p in result["pids"]}[w0] == "checkpointed"
    assert_all(toggle_env, tree.cuda_pids, "checkpointed")

    subprocess.run([checkpoint, "--action", "restore", "--pid", str(w0)], check=True)  # w0 locked now
    code, result = toggle_env.run_json("running")
    assert code == 0, result
    assert_all(toggle_env, tree.cuda_pids, "running")


# --- never brick the server --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env_change, args, expected",
    [
        ({"NCCL_P2P_DISABLE": None}, None, "NCCL_P2P_DISABLE=1"),
        ({"NCCL_SHM_DISABLE": "0"}, None, "NCCL_SHM_DISABLE=1"),
        ({"VLLM_ALLREDUCE_USE_SYMM_MEM": None}, None, "VLLM_ALLREDUCE_USE_SYMM_MEM"),
        ({}, "--tensor-parallel-size 2", "--disable-custom-all-reduce"),
    ],
    ids=["no-p2p-disable", "shm-on", "symm-mem-default", "custom-all-reduce-on"],
)
def test_refuses_settings_that_cannot_restore(toggle_env, fake_tree, env_change, args, expected):
    """A server started without the settings TP=2 restore needs is refused, and nothing is touched."""
    env = {k: v for k, v in {**SAFE_ENV, **env_change}.items() if v is not None}
    tree = fake_tree(env=env, args=args or "--tensor-parallel-size 2 --disable-custom-all-reduce")
    code, result = toggle_env.run_json("checkpointed")
    assert code == ExitCode.REFUSED
    assert expected in result["error"] and "nothing changed" in result["error"]
    assert ops(toggle_env, "lock", "checkpoint") == []
    assert_all(toggle_env, tree.cuda_pids, "running")
    assert tree.status_letter(tree.dispatcher) != "T"


def test_single_worker_needs_no_nccl_settings(toggle_env, fake_tree):
    """One GPU worker has no NCCL peer: the NCCL and all-reduce checks do not apply."""
    tree = fake_tree(workers=1, env={}, args="")
    assert toggle_env.run("checkpointed").returncode == 0
    assert_all(toggle_env, tree.cuda_pids, "checkpointed")
    assert toggle_env.run("running").returncode == 0


def test_refuses_when_host_ram_cannot_hold_the_gpu_memory(toggle_env, fake_tree):
    """GPU memory larger than the host's available RAM is refused; --force goes on and says so loudly."""
    tree = fake_tree(mib=64 * 2**20)  # 64 TiB per worker: no test machine has that much RAM
    gpus = [(i, u, 2**27, b) for i, u, _, b in fakegpu.read_gpus(toggle_env.state_dir)]
    fakegpu.write_gpus(toggle_env.state_dir, gpus)
    code, result = toggle_env.run_json("checkpointed")
    assert code == ExitCode.REFUSED and "host RAM" in result["error"]
    assert_all(toggle_env, tree.cuda_pids, "running")
    done = toggle_env.run("checkpointed", "--force")
    assert done.returncode == 0, done.stderr
    assert "--force: going on despite: host RAM" in done.stderr
    toggle_env.run("running", "--force")


def test_refuses_without_a_dispatcher_to_freeze(toggle_env, fake_tree):
    """With no process titled like the dispatcher, suspend refuses and names the setting; --no-freeze goes on."""
    tree = fake_tree()
    code, result = toggle_env.run_json("checkpointed", env={"CUDA_TOGGLE_DISPATCHER": "NoSuchTitle"})
    assert code == ExitCode.REFUSED and "CUDA_TOGGLE_DISPATCHER" in result["error"]
    assert "nothing can hold the requests" in result["error"]
    code, result = toggle_env.run_json("checkpointed", "--no-freeze")
    assert code == 0, result
    assert tree.status_letter(tree.dispatcher) != "T"
    assert toggle_env.state(tree.dispatcher) == "checkpointed"  # without freezing it is moved like the others
    assert toggle_env.run("running").returncode == 0
    assert toggle_env.state(tree.dispatcher) == "running"


def test_lock_round_is_retried_when_one_pid_times_out(toggle_env, fake_tree):
    """A lock that times out (a collective waiting on a locked peer) unlocks the others and tries again."""
    tree = fake_tree()
    fakegpu.add_fault(tree.workers[1], "lock", "timeout", "timeout", root=toggle_env.state_dir)
    code, result = toggle_env.run_json("checkpointed")
    assert code == 0, result
    assert result["lock_rounds"] == 3
    unlocks = [pid for op, pid in ops(toggle_env, "unlock")]
    assert tree.workers[0] in unlocks, "the locked peer must be unlocked between rounds"
    assert_all(toggle_env, tree.cuda_pids, "checkpointed")
    toggle_env.run("running")


def test_lock_deadline_rolls_back_to_running(toggle_env, fake_tree):
    """Locks that keep failing until the deadline leave every PID running and the dispatcher continued."""
    tree = fake_tree()
    fakegpu.add_fault(tree.workers[1], "lock", *["timeout"] * 50, root=toggle_env.state_dir)
    code, result = toggle_env.run_json("checkpointed", env={"CUDA_TOGGLE_LOCK_DEADLINE_S": "1"})
    assert code == ExitCode.TRANSITION_FAILED
    assert "CUDA_TOGGLE_LOCK_DEADLINE_S" in result["error"]
    assert_all(toggle_env, tree.cuda_pids, "running")
    assert tree.status_letter(tree.dispatcher) != "T"
    assert not list((toggle_env.run_dir / "servers").glob("*.json")), "a rolled-back suspend leaves no record"


def test_checkpoint_failure_restores_the_others(toggle_env, fake_tree):
    """A checkpoint that fails on one PID restores and unlocks the ones already checkpointed."""
    tree = fake_tree()
    fakegpu.add_fault(tree.workers[1], "checkpoint", "error", root=toggle_env.state_dir)
    code, result = toggle_env.run_json("checkpointed")
    assert code == ExitCode.TRANSITION_FAILED
    assert "checkpoint failed" in result["error"]
    assert ("restore", tree.workers[0]) in ops(toggle_env, "restore")
    assert_all(toggle_env, tree.cuda_pids, "running")
    assert tree.status_letter(tree.dispatcher) != "T"


def test_checkpoint_that_leaves_a_failed_state_is_reported_inconsistent(toggle_env, fake_tree):
    """A PID stuck in `failed` cannot be rolled back: exit INCONSISTENT, and the dispatcher stays frozen
    (nothing may send work to a process that is not running; the server needs a restart)."""
    tree = fake_tree()
    fakegpu.add_fault(tree.workers[1], "checkpoint", "fail-state", root=toggle_env.state_dir)
    code, result = toggle_env.run_json("checkpointed")
    assert code == ExitCode.INCONSISTENT
    assert "restart the server" in result["error"]
    assert toggle_env.state(tree.workers[1]) == "failed"
    assert toggle_env.state(tree.workers[0]) == "running"
    assert tree.status_letter(tree.dispatcher) == "T"


def test_failed_restore_keeps_the_server_consistently_suspended(toggle_env, fake_tree):
    """A restore error re-checkpoints the restored PIDs and keeps the dispatcher frozen; a retry works."""
    tree = fake_tree()
    assert toggle_env.run("checkpointed").returncode == 0
    fakegpu.add_fault(tree.workers[1], "restore", "error", root=toggle_env.state_dir)
    code, result = toggle_env.run_json("running")
    assert code == ExitCode.TRANSITION_FAILED
    assert "still suspended" in result["error"]
    assert_all(toggle_env, tree.cuda_pids, "checkpointed")
    assert tree.status_letter(tree.dispatcher) == "T"
    assert toggle_env.run("running").returncode == 0
    assert_all(toggle_env, tree.cuda_pids, "running")
    assert tree.status_letter(tree.dispatcher) != "T"


def test_restore_refused_when_a_gpu_lacks_the_memory(toggle_env, fake_tree):
    """If another process took a GPU's memory while suspended, resume refuses and names the GPU and MiB."""
    tree = fake_tree(mib=8000)
    assert toggle_env.run("checkpointed").returncode == 0
    gpus = fakegpu.read_gpus(toggle_env.state_dir)
    index, uuid, total, _ = gpus[1]
    gpus[1] = (index, uuid, total, total - 3000)  # someone else now uses all but 3000 MiB of GPU 1
    fakegpu.write_gpus(toggle_env.state_dir, gpus)
    code, result = toggle_env.run_json("running")
    assert code == ExitCode.REFUSED
    assert "GPU 1 has 3000 MiB free but the restore needs 8000 MiB" in result["error"]
    assert ops(toggle_env, "restore") == []
    assert_all(toggle_env, tree.cuda_pids, "checkpointed")
    assert tree.status_letter(tree.dispatcher) == "T", "a refused resume keeps the server safely suspended"
    gpus[1] = (index, uuid, total, 4)
    fakegpu.write_gpus(toggle_env.state_dir, gpus)
    assert toggle_env.run("running").returncode == 0


def test_stopped_process_is_skipped_and_said(toggle_env, fake_tree):
    """A stopped CUDA process is never asked or locked (that hangs on real GPUs): skipped and reported."""
    tree = fake_tree()
    os.kill(tree.root, signal.SIGSTOP)
    try:
        code, result = toggle_env.run_json("checkpointed")
        assert code == 0, result
        assert tree.root in [s["pid"] for s in result["skipped"]]
        assert tree.root not in [pid for _, _, pid, _ in toggle_env.calls()]
        assert toggle_env.state(tree.root) == "running"
        assert_all(toggle_env, tree.workers, "checkpointed")
        assert toggle_env.run("running").returncode == 0
    finally:
        os.kill(tree.root, signal.SIGCONT)


def started_calls(env, op: str) -> list[int]:
    """PIDs the fake cuda-checkpoint was started on for `op` (argv.log is written when a call starts)."""
    try:
        lines = (env.state_dir / "argv.log").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [int(line.split("--pid ")[1].split()[0]) for line in lines if f"--action {op} " in line]


def kill_mid_checkpoint(env, tree, fault: str, backend: str = "cli") -> None:
    """Start a suspend, kill -9 it while worker 1's checkpoint (told `fault`) runs."""
    fakegpu.add_fault(tree.workers[1], "checkpoint", fault, root=env.state_dir)
    tool = env.start("checkpointed", "--backend", backend, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sleep_until(lambda: tree.workers[1] in started_calls(env, "checkpoint"), "the checkpoint to start", timeout=30)
    tool.kill()
    tool.wait()


@pytest.mark.parametrize("backend", ["cli", "driver"])
def test_killed_tools_checkpoint_lands_and_running_waits_for_it(toggle_env, fake_tree, backend):
    """A checkpoint left running by a killed suspend lands later: `running` waits for it, then resumes all."""
    tree = fake_tree()
    kill_mid_checkpoint(toggle_env, tree, "slow:1.5", backend)
    assert tree.status_letter(tree.dispatcher) == "T"
    assert toggle_env.state(tree.workers[1]) == "locked", "the orphaned checkpoint has not landed yet"
    code, result = toggle_env.run_json("running")
    assert code == 0, result
    assert any(f"checkpoint of PID {tree.workers[1]}" in note for note in result["notes"]), result["notes"]
    landed = [i for i, (op, pid) in enumerate(ops(toggle_env, "checkpoint", "restore")) if pid == tree.workers[1]]
    assert [ops(toggle_env, "checkpoint", "restore")[i][0] for i in landed][-2:] == ["checkpoint", "restore"]
    assert_all(toggle_env, tree.cuda_pids, "running")
    assert tree.status_letter(tree.dispatcher) != "T"


def test_hung_orphan_stops_running_until_it_ends(toggle_env, fake_tree):
    """An orphaned call that never ends: `running` touches nothing and exits INCONSISTENT naming the PID;
    once that call is gone, `running` repairs the server."""
    tree = fake_tree()
    kill_mid_checkpoint(toggle_env, tree, "hang")
    code, result = toggle_env.run_json("running", env={"CUDA_TOGGLE_OP_TIMEOUT_S": "1"})
    assert code == ExitCode.INCONSISTENT, result
    assert f"PID {tree.workers[1]}" in result["error"] and "CUDA_TOGGLE_OP_TIMEOUT_S" in result["error"]
    assert tree.status_letter(tree.dispatcher) == "T", "nothing may send work while a call may still land"
    kill_hung_fakes(toggle_env.state_dir)
    code, result = toggle_env.run_json("running")
    assert code == 0, result
    assert_all(toggle_env, tree.cuda_pids, "running")
    assert tree.status_letter(tree.dispatcher) != "T"


def test_call_that_does_not_return_is_never_rolled_back(toggle_env, fake_tree):
    """A restore past CUDA_TOGGLE_OP_TIMEOUT_S is in flight: its PID is not acted on again, the run ends
    INCONSISTENT (never "rolled back"), and the next run waits for it to land, then finishes."""
    tree = fake_tree()
    assert toggle_env.run("checkpointed").returncode == 0
    w0, w1 = tree.workers
    fakegpu.add_fault(w1, "restore", "slow:4", root=toggle_env.state_dir)
    timeouts = {"CUDA_TOGGLE_OP_TIMEOUT_S": "1", "CUDA_TOGGLE_STATE_TIMEOUT_S": "1"}
    before = len(ops(toggle_env, "restore", "unlock", "checkpoint"))
    code, result = toggle_env.run_json("running", env=timeouts)
    assert code == ExitCode.INCONSISTENT, result
    assert result["in_flight"] == [w1] and "nothing was rolled back" in result["error"]
    assert [op for op, pid in ops(toggle_env, "restore", "unlock", "checkpoint")[before:] if pid == w1] == []
    code, result = toggle_env.run_json("running")
    assert code == 0, result
    assert any(f"restore of PID {w1}" in note for note in result["notes"]), result["notes"]
    later = ops(toggle_env, "restore", "unlock", "checkpoint")[before:]
    assert [op for op, pid in later if pid == w1] == ["restore", "unlock"]
    assert_all(toggle_env, tree.cuda_pids, "running")


def test_freeze_that_does_not_take_effect_is_undone():
    """A SIGSTOP that has not taken effect in time is cancelled with SIGCONT before the error is raised,
    and the message says so (nothing claims a rollback that did not happen)."""
    from entrypoint.base.errors import ToolError
    from entrypoint.base.processes import describe
    from entrypoint.suspend.executor import freeze

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(ToolError) as failure:
            freeze(describe(sleeper.pid), wait_s=0)
        assert "SIGCONT sent" in failure.value.message and "rolled back" not in failure.value.message
        sleep_until(lambda: fakegpu.process_status(sleeper.pid) not in ("T", "t"), "the process to run again")
        time.sleep(0.1)
        assert fakegpu.process_status(sleeper.pid) not in ("T", "t"), "the stop must not land later"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_running_continues_a_frozen_dispatcher_even_when_cuda_runs(toggle_env, fake_tree):
    """A dispatcher left stopped with every worker running is continued by `running` (repair)."""
    tree = fake_tree()
    os.kill(tree.dispatcher, signal.SIGSTOP)
    sleep_until(lambda: tree.status_letter(tree.dispatcher) == "T", "the stop")
    code, result = toggle_env.run_json("running")
    assert code == 0 and any("continued the frozen dispatcher" in note for note in result["notes"])
    sleep_until(lambda: tree.status_letter(tree.dispatcher) != "T", "the continue")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_suspend_rolls_back(toggle_env, fake_tree, signum):
    """Ctrl-C or SIGTERM during a suspend finishes the phase, then rolls back: nothing is left split."""
    tree = fake_tree()
    fakegpu.add_fault(tree.workers[1], "checkpoint", "slow:1.5", root=toggle_env.state_dir)
    tool = toggle_env.start("checkpointed", "--json")
    sleep_until(lambda: ("checkpoint", tree.workers[0]) in ops(toggle_env, "checkpoint"), "a checkpoint")
    tool.send_signal(signum)
    out, err = tool.communicate(timeout=30)
    assert tool.returncode == ExitCode.TRANSITION_FAILED, err
    result = json.loads(out)
    assert "interrupted by " + signal.Signals(signum).name in result["error"]
    assert result["interrupted"] == signal.Signals(signum).name
    assert_all(toggle_env, tree.cuda_pids, "running")
    assert tree.status_letter(tree.dispatcher) != "T"


def test_terminal_ctrl_c_does_not_kill_a_checkpoint_half_way(toggle_env, fake_tree):
    """Ctrl-C at a terminal reaches the whole process group: the cuda-checkpoint calls in flight must finish."""
    tree = fake_tree()
    fakegpu.add_fault(tree.workers[1], "checkpoint", "slow:1.5", root=toggle_env.state_dir)
    tool = toggle_env.start("checkpointed", "--json", start_new_session=True)
    sleep_until(lambda: ("checkpoint", tree.workers[0]) in ops(toggle_env, "checkpoint"), "a checkpoint")
    os.killpg(tool.pid, signal.SIGINT)  # what the terminal does: the tool and all its children
    out, err = tool.communicate(timeout=30)
    result = json.loads(out)
    assert tool.returncode == ExitCode.TRANSITION_FAILED, err
    assert result["interrupted"] == "SIGINT" and "checkpoint failed" not in result["error"]
    assert ("checkpoint", tree.workers[1]) in [(op, pid) for _, op, pid, r in toggle_env.calls() if r == "ok"]
    assert_all(toggle_env, tree.cuda_pids, "running")


def test_sigterm_during_resume_finishes_the_resume(toggle_env, fake_tree):
    """SIGTERM during a resume lets it finish: every PID running, dispatcher continued."""
    tree = fake_tree()
    toggle_env.run("checkpointed")
    fakegpu.add_fault(tree.workers[1], "restore", "slow:1.5", root=toggle_env.state_dir)
    tool = toggle_env.start("running", "--json")
    sleep_until(lambda: ("restore", tree.workers[0]) in ops(toggle_env, "restore"), "a restore")
    tool.send_signal(signal.SIGTERM)
    out, err = tool.communicate(timeout=30)
    assert tool.returncode == 0, err
    assert json.loads(out)["interrupted"] == "SIGTERM"
    assert_all(toggle_env, tree.cuda_pids, "running")
    assert tree.status_letter(tree.dispatcher) != "T"


def test_vanished_worker_is_simply_gone(toggle_env, fake_tree):
    """A worker that exited is not a CUDA process any more: status and suspend carry on without it."""
    tree = fake_tree(workers=3)
    os.kill(tree.workers[2], signal.SIGKILL)
    sleep_until(lambda: tree.status_letter(tree.workers[2]) is None, "the worker to go")
    code, status = toggle_env.run_json("status")
    assert code == 0 and tree.workers[2] not in [p["pid"] for p in status["pids"]]
    code, result = toggle_env.run_json("checkpointed")
    assert code == 0 and tree.workers[2] not in [p["pid"] for p in result["pids"]]
    toggle_env.run("running")


# --- one at a time, discovery, output ------------------------------------------------------------------


def test_second_tool_is_busy_and_names_the_holder(toggle_env, fake_tree):
    """While one run holds the lock, another waits CUDA_TOGGLE_BUSY_WAIT_S, then exits BUSY naming the holder."""
    fake_tree()
    with ToolLock(str(toggle_env.run_dir), 0, purpose="test holder"):
        started = time.monotonic()
        code, result = toggle_env.run_json("checkpointed")
        assert time.monotonic() - started >= 0.5
    assert code == ExitCode.BUSY
    assert f"PID {os.getpid()}" in result["error"] and "test holder" in result["error"]


def test_server_not_found_and_ambiguous(toggle_env, fake_tree):
    """No server, a wrong --pid, and two candidate servers each exit SERVER_NOT_FOUND with the fix named."""
    code, result = toggle_env.run_json("status")
    assert code == ExitCode.SERVER_NOT_FOUND and "--pid" in result["error"]
    code, result = toggle_env.run_json("checkpointed", "--pid", "999999")
    assert code == ExitCode.SERVER_NOT_FOUND and "999999" in result["error"]
    first, second = fake_tree(), fake_tree()
    code, result = toggle_env.run_json("checkpointed")
    assert code == ExitCode.SERVER_NOT_FOUND
    assert str(first.root) in result["error"] and str(second.root) in result["error"]
    code, result = toggle_env.run_json("status", "--pid", str(second.root))
    assert code == 0 and result["root_pid"] == second.root


def test_match_option_finds_a_server_by_command_line(toggle_env, fake_tree, server_tag):
    """--match picks the server by a command-line substring; the tool never matches itself."""
    tree = fake_tree(title="my-custom-server")
    code, result = toggle_env.run_json("status", "--match", f"my-custom-server --tag {server_tag}")
    assert code == 0 and result["root_pid"] == tree.root


def test_default_patterns_find_vllm_by_either_command_line(fake_tree, server_tag):
    """The default patterns cover `python -m vllm.entrypoints.openai.api_server` and `vllm serve`."""
    from entrypoint.base.config import DEFAULT_MATCH
    from entrypoint.server.discovery import matching_roots

    first = fake_tree()
    second = fake_tree(title="/usr/bin/vllm serve Qwen/Qwen3-8B-AWQ")
    roots = [p.pid for p in matching_roots(DEFAULT_MATCH)]
    assert first.root in roots and second.root in roots
    assert not set(first.workers + [first.dispatcher]) & set(roots), "descendants are not candidates"


def test_no_cuda_processes(toggle_env):
    """A server with no CUDA context anywhere exits NO_CUDA_PROCESSES."""
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        code, result = toggle_env.run_json("checkpointed", "--pid", str(sleeper.pid), "--force")
        assert code == ExitCode.NO_CUDA_PROCESSES and "no CUDA processes" in result["error"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_json_shapes(toggle_env, fake_tree):
    """--json gives the documented keys, for a transition and for status."""
    tree = fake_tree()
    code, result = toggle_env.run_json("checkpointed")
    assert {"ok", "target", "root_pid", "backend", "seconds", "error", "pids"} <= result.keys()
    assert all({"pid", "name", "before", "after", "seconds"} <= p.keys() for p in result["pids"])
    code, status = toggle_env.run_json("status")
    assert status["state"] == "checkpointed"
    assert all({"pid", "name", "state"} <= p.keys() for p in status["pids"])
    assert status["dispatchers"] == [{"pid": tree.dispatcher, "name": "VLLM::EngineCore", "frozen": True}]
    assert [(g["index"], g["used_mib"], g["total_mib"]) for g in status["gpus"]] == [
        (0, 4, 81559),
        (1, 4, 81559),
    ]
    toggle_env.run("running")


def test_bad_environment_value_is_a_usage_error(toggle_env):
    """A malformed setting exits USAGE and names the variable."""
    done = toggle_env.run("status", env={"CUDA_TOGGLE_VERIFY_ATTEMPTS": "many"})
    assert done.returncode == ExitCode.USAGE and "CUDA_TOGGLE_VERIFY_ATTEMPTS" in done.stderr


def test_missing_backend_names_the_fix(toggle_env, fake_tree):
    """Without libcuda's checkpoint API and without the binary, the error says what to install."""
    fake_tree()
    done = toggle_env.run(
        "status",
        env={
            "CUDA_TOGGLE_LIBCUDA": "/nonexistent/libcuda.so.1",
            "CUDA_CHECKPOINT_BIN": "no-such-cuda-checkpoint",
            "CUDA_TOGGLE_BACKEND": "auto",
        },
    )
    assert done.returncode == ExitCode.USAGE
    assert "install NVIDIA's cuda-checkpoint" in done.stderr


def test_help_documents_targets_options_env_and_exit_codes(toggle_env):
    """--help lists the targets, every environment variable and every exit code."""
    text = toggle_env.run("--help").stdout
    for word in [
        "checkpointed",
        "running",
        "status",
        "--pid",
        "--backend",
        "--force",
        "--no-freeze",
        "--json",
    ]:
        assert word in text
    for env in SETTINGS:
        assert env in text
    for code in TOGGLE_EXIT_CODES:
        assert f"{int(code):>2}  {code.meaning}" in text
