"""Fixtures for cuda-toggle-all's tests: its environment over the fake GPU, and fake vLLM process trees."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from entrypoint.suspend.safety import REQUIRED_SERVER_ENV
from tests.testing import FAKES_DIR, REPO, TOGGLE_ALL_CLI, fakegpu
from tests.testing import wait_until as sleep_until  # noqa: F401 (the name its tests import from here)

# What a correctly configured TP=2 vLLM runs with (docs/facts.md); the safety checks refuse without it.
SAFE_ENV = dict(REQUIRED_SERVER_ENV)
SAFE_ARGS = "--tensor-parallel-size 2 --disable-custom-all-reduce"
VLLM_TITLE = "python3 -m vllm.entrypoints.openai.api_server"


@pytest.fixture(scope="session")
def fake_libcuda(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/fakes/fake_libcuda.c built with gcc into a libcuda.so.1 (the driver backend's fake)."""
    out = tmp_path_factory.mktemp("libcuda") / "libcuda.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(FAKES_DIR / "fake_libcuda.c")], check=True)
    return out


@dataclass
class ToggleEnv:
    state_dir: Path
    run_dir: Path

    def run(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the real `cuda-toggle-all` CLI (as `python -m`), capturing its output."""
        return subprocess.run(
            [*TOGGLE_ALL_CLI, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )

    def start(self, *args: str, **popen: object) -> subprocess.Popen:
        """The real `cuda-toggle-all` CLI in the background, its output piped as text (`popen` overrides)."""
        options = {"cwd": REPO, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
        return subprocess.Popen([*TOGGLE_ALL_CLI, *args], **options)

    def run_json(self, *args: str, **kwargs) -> tuple[int, dict]:
        done = self.run(*args, "--json", **kwargs)
        try:
            return done.returncode, json.loads(done.stdout)
        except ValueError:
            raise AssertionError(f"no JSON on stdout (rc {done.returncode}):\n{done.stdout}\n{done.stderr}")

    def calls(self) -> list[tuple[int, str, int, str]]:
        return fakegpu.read_calls(self.state_dir)

    def state(self, pid: int) -> str | None:
        return fakegpu.read_state(pid, self.state_dir)

    def used_mib(self) -> dict[int, int]:
        return fakegpu.used_mib(self.state_dir)


@pytest.fixture
def server_tag() -> str:
    """A word unique to this test, put in its servers' command lines and used as CUDA_TOGGLE_MATCH, so the
    tool finds this test's server and never another one on the machine."""
    return f"test-server-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def toggle_env(
    fake_gpu: Path, fake_libcuda: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_tag: str
) -> Iterator[ToggleEnv]:
    """cuda-toggle-all's environment over the fake GPU: cli backend, short timeouts, private run dir.

    At teardown, fake cuda-checkpoint calls told to hang (and orphaned by a killed tool) are killed.
    """
    run_dir = tmp_path / "run"
    settings = {
        "CUDA_TOGGLE_RUN_DIR": str(run_dir),
        "CUDA_TOGGLE_MATCH": server_tag,
        "CUDA_TOGGLE_SUPERVISOR_URL": f"unix://{tmp_path}/no-supervisord.sock",
        "CUDA_TOGGLE_GPU_QUERY": "nvidia-smi",
        "CUDA_TOGGLE_BACKEND": "cli",
        "CUDA_TOGGLE_VERIFY_SLEEP_S": "0.05",
        "CUDA_TOGGLE_VERIFY_ATTEMPTS": "20",
        "CUDA_TOGGLE_LOCK_TIMEOUT_MS": "200",
        # Generous: each call of the fakes starts a Python process, slow on a loaded 2-core machine.
        "CUDA_TOGGLE_LOCK_DEADLINE_S": "20",
        "CUDA_TOGGLE_STATE_TIMEOUT_S": "10",
        "CUDA_TOGGLE_OP_TIMEOUT_S": "10",
        "CUDA_TOGGLE_BUSY_WAIT_S": "0.5",
        "CUDA_TOGGLE_PROGRESS_S": "1",
        "CUDA_TOGGLE_LIBCUDA": str(fake_libcuda),
        "FAKE_CUDA_CHECKPOINT": str(FAKES_DIR / "cuda-checkpoint"),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    yield ToggleEnv(fake_gpu, run_dir)
    kill_hung_fakes(fake_gpu)


def kill_hung_fakes(state_dir: Path) -> None:
    fake = str(FAKES_DIR / "cuda-checkpoint")
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if fake in " ".join(process.info["cmdline"] or []) and process.environ().get("FAKE_CUDA_STATE_DIR") == str(
                state_dir
            ):
                process.kill()


@dataclass
class FakeTree:
    process: subprocess.Popen
    root: int
    dispatcher: int
    workers: list[int]
    others: list[int]

    @property
    def cuda_pids(self) -> list[int]:
        return sorted([self.root, *self.workers])

    def status_letter(self, pid: int) -> str | None:
        return fakegpu.process_status(pid)

    def kill(self) -> None:
        from tests.conftest import wait_until_dead

        with contextlib.suppress(psutil.NoSuchProcess):
            family = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
            for member in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.send_signal(signal.SIGCONT)
                    member.kill()
            wait_until_dead(family, timeout=10)  # a zombie counts: PID 1 may take a second to reap an orphan
        self.process.wait(timeout=10)


@pytest.fixture
def fake_tree(fake_gpu: Path, server_tag: str) -> Iterator[Callable[..., FakeTree]]:
    """Factory: fake_tree(workers=2, mib=1000, args=SAFE_ARGS, env=SAFE_ENV, title=VLLM_TITLE) starts
    tests/fakes/fake_tree.py (root -> VLLM::EngineCore -> VLLM::Worker_TP*, plus non-CUDA helpers) and
    kills it at teardown. The root's command line holds `server_tag`, and a --port where nothing listens: a
    socket bound without listening, held until teardown, so the tool's HTTP calls are refused at once and
    never reach a server that listens on vLLM's default port on this machine."""
    trees: list[FakeTree] = []
    closed_port = socket.socket()
    closed_port.bind(("127.0.0.1", 0))
    port = closed_port.getsockname()[1]

    def start(
        workers: int = 2,
        mib: int = 1000,
        args: str = SAFE_ARGS,
        env: dict[str, str] | None = None,
        title: str = VLLM_TITLE,
    ) -> FakeTree:
        environ = {key: value for key, value in os.environ.items() if key not in SAFE_ENV}
        environ.update(SAFE_ENV if env is None else env)
        process = subprocess.Popen(
            [
                sys.executable,
                str(FAKES_DIR / "fake_tree.py"),
                "--workers",
                str(workers),
                "--mib",
                str(mib),
                "--root-title",
                f"{title} --tag {server_tag} --port {port}",
                "--args",
                args,
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=environ,
        )
        line = process.stdout.readline()
        assert line, "fake_tree.py exited before it was ready"
        pids = json.loads(line)
        tree = FakeTree(process, pids["root"], pids["dispatcher"], pids["workers"], pids["others"])
        trees.append(tree)
        return tree

    yield start
    for tree in trees:
        tree.kill()
    closed_port.close()
