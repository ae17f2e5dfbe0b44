"""The fault matrix of servers that die: a process of the vLLM server (a worker, EngineCore, the API server,
or the whole tree) is killed during a suspend, during a resume, during a swap, and while suspended, and the
real supervisord (the project's supervisord.conf, started through docker/start-services.sh) restarts it.
The stand-in vLLM on the fake GPU, at TP=1 and TP=2, one model and two (GATE_MODELS), behind the real gate.

Every case must end consistent: after the restart the gate serves again within a bound (meanwhile it answers
502 or 503, never hangs); no suspend record, tool lock or stopped process outlives the server it belonged
to; the tool said ok only where it was (a run during which a process was killed never exits 0), and a
`cuda-toggle-all running` afterwards exits 0, proving the new instance serves.

supervisord counts an exit within startsecs (10 s) as a failed start; a case waits for RUNNING before its
kill, so that no case leaves the program FATAL for the next.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from entrypoint.base.errors import ExitCode
from entrypoint.gate.control import tool_lock_purpose
from tests.test_container import STANDIN, Supervised, alive, process_tree, start_supervised
from tests.test_swap import MODELS, SHARE, library_env
from tests.testing import REPO, TOGGLE_ALL_CLI, fakegpu, free_port, wait_until
from tests.toggle_fixtures import SAFE_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
SLOW_OP_S = 2.0  # a lock or restore made this long, so that the kill lands inside it
SERVE_BOUND_S = 60.0  # the gate serves the restarted server within this (the stand-in loads in about a second)


@dataclass
class Rig:
    supervised: Supervised
    state_dir: Path
    ports: dict[str, int]  # model -> its server's port ("" for the one server)
    programs: dict[str, str]  # model -> its supervisord program
    tp: int

    @property
    def run_dir(self) -> Path:
        return self.supervised.tmp / "toggle"

    def run_dir_of(self, model: str) -> Path:
        return self.run_dir if self.programs[model] == "vllm" else self.run_dir / "models" / model

    def root(self, model: str) -> int:
        return self.supervised.info(self.programs[model])["pid"]

    def tree(self, model: str) -> list[psutil.Process]:
        return process_tree(self.root(model))

    def engine(self, model: str) -> psutil.Process:
        (engine,) = psutil.Process(self.root(model)).children()
        return engine

    def workers(self, model: str) -> list[psutil.Process]:
        return sorted(self.engine(model).children(), key=lambda p: " ".join(p.cmdline()))

    def holder(self, model: str) -> psutil.Process:
        """The process that holds the model's GPU memory: worker 0, or EngineCore at TP=1."""
        return (self.workers(model) or [self.engine(model)])[0]

    def victim(self, model: str, which: str) -> list[psutil.Process]:
        if which == "worker":
            return [self.workers(model)[-1]]
        if which == "engine":
            return [self.engine(model)]
        if which == "api":
            return [psutil.Process(self.root(model))]
        return self.tree(model)  # the whole tree at once

    def toggle_env(self, model: str) -> dict[str, str]:
        env = {**self.supervised.env, "CUDA_TOGGLE_PROGRAM": self.programs[model]}
        env["CUDA_TOGGLE_RUN_DIR"] = str(self.run_dir_of(model))
        env["CUDA_TOGGLE_SERVER_URL"] = f"http://127.0.0.1:{self.ports[model]}"
        return env

    def start_tool(self, target: str, model: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*TOGGLE_ALL_CLI, target, "--json"],
            cwd=REPO,
            env=self.toggle_env(model),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def toggle(self, target: str, model: str) -> tuple[int, str]:
        tool = self.start_tool(target, model)
        out, err = tool.communicate(timeout=120)
        return tool.returncode, out + err

    def ask(self, model: str, timeout: float = 30) -> int:
        body = {"prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        if model:
            body["model"] = model
        try:
            return requests.post(f"{self.supervised.gate_url}/v1/completions", json=body, timeout=timeout).status_code
        except requests.RequestException:
            return 0  # the gate itself did not answer: never expected

    def serving(self, model: str) -> int:
        """Wait until the program is RUNNING (past startsecs) and the gate answers 200 for it; its root PID."""
        program = self.programs[model]
        wait_until(lambda: self.supervised.info(program)["statename"] == "RUNNING", f"{program} RUNNING", 60)
        wait_until(lambda: self.ask(model) == 200, f"the gate to serve {model or 'the server'}", SERVE_BOUND_S)
        return self.root(model)

    def started_calls(self, op: str, pid: int) -> bool:
        try:
            lines = (self.state_dir / "argv.log").read_text().splitlines()
        except FileNotFoundError:
            return False
        return any(f"--action {op} " in line and f"--pid {pid}" in line for line in lines)


def start_rig(fake_gpu: Path, tp: int, models: tuple[str, ...] = ("",)) -> Rig:
    ports = {model: free_port() for model in models}
    args = ["--model", "standin", "--tensor-parallel-size", str(tp), "--host", "127.0.0.1"]
    args += ["--disable-custom-all-reduce", "--gpu-memory-utilization", SHARE if len(models) > 1 else "0.3"]
    settings = {key: value for key, value in library_env(fake_gpu, Path()).items() if not key.endswith(("URL", "DIR"))}
    settings.update(SAFE_ENV)  # the NCCL and all-reduce settings a TP=2 server needs to be suspended
    settings.update(FAKE_CUDA_STATE_DIR=str(fake_gpu), SPT_NOENV="1", STANDIN_STEP_S="0.005", VLLM_SLEEP_MODE="1")
    settings.update(CUDA_TOGGLE_LOCK_TIMEOUT_MS="200", CUDA_TOGGLE_VERIFY_SLEEP_S="0.05", GATE_BUSY_WAIT_S="60")
    if len(models) > 1:
        settings["GATE_MODELS"] = ",".join(f"{model}:standin-{model}:{ports[model]}:{SHARE}" for model in models)
        programs = {model: "vllm" if index == 0 else f"vllm-{model}" for index, model in enumerate(models)}
        args += ["--port", "1"]  # each model's own --port is appended by the program GATE_MODELS writes
    else:
        programs = {"": "vllm"}
        args += ["--port", str(ports[""])]
    supervised = start_supervised(f"{sys.executable} {STANDIN}", args, ports[models[0]], **settings)
    return Rig(supervised, fake_gpu, ports, programs, tp)


@pytest.fixture
def rig(fake_gpu: Path) -> Iterator[callable]:
    started: list[Rig] = []

    def start(tp: int, models: tuple[str, ...] = ("",)) -> Rig:
        made = start_rig(fake_gpu, tp, models)
        started.append(made)
        return made

    yield start
    for made in started:
        made.supervised.shutdown()
        shutil.rmtree(made.supervised.tmp, ignore_errors=True)


def kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def assert_consistent_after_restart(rig: Rig, model: str, old_root: int, old_tree: list[psutil.Process]) -> None:
    """supervisord restarted the server; the gate serves it within the bound (answering only a clear 503 until
    then: nothing listens yet, or the new instance is not ready); nothing of the dead instance is left: no process,
    record, lock, stopped process; `running` proves the new one."""
    program = rig.programs[model]
    wait_until(lambda: rig.supervised.info(program)["pid"] not in (0, old_root), f"{program} restarted", 60)
    restarted = time.monotonic()
    answers = []

    def served() -> bool:
        answers.append(rig.ask(model))
        return answers[-1] == 200

    wait_until(served, f"the gate to serve the restarted {program}", SERVE_BOUND_S, interval=0.2)
    assert set(answers) <= {200, 503}, answers
    print(f"{program}: served {time.monotonic() - restarted:.1f} s after the restart; answers meanwhile {answers}")
    wait_until(lambda: not [p for p in old_tree if alive(p)], "every process of the dead instance to end", 30)
    records = sorted((rig.run_dir_of(model) / "servers").glob("*.json"))
    assert records == [], [path.read_text() for path in records]
    assert tool_lock_purpose(str(rig.run_dir_of(model))) is None
    new_tree = rig.tree(model)
    assert [p.pid for p in new_tree if p.status() == psutil.STATUS_STOPPED] == []
    code, output = rig.toggle("running", model)
    assert code == 0, output
    assert {fakegpu.read_state(p.pid, rig.state_dir) for p in new_tree} <= {"running", None}


def kill_while_suspended(rig: Rig, model: str, which: str) -> None:
    root = rig.serving(model)
    code, output = rig.toggle("checkpointed", model)
    assert code == 0, output
    tree = rig.tree(model)
    kill(rig.victim(model, which))
    assert_consistent_after_restart(rig, model, root, tree)


def kill_during(rig: Rig, model: str, which: str, target: str) -> None:
    """Kill `which` while the tool's lock (suspend) or restore (resume) call is in progress: the tool must
    not exit 0."""
    root = rig.serving(model)
    if target == "running":
        code, output = rig.toggle("checkpointed", model)
        assert code == 0, output
    op = "lock" if target == "checkpointed" else "restore"
    holder = rig.holder(model)
    fakegpu.add_fault(holder.pid, op, f"slow:{SLOW_OP_S}", root=rig.state_dir)
    tree = rig.tree(model)
    tool = rig.start_tool(target, model)
    wait_until(lambda: rig.started_calls(op, holder.pid), f"the slow {op}", 60)
    kill(rig.victim(model, which))
    out, err = tool.communicate(timeout=120)
    assert tool.returncode not in (0, ExitCode.UNEXPECTED), out + err
    assert "Traceback" not in err, err
    assert_consistent_after_restart(rig, model, root, tree)


TP2_CASES = [
    ("suspended", "worker"),
    ("suspended", "engine"),
    ("suspended", "api"),
    ("suspended", "tree"),
    ("checkpointed", "worker"),
    ("checkpointed", "api"),
    ("running", "engine"),
    ("running", "tree"),
]
TP1_CASES = [("suspended", "engine"), ("suspended", "tree"), ("checkpointed", "engine"), ("running", "api")]


def run_cases(rig: Rig, cases: list[tuple[str, str]], model: str = "") -> None:
    for moment, which in cases:
        print(f"case: {which} killed {'while suspended' if moment == 'suspended' else 'during ' + moment}")
        if moment == "suspended":
            kill_while_suspended(rig, model, which)
        else:
            kill_during(rig, model, which, moment)


def test_tp2_server_killed_at_each_phase_is_restarted_and_served(rig):
    """TP=2: a worker, EngineCore, the API server or the whole tree killed while suspended, during a suspend
    or a resume: supervisord restarts it and every outcome is consistent."""
    run_cases(rig(2), TP2_CASES)


def test_tp1_server_killed_at_each_phase_is_restarted_and_served(rig):
    """TP=1 (EngineCore holds the model): the same."""
    run_cases(rig(1), TP1_CASES)


def test_two_models_servers_killed_while_suspended_and_during_swaps(rig):
    """GATE_MODELS, TP=1: the suspended model's server killed, then asked for (the resident one is never
    evicted for it); the resident one killed during a swap (its suspend); the target killed during a swap
    (its restore). Each time supervisord restarts it and both models are served again."""
    made = rig(1, MODELS)
    alpha, beta = MODELS

    def started() -> bool:
        try:
            return requests.get(f"{made.supervised.gate_url}/gate/status", timeout=2).json()["started"]
        except (requests.RequestException, ValueError, KeyError):
            return False

    wait_until(started, "the gate to start both servers", 60)
    made.serving(alpha)
    # beta is suspended: kill it, ask for it; alpha stays resident meanwhile
    beta_root, beta_tree = made.root(beta), made.tree(beta)
    wait_until(lambda: list((made.run_dir_of(beta) / "servers").glob("*.json")), "beta suspended", 30)
    alpha_engine = made.engine(alpha).pid
    kill(beta_tree)
    assert made.ask(beta) in (200, 502, 503)
    evicted = fakegpu.read_state(alpha_engine, made.state_dir) != "running"
    assert not evicted, f"alpha was evicted for a dead beta:\n{made.supervised.log()[-5000:]}"
    assert_consistent_after_restart(made, beta, beta_root, beta_tree)
    assert made.ask(alpha) == 200 and made.ask(beta) == 200
    # a swap whose victim dies during its suspend, then one whose target dies during its restore
    kill_during_swap(made, victim_model=alpha, target_model=beta, op="lock")
    kill_during_swap(made, victim_model=beta, target_model=alpha, op="restore")


def kill_during_swap(made: Rig, victim_model: str, target_model: str, op: str) -> None:
    """A request for `target_model` swaps out `victim_model`; the server whose `op` is slowed (the victim's
    lock, or the target's restore) is killed meanwhile: the request is answered 200, 502 or 503, supervisord
    restarts the server, and both models are served again."""
    made.serving(victim_model)  # resident now
    made.serving(target_model)  # restarted by an earlier case beside it, say: suspend it, so that a swap is needed
    code, output = made.toggle("checkpointed", target_model)
    assert code == 0, output
    dying = victim_model if op == "lock" else target_model
    root, tree, holder = made.root(dying), made.tree(dying), made.holder(dying)
    fakegpu.add_fault(holder.pid, op, f"slow:{SLOW_OP_S}", root=made.state_dir)
    asking = subprocess.Popen(
        [sys.executable, "-c", "import sys, requests; print(requests.post(sys.argv[1], json=eval(sys.argv[2]), "
         "timeout=120).status_code)", f"{made.supervised.gate_url}/v1/completions",
         repr({"model": target_model, "prompt": "hi", "max_tokens": 4, "temperature": 0})],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(lambda: made.started_calls(op, holder.pid), f"the swap's slow {op}", 60)
    kill([psutil.Process(root)])
    status = int(asking.communicate(timeout=120)[0].strip() or 0)
    assert status in (200, 502, 503), status
    assert_consistent_after_restart(made, dying, root, tree)
    both = MODELS
    wait_until(lambda: all(made.ask(model) == 200 for model in both), "both models served", SERVE_BOUND_S)
