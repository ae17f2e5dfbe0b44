"""The image's build steps that can run without an engine: cuda-checkpoint's install (a provided file or the
download, always checked by SHA-256), the architecture check, the no-upgrade check of the pip install, the
CPU override's shape, and the SYS_PTRACE preflight. The image itself is built and run by
`make check-container` (scripts/check-container.sh)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoint.suspend import safety
from tests.testing import REPO

INSTALL = REPO / "docker" / "install-cuda-checkpoint.sh"
VENV_BIN = Path(sys.executable).parent


def dockerfile_run(first_words: str) -> str:
    """The shell command of the Dockerfile's RUN that starts with first_words, continuation lines joined."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    [command] = [line[4:] for line in text.splitlines() if line.startswith("RUN " + first_words)]
    return command


def install(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    target = tmp_path / "bin" / "cuda-checkpoint"
    target.parent.mkdir(exist_ok=True)
    full_env = {"PATH": os.environ["PATH"], "CUDA_CHECKPOINT_PROVIDED_DIR": str(tmp_path / "provided"), **env}
    return subprocess.run(["bash", str(INSTALL), str(target)], env=full_env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def provided(tmp_path: Path) -> tuple[str, str]:
    """A binary the builder provides in docker/cuda-checkpoint/ (here: a folder of the test), and its SHA-256."""
    folder = tmp_path / "provided"
    folder.mkdir()
    content = b"#!/bin/sh\necho fake\n"
    (folder / "my-cuda-checkpoint").write_bytes(content)
    return "my-cuda-checkpoint", hashlib.sha256(content).hexdigest()


def test_provided_cuda_checkpoint_with_its_sum_is_installed_executable(tmp_path: Path, provided):
    """A provided file whose SHA-256 is given is installed, executable, and the build says from where."""
    name, sha = provided
    result = install(tmp_path, CUDA_CHECKPOINT_FILE=name, CUDA_CHECKPOINT_SHA256=sha)
    assert result.returncode == 0, result.stderr
    target = tmp_path / "bin" / "cuda-checkpoint"
    assert target.read_bytes() == (tmp_path / "provided" / name).read_bytes()
    assert os.access(target, os.X_OK)
    assert f"from docker/cuda-checkpoint/{name}" in result.stdout


def test_provided_cuda_checkpoint_with_the_pinned_sum_fails_in_one_line(tmp_path: Path, provided):
    """Another file with the default (pinned) sum: one line naming the file and both sums; nothing installed."""
    name, sha = provided
    pinned = re.search(r"^ARG CUDA_CHECKPOINT_SHA256=(\w+)$", (REPO / "Dockerfile").read_text(), re.M)[1]
    result = install(tmp_path, CUDA_CHECKPOINT_FILE=name, CUDA_CHECKPOINT_SHA256=pinned)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"cuda-checkpoint: SHA-256 mismatch: docker/cuda-checkpoint/{name} is {sha}, CUDA_CHECKPOINT_SHA256 is {pinned}"
    ]
    assert not (tmp_path / "bin" / "cuda-checkpoint").exists()


def test_missing_provided_file_is_named_with_the_folder_to_put_it_in(tmp_path: Path, provided):
    """CUDA_CHECKPOINT_FILE naming nothing there: one line naming docker/cuda-checkpoint/."""
    result = install(tmp_path, CUDA_CHECKPOINT_FILE="nothing-here", CUDA_CHECKPOINT_SHA256="0" * 64)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "CUDA_CHECKPOINT_FILE=nothing-here: no such file in docker/cuda-checkpoint/" in line


def test_download_that_fails_says_how_to_build_without_internet(tmp_path: Path):
    """Without CUDA_CHECKPOINT_FILE the URL is downloaded; when that fails, one line says what to provide."""
    url = f"file://{tmp_path}/no-such-binary"
    result = install(tmp_path, CUDA_CHECKPOINT_URL=url, CUDA_CHECKPOINT_SHA256="0" * 64)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"cuda-checkpoint: cannot download {url}: without internet access, put the binary in")
    assert "CUDA_CHECKPOINT_FILE and CUDA_CHECKPOINT_SHA256" in line


def test_downloaded_cuda_checkpoint_is_checked_too(tmp_path: Path, provided):
    """The download path checks the sum as well: the right sum installs, a wrong one fails naming the URL."""
    name, sha = provided
    url = f"file://{tmp_path}/provided/{name}"
    assert install(tmp_path, CUDA_CHECKPOINT_URL=url, CUDA_CHECKPOINT_SHA256=sha).returncode == 0
    result = install(tmp_path, CUDA_CHECKPOINT_URL=url, CUDA_CHECKPOINT_SHA256="1" * 64)
    assert result.returncode == 1
    assert result.stderr == f"cuda-checkpoint: SHA-256 mismatch: {url} is {sha}, CUDA_CHECKPOINT_SHA256 is {'1' * 64}\n"


@pytest.mark.parametrize("machine", ["aarch64", "x86_64"])
def test_build_refuses_another_architecture_naming_it(tmp_path: Path, machine: str):
    """The Dockerfile's architecture step, run with `uname -m` answering `machine`: x86_64 passes, aarch64
    fails with one line naming it."""
    fake = tmp_path / "uname"
    fake.write_text(f"#!/bin/sh\necho {machine}\n")
    fake.chmod(0o755)
    command = dockerfile_run('arch="$(uname -m)"')
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    if machine == "x86_64":
        assert (result.returncode, result.stdout) == (0, "")
    else:
        assert result.returncode == 1
        assert result.stdout.splitlines() == [
            "This image needs an x86_64 host: NVIDIA's cuda-checkpoint is built for x86_64 only, and this build "
            "runs on aarch64"
        ]


def test_pip_install_step_fails_when_it_changes_a_package_of_the_base_image(tmp_path: Path):
    """The Dockerfile's install step, with a fake pip whose install upgrades aiohttp: the build stops naming
    the package's version before; with an install that adds only, it passes."""
    freeze_file = tmp_path / "freeze.txt"
    freeze_file.write_text("aiohttp==3.13.5\nclick==8.3.3\n")
    # `python3 -m pip freeze --all` prints the file; `python3 -m pip install ...` rewrites it.
    fake_python = tmp_path / "python3"
    fake_python.write_text(
        "#!/bin/sh\n"
        f'if [ "$3" = freeze ]; then cat {freeze_file}; exit 0; fi\n'
        f'if [ "$UPGRADE" = 1 ]; then printf "aiohttp==3.14.5\\nclick==8.3.3\\n" >{freeze_file};\n'
        f'else printf "aiohttp==3.13.5\\nclick==8.3.3\\nvllm-cuda-suspend==0.1.0\\n" >{freeze_file}; fi\n'
    )
    fake_python.chmod(0o755)
    command = dockerfile_run("python3 -m pip freeze").replace("rm -rf /tmp/vllm-cuda-suspend", "true")
    command = command.replace("/tmp/before.txt", str(tmp_path / "before.txt"))
    command = command.replace("/tmp/after.txt", str(tmp_path / "after.txt"))

    def run(upgrade: str) -> subprocess.CompletedProcess:
        env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "UPGRADE": upgrade, "CONSTRAINTS_FILE": ""}
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)

    upgraded = run("1")
    assert upgraded.returncode == 1
    assert upgraded.stdout.splitlines() == [
        "Installing vllm-cuda-suspend changed packages the base image has (was: aiohttp==3.13.5 ): "
        "pin them with CONSTRAINTS_FILE"
    ]
    freeze_file.write_text("aiohttp==3.13.5\nclick==8.3.3\n")
    added = run("0")
    assert (added.returncode, added.stdout) == (0, "")


def cpu_config(tmp_path: Path) -> dict:
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {
        "PATH": os.environ["PATH"],
        "STANDIN_BASE_IMAGE": "base:test",
        "STANDIN_CUDA_CHECKPOINT_FILE": "fake",
        "STANDIN_CUDA_CHECKPOINT_SHA256": "0" * 64,
        "HOST_PORT": "18010",
        "VLLM_PORT": "18001",
    }
    result = subprocess.run(
        [str(VENV_BIN / "docker-compose"), "--env-file", str(env_file), "-f", "docker-compose.yml"]
        + ["-f", "docker-compose.cpu.yml", "config", "--format", "json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]["vllm-qwen3-8b-awq"]


def test_cpu_override_changes_only_build_arguments_and_the_run_around_the_same_dockerfile(tmp_path: Path):
    """The stand-in builds the same Dockerfile (only build args differ), with the versions vLLM's image has,
    keeps the checkpoint settings of the real service, and puts the gate on HOST_PORT and vLLM on VLLM_PORT."""
    svc = cpu_config(tmp_path)
    assert (svc["build"]["dockerfile"], svc["build"]["context"]) == ("Dockerfile", str(REPO))
    assert svc["build"]["args"]["CONSTRAINTS_FILE"] == "constraints/vllm-v0.20.2.txt"
    assert (REPO / svc["build"]["args"]["CONSTRAINTS_FILE"]).is_file()
    assert svc["build"]["args"]["BASE_IMAGE"] == "base:test"
    assert "gpus" not in svc and svc["network_mode"] == "host"
    assert svc["cap_add"] == ["SYS_PTRACE"] and svc["security_opt"] == ["seccomp=unconfined"]
    env = svc["environment"]
    assert env["GATE_PORT"] == "18010" and env["GATE_UPSTREAM"] == "http://127.0.0.1:18001"
    command = svc["command"]
    assert command[command.index("--port") + 1] == "18001"
    assert env["VLLM_HEALTH_URL"] == "http://127.0.0.1:18010/health"
    assert (REPO / "tests" / "fakes" / "container-entrypoint.sh").stat().st_mode & 0o111


def status_with_bounding_set(mask: int) -> str:
    return f"Name:\tcuda-toggle-all\nCapEff:\t0000000000000000\nCapBnd:\t{mask:016x}\nSeccomp:\t2\n"


DOCKER_DEFAULT_CAPS = 0x00000000A80425FB  # Docker's default set: no SYS_PTRACE (bit 19)


def test_container_without_sys_ptrace_is_refused_naming_the_compose_setting():
    """A bounding set without SYS_PTRACE (Docker's default): one refusal naming `cap_add: [SYS_PTRACE]`."""
    [reason] = safety.ptrace_capability_refusals(status_with_bounding_set(DOCKER_DEFAULT_CAPS))
    assert "cap_add: [SYS_PTRACE]" in reason and "docker-compose.yml" in reason


@pytest.mark.parametrize(
    "status",
    [status_with_bounding_set(DOCKER_DEFAULT_CAPS | 1 << 19), status_with_bounding_set(2**41 - 1), ""],
    ids=["cap_add SYS_PTRACE", "host, any user", "unreadable"],
)
def test_sys_ptrace_in_the_bounding_set_or_unknown_refuses_nothing(status: str):
    """With SYS_PTRACE bound (the compose file's cap_add, or a host) or no status to read: no refusal."""
    assert safety.ptrace_capability_refusals(status) == []


def test_own_status_of_these_tests_is_read():
    """The preflight reads the caller's own /proc status (the capabilities the kernel reports)."""
    assert re.search(r"^CapBnd:\s*[0-9a-f]+$", safety.own_proc_status(), re.M)


def start_services(tmp_path: Path, as_pid_1: bool) -> subprocess.CompletedProcess:
    """docker/start-services.sh with supervisord replaced by `true`, as PID 1 of a new PID namespace (a
    container start) or as an ordinary process."""
    env = {
        "PATH": os.environ["PATH"],
        "CUDA_TOGGLE_RUN_DIR": str(tmp_path / "toggle"),
        "SUPERVISOR_RUN_DIR": str(tmp_path / "run"),
        "VLLM_ARGS_FILE": str(tmp_path / "vllm" / "args"),
        "SUPERVISORD_BIN": "true",
    }
    command = [str(REPO / "docker" / "start-services.sh"), "--model", "m"]
    if as_pid_1:
        command = ["unshare", "--pid", "--fork", "--mount-proc", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="a new PID namespace needs root")
def test_container_start_forgets_the_suspend_record_of_the_last_start(tmp_path: Path):
    """A container start (start-services.sh as PID 1) removes the suspend record left by `docker stop` while
    suspended, whose processes are gone; run as an ordinary process it removes nothing."""
    record = tmp_path / "toggle" / "suspend.json"
    record.parent.mkdir()
    record.write_text("{}")
    result = start_services(tmp_path, as_pid_1=False)
    assert result.returncode == 0, result.stderr
    assert record.exists()
    result = start_services(tmp_path, as_pid_1=True)
    assert result.returncode == 0, result.stderr
    assert not record.parent.exists()
