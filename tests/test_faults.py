"""The fault matrix: kill -9, Ctrl-C and SIGTERM at every phase of a suspend and of a resume, transient
state-read errors, and suspend records that cannot be trusted; on the fake GPU with the stand-in vLLM
(TP=2: API server -> VLLM::EngineCore -> two workers), through the real CLI.

Every case ends the same way: `cuda-toggle-all running` at once, then a request to the stand-in. The
server must answer with every process `running`; where `running` cannot get there, it exits non-zero
and reports the real state (checked against the fake GPU's state directory), and a second `running`
gets there.

Kills come at seeded random moments: kill k aims at phase k of the list in the code (in turn), waits
until the tool marks that phase, then a random part of the phase's expected length. `slow:` faults
make the phases long enough to hit. FAULT_SEED picks another sequence.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from entrypoint.base.errors import ExitCode
from entrypoint.suspend.executor import RESUME_PHASES, SUSPEND_PHASES
from tests.testing import TOGGLE_ALL_CLI
from tests.toggle_fixtures import REPO, SAFE_ENV, fakegpu

# The ways the server is kept from sending work while suspended (--quiesce / CUDA_TOGGLE_QUIESCE).
# Add "scheduler" (vLLM's /pause) here once the tool has it: every case below then runs for both.
QUIESCE_PATHS = ["scheduler", "sigstop"]  # the first is the default of the tests that take one

SEED = int(os.environ.get("FAULT_SEED", "11"))
# Each test runs many whole suspend/resume cycles with slowed phases: minutes on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(400)
CHUNKS, KILLS_PER_CHUNK = 5, 4  # 20 kills of each direction
BACKENDS = ("cli", "driver")  # the killed run's backend: each round of the phase list uses the next one
SERVER_ARGS = ("--disable-custom-all-reduce", "--gpu-memory-utilization", "0.02")
# How long each phase lasts here with the faults of `slow_phases` (s): the kill lands in a random part
SLOW_S = 0.3
PHASE_SECONDS = defaultdict(
    lambda: 0.05, {"settle": 0.6, "observe": 0.1, "quiesce": 0.01, "unquiesce": 0.01, "lock": SLOW_S}
)
PHASE_SECONDS.update({"checkpoint": SLOW_S, "restore": SLOW_S, "unlock": SLOW_S, "verify": SLOW_S})


@dataclass
class Rig:
    """The tool's environment (toggle_env) and one stand-in server, with the quiesce path in use."""

    env: object
    server: object
    quiesce: str
    orphan: int | None = None  # the worker whose call leave_an_orphan keeps in flight

    @property
    def engine(self) -> int:
        return self.server.engine_core().pid

    @property
    def workers(self) -> list[int]:
        return [worker.pid for worker in self.server.workers()]

    @property
    def cuda_pids(self) -> list[int]:
        return [self.server.pid, self.engine, *self.workers]

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # The fakes are Python scripts run through `env python3`: this interpreter's folder first on PATH
        # spares each call a version manager's shim (half the matrix's time on a busy machine).
        fakes, rest = os.environ["PATH"].split(os.pathsep, 1)
        path = os.pathsep.join([fakes, os.path.dirname(sys.executable), rest])
        settings = {"CUDA_TOGGLE_QUIESCE": self.quiesce, "CUDA_TOGGLE_MODE": "plain", "PATH": path}
        return {**os.environ, **settings, **(extra or {})}

    def start(self, target: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """The CLI on this server, in the background (stdout: its --json result)."""
        return subprocess.Popen(
            [*TOGGLE_ALL_CLI, target, "--pid", str(self.server.pid), "--json"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.environ(env),
        )

    def run(self, target: str, env: dict[str, str] | None = None) -> tuple[int, dict, str]:
        tool = self.start(target, env)
        out, err = tool.communicate(timeout=60)
        try:
            return tool.returncode, json.loads(out), err
        except ValueError:
            raise AssertionError(f"{target}: no JSON on stdout (rc {tool.returncode}):\n{out}\n{err}")

    def states(self) -> dict[int, str | None]:
        return {pid: self.env.state(pid) for pid in self.cuda_pids}

    def engine_stopped(self) -> bool:
        return fakegpu.process_status(self.engine) in ("T", "t")

    def clear_faults(self) -> None:
        for pid in self.cuda_pids:
            for path in (fakegpu.pid_dir(pid, self.env.state_dir) / "faults").glob("*"):
                path.unlink()
        (self.env.run_dir / "phase").unlink(missing_ok=True)

    def release_orphan(self) -> None:
        """Let the call that leave_an_orphan keeps in flight land (nothing when there is none)."""
        if self.orphan is not None:
            (fakegpu.pid_dir(self.orphan, self.env.state_dir) / "released").write_text("1\n")
            self.orphan = None

    def fault(self, pid: int, op: str, *faults: str) -> None:
        fakegpu.add_fault(pid, op, *faults, root=self.env.state_dir)

    def started_calls(self, op: str) -> list[int]:
        """PIDs the fake cuda-checkpoint was started on for `op` (argv.log is written as a call starts)."""
        try:
            lines = (self.env.state_dir / "argv.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [int(line.split("--pid ")[1].split()[0]) for line in lines if f"--action {op} " in line]

    def phase_of(self, tool: subprocess.Popen) -> str | None:
        """The phase `tool` marked last (None before its first mark)."""
        try:
            mark = json.loads((self.env.run_dir / "phase").read_text())
        except (OSError, ValueError):
            return None
        return mark["phase"] if mark.get("pid") == tool.pid else None

    def answer(self) -> str:
        """A completion from the stand-in: every worker computes a piece of every token."""
        body = {"model": "standin-model", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        response = self.server.post("/v1/completions", json=body, timeout=15)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]


@pytest.fixture
def rig(request, toggle_env, standin_server) -> Rig:
    """A stand-in TP=2 server (sleep mode on, so every quiesce path is possible) and the tool around it."""
    server = standin_server(*SERVER_ARGS, "--enable-sleep-mode", env={**SAFE_ENV, "VLLM_SERVER_DEV_MODE": "1"})
    return Rig(toggle_env, server, getattr(request, "param", QUIESCE_PATHS[0]))


def slow_phases(rig: Rig, direction: str) -> None:
    """Faults that make every phase of `direction` last about SLOW_S (each is taken by the first call)."""
    w0, w1 = rig.workers
    if direction == "suspend":
        rig.fault(w0, "lock", f"slow:{SLOW_S}")
        rig.fault(w1, "checkpoint", f"slow:{SLOW_S}")
        rig.fault(w0, "get-state", f"when=checkpointed:slow:{SLOW_S}")
    else:
        rig.fault(w1, "restore", f"slow:{SLOW_S}")
        rig.fault(w0, "unlock", f"slow:{SLOW_S}")
        rig.fault(w0, "get-state", f"when=running:slow:{SLOW_S}")


def leave_an_orphan(rig: Rig, target: str, backend: str = "cli") -> None:
    """A run of `target` killed during a call that stays in flight until rig.release_orphan() (the next run
    must wait for it in `settle`, however long that run takes to start on a loaded machine)."""
    op = "checkpoint" if target == "checkpointed" else "restore"
    worker = rig.workers[1]
    release = fakegpu.pid_dir(worker, rig.env.state_dir) / "released"
    release.unlink(missing_ok=True)
    rig.fault(worker, op, "until-released:60")
    rig.orphan = worker
    tool = rig.start(target, {"CUDA_TOGGLE_BACKEND": backend})
    deadline = time.monotonic() + 30
    while worker not in rig.started_calls(op):
        assert tool.poll() is None and time.monotonic() < deadline, "the slow call never started"
        time.sleep(0.005)
    tool.kill()
    tool.communicate()


def kill_in_phase(
    rig: Rig,
    target: str,
    phase: str,
    rng: random.Random,
    signum: int = signal.SIGKILL,
    backend: str = "cli",
    tool: subprocess.Popen | None = None,
):
    """Start `target` (with `backend`; or take the `tool` started), wait until it marks `phase` (or one
    after it), wait a random part of that phase, then send `signum`. Returns (the phase it was in, the tool)."""
    order = list(SUSPEND_PHASES if target == "checkpointed" else RESUME_PHASES)
    tool = tool or rig.start(target, {"CUDA_TOGGLE_BACKEND": backend})
    deadline = time.monotonic() + 30
    while True:
        current = rig.phase_of(tool)
        if current == phase or (current in order and order.index(current) > order.index(phase)):
            break
        if tool.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    time.sleep(rng.uniform(0, PHASE_SECONDS[phase]))
    with_tool_alive = tool.poll() is None
    hit = (rig.phase_of(tool) or "startup") if with_tool_alive else "finished"
    if with_tool_alive:
        tool.send_signal(signum)
    rig.release_orphan()  # the call an earlier kill left in flight now lands, after this run was hit
    return hit, tool


def assert_running_gets_there(rig: Rig) -> None:
    """`running`, at once: every process running and the server answering; or a non-zero exit that
    reports the real state, after which a second `running` gets there."""
    code, result, err = rig.run("running")
    assert "Traceback" not in err, err
    if code != 0:
        real = rig.states()
        reported = {entry["pid"]: entry["after"] for entry in result["pids"]}
        assert all(real.get(pid) == state for pid, state in reported.items() if state != "gone"), (
            result["error"],
            reported,
            real,
        )
        code, result, err = rig.run("running")
        assert code == 0, (result["error"], err)
    assert set(rig.states().values()) == {"running"}, rig.states()
    assert not rig.engine_stopped(), "the dispatcher must run again"
    assert rig.server.process.poll() is None, rig.server.log()[-2000:]
    assert rig.answer()


# The chunks alternate between the quiesce paths: every phase of both is hit within the 20 kills.
KILL_CHUNKS = [(chunk, QUIESCE_PATHS[chunk % len(QUIESCE_PATHS)]) for chunk in range(CHUNKS)]


def hits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where each kill test saves the phases it hit: shared by every pytest-xdist worker of this run (the kill
    tests run spread over them), private to the run."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "fault-matrix-hits"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def hits(request, tmp_path_factory) -> Iterator[dict]:
    """The phases this kill test hits ("hit"), and whether it ran to its end ("complete"); saved at teardown,
    also when the test failed, for test_every_phase_was_hit."""
    record = {"hit": [], "complete": False}
    yield record
    (hits_folder(tmp_path_factory) / f"{request.node.name}.json").write_text(json.dumps(record))


def kill_each_phase_then_running(rig: Rig, chunk: int, target: str, hits: dict) -> None:
    """The chunk's kills of `target`: kill -9 at a random moment of each of its phases in turn (both backends,
    an orphaned call before `settle`), each followed by `running`, which must get the server answering."""
    direction = "suspend" if target == "checkpointed" else "resume"
    phases = SUSPEND_PHASES if direction == "suspend" else RESUME_PHASES
    rng = random.Random(f"{SEED}-{direction}-{chunk}")
    for k in range(chunk * KILLS_PER_CHUNK, (chunk + 1) * KILLS_PER_CHUNK):
        phase = phases[k % len(phases)]
        rig.clear_faults()
        if direction == "resume":
            code, result, err = rig.run("checkpointed")
            assert code == 0, (result["error"], err)
        backend = BACKENDS[k // len(phases) % 2]
        if phase == "settle":
            leave_an_orphan(rig, target, backend)
        slow_phases(rig, direction)
        hit, tool = kill_in_phase(rig, target, phase, rng, backend=backend)
        tool.communicate()
        hits["hit"].append(hit)
        print(f"{direction} kill {k} ({backend}): aimed at {phase}, hit {hit}")
        assert_running_gets_there(rig)
    hits["complete"] = True


@pytest.mark.parametrize(("chunk", "rig"), KILL_CHUNKS, indirect=["rig"])
def test_kill_during_suspend_then_running(rig, chunk, hits):
    """kill -9 of `checkpointed` at a random moment of each phase, then `running`: the server answers."""
    kill_each_phase_then_running(rig, chunk, "checkpointed", hits)


@pytest.mark.parametrize(("chunk", "rig"), KILL_CHUNKS, indirect=["rig"])
def test_kill_during_resume_then_running(rig, chunk, hits):
    """kill -9 of `running` at a random moment of each phase, then `running`: the server answers."""
    kill_each_phase_then_running(rig, chunk, "running", hits)


# --- Ctrl-C and SIGTERM at every phase ------------------------------------------------------------------

INTERRUPTED_EARLY = (ExitCode.INTERRUPTED,)  # stopped before anything changed


def assert_signal_outcome(rig: Rig, target: str, code: int, result: dict | None, before: dict | None) -> None:
    """What an interrupted run may leave: its target reached (0), everything rolled back (6), or, when the
    signal came before anything changed, nothing changed (`before`, None when an earlier run's call was
    still landing). Never a half-way state."""
    states = rig.states()
    moved = [pid for pid in rig.cuda_pids if pid != rig.engine or rig.quiesce != "sigstop"]
    if code == 0:
        wanted = "checkpointed" if target == "checkpointed" else "running"
        assert {states[pid] for pid in moved} == {wanted}, states
    elif code == ExitCode.TRANSITION_FAILED:
        if target == "checkpointed":
            assert set(states.values()) == {"running"} and not rig.engine_stopped(), (result, states)
        else:
            assert {states[pid] for pid in moved} == {"checkpointed"}, (result, states)
    else:
        assert code in INTERRUPTED_EARLY, (code, result)
        assert before is None or states == before, (code, before, states)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("target", ["checkpointed", "running"])
def test_signal_at_every_phase(rig, target, signum):
    """Ctrl-C or SIGTERM in each phase: the run finishes or rolls back, says so, and `running` repairs."""
    rng = random.Random(f"{SEED}-{target}-{signum}")
    for phase in SUSPEND_PHASES if target == "checkpointed" else RESUME_PHASES:
        rig.clear_faults()
        if target == "running":
            code, result, err = rig.run("checkpointed")
            assert code == 0, (result["error"], err)
        if phase == "settle":
            leave_an_orphan(rig, target)
        slow_phases(rig, "suspend" if target == "checkpointed" else "resume")
        before = None if phase == "settle" else rig.states()
        hit, tool = kill_in_phase(rig, target, phase, rng, signum)
        out, err = tool.communicate(timeout=60)
        print(f"{signal.Signals(signum).name} during {target}: aimed at {phase}, hit {hit}, exit {tool.returncode}")
        assert "Traceback" not in err, err
        result = json.loads(out) if out.strip() else None
        if hit not in ("settle", "observe", "startup"):  # the run may have changed something: 0 or 6 only
            assert tool.returncode in (0, ExitCode.TRANSITION_FAILED), (tool.returncode, result, err[-2000:])
        assert_signal_outcome(rig, target, tool.returncode, result, before)
        assert_running_gets_there(rig)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_hybrid_suspend_and_resume(rig, signum):
    """Hybrid (vLLM asleep while checkpointed): a signal in each phase leaves vLLM awake unless the
    suspend completed, never asleep behind a report of "running" or "nothing changed"."""
    rng = random.Random(f"{SEED}-hybrid-{signum}")
    hybrid = {"CUDA_TOGGLE_MODE": "auto"}
    for target in ("checkpointed", "running"):
        phases = SUSPEND_PHASES if target == "checkpointed" else RESUME_PHASES
        for phase in [p for p in phases if p not in ("settle", "verify")]:
            rig.clear_faults()
            if target == "running":
                code, result, err = rig.run("checkpointed", hybrid)
                assert code == 0 and result["mode"] == "hybrid", (result["error"], err)
            slow_phases(rig, "suspend" if target == "checkpointed" else "resume")
            before = rig.states()
            tool = rig.start(target, hybrid)
            hit, tool = kill_in_phase(rig, target, phase, rng, signum, tool=tool)
            out, err = tool.communicate(timeout=60)
            print(
                f"hybrid {signal.Signals(signum).name} during {target}: aimed at {phase}, hit {hit}, "
                f"exit {tool.returncode}"
            )
            assert "Traceback" not in err, err
            result = json.loads(out) if out.strip() else None
            asleep = rig.server.get("/is_sleeping").json()["is_sleeping"]
            if tool.returncode == 0 and target == "checkpointed":
                assert asleep and result["mode"] == "hybrid"
            else:
                # a resume that failed (6) or was interrupted before anything changed (130) leaves it suspended
                stayed = tool.returncode in (ExitCode.TRANSITION_FAILED, ExitCode.INTERRUPTED)
                assert not asleep or stayed and target == "running", (
                    tool.returncode,
                    result,
                )
            if hit not in ("observe", "startup"):
                assert tool.returncode in (0, ExitCode.TRANSITION_FAILED), (tool.returncode, result, err[-2000:])
            assert_signal_outcome(rig, target, tool.returncode, result, before)
            assert_running_gets_there(rig)
            assert not rig.server.get("/is_sleeping").json()["is_sleeping"]


# --- state reads that fail once ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, fault",
    [
        ("checkpointed", "error"),  # the first look
        ("checkpointed", "when=checkpointed:error"),  # the verify after the checkpoint
        ("running", "error"),  # the first look of the resume
        ("running", "when=running:error"),  # the verify after the unlock
    ],
    ids=["suspend-observe", "suspend-verify", "resume-observe", "resume-verify"],
)
def test_transient_state_read_error_is_read_again(rig, target, fault):
    """A get-state that fails once is read again: the run succeeds as if nothing had happened."""
    if target == "running":
        assert rig.run("checkpointed")[0] == 0
    worker = rig.workers[1]
    rig.fault(worker, "get-state", fault)
    code, result, err = rig.run(target)
    assert code == 0, (result["error"], err)
    assert ("get-state", worker, "error") in [(op, pid, r) for _, op, pid, r in rig.env.calls()]
    wanted = "checkpointed" if target == "checkpointed" else "running"
    assert {rig.env.state(pid) for pid in rig.workers} == {wanted}
    assert_running_gets_there(rig)


def test_read_error_during_rollback_does_not_skip_the_pid(rig):
    """A checkpoint fails; the rollback's read of the failed PID fails once: it is read again and rolled
    back too, and the run says rolled back only because every process runs again."""
    w0, w1 = rig.workers
    rig.fault(w1, "checkpoint", "error")
    rig.fault(w1, "get-state", "when=locked:error")
    code, result, err = rig.run("checkpointed")
    assert code == ExitCode.TRANSITION_FAILED, (result["error"], err)
    assert ("get-state", w1, "error") in [(op, pid, r) for _, op, pid, r in rig.env.calls()]
    assert set(rig.states().values()) == {"running"} and not rig.engine_stopped()
    assert_running_gets_there(rig)


# --- the suspend record ------------------------------------------------------------------------------------


def record_path(rig: Rig, create_time: float) -> Path:
    return rig.env.run_dir / "servers" / f"{rig.server.pid}-{create_time:.2f}.json"


def test_record_names_the_server_instance_and_keeps_released_memory(rig):
    """The record names the server by PID and start time, lists the CUDA processes moved, and a second
    suspend keeps the released figures: the resume's GPU-room check still works after it."""
    code, result, err = rig.run("checkpointed")
    assert code == 0, (result["error"], err)
    code, status, err = rig.run("status")
    record = status["suspend_record"]
    assert record["root_pid"] == rig.server.pid
    assert record["root_create_time"] == pytest.approx(psutil.Process(rig.server.pid).create_time(), abs=0.01)
    assert set(rig.workers) <= {p["pid"] for p in record["cuda"]}
    released = {g["uuid"]: g["used_before_mib"] - g["used_after_mib"] for g in record["gpus"]}
    assert min(released.values()) > 0, record["gpus"]
    code, result, err = rig.run("checkpointed")  # already suspended: releases nothing more
    assert code == 0, (result["error"], err)
    again = rig.run("status")[1]["suspend_record"]
    assert {g["uuid"]: g["used_before_mib"] - g["used_after_mib"] for g in again["gpus"]} == released
    gpus = fakegpu.read_gpus(rig.env.state_dir)
    index, uuid, total, _ = gpus[1]
    gpus[1] = (index, uuid, total, total - 10)  # another process took GPU 1 meanwhile
    fakegpu.write_gpus(rig.env.state_dir, gpus)
    code, result, err = rig.run("running")
    assert code == ExitCode.REFUSED and "GPU 1" in result["error"], result["error"]
    gpus[1] = (index, uuid, total, 4)
    fakegpu.write_gpus(rig.env.state_dir, gpus)
    assert_running_gets_there(rig)


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"root_pid": "x"}', "null"],
    ids=["not-json", "list", "wrong-fields", "null"],
)
def test_malformed_record_is_reported_and_ignored(rig, content):
    """A record of the wrong shape (valid JSON included): one warning, ignored; status and both
    transitions work."""
    path = record_path(rig, psutil.Process(rig.server.pid).create_time())
    path.parent.mkdir(parents=True)
    path.write_text(content)
    code, status, err = rig.run("status")
    assert code == 0 and status["suspend_record"] is None and "Traceback" not in err
    assert str(path) in err, err
    code, result, err = rig.run("checkpointed")
    assert code == 0, (result["error"], err)
    assert_running_gets_there(rig)


def test_stale_record_of_an_earlier_process_is_ignored(rig):
    """A record left by an earlier process with the same PID (another start time) is reported, removed and
    never used: its frozen dispatcher and released figures mean nothing for this server."""
    path = record_path(rig, 1000.0)
    path.parent.mkdir(parents=True)
    stale = {
        "root_pid": rig.server.pid,
        "root_create_time": 1000.0,
        "backend": "cli",
        "started_at": 1000.0,
        "frozen": [],
        "cuda": [],
        "gpus": [{"uuid": "GPU-x", "index": 0, "used_before_mib": 99999, "used_after_mib": 0}],
        "complete": True,
        "mode": "plain",
        "quiesce": "sigstop",
        "server_url": "",
    }
    path.write_text(json.dumps(stale))
    code, status, err = rig.run("status")
    assert code == 0 and status["suspend_record"] is None
    assert "stale" in err and not path.exists()
    code, result, err = rig.run("checkpointed")
    assert code == 0, (result["error"], err)
    assert_running_gets_there(rig)


@pytest.mark.parametrize("where", ["run-dir", "records"])
def test_unwritable_run_dir_is_a_usage_error(rig, tmp_path, where):
    """A RUN_DIR (or its records folder) that cannot be written: exit 2 naming CUDA_TOGGLE_RUN_DIR, no
    traceback, nothing changed."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {}
    if where == "run-dir":
        env["CUDA_TOGGLE_RUN_DIR"] = str(blocker / "run")
    else:
        rig.env.run_dir.mkdir(parents=True, exist_ok=True)
        (rig.env.run_dir / "servers").write_text("")
    code, result, err = rig.run("checkpointed", env)
    assert code == ExitCode.USAGE and "CUDA_TOGGLE_RUN_DIR" in result["error"], (code, result, err)
    assert "Traceback" not in err
    assert set(rig.states().values()) == {"running"} and not rig.engine_stopped()
    code, status, err = rig.run("status", env)
    assert code == 0 and "Traceback" not in err


def test_every_phase_was_hit(request, tmp_path_factory):
    """The kills above hit every phase of the lists in the code at least once."""
    kill_tests = {item.name for item in request.session.items if item.name.startswith("test_kill_during_")}
    if not kill_tests:
        pytest.skip("runs with the kill matrix of this module")
    # Under pytest-xdist the kill tests run on other workers too: wait until each has saved what it hit.
    folder = hits_folder(tmp_path_factory)
    deadline = time.monotonic() + 380
    while (missing := {name for name in kill_tests if not (folder / f"{name}.json").exists()}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert not missing, f"kill tests that never finished: {sorted(missing)}"
    records = {name: json.loads((folder / f"{name}.json").read_text()) for name in kill_tests}
    if not all(record["complete"] for record in records.values()):
        pytest.skip("a kill test failed (its own report says why): the matrix is incomplete")
    for direction, phases in (("suspend", SUSPEND_PHASES), ("resume", RESUME_PHASES)):
        hit = {phase for name, record in records.items() if f"_{direction}_" in name for phase in record["hit"]}
        assert set(phases) <= hit, (direction, hit)
