"""Several models behind one gate (GATE_MODELS): two stand-in vLLM servers on one fake GPU, swapped by the gate.

Each stand-in (TP=1, sleep mode on) takes 60% of GPU 0, so the two cannot be resident together: the library
refuses to restore one while the other holds the GPU. The gate runs as a subprocess; suspends and resumes go
through the real library and the fake cuda-checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from entrypoint.suspend.records import SuspendRecord
from tests.conftest import StandinServer, fakegpu, free_port
from tests.test_gate import REPO, SAFE_ENV, Gate, parse_metrics, series, wait_until
from tests.testing import TOGGLE_ALL_CLI

MODELS = ("alpha", "beta")  # alpha is the default (first) model
SHARE = "0.6"  # of a fake 80 GB GPU each: two do not fit
# The library checks host RAM before each suspend: a figure that holds both, whatever this machine has.
HOST_RAM_MIB = "400000"
FAKE_NVML = REPO / "tests" / "fakes" / "nvml"


@dataclass
class Swapped:
    gate: Gate
    servers: dict[str, StandinServer]
    fake_gpu: Path
    run_dir: Path  # CUDA_TOGGLE_RUN_DIR: the default model's suspend record; models/NAME/ for the others

    def ask(self, model: str, prompt: str, max_tokens: int = 8, timeout: float = 30) -> requests.Response:
        # ignore_eos: every answer has max_tokens tokens, whatever words the stand-in's TP ranks combine into
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        return requests.post(f"{self.gate.url}/v1/completions", json=body, timeout=timeout)

    def text(self, model: str, prompt: str, max_tokens: int = 8) -> str:
        response = self.ask(model, prompt, max_tokens)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model  # answered by that model's own server
        return response.json()["choices"][0]["text"]

    def model_status(self, model: str) -> dict:
        return self.gate.status()["models"][model]

    def cuda_pids(self, model: str) -> list[int]:
        """The model server's CUDA processes: its workers, or at TP=1 EngineCore (which runs the one worker)."""
        server = self.servers[model]
        workers = server.workers()
        return [worker.pid for worker in workers] if workers else [server.engine_core().pid]

    def holders_on_gpu(self) -> list[str]:
        """The models whose CUDA processes hold GPU memory now (not checkpointed)."""
        return [
            model
            for model in self.servers
            if all(fakegpu.read_state(pid, self.fake_gpu) in ("running", "locked") for pid in self.cuda_pids(model))
        ]

    def alone_on_gpu(self, model: str, timeout_s: float = 20.0) -> bool:
        """True once `model` is the only model on the GPU; fails after `timeout_s`. A request is answered as soon as
        its model's resume ended, so the checkpoint of the model swapped out (with the early wake) may still run."""
        wait_until(lambda: self.holders_on_gpu() == [model], f"{model} alone on the GPU", timeout_s)
        return True


def library_env(fake_gpu: Path, run_dir: Path) -> dict[str, str]:
    return {
        "CUDA_TOGGLE_BACKEND": "cli",
        "CUDA_TOGGLE_GPU_QUERY": "nvidia-smi",
        "CUDA_TOGGLE_RUN_DIR": str(run_dir),
        "CUDA_TOGGLE_SUPERVISOR_URL": "unix:///nonexistent",
        "CUDA_TOGGLE_VERIFY_SLEEP_S": "0.05",
        "CUDA_TOGGLE_HOST_RAM_MIB": HOST_RAM_MIB,
    }


def start_gate(tmp_path: Path, environ: dict[str, str]) -> subprocess.Popen:
    port = free_port()
    log_path = tmp_path / f"gate-{port}.log"
    env = {**os.environ, "GATE_HOST": "127.0.0.1", "GATE_PORT": str(port), "GATE_POLL_S": "0.05", **environ}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "entrypoint.gate", "--verbose"], cwd=REPO, env=env, stdout=log_file, stderr=log_file
        )
    process.port, process.log_path = port, log_path  # type: ignore[attr-defined]
    return process


@pytest.fixture
def swapped(fake_gpu: Path, tmp_path: Path, standin_server) -> Iterator[Callable[..., Swapped]]:
    """Factory: two stand-ins (alpha, beta) and the gate in front of both with GATE_MODELS; stopped at teardown."""
    gates: list[Gate] = []

    def start(
        step_s: float = 0.005,
        nvml: bool = False,
        tp: int = 1,
        standin_env: dict[str, str] | None = None,
        **settings: str,
    ) -> Swapped:
        """nvml: the gate reads the fake GPU through the fake NVML (per-process figures in one reading), which
        lets a swap overlap the two servers' transitions; else through the fake nvidia-smi. standin_env: added
        to both stand-ins' environment."""
        environ = {**SAFE_ENV, "VLLM_SERVER_DEV_MODE": "1", "STANDIN_STEP_S": str(step_s), **(standin_env or {})}
        if nvml:
            settings = {"PYTHONPATH": f"{FAKE_NVML}:{REPO}", "CUDA_TOGGLE_GPU_QUERY": "nvml", **settings}
        servers = {
            model: standin_server(
                "--served-model-name",
                model,
                "--gpu-memory-utilization",
                SHARE,
                "--enable-sleep-mode",
                "--disable-custom-all-reduce",  # refused at TP>1 otherwise (CUDA IPC memory)
                tensor_parallel_size=tp,
                env=environ,
            )  # fmt: skip
            for model in MODELS
        }
        entries = ",".join(f"{model}:standin-{model}:{servers[model].port}:{SHARE}" for model in MODELS)
        process = start_gate(tmp_path, {**library_env(fake_gpu, tmp_path / "run"), "GATE_MODELS": entries, **settings})
        front = Gate(process, process.port, process.log_path)  # type: ignore[attr-defined]
        gates.append(front)

        def placed() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the gate exited ({process.returncode}):\n{front.log()}")
            try:
                status = requests.get(front.url + "/gate/status", timeout=1).json()
            except requests.ConnectionError:
                return False
            return status["started"]

        # A failure bound, not an expectation: on a loaded 2-core machine the start-up (two warm-ups, one
        # suspend) took over 20 s.
        wait_until(placed, "the gate to start both servers", timeout=30)
        # Here both stand-ins loaded before the gate started (the gate starts real servers in turn): from now
        # on the fake GPU must never hold more than it has.
        (fake_gpu / "overcommitted").unlink(missing_ok=True)
        return Swapped(front, servers, fake_gpu, tmp_path / "run")

    yield start
    for front in gates:
        front.stop()
    assert fakegpu.overcommits(fake_gpu) == []  # no two servers were ever resident together


def test_alternating_requests_swap_the_servers(swapped):
    """At start only the default is resident and /v1/models lists both; then requests alternating between the
    models swap them each time, only one is ever on the GPU, and the answers stay right."""
    fleet = swapped()
    assert fleet.holders_on_gpu() == ["alpha"]  # at start: the default runs, the other is suspended
    assert fleet.model_status("alpha")["default"] and fleet.model_status("beta")["state"] == "suspended"
    listed = requests.get(f"{fleet.gate.url}/v1/models", timeout=5).json()
    assert [entry["id"] for entry in listed["data"]] == ["alpha", "beta"]  # listing wakes nothing
    unknown = fleet.ask("gamma", "steady")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFoundError"
    assert fleet.holders_on_gpu() == ["alpha"]
    # Greedy answers of the stand-in depend on the prompt only: the resident server's answer is both models'.
    expected = (
        fleet.servers["alpha"]
        .post("/v1/completions", {"model": "alpha", "prompt": "steady", "max_tokens": 8, "temperature": 0})
        .json()["choices"][0]["text"]
    )
    assert fleet.text("alpha", "steady") == expected
    run_dirs = {"alpha": str(fleet.run_dir), "beta": str(fleet.run_dir / "models" / "beta")}
    for model in ("beta", "alpha", "beta", "alpha"):
        assert fleet.text(model, "steady") == expected
        assert fleet.holders_on_gpu() == [model]
        # Each server keeps its own suspend record: the suspended one's is there, the resident one's is not.
        assert {name for name, run_dir in run_dirs.items() if SuspendRecord.any(run_dir)} == set(MODELS) - {model}
    alpha, beta = fleet.model_status("alpha"), fleet.model_status("beta")
    assert (alpha["state"], beta["state"]) == ("running", "suspended")
    assert (alpha["swaps"], beta["swaps"]) == (2, 2)
    assert alpha["swap_seconds"] > 0 and beta["last_swap_s"] > 0
    assert alpha["failed_swaps"] == beta["failed_swaps"] == 0
    assert beta["waited_requests"] == 2 and beta["waited_seconds"] > 0
    metrics = fleet.gate.metrics()
    assert metrics[series("vllm_gate_model_swaps_total", model="beta")] == 2
    assert metrics[series("vllm_gate_model_swap_seconds_total", model="alpha")] > 0
    assert metrics[series("vllm_gate_model_waited_requests_total", model="alpha")] == 2
    assert metrics[series("vllm_gate_model_state", model="alpha", state="running")] == 1
    assert metrics[series("vllm_gate_model_state", model="beta", state="suspended")] == 1
    assert metrics[series("vllm_gate_transitions_total", transition="suspend", outcome="ok")] == 5  # 1 at start


def test_concurrent_requests_for_both_models_are_all_answered(swapped):
    """Eight clients asking both models at once: every request is answered, by the right model, correctly."""
    fleet = swapped()
    expected = dict.fromkeys(MODELS, fleet.text("alpha", "together"))

    def client(index: int) -> list[tuple[str, str]]:
        answers = []
        for turn in range(2):
            model = MODELS[(index + turn) % 2]
            answers.append((model, fleet.text(model, "together")))
        return answers

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [answer for answers in pool.map(client, range(8)) for answer in answers]
    assert len(results) == 16
    assert all(text == expected[model] for model, text in results)
    assert len(fleet.holders_on_gpu()) == 1
    status = fleet.gate.status()
    assert all(entry["in_flight"] == 0 and entry["waiting"] == 0 for entry in status["models"].values())


@pytest.mark.parametrize(
    ("nvml", "tp"), [(False, 1), (True, 1), (True, 2)], ids=["serial", "overlapped", "overlapped-tp2"]
)
def test_swap_under_load_waits_for_the_requests_in_flight_and_loses_nothing(swapped, nvml: bool, tp: int):
    """Long requests on alpha finish whole before beta is swapped in; beta's requests wait, then all answer
    (overlapped: beta restores, locked, while alpha's requests finish)."""
    fleet = swapped(step_s=0.02, nvml=nvml, tp=tp)
    outcomes: dict[str, list] = {"alpha": [], "beta": []}
    lock = threading.Lock()

    def ask(model: str, max_tokens: int) -> None:
        response = fleet.ask(model, f"load {model}", max_tokens=max_tokens)
        with lock:
            outcomes[model].append(response)

    alpha_clients = [threading.Thread(target=ask, args=("alpha", 40)) for _ in range(3)]
    for thread in alpha_clients:
        thread.start()
    wait_until(lambda: fleet.model_status("alpha")["in_flight"] == 3, "alpha's three requests in flight")
    beta_clients = [threading.Thread(target=ask, args=("beta", 5)) for _ in range(3)]
    for thread in beta_clients:
        thread.start()
    wait_until(lambda: fleet.model_status("beta")["waiting"] == 3, "beta's requests waiting")
    assert fleet.holders_on_gpu() == ["alpha"]  # alpha is not suspended under its requests
    # A new request for alpha during the drain waits for a later swap, after beta's turn.
    late = threading.Thread(target=ask, args=("alpha", 5))
    late.start()
    for thread in alpha_clients + beta_clients + [late]:
        thread.join(timeout=30)
    assert len(outcomes["alpha"]) == 4 and len(outcomes["beta"]) == 3
    for response in outcomes["alpha"] + outcomes["beta"]:
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "length"
    assert sorted(r.json()["usage"]["completion_tokens"] for r in outcomes["alpha"]) == [5, 40, 40, 40]
    for model, server in fleet.servers.items():
        aborted = parse_metrics(server.get("/metrics").text)["standin:aborted_requests_total"]
        assert aborted == 0, model
    assert fleet.model_status("beta")["swaps"] == 1 and fleet.model_status("alpha")["swaps"] == 1
    assert "waiting for its 3 request(s) in flight" in fleet.gate.log()


def test_failed_swap_answers_503_and_the_next_request_swaps(swapped):
    """A suspend that fails during a swap: that request gets 503, the resident model keeps serving, a retry swaps."""
    fleet = swapped()
    fakegpu.add_fault(fleet.servers["alpha"].engine_core().pid, "checkpoint", "error", root=fleet.fake_gpu)
    refused = fleet.ask("beta", "retry")
    assert refused.status_code == 503, refused.text
    assert fleet.model_status("beta")["failed_swaps"] == 1
    assert fleet.holders_on_gpu() == ["alpha"] and fleet.text("alpha", "still") != ""
    assert fleet.text("beta", "retry") != "" and fleet.alone_on_gpu("beta")
    assert "swap to model beta failed" in fleet.gate.log()


def finished_at(fleet: Swapped, op: str, model: str) -> list[int]:
    """When each `op` of `model`'s EngineCore returned ok (monotonic ns, from the fakes' call log)."""
    pid = fleet.cuda_pids(model)[0]
    return [stamp for stamp, name, caller, result in fakegpu.read_calls(fleet.fake_gpu) if (name, caller) == (op, pid)
            and result == "ok"]  # fmt: skip


def started_at(fleet: Swapped, op: str, model: str) -> list[int]:
    """When each `op` of `model`'s EngineCore began (monotonic ns, from the fakes' start log)."""
    pid = fleet.cuda_pids(model)[0]
    return [stamp for stamp, name, caller in fakegpu.read_starts(fleet.fake_gpu) if (name, caller) == (op, pid)]


@pytest.mark.parametrize("tp", [1, 2])
def test_swap_restores_the_next_server_while_the_last_one_is_checkpointed(swapped, tp: int):
    """With per-process figures (NVML), beta's restore (its contexts: it fits beside alpha) runs while alpha sleeps
    and is checkpointed; beta unlocks and wakes only after alpha's suspend ended (no early wake): never both
    resident, steps shown."""
    fleet = swapped(nvml=True, tp=tp, GATE_SWAP_EARLY_WAKE="0")
    for pid in fleet.cuda_pids("alpha"):
        fakegpu.add_fault(pid, "checkpoint", "slow:0.6", root=fleet.fake_gpu)
    assert fleet.text("beta", "overlap") != "" and fleet.alone_on_gpu("beta")
    # Orderings, not durations (a loaded machine stretches those): beta's restore began before alpha's
    # checkpoint ended (they overlapped), and beta was unlocked only after it ended.
    (restore_began,), (checkpointed,), (unlocked,) = (
        started_at(fleet, "restore", "beta"), finished_at(fleet, "checkpoint", "alpha")[-1:],
        finished_at(fleet, "unlock", "beta"),
    )  # fmt: skip
    assert restore_began < checkpointed < unlocked
    steps = fleet.model_status("beta")["last_swap_steps"]
    assert {"sleep", "lock", "checkpoint", "verify"} <= set(steps["suspend alpha"])
    assert steps["suspend alpha"]["checkpoint"] >= 0.6
    assert {"restore", "wait_for_room", "unlock", "wake_up", "probe"} <= set(steps["resume beta"])
    assert "model beta: restoring it while alpha is suspended" in fleet.gate.log()
    for model in ("alpha", "beta", "alpha"):  # and on: each swap overlaps
        assert fleet.text(model, "overlap") != "" and fleet.alone_on_gpu(model)
    assert fleet.gate.log().count(": restoring it while") == 4


def test_a_restore_that_does_not_fit_beside_the_resident_server_waits_for_its_sleep(swapped):
    """When beta's restore does not fit beside resident alpha (a large restore margin here), it starts once alpha's
    sleep has freed its weights and KV cache, still before alpha's checkpoint ends."""
    fleet = swapped(nvml=True, CUDA_TOGGLE_RESTORE_MARGIN_MIB="40000")  # 32.6 GB free beside alpha, 80 GB after
    # alpha's checkpoint is held until beta's restore has begun (at most 30 s): a delay alone was outrun under
    # load (the restore began 0.34 s after a checkpoint slowed by 0.6 s had ended). Were the restore to wait for
    # the checkpoint instead, the checkpoint would end first, after the 30 s, and the ordering below fail.
    held = fleet.servers["alpha"].engine_core().pid
    fakegpu.add_fault(held, "checkpoint", "until-begun:restore:30", root=fleet.fake_gpu)
    assert fleet.text("beta", "late") != "" and fleet.alone_on_gpu("beta")
    # Every CUDA process of beta's tree (the API server's context too): the fault lets the checkpoint end as soon
    # as the first of their restores, run in parallel, has begun.
    beta = fleet.servers["beta"]
    betas = {beta.pid, beta.engine_core().pid, *fleet.cuda_pids("beta")}
    restores_began = [stamp for stamp, op, pid in fakegpu.read_starts(fleet.fake_gpu)
                      if op == "restore" and pid in betas]  # fmt: skip
    checkpointed = [stamp for stamp, op, pid, result in fakegpu.read_calls(fleet.fake_gpu)
                    if (op, pid, result) == ("checkpoint", held, "ok")]  # fmt: skip
    log = fleet.gate.log()
    # they overlapped (an ordering: load stretches durations)
    assert min(restores_began) < checkpointed[-1], log[-6000:]
    assert "model alpha: memory released, checkpointing it while beta restores" in log
    assert "restoring it while alpha is suspended" not in log


@pytest.mark.parametrize("tp", [1, 2])
def test_a_victim_that_fails_to_checkpoint_withdraws_the_overlapped_resume(swapped, tp: int):
    """alpha's checkpoint fails after beta began restoring: alpha runs again, beta is checkpointed again without
    ever waking, the request gets 503, alpha keeps serving, and the next request for beta swaps (no early wake)."""
    fleet = swapped(nvml=True, tp=tp, GATE_SWAP_EARLY_WAKE="0")
    fakegpu.add_fault(fleet.cuda_pids("alpha")[-1], "checkpoint", "error-after:0.4", root=fleet.fake_gpu)
    refused = fleet.ask("beta", "withdrawn")
    assert refused.status_code == 503, refused.text
    assert fleet.holders_on_gpu() == ["alpha"] and fleet.text("alpha", "still") != ""
    assert {fakegpu.read_state(pid, fleet.fake_gpu) for pid in fleet.cuda_pids("beta")} == {"checkpointed"}
    assert finished_at(fleet, "restore", "beta") and finished_at(fleet, "unlock", "beta") == []
    log = fleet.gate.log()
    assert "the resume was withdrawn" in log and "suspending model alpha to make room failed" in log
    status = fleet.model_status("beta")
    assert (status["state"], status["failed_swaps"]) == ("suspended", 1)
    assert fleet.text("beta", "withdrawn") != "" and fleet.alone_on_gpu("beta")


def test_host_ram_that_cannot_hold_the_suspended_servers_is_refused_at_start(fake_gpu: Path, tmp_path: Path):
    """GATE_MODELS whose suspended servers need more host RAM than there is: exit 2, naming the fix."""
    environ = {
        **library_env(fake_gpu, tmp_path / "run"),
        "CUDA_TOGGLE_HOST_RAM_MIB": "60000",  # one suspended server needs 0.6 x 2 fake GPUs = 97870 MiB
        "GATE_MODELS": f"alpha:a:{free_port()}:0.6,beta:b:{free_port()}:0.6",
    }
    process = start_gate(tmp_path, environ)
    assert process.wait(timeout=20) == 2
    log = process.log_path.read_text()  # type: ignore[attr-defined]
    assert "host RAM must hold up to 97870 MiB" in log and "60000 MiB is available" in log
    assert "Lower the memory shares in GATE_MODELS" in log and "Traceback" not in log
    smaller = start_gate(tmp_path, {**environ, "GATE_MODELS": environ["GATE_MODELS"].replace("0.6", "0.3")})
    try:
        wait_until(lambda: "vllm-gate listening" in smaller.log_path.read_text(), "the gate to start", 15)  # type: ignore[attr-defined]
    finally:
        smaller.terminate()
        smaller.wait(timeout=15)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("alpha:m:8001", "which is not served-name:model:port:memory-share"),
        ("al pha:m:8001:0.5", "has the served name 'al pha'"),
        ("alpha:m:8001:1.5", "has the memory share 1.5"),
        ("alpha:m:8001:0.5,alpha:n:8002:0.5", "gives the served name alpha to several models"),
        ("alpha:m:8001:0.5,beta:n:8001:0.5", "gives the port 8001 to several models"),
    ],
)
def test_bad_model_lists_exit_2_with_the_fix(tmp_path: Path, value: str, message: str):
    """A malformed GATE_MODELS stops the gate at once with exit 2 and says what to write instead."""
    process = start_gate(tmp_path, {"GATE_MODELS": value})
    assert process.wait(timeout=20) == 2
    log = process.log_path.read_text()  # type: ignore[attr-defined]
    assert message in log and "Traceback" not in log


def test_supervisord_runs_a_program_per_model_started_one_after_another(fake_gpu: Path):
    """Under the real supervisord (start-services.sh, supervisord.conf): `vllm-beta` starts and is suspended before
    `vllm` (the default model) starts; then a request for beta swaps the two programs' servers."""
    from tests.test_container import STANDIN, start_supervised

    ports = {model: free_port() for model in MODELS}
    entries = ",".join(f"{model}:standin-{model}:{ports[model]}:{SHARE}" for model in MODELS)
    base_args = ["--model", "standin", "--tensor-parallel-size", "1", "--host", "127.0.0.1", "--port", "1"]
    settings = {key: value for key, value in library_env(fake_gpu, Path()).items() if not key.endswith(("URL", "DIR"))}
    supervised = start_supervised(
        f"{sys.executable} {STANDIN}", base_args, ports["alpha"], GATE_MODELS=entries, VLLM_SLEEP_MODE="1",
        FAKE_CUDA_STATE_DIR=str(fake_gpu), SPT_NOENV="1", STANDIN_STEP_S="0.005", **settings,
    )  # fmt: skip
    try:

        def started() -> bool:
            try:
                return requests.get(f"{supervised.gate_url}/gate/status", timeout=1).json()["started"]
            except (requests.ConnectionError, ValueError):
                return False

        wait_until(started, "the gate to start both programs", timeout=45)
        # STARTING: younger than supervisord's startsecs (10 s), and running.
        assert {supervised.info(program)["statename"] for program in ("vllm", "vllm-beta")} <= {"STARTING", "RUNNING"}
        log = supervised.log()
        order = [
            log.index("model beta: supervisord program vllm-beta: started"),
            log.index("suspended of model beta"),
            log.index("model alpha: supervisord program vllm: started"),
        ]
        assert order == sorted(order), log[-3000:]
        body = {"model": "beta", "prompt": "hi", "max_tokens": 4, "temperature": 0}
        response = requests.post(f"{supervised.gate_url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 200 and response.json()["model"] == "beta", response.text
        models = requests.get(f"{supervised.gate_url}/gate/status", timeout=5).json()["models"]
        assert (models["alpha"]["state"], models["beta"]["state"]) == ("suspended", "running")
    finally:
        supervised.shutdown()


def test_each_model_is_suspended_when_idle_and_a_request_brings_it_back(swapped):
    """GATE_IDLE_SUSPEND_S applies per model: both idle ones end suspended; a request resumes one with no swap out."""
    fleet = swapped(GATE_IDLE_SUSPEND_S="1")
    wait_until(lambda: fleet.model_status("alpha")["state"] == "suspended", "alpha's idle suspend", timeout=15)
    assert fleet.holders_on_gpu() == []
    assert fleet.text("beta", "idle") != "" and fleet.alone_on_gpu("beta")
    assert "swap to model beta: suspending nothing" in fleet.gate.log()
    wait_until(lambda: fleet.model_status("beta")["state"] == "suspended", "beta's idle suspend", timeout=15)
    assert fleet.model_status("alpha")["swaps"] == 0 and fleet.model_status("beta")["swaps"] == 1


def test_a_model_whose_server_is_gone_does_not_block_swaps(swapped):
    """The resident model's server died: a request for the other model still swaps it in and is answered."""
    fleet = swapped()
    fleet.servers["alpha"].kill_tree()
    assert fleet.text("beta", "alone") != "" and fleet.model_status("beta")["state"] == "running"
    assert "model alpha: no server on the GPUs, not in the way" in fleet.gate.log()


@pytest.mark.parametrize("tp", [1, 2])
def test_early_wake_wakes_the_target_before_the_victims_checkpoint_ends(swapped, tp: int):
    """GATE_SWAP_EARLY_WAKE (default): beta's whole share fits beside alpha's post-sleep residual, so beta unlocks
    and wakes up while alpha's checkpoint still runs; the fake GPU never holds more than it has (the fixture checks
    its over-commit log), alpha's memory proof passes, and the path is reported in /gate/status."""
    fleet = swapped(nvml=True, tp=tp)
    for pid in fleet.cuda_pids("alpha"):
        fakegpu.add_fault(pid, "checkpoint", "slow:0.8", root=fleet.fake_gpu)
    assert fleet.text("beta", "early") != "" and fleet.alone_on_gpu("beta")
    (restored,), (unlocked,) = finished_at(fleet, "restore", "beta"), finished_at(fleet, "unlock", "beta")
    checkpointed = finished_at(fleet, "checkpoint", "alpha")[-1]
    assert restored < unlocked < checkpointed  # woken before alpha's checkpoint ended
    status = fleet.model_status("beta")
    assert status["last_swap_path"].endswith("woken before the checkpoint ended")
    wait_until(lambda: fleet.model_status("alpha")["state"] == "suspended", "alpha's suspend to end", 20)
    assert fleet.model_status("alpha")["proof"] == "per-process"
    assert "model beta: waking it up while alpha is checkpointed" in fleet.gate.log()
    assert fleet.text("alpha", "back") != "" and fleet.alone_on_gpu("alpha")


def test_a_victim_whose_checkpoint_fails_after_the_early_wake_stays_asleep(swapped):
    """alpha's checkpoint fails after beta woke: beta answers, alpha stays asleep (its CUDA processes running,
    vLLM asleep: no over-commit), and the next request for alpha swaps it back in."""
    fleet = swapped(nvml=True)
    fakegpu.add_fault(fleet.cuda_pids("alpha")[-1], "checkpoint", "error-after:0.8", root=fleet.fake_gpu)
    assert fleet.text("beta", "up") != ""
    wait_until(lambda: fleet.model_status("alpha")["state"] == "asleep", "alpha to stay asleep", 10)
    assert fleet.servers["alpha"].get("/is_sleeping").json() == {"is_sleeping": True}
    assert "vLLM stays asleep" in fleet.gate.log()
    assert fleet.text("alpha", "again") != "" and fleet.alone_on_gpu("alpha")


def test_a_victim_whose_memory_stays_after_the_early_wake_stays_asleep(swapped):
    """alpha's checkpoint 'succeeds' but its memory stays on the GPU (the proof fails, exit 9's undo) after beta
    woke: the undo leaves alpha asleep instead of waking it into the memory beta holds; the fake GPU never
    over-commits (the fixture checks) and the next request for alpha swaps it back in."""
    fleet = swapped(nvml=True)
    fakegpu.add_fault(fleet.cuda_pids("alpha")[-1], "checkpoint", "keep-memory", root=fleet.fake_gpu)
    assert fleet.text("beta", "up") != ""
    wait_until(lambda: fleet.model_status("alpha")["state"] == "asleep", "alpha to stay asleep", 10)
    assert fleet.servers["alpha"].get("/is_sleeping").json() == {"is_sleeping": True}
    assert "the checkpoint was undone and vLLM stays asleep" in fleet.gate.log()
    assert fleet.text("alpha", "again") != "" and fleet.alone_on_gpu("alpha")


def test_a_server_in_light_sleep_is_left_asleep_where_the_target_fits_beside_it(swapped):
    """The cheapest way to make room: alpha sleeps lightly (GATE_IDLE_SLEEP_S) and beta's share fits beside its
    residual, so the swap to beta checkpoints nothing of alpha; a request for alpha then suspends beta and wakes
    alpha from its light sleep. The fake GPU never over-commits (the fixture checks)."""
    fleet = swapped(nvml=True, GATE_IDLE_SLEEP_S="0.3")
    wait_until(lambda: fleet.model_status("alpha")["state"] == "asleep", "alpha's light sleep", 10)
    assert fleet.text("beta", "beside") != ""
    assert fleet.model_status("beta")["last_swap_path"] == "beside the light sleep"
    assert {fakegpu.read_state(pid, fleet.fake_gpu) for pid in fleet.cuda_pids("alpha")} == {"running"}
    assert finished_at(fleet, "checkpoint", "alpha") == []  # never checkpointed
    assert fleet.text("alpha", "woken") != "" and fleet.alone_on_gpu("alpha")
    assert fleet.model_status("alpha")["last_wake_s"] is not None


def requests_at(server: StandinServer) -> float:
    """How many requests the stand-in has been handed (vLLM queues them even while it sleeps)."""
    return parse_metrics(server.get("/metrics").text)["standin:requests_total"]


@pytest.mark.parametrize("tp", [1, 2])
def test_requests_waiting_for_a_swap_are_answered_once_the_target_resumed_while_the_other_still_checkpoints(
    swapped, tmp_path: Path, tp: int
):
    """Early wake: beta wakes while alpha's checkpoint goes on (held here until the test lets it end). The requests
    waiting for beta reach it only once its resume ended well (nothing while its wake-up is held back), and are
    answered then, before alpha's checkpoint has ended."""
    hold = tmp_path / "wake-hold"
    fleet = swapped(nvml=True, tp=tp, standin_env={"STANDIN_WAKE_HOLD_FILE": str(hold)})
    expected = fleet.text("alpha", "early")  # greedy answers depend on the prompt only
    for pid in fleet.cuda_pids("alpha"):
        fakegpu.add_fault(pid, "checkpoint", "until-released:60", root=fleet.fake_gpu)
    beta = fleet.servers["beta"]
    handed_over = requests_at(beta)
    hold.write_text("hold")
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = [pool.submit(fleet.text, "beta", "early") for _ in range(2)]
        unlocked = lambda: {fakegpu.read_state(pid, fleet.fake_gpu) for pid in fleet.cuda_pids("beta")} == {"running"}  # noqa: E731
        wait_until(unlocked, "beta restored and unlocked", 20)
        time.sleep(0.5)
        assert fleet.model_status("beta")["state"] == "resuming" and requests_at(beta) == handed_over
        assert not any(answer.done() for answer in answers)
        hold.unlink()
        assert [answer.result(timeout=30) for answer in answers] == [expected, expected]
        assert fleet.model_status("alpha")["state"] == "suspending"  # its checkpoint is still held
    for pid in fleet.cuda_pids("alpha"):
        (fakegpu.pid_dir(pid, fleet.fake_gpu) / "released").write_text("1\n")
    assert fleet.alone_on_gpu("beta")
    wait_until(lambda: fleet.model_status("alpha")["state"] == "suspended", "alpha's suspend to end", 20)
    assert fleet.model_status("beta")["last_swap_path"].endswith("woken before the checkpoint ended")


def test_a_swap_whose_target_fails_to_wake_answers_503_and_sends_nothing_to_it(swapped, tmp_path: Path):
    """beta's CUDA state comes back but its wake-up fails: the requests waiting for the swap get 503 and none of
    them reached beta; once the wake-up works again, the next request swaps beta in and is answered."""
    hold = tmp_path / "wake-hold"
    fleet = swapped(nvml=True, standin_env={"STANDIN_WAKE_HOLD_FILE": str(hold)})
    expected = fleet.text("alpha", "no wake")
    beta = fleet.servers["beta"]
    handed_over = requests_at(beta)
    hold.write_text("fail")
    with ThreadPoolExecutor(max_workers=2) as pool:
        refused = list(pool.map(lambda _: fleet.ask("beta", "no wake"), range(2)))
    assert [response.status_code for response in refused] == [503, 503]
    assert requests_at(beta) == handed_over
    assert fleet.model_status("beta")["failed_swaps"] >= 1
    hold.unlink()
    assert fleet.text("beta", "no wake") == expected


def test_a_hold_of_one_model_leaves_the_other_serving(swapped):
    """hold --model beta: beta's requests get 503 with Retry-After, alpha keeps serving; release lets beta swap in."""
    fleet = swapped(nvml=True)
    entries = ",".join(f"{model}:standin-{model}:{fleet.servers[model].port}:{SHARE}" for model in MODELS)
    environ = {**os.environ, **library_env(fleet.fake_gpu, fleet.run_dir), "GATE_MODELS": entries}

    def toggle(*args: str) -> dict:
        done = subprocess.run([*TOGGLE_ALL_CLI, *args, "--json"], capture_output=True, text=True, cwd=REPO, env=environ)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    held = toggle("hold", "--model", "beta")
    assert held["held"] and held["model"] == "beta"
    refused = fleet.ask("beta", "held")
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
    assert fleet.text("alpha", "serving") != "" and fleet.alone_on_gpu("alpha")
    assert fleet.model_status("beta")["hold"]["model"] == "beta" and fleet.model_status("alpha")["hold"] is None
    assert fleet.gate.metric("vllm_gate_held", model="beta") == 1
    toggle("release", "--model", "beta", "--no-resume")
    assert fleet.text("beta", "released") != "" and fleet.alone_on_gpu("beta")
