"""Fixtures shared by the tests: the fake GPU and the stand-in vLLM server (see tests/fakes/README.md)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests

from tests.testing import FAKES_DIR, fakegpu, free_port, scaled

STANDIN_VLLM = FAKES_DIR / "standin_vllm.py"
STANDIN_MODEL = "standin-model"
FAKE_GPU_COUNT = 2
FAKE_GPU_TOTAL_MIB = 81559  # an H100 80GB
FAKE_GPU_BASELINE_MIB = 4  # what nvidia-smi shows on an idle GPU


# The slow tier: `make check` runs every test, `make check-fast` (the edit loop) leaves these out: a test
# that starts a server (the stand-in vLLM, a fake vLLM process tree, the gate, supervisord) takes seconds,
# so the quick tier keeps the tests that run in-process or start only short-lived commands. Slow are the
# tests that use a fixture starting one, whole files that do (the install test builds a venv; the GPU
# suite's CPU run, the fault tests and the benchmark start many servers; the dummy-model test loads
# transformers), and tests marked @pytest.mark.slow themselves (those that start supervisord); but for
# the few whole cycles of QUICK_CYCLES.
SLOW_FILES = {"test_install.py", "test_gpu_suite_cpu.py", "test_faults.py", "test_benchmarks.py", "test_dummy_model.py"}
SERVER_FIXTURES = {"standin_server", "fake_tree"}
# A few whole cycles stay in the quick tier, so that the edit loop still suspends and resumes something.
QUICK_CYCLES = {
    "test_cuda_toggle_all.py::test_suspend_and_resume_move_every_cuda_process[driver]",
    "test_quiesce.py::test_scheduler_pause_suspends_any_tp_size_and_keeps_every_request[1-plain]",
    "test_quiesce.py::test_scheduler_pause_suspends_any_tp_size_and_keeps_every_request[2-hybrid]",
    "test_selftest.py::test_passing_run_at_tp2",
    "test_gate.py::test_idle_server_is_suspended_and_the_next_request_wakes_it",
}


# The longest tests (a minute or more each on 2 busy cores) start first, then the other slow ones, the quick
# ones last: with pytest-xdist no worker is then still in a long test while the others have run out of work.
# A test that waits for others to finish goes last.
LONGEST = ("test_install.py", "test_gpu_suite_cpu.py", "test_faults.py::test_kill_during", "test_swap.py::")
LAST = "test_faults.py::test_every_phase_was_hit"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: left out of `make check-fast` (the quick tier); `make check` runs it")
    start_python_fast()


def start_python_fast() -> None:
    """The tests start thousands of short Python processes (the fakes, the CLI, the stand-in's processes).

    The fakes run through `env python3`: this interpreter's folder first on PATH spares each one a version
    manager's shim (pyenv's costs more than the fake itself). With PYTHONDONTWRITEBYTECODE set, each would
    compile again every module of this repository it imports: the tests write the bytecode (__pycache__,
    ignored by git), as Python does by default."""
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False


def stretch_timeout(item: pytest.Item) -> None:
    """The hang bound of a test (its timeout marker, else pyproject's `timeout`) stretched like the waits
    (tests/testing.py, WAIT_SCALE): a loaded machine runs every test several times slower. A timeout given
    on the command line (--timeout) or in PYTEST_TIMEOUT is left as it is."""
    if item.config.getoption("timeout", None) is not None or os.environ.get("PYTEST_TIMEOUT"):
        return
    marker = item.get_closest_marker("timeout")
    if marker is None:
        seconds, options = item.config.getini("timeout"), {}
    else:
        seconds = marker.args[0] if marker.args else marker.kwargs.get("timeout")
        options = {key: value for key, value in marker.kwargs.items() if key != "timeout"}
    if seconds:
        item.add_marker(pytest.mark.timeout(scaled(float(seconds)), **options), append=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        stretch_timeout(item)
        if module_fixtures(item):  # (pytest-xdist --dist loadgroup) on one worker: the fixture starts once
            item.add_marker(pytest.mark.xdist_group(item.path.name))
        if f"{item.path.name}::{item.name}" in QUICK_CYCLES:
            continue
        if item.path.name in SLOW_FILES or SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

    def start_order(item: pytest.Item) -> int:
        name = f"{item.path.name}::{item.name}"
        if name == LAST:
            return len(LONGEST) + 2
        longest = [rank for rank, prefix in enumerate(LONGEST) if name.startswith(prefix)]
        if longest:
            return longest[0]
        return len(LONGEST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=start_order)  # stable: each file's tests keep their order


def module_fixtures(item: pytest.Item) -> list[str]:
    """The fixtures of module scope the test uses (defined in tests/, not pytest's own)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    return [
        name
        for name, definitions in info.name2fixturedefs.items()
        if definitions[-1].scope == "module" and "tests" in Path(definitions[-1].baseid or ".").parts
    ]


@pytest.fixture
def fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake machine with FAKE_GPU_COUNT GPUs; returns its state directory.

    Sets FAKE_CUDA_STATE_DIR to it and puts tests/fakes first on PATH, so processes started by the test
    find the fake `cuda-checkpoint` and `nvidia-smi`.
    """
    root = tmp_path / "fake-gpu"
    gpus = [
        (index, f"GPU-{uuid.UUID(int=index + 1)}", FAKE_GPU_TOTAL_MIB, FAKE_GPU_BASELINE_MIB)
        for index in range(FAKE_GPU_COUNT)
    ]
    fakegpu.write_gpus(root, gpus)
    monkeypatch.setenv("FAKE_CUDA_STATE_DIR", str(root))
    monkeypatch.setenv("PATH", f"{FAKES_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    return root


def is_dead(process: psutil.Process) -> bool:
    """Gone, or a zombie: orphans wait for PID 1 to reap them, which can take a second here."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until_dead(processes: list[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """Waits until every process is dead (see is_dead); returns those still alive after scaled(`timeout`)."""
    deadline = time.monotonic() + scaled(timeout)
    while (alive := [process for process in processes if not is_dead(process)]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return alive


def process_title(process: psutil.Process) -> str:
    """The title setproctitle gave the process (its whole command line)."""
    return " ".join(part for part in process.cmdline() if part)


@dataclass
class StandinServer:
    """A running tests/fakes/standin_vllm.py: API server -> VLLM::EngineCore -> VLLM::Worker_TP*."""

    process: subprocess.Popen
    port: int
    log_path: Path
    family: list[psutil.Process] = field(default_factory=list)  # the tree, as of when it came up

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=timeout, **kwargs)

    def post(self, path: str, json: object = None, timeout: float = 10, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=json, timeout=timeout, **kwargs)

    def engine_core(self) -> psutil.Process:
        (engine,) = psutil.Process(self.pid).children()
        return engine

    def workers(self) -> list[psutil.Process]:
        """The worker processes, in rank order (Worker_TP0 first)."""
        return sorted(self.engine_core().children(), key=process_title)

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                pytest.fail(f"stand-in exited ({self.process.returncode}) before {what}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"stand-in not {what} after {timeout} s:\n{self.log()}")
            time.sleep(0.02)

    def answers_health(self) -> bool:
        try:
            return self.get("/health", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def kill_tree(self) -> None:
        family = list(self.family)
        if self.process.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                family += psutil.Process(self.pid).children(recursive=True)
            self.process.kill()
        self.process.wait(timeout=10)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGKILL)  # psutil refuses if the PID was reused meanwhile
        wait_until_dead(family, timeout=10)


@pytest.fixture
def standin_server(tmp_path: Path) -> Iterator[Callable[..., StandinServer]]:
    """Factory: standin_server(*args, tensor_parallel_size=2, env=None, wait_ready=True, timeout=20)
    starts the stand-in vLLM on a free port with `args` appended to the defaults (--model standin-model,
    --tensor-parallel-size, --host 127.0.0.1, --port) and `env` added to os.environ; waits for its ready
    line (or, with wait_ready=False, only for /health). Output goes to server.log_path. The whole process
    tree is killed at teardown."""
    started: list[StandinServer] = []

    def start(
        *args: str,
        tensor_parallel_size: int = 2,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        timeout: float = 20.0,
    ) -> StandinServer:
        port = free_port()
        log_path = tmp_path / f"standin-{port}.log"
        command = [
            sys.executable,
            str(STANDIN_VLLM),
            "--model",
            STANDIN_MODEL,
            "--tensor-parallel-size",
            str(tensor_parallel_size),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ]
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        server = StandinServer(process, port, log_path)
        started.append(server)
        if wait_ready:
            server.wait_until(lambda: "standin: ready (pid" in server.log(), "ready", timeout)
        else:
            server.wait_until(server.answers_health, "answering /health", timeout)
        with contextlib.suppress(psutil.NoSuchProcess):
            api_server = psutil.Process(process.pid)
            server.family = [api_server, *api_server.children(recursive=True)]
        return server

    yield start
    for server in started:
        server.kill_tree()


# cuda-toggle-all's fixtures (its environment over the fake GPU, fake vLLM process trees)
from tests.toggle_fixtures import fake_libcuda, fake_tree, server_tag, toggle_env  # noqa: E402, F401
