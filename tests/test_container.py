"""The container part, without a Docker engine: Dockerfile, compose file, scripts, Makefile, supervisord.

What can run for real here does: hadolint, shellcheck and compose's own config parser on the files;
docker/start-services.sh and docker/run-vllm.sh passing arguments to a program; supervisord with the image's
supervisord.conf running the stand-in vLLM (tests/fakes/standin_vllm.py) behind the real gate, and stopping
both, suspended or not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from tests.testing import REPO, JsonHandler, free_port, serving, wait_until

VENV_BIN = Path(sys.executable).parent
STANDIN = REPO / "tests" / "fakes" / "standin_vllm.py"
SERVICE = "vllm-qwen3-8b-awq"
SEED_DEFAULTS = {
    "VLLM_VERSION": "v0.20.2",
    "MODEL": "Qwen/Qwen3-8B-AWQ",
    "SERVED_MODEL_NAME": "qwen3-8b-awq",
    "HOST_PORT": "8010",
    "TP_SIZE": "2",
    "GPU_MEMORY_UTILIZATION": "0.80",
    "MAX_MODEL_LEN": "8192",
}
REQUIRED_ENV = {
    "NCCL_P2P_DISABLE": "1",
    "NCCL_SHM_DISABLE": "1",
    "NCCL_NVLS_ENABLE": "0",
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
    "VLLM_ALLREDUCE_USE_FLASHINFER": "0",
    "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600",
    "HF_HOME": "/root/.cache/huggingface",
    "XDG_CACHE_HOME": "/root/.cache",
}
MAKE_TARGETS = ["venv", "lint", "check", "help", "build", "up", "down", "logs", "wait", "test"]
MAKE_TARGETS += ["suspend", "resume", "status", "gate-status", "check-container"]
# The gate's settings in the compose file (the vLLM side of GATE_UPSTREAM is the command's --host/--port).
GATE_ENV = {
    "GATE_UPSTREAM": "http://127.0.0.1:8001",
    "GATE_IDLE_SUSPEND_S": "0",
    "CUDA_TOGGLE_MODE": "auto",
    "VLLM_SLEEP_MODE": "1",
}
# Arguments that break naive passing: blanks, quotes, glob and shell characters, an empty one, a newline.
AWKWARD_ARGS = ["two words", "it's", 'say "hi"', "", "$HOME", "*", "a\nb", "--flag=x y", "  padded  "]


def tool(name: str) -> str:
    """A linter from the test extras (in the venv next to this Python), else from PATH."""
    candidate = VENV_BIN / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install the test extras (make venv)")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **extra}


def title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()).strip()  # setproctitle pads the title with blanks
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def alive(process: psutil.Process) -> bool:
    """Running, stopped or sleeping; a zombie or a vanished process is gone."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


# ---------------------------------------------------------------------------------------------------
# Compose


def compose_config(env_file: Path, **env: str) -> dict:
    """`docker-compose config` as JSON, from the repository root, with a clean environment."""
    result = subprocess.run(
        [tool("docker-compose"), "--env-file", str(env_file), "-f", "docker-compose.yml", "config"]
        + ["--format", "json"],
        cwd=REPO,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def empty_env_file(tmp_path: Path) -> Path:
    """An empty --env-file, so that a developer's own .env does not change what is tested."""
    path = tmp_path / "empty.env"
    path.write_text("")
    return path


def service(config: dict) -> dict:
    assert list(config["services"]) == [SERVICE]
    return config["services"][SERVICE]


def test_compose_config_has_the_seed_setup_and_the_checkpoint_settings(empty_env_file: Path):
    """docker-compose config shows the seed's service plus every setting cuda-checkpoint needs."""
    svc = service(compose_config(empty_env_file))
    assert svc["build"]["args"] == {"VLLM_VERSION": "v0.20.2"}
    assert svc["image"].endswith(":v0.20.2")
    assert [(p["published"], p["target"]) for p in svc["ports"]] == [("8010", 8000)]
    assert svc["gpus"] == [{"count": -1}]  # gpus: all
    assert svc["ipc"] == "host"
    assert svc["cap_add"] == ["SYS_PTRACE"]
    assert svc["security_opt"] == ["seccomp=unconfined"]
    [volume] = svc["volumes"]
    assert (volume["type"], volume["source"], volume["target"]) == (
        "bind",
        str(REPO / ".cache"),
        "/root/.cache",
    )
    for name, value in {**REQUIRED_ENV, **GATE_ENV}.items():
        assert svc["environment"].get(name) == value, name
    command = " ".join(svc["command"])
    for expected in [
        "--model Qwen/Qwen3-8B-AWQ",
        "--served-model-name qwen3-8b-awq",
        "--dtype half",
        "--max-model-len 8192",
        "--gpu-memory-utilization 0.80",
        "--tensor-parallel-size 2",
        "--disable-custom-all-reduce",
        "--enforce-eager",
        "--host 127.0.0.1",
        "--port 8001",
    ]:
        assert expected in command, expected
    assert "0.0.0.0" not in command  # vLLM is reachable only through the gate
    # vLLM picks the AWQ kernel from the model's config (awq_marlin where it can): docs/container.md.
    assert "--quantization" not in command


def option(args: list[str], name: str) -> str:
    """The value of the last `name VALUE` or `name=VALUE` in args."""
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == name]
    values += [arg.split("=", 1)[1] for arg in args if arg.startswith(name + "=")]
    assert values, f"{name} missing from {args}"
    return values[-1]


def test_compose_publishes_the_gate_and_keeps_vllm_internal(empty_env_file: Path):
    """The host port goes to the gate (8000); vLLM listens on loopback at GATE_UPSTREAM, nowhere else."""
    from entrypoint.gate.config import GATE_SETTINGS

    svc = service(compose_config(empty_env_file))
    assert [(p["published"], p["target"]) for p in svc["ports"]] == [("8010", 8000)]
    assert GATE_SETTINGS["GATE_PORT"].default == "8000"
    assert GATE_SETTINGS["GATE_HOST"].default == "0.0.0.0"
    command = svc["command"]
    upstream = f"http://{option(command, '--host')}:{option(command, '--port')}"
    assert upstream == svc["environment"]["GATE_UPSTREAM"] == GATE_SETTINGS["GATE_UPSTREAM"].default
    assert option(command, "--host") == "127.0.0.1"
    # Sleep mode is switched by VLLM_SLEEP_MODE in run-vllm.sh, not written into the command.
    assert "--enable-sleep-mode" not in command
    assert "VLLM_SERVER_DEV_MODE" not in svc["environment"]


def test_compose_stop_grace_period_outlasts_supervisord_stopwaitsecs(empty_env_file: Path):
    """Docker waits longer than supervisord stops the gate, then vLLM (one after the other), may take."""
    svc = service(compose_config(empty_env_file))
    hours, minutes, seconds = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", svc["stop_grace_period"]).groups()
    grace_s = int(hours or 0) * 3600 + int(minutes or 0) * 60 + int(seconds or 0)
    stopwaitsecs = re.findall(r"^stopwaitsecs=(\d+)$", (REPO / "supervisord.conf").read_text(), re.M)
    assert len(stopwaitsecs) == 2  # gate, vllm
    assert grace_s >= sum(map(int, stopwaitsecs)) + 30


def test_compose_values_can_be_overridden_from_the_environment(empty_env_file: Path):
    """Model, served name, port, TP size, memory share, max length and vLLM version follow the environment."""
    svc = service(
        compose_config(
            empty_env_file,
            HOST_PORT="9000",
            MODEL="x",
            SERVED_MODEL_NAME="y",
            TP_SIZE="4",
            GPU_MEMORY_UTILIZATION="0.5",
            MAX_MODEL_LEN="4096",
            VLLM_VERSION="v0.12.0",
            VLLM_SLEEP_MODE="0",
            GATE_IDLE_SUSPEND_S="600",
            CUDA_TOGGLE_MODE="plain",
        )
    )
    environment = svc["environment"]
    assert (environment["VLLM_SLEEP_MODE"], environment["GATE_IDLE_SUSPEND_S"]) == ("0", "600")
    assert environment["CUDA_TOGGLE_MODE"] == "plain"
    assert [p["published"] for p in svc["ports"]] == ["9000"]
    assert svc["build"]["args"] == {"VLLM_VERSION": "v0.12.0"}
    assert svc["image"].endswith(":v0.12.0")
    command = " ".join(svc["command"])
    for expected in ["--model x", "--served-model-name y", "--tensor-parallel-size 4"]:
        assert expected in command, expected
    for expected in ["--gpu-memory-utilization 0.5", "--max-model-len 4096"]:
        assert expected in command, expected


def test_env_example_documents_every_variable_with_its_default(empty_env_file: Path):
    """.env.example names every ${VAR} of the compose file, and its values are the defaults."""
    compose = (REPO / "docker-compose.yml").read_text()
    compose_vars = set(re.findall(r"\$\{(\w+)", re.sub(r"^\s*#.*$", "", compose, flags=re.M)))
    example = (REPO / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*(\w+)=", example, re.M))
    assert compose_vars <= documented, compose_vars - documented
    for name, value in SEED_DEFAULTS.items():
        assert re.search(rf"^{name}={re.escape(value)}$", example, re.M), name
    assert compose_config(REPO / ".env.example") == compose_config(empty_env_file)


# ---------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_hadolint_passes_without_output():
    """hadolint has nothing to say about the Dockerfile (every ignore is inline, with its reason)."""
    result = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_base_image_follows_vllm_version():
    """The base image is the BASE_IMAGE build arg, by default vllm/vllm-openai at VLLM_VERSION (v0.20.2)."""
    text = dockerfile()
    assert re.search(r"^ARG VLLM_VERSION=v0\.20\.2$", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=vllm/vllm-openai:\$\{VLLM_VERSION\}$", text, re.M)
    assert re.findall(r"^FROM (.+)$", text, re.M) == ["${BASE_IMAGE}"]


def test_dockerfile_pins_cuda_checkpoint_to_a_commit():
    """cuda-checkpoint comes from NVIDIA's repository at a 40-hex commit given by a build arg."""
    text = dockerfile()
    assert re.search(r"^ARG CUDA_CHECKPOINT_COMMIT=[0-9a-f]{40}$", text, re.M)
    assert re.search(r"^ARG CUDA_CHECKPOINT_SHA256=[0-9a-f]{64}$", text, re.M)
    url = "https://raw.githubusercontent.com/NVIDIA/cuda-checkpoint/${CUDA_CHECKPOINT_COMMIT}/bin/x86_64_Linux/"
    assert url + "cuda-checkpoint" in text
    assert "bash /tmp/cuda-checkpoint/install.sh /usr/local/bin/cuda-checkpoint" in text  # checks the SHA-256


def test_dockerfile_fails_the_build_when_the_tools_cannot_start():
    """The build runs `cuda-toggle-all --help`, `selftest --help` and `vllm-gate --help`."""
    checks = "cuda-toggle-all --help >/dev/null && selftest --help >/dev/null && vllm-gate --help >/dev/null"
    assert re.search(rf"^RUN {checks}$", dockerfile(), re.M)


def test_dockerfile_exposes_only_the_gate():
    """EXPOSE names port 8000 (the gate) alone, the HEALTHCHECK asks there, and the gate extra is installed."""
    text = dockerfile()
    assert re.findall(r"^EXPOSE (.+)$", text, re.M) == ["8000"]
    assert '"/tmp/vllm-cuda-suspend[gate]"' in text
    assert "VLLM_HEALTH_URL=http://127.0.0.1:8000/health" in text


def test_dockerfile_has_a_healthcheck_on_health():
    """HEALTHCHECK asks /health through the gate, with a start period long enough for a model download."""
    text = dockerfile()
    assert "HEALTHCHECK" in text
    assert re.search(r"^\s+VLLM_HEALTH_URL=http://127\.0\.0\.1:8000/health", text, re.M)
    start_period = re.search(r"--start-period=(\d+)m", text)
    assert start_period and int(start_period[1]) >= 10


def test_dockerfile_env_matches_the_copied_files_and_the_tool_defaults():
    """ENV names the files COPY puts there; the socket and program are cuda-toggle-all's defaults."""
    from entrypoint.base.config import SETTINGS

    text = dockerfile()
    env = dict(re.findall(r"^\s+(?:ENV\s+)?([A-Z_]+)=(\S+?)(?:\s+\\)?$", text, re.M))
    copies = dict((dst, src) for src, dst in re.findall(r"^COPY (\S+) (\S+)$", text, re.M))
    assert copies[env["VLLM_LAUNCHER"]] == "docker/run-vllm.sh"
    assert copies[env["VLLM_REAPER"]] == "docker/vllm-reaper.sh"
    assert copies[env["SUPERVISOR_CONF"]] == "supervisord.conf"
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', (REPO / "pyproject.toml").read_text(), re.M))
    assert scripts[env["GATE_LAUNCHER"]] == "entrypoint.gate.app:main"
    assert re.search(r'^ENTRYPOINT \["(\S+)"\]$', text, re.M)[1] in copies
    socket_url = f"unix://{env['SUPERVISOR_RUN_DIR']}/supervisord.sock"
    assert socket_url == SETTINGS["CUDA_TOGGLE_SUPERVISOR_URL"].default
    conf = (REPO / "supervisord.conf").read_text()
    assert "[program:vllm]" in conf
    assert re.search(r"^\[program:gate\]\ncommand=%\(ENV_GATE_LAUNCHER\)s$", conf, re.M)
    assert SETTINGS["CUDA_TOGGLE_PROGRAM"].default == "vllm"


def test_build_context_holds_what_the_dockerfile_copies_and_not_the_cache():
    """.dockerignore lets every COPY source in and keeps .cache/ (the model weights) out."""
    ignore = (REPO / ".dockerignore").read_text().split("\n")
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    sources = [src for line in re.findall(r"^COPY (.+) \S+$", dockerfile(), re.M) for src in line.split()]
    for source in sources:
        assert (REPO / source).exists(), source
        source = source.rstrip("/")
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
    assert ".cache" not in allowed


def test_pip_installs_only_what_the_package_needs():
    """The package is installed from a copy of pyproject.toml, README.md and entrypoint/, not editable."""
    text = dockerfile()
    assert "COPY pyproject.toml README.md /tmp/vllm-cuda-suspend/" in text
    assert "COPY entrypoint/ /tmp/vllm-cuda-suspend/entrypoint/" in text
    install = r'pip install --no-cache-dir \\\n\s+--no-build-isolation .* "/tmp/vllm-cuda-suspend\[gate\]"'
    assert re.search(install, text)
    assert " -e " not in text


# ---------------------------------------------------------------------------------------------------
# Shell scripts


def shell_scripts() -> list[Path]:
    found = {REPO / ".ci" / "run"}
    for folder in ("docker", "scripts", "tests/gpu"):
        for path in (REPO / folder).iterdir():
            if not path.is_file():  # __pycache__ and the like
                continue
            if path.suffix == ".sh" or (
                path.suffix != ".py" and path.read_text(errors="replace").startswith("#!/usr/bin/env bash")
            ):
                found.add(path)
    return sorted(found)


def test_shell_scripts_pass_shellcheck():
    """shellcheck passes on every shell script of the repository."""
    scripts = shell_scripts()
    assert len(scripts) >= 5
    result = subprocess.run(
        [tool("shellcheck"), *map(str, scripts)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_shell_scripts_are_strict_executable_bash(script: Path):
    """Every script is executable bash with `set -euo pipefail`."""
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.M)
    assert os.access(script, os.X_OK)


# ---------------------------------------------------------------------------------------------------
# Arguments: compose `command:` -> start-services.sh -> file -> run-vllm.sh -> the server's argv


@pytest.fixture
def argv_printer(tmp_path: Path) -> str:
    """A VLLM_SERVER_CMD that prints its arguments as JSON."""
    script = tmp_path / "printargv.py"
    script.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    return f"{sys.executable} -u {script}"


def pass_arguments(tmp_path: Path, server_cmd: str, args: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    env = clean_env(
        **extra_env,
        SUPERVISOR_RUN_DIR=str(tmp_path / "run"),
        SUPERVISOR_CONF=str(REPO / "supervisord.conf"),
        SUPERVISORD_BIN="true",  # stands in for supervisord: start-services.sh's last step is `exec` of it
        VLLM_ARGS_FILE=str(tmp_path / "vllm" / "args"),
        VLLM_SERVER_CMD=server_cmd,
    )
    entry = subprocess.run([REPO / "docker" / "start-services.sh", *args], env=env, capture_output=True, timeout=30)
    assert entry.returncode == 0, entry.stderr
    return subprocess.run([REPO / "docker" / "run-vllm.sh"], env=env, capture_output=True, text=True, timeout=30)


def test_compose_command_reaches_vllm_unchanged(tmp_path: Path, argv_printer: str, empty_env_file: Path):
    """The compose command, and arguments with blanks, quotes and newlines, reach the server as given."""
    args = service(compose_config(empty_env_file))["command"] + ["--served-model-name", *AWKWARD_ARGS]
    result = pass_arguments(tmp_path, argv_printer, args)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == args
    assert "run-vllm: exec" in result.stderr


@pytest.fixture
def argv_env_printer(tmp_path: Path) -> str:
    """A VLLM_SERVER_CMD that prints its arguments and its VLLM_SERVER_DEV_MODE as JSON."""
    script = tmp_path / "printargvenv.py"
    script.write_text(
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'dev_mode': os.environ.get('VLLM_SERVER_DEV_MODE')}))\n"
    )
    return f"{sys.executable} -u {script}"


@pytest.mark.parametrize("dot_env", ["", "VLLM_SLEEP_MODE=0\n"], ids=["default", "switched-off-in-.env"])
def test_sleep_mode_is_on_by_default_and_off_with_the_switch(tmp_path: Path, argv_env_printer: str, dot_env: str):
    """compose -> run-vllm.sh: vLLM gets --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1, unless .env says
    VLLM_SLEEP_MODE=0; the compose command's own arguments arrive unchanged either way."""
    env_file = tmp_path / "dot.env"
    env_file.write_text(dot_env)
    svc = service(compose_config(env_file))
    command, switch = svc["command"], svc["environment"]["VLLM_SLEEP_MODE"]
    result = pass_arguments(tmp_path, argv_env_printer, command, VLLM_SLEEP_MODE=switch)
    assert result.returncode == 0, result.stderr
    started = json.loads(result.stdout)
    if dot_env:
        assert switch == "0"
        assert started == {"argv": command, "dev_mode": None}
        assert "sleep mode on" not in result.stderr
    else:
        assert switch == "1"
        assert started == {"argv": [*command, "--enable-sleep-mode"], "dev_mode": "1"}
        assert "VLLM_SLEEP_MODE=1: sleep mode on" in result.stderr


def test_sleep_mode_flag_given_in_the_command_is_not_repeated(tmp_path: Path, argv_env_printer: str):
    """An --enable-sleep-mode already in the arguments is kept once, in its place."""
    args = ["--enable-sleep-mode", "--host", "127.0.0.1", "--port", "8001"]
    result = pass_arguments(tmp_path, argv_env_printer, args, VLLM_SLEEP_MODE="1")
    assert json.loads(result.stdout) == {"argv": args, "dev_mode": "1"}


@pytest.mark.parametrize(
    "args, accepted",
    [
        (["--host", "127.0.0.1"], True),
        (["--host=127.0.0.2"], True),
        (["--host", "localhost"], True),
        (["--host", "::1"], True),
        (["--host", "127.0.0.1", "--host", "0.0.0.0"], False),  # the last one counts, as in vLLM
        (["--host", "0.0.0.0"], False),
        (["--host=10.1.2.3"], False),
        (["--host", ""], False),
        (["--port", "8001"], False),  # no --host: vLLM listens on every interface
    ],
)
def test_sleep_mode_refuses_vllm_outside_loopback(tmp_path: Path, argv_env_printer: str, args, accepted):
    """With sleep mode on, run-vllm.sh starts vLLM only on a loopback address: its dev endpoints stay inside."""
    result = pass_arguments(tmp_path, argv_env_printer, args, VLLM_SLEEP_MODE="1")
    if accepted:
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["dev_mode"] == "1"
    else:
        assert (result.returncode, result.stdout) == (2, "")
        assert "VLLM_SLEEP_MODE=1 needs vLLM on loopback" in result.stderr


def test_sleep_mode_switch_rejects_other_values(tmp_path: Path, argv_env_printer: str):
    """VLLM_SLEEP_MODE is 0 or 1; anything else stops run-vllm.sh with a message naming both."""
    result = pass_arguments(tmp_path, argv_env_printer, ["--host", "127.0.0.1"], VLLM_SLEEP_MODE="yes")
    assert (result.returncode, result.stdout) == (2, "")
    assert "VLLM_SLEEP_MODE=yes: use 1" in result.stderr


def test_no_arguments_reach_vllm_as_none(tmp_path: Path, argv_printer: str):
    """Without a compose command the server gets no arguments (not one empty argument)."""
    result = pass_arguments(tmp_path, argv_printer, [])
    assert json.loads(result.stdout) == []


def test_default_server_command_is_vllm_openai_api_server():
    """Without VLLM_SERVER_CMD, run-vllm.sh starts the api_server module (v0.11.0's entry point; v0.20.2 serves it
    too)."""
    text = (REPO / "docker" / "run-vllm.sh").read_text()
    assert ': "${VLLM_SERVER_CMD:=python3 -m vllm.entrypoints.openai.api_server}"' in text


def test_run_vllm_without_saved_arguments_says_why(tmp_path: Path):
    """run-vllm.sh refuses to start vLLM with no saved arguments, and names the file."""
    env = clean_env(VLLM_ARGS_FILE=str(tmp_path / "missing"), VLLM_SERVER_CMD="true")
    result = subprocess.run([REPO / "docker" / "run-vllm.sh"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert str(tmp_path / "missing") in result.stderr


# ---------------------------------------------------------------------------------------------------
# Makefile


def make(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_make_help_lists_every_target():
    """`make help` lists the development and the container targets, each with its description."""
    result = make("help")
    assert result.returncode == 0, result.stderr
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    listed = dict(re.findall(r"^  (\S+)\s+(.+)$", plain, re.M))
    for target in MAKE_TARGETS:
        assert listed.get(target), f"{target} missing from make help"
    assert "Container (host with Docker and two GPUs)" in plain


def test_every_make_target_has_a_description():
    """Every target of the Makefile has a `##` description, and is .PHONY."""
    text = (REPO / "Makefile").read_text()
    targets = re.findall(r"^([a-zA-Z][\w-]*):(?!=)(.*)$", text, re.M)
    assert {name for name, _ in targets} >= set(MAKE_TARGETS)
    for name, rest in targets:
        assert "##" in rest, f"{name} has no ## description"
    phony = set(" ".join(re.findall(r"^\.PHONY:(.*)$", text, re.M)).split())
    assert {name for name, _ in targets} <= phony


def test_make_container_targets_run_the_documented_commands():
    """The container targets run the compose commands the README describes (make -n, nothing executed)."""
    expected = {
        "build": ["docker compose build"],
        "up": ["docker compose up -d"],
        "down": ["docker compose down"],
        "suspend": [f"docker compose exec -T {SERVICE} cuda-toggle-all checkpointed"],
        "resume": [f"docker compose exec -T {SERVICE} cuda-toggle-all running"],
        "status": [f"docker compose exec -T {SERVICE} cuda-toggle-all status"],
        "gate-status": ['curl -fsS "http://localhost:8010/gate/status"'],
        "wait": ["scripts/wait-for-model.sh", "http://localhost:8010/v1/models", "qwen3-8b-awq"],
        "test": ["docker compose build", "docker compose up -d", "scripts/wait-for-model.sh"]
        + [f"docker compose exec -T {SERVICE} selftest", 'if [ "1" = 1 ]; then docker compose down'],
    }
    for target, fragments in expected.items():
        result = make("-n", target, "HOST_PORT=8010", "SERVED_MODEL_NAME=qwen3-8b-awq", "CLEANUP=1")
        assert result.returncode == 0, result.stderr
        for fragment in fragments:
            assert fragment in result.stdout, (target, fragment, result.stdout)
    assert " -v" not in make("-n", "down").stdout  # never the volumes: .cache/ holds the model


def test_make_reads_port_and_model_name_from_dot_env(tmp_path: Path):
    """`make wait` takes HOST_PORT and SERVED_MODEL_NAME from .env, as compose does; the shell wins."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / ".env").write_text("# comment\nHOST_PORT=9123\nSERVED_MODEL_NAME='my-model'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "HOST_PORT"}
    result = subprocess.run(["make", "-n", "wait"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert 'scripts/wait-for-model.sh "http://localhost:9123/v1/models" "my-model"' in result.stdout
    result = subprocess.run(["make", "-n", "wait"], cwd=tmp_path, env={**env, "HOST_PORT": "7000"},
                            capture_output=True, text=True)  # fmt: skip
    assert "http://localhost:7000/v1/models" in result.stdout


def test_make_lint_runs_the_container_linters():
    """`make lint` runs shellcheck, hadolint and docker-compose config besides ruff."""
    result = make("-n", "lint")
    assert result.returncode == 0, result.stderr
    for fragment in ["shellcheck", "docker/start-services.sh", "scripts/wait-for-model.sh", ".ci/run"]:
        assert fragment in result.stdout
    for fragment in ["hadolint Dockerfile", "-f docker-compose.yml config -q", "-f docker-compose.cpu.yml config -q"]:
        assert fragment in result.stdout


# ---------------------------------------------------------------------------------------------------
# scripts/wait-for-model.sh against a real local server


@pytest.fixture
def models_server() -> Iterator[tuple[str, list[dict]]]:
    """A local HTTP server whose /v1/models lists what the test puts in the returned list."""
    models: list[dict] = []

    class Handler(JsonHandler):
        def do_GET(self):  # noqa: N802 (the name http.server calls)
            self.send_json(200 if self.path == "/v1/models" else 404, {"object": "list", "data": models})

    with serving(Handler) as url:
        yield f"{url}/v1/models", models


def wait_for_model(url: str, model: str, timeout_s: int, interval_s: str = "0.1") -> subprocess.CompletedProcess:
    command = [REPO / "scripts" / "wait-for-model.sh", url, model, str(timeout_s), interval_s]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 30)


def test_wait_for_model_returns_once_the_model_is_listed(models_server):
    """wait-for-model.sh exits 0 as soon as /v1/models lists the model, saying after how long."""
    url, models = models_server
    models.append({"id": "qwen3-8b-awq", "object": "model"})
    result = wait_for_model(url, "qwen3-8b-awq", 10)
    assert result.returncode == 0, result.stderr
    assert re.search(r"'qwen3-8b-awq' is served after \d+s", result.stdout)


def test_wait_for_model_times_out_saying_what_it_waited_for(models_server):
    """wait-for-model.sh gives up after its timeout, with the elapsed time and the server's answer."""
    url, models = models_server
    models.append({"id": "another-model", "object": "model"})
    result = wait_for_model(url, "qwen3-8b-awq", 1)
    assert result.returncode == 1
    assert "waiting up to 1s for model 'qwen3-8b-awq'" in result.stdout
    assert "does not list 'qwen3-8b-awq' yet" in result.stdout
    assert re.search(r"gave up after \d+s", result.stderr)


def test_wait_for_model_reports_no_server(tmp_path: Path):
    """wait-for-model.sh with nothing listening times out and says there was no answer."""
    result = wait_for_model(f"http://127.0.0.1:{free_port()}/v1/models", "m", 1)
    assert result.returncode == 1
    assert "no answer yet" in result.stdout


# ---------------------------------------------------------------------------------------------------
# supervisord for real: start-services.sh -> supervisord (supervisord.conf) -> run-vllm.sh -> server


@dataclass
class Supervised:
    """supervisord started through docker/start-services.sh, as in the container, in a session of its own."""

    process: subprocess.Popen
    tmp: Path
    env: dict[str, str]
    gate_port: int

    @property
    def gate_url(self) -> str:
        return f"http://127.0.0.1:{self.gate_port}"

    @property
    def socket_url(self) -> str:
        return f"unix://{self.tmp}/run/supervisord.sock"

    def log(self) -> str:
        return (self.tmp / "container.log").read_text(errors="replace")

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        command = [str(VENV_BIN / "supervisorctl"), "-c", str(REPO / "supervisord.conf"), *args]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=90)

    def rpc(self) -> xmlrpc.client.ServerProxy:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, serverurl=self.socket_url)
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def info(self, program: str = "vllm") -> dict:
        return self.rpc().supervisor.getProcessInfo(program)

    def wait_for_log(self, text: str, timeout_s: float = 30) -> None:
        wait_until(lambda: text in self.log(), f"{text!r} in the log:\n{self.log()[-3000:]}", timeout_s)

    def shutdown(self) -> None:
        """Stop supervisord, then kill whatever of its session is left (stopped processes too)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        for process in psutil.process_iter():
            try:
                if process.pid != os.getpid() and os.getsid(process.pid) == self.process.pid:
                    process.kill()
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def start_supervised(server_cmd: str, vllm_args: list[str], upstream_port: int = 0, **extra_env: str) -> Supervised:
    """supervisord with the project's supervisord.conf: `vllm` runs server_cmd with vllm_args through
    run-vllm.sh, `gate` the real gate (this Python's `-m entrypoint.gate`) in front of upstream_port."""
    # A short path of its own: a unix socket path must stay under 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="sv-"))
    gate_port = free_port()
    env = clean_env(
        GATE_LAUNCHER=f"{sys.executable} -m entrypoint.gate",
        GATE_HOST="127.0.0.1",
        GATE_PORT=str(gate_port),
        GATE_UPSTREAM=f"http://127.0.0.1:{upstream_port or free_port()}",
        GATE_POLL_S="0.1",
        # The library, as the gate uses it, finds the server through this supervisord.
        CUDA_TOGGLE_SUPERVISOR_URL=f"unix://{tmp}/run/supervisord.sock",
        CUDA_TOGGLE_RUN_DIR=str(tmp / "toggle"),
        PATH=f"{VENV_BIN}:{os.environ['PATH']}",
        SUPERVISOR_RUN_DIR=str(tmp / "run"),
        SUPERVISOR_CONF=str(REPO / "supervisord.conf"),
        SUPERVISORD_BIN=str(VENV_BIN / "supervisord"),
        VLLM_LAUNCHER=str(REPO / "docker" / "run-vllm.sh"),
        VLLM_REAPER=str(REPO / "docker" / "vllm-reaper.sh"),
        VLLM_ARGS_FILE=str(tmp / "vllm" / "args"),
        VLLM_SERVER_CMD=server_cmd,
        **extra_env,
    )
    # Appending: supervisord writes its own lines through fd 1 and the program's through /dev/stdout.
    with open(tmp / "container.log", "ab") as log:
        process = subprocess.Popen(
            [str(REPO / "docker" / "start-services.sh"), *vllm_args],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    supervised = Supervised(process, tmp, env, gate_port)
    try:
        wait_until(lambda: (tmp / "run" / "supervisord.sock").exists(), "supervisord's socket", 30)
    except BaseException:
        supervised.shutdown()
        raise
    return supervised


SERVED_NAME = "qwen3 8b 'awq'"  # blanks and quotes: the name only matches if the arguments arrived intact


def standin_args(port: int) -> list[str]:
    return ["--model", "standin", "--served-model-name", SERVED_NAME, "--tensor-parallel-size", "2"] + [
        "--disable-custom-all-reduce", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)
    ]  # fmt: skip


def start_standin() -> tuple[Supervised, int]:
    """supervisord running the stand-in vLLM on a free loopback port, with sleep mode on as in the compose
    file, behind the gate."""
    if not STANDIN.exists():
        pytest.fail(f"{STANDIN} is missing")
    port = free_port()
    supervised = start_supervised(f"{sys.executable} {STANDIN}", standin_args(port), port, VLLM_SLEEP_MODE="1")
    return supervised, port


@pytest.fixture(scope="module")
def standin() -> Iterator[tuple[Supervised, int]]:
    """One supervisord running the stand-in vLLM (TP=2) for the tests that only look."""
    supervised, port = start_standin()
    try:
        yield supervised, port
    finally:
        supervised.shutdown()
        shutil.rmtree(supervised.tmp, ignore_errors=True)


def ensure_running(supervised: Supervised, port: int, program: str = "vllm") -> int:
    """Start `program` if a test stopped it; wait until it is RUNNING and serving. Returns its PID."""
    if supervised.info(program)["statename"] in ("STOPPED", "EXITED", "FATAL"):
        assert "started" in supervised.ctl("start", program).stdout
    wait_until(lambda: supervised.info(program)["statename"] == "RUNNING", f"{program} RUNNING", 60)
    wait_until(lambda: models_status(port) == 200, f"/v1/models answering 200 on port {port}", 60)
    return supervised.info(program)["pid"]


def models_status(port: int) -> int | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code
    except requests.RequestException:
        return None


def ensure_gate(supervised: Supervised, port: int) -> int:
    """The server is up and the gate serves it; returns the gate's PID."""
    ensure_running(supervised, port)
    return ensure_running(supervised, supervised.gate_port, "gate")


def engine_and_workers(pid: int) -> tuple[psutil.Process, list[psutil.Process]]:
    def find():
        tree = process_tree(pid)
        engines = [p for p in tree if title(p).startswith("VLLM::EngineCore")]
        workers = [p for p in tree if title(p).startswith("VLLM::Worker_TP")]
        return (engines, workers) if len(engines) == 1 and len(workers) == 2 else None

    engines, workers = wait_until(find, f"EngineCore and two workers under {pid}", 30)
    return engines[0], workers


@pytest.mark.slow
def test_supervisord_runs_vllm_and_answers_through_its_socket(standin):
    """supervisord starts the server with the compose-style arguments; supervisorctl works over the socket."""
    supervised, port = standin
    ensure_running(supervised, port)
    supervised.wait_for_log("standin: ready")
    status = supervised.ctl("status", "vllm")
    assert re.match(r"vllm\s+RUNNING\s+pid \d+", status.stdout), status.stdout + status.stderr
    models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == [SERVED_NAME]
    assert supervised.ctl("status", "vllm-reaper").stdout.split()[1] == "RUNNING"


@pytest.mark.slow
def test_wait_for_model_sees_the_standin_served_under_supervisord(standin):
    """wait-for-model.sh finds the served model on the supervised stand-in."""
    supervised, port = standin
    ensure_running(supervised, port)
    result = wait_for_model(f"http://127.0.0.1:{port}/v1/models", SERVED_NAME, 20)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_supervisord_pid_of_vllm_is_the_root_of_the_tp2_tree(standin):
    """supervisord's XML-RPC PID of `vllm` is the API server; below it EngineCore and two TP workers."""
    supervised, port = standin
    pid = ensure_running(supervised, port)
    api = psutil.Process(pid)
    assert "vllm.entrypoints.openai.api_server" in title(api)
    engine, workers = engine_and_workers(pid)
    assert engine.ppid() == pid
    assert sorted(title(w) for w in workers) == ["VLLM::Worker_TP0", "VLLM::Worker_TP1"]
    assert all(w.ppid() == engine.pid for w in workers)
    # stopasgroup/killasgroup reach the whole tree only if it is one process group led by that PID.
    assert {os.getpgid(p.pid) for p in process_tree(pid)} == {pid}


@pytest.mark.slow
def test_cuda_toggle_all_finds_the_supervised_server(standin):
    """cuda-toggle-all's server lookup gets the same PID from supervisord's socket."""
    from entrypoint.base.config import load_config
    from entrypoint.server.discovery import find_server, supervisor_program_pid

    supervised, port = standin
    pid = ensure_running(supervised, port)
    assert supervisor_program_pid(supervised.socket_url, "vllm") == pid
    config = load_config({"CUDA_TOGGLE_SUPERVISOR_URL": supervised.socket_url, "CUDA_TOGGLE_PROGRAM": "vllm"})
    root = find_server(config)
    assert root.pid == pid
    assert "supervisord" in root.how


@pytest.mark.slow
def test_sleep_calls_go_to_the_port_on_vllm_command_line(standin):
    """The hybrid suspend finds vLLM's own address (for /sleep) in its command line: the internal port,
    not the gate's; the gate's GATE_UPSTREAM is the same address."""
    from entrypoint.base.processes import describe
    from entrypoint.server.vllm_control import VllmControl, server_url

    supervised, port = standin
    pid = ensure_running(supervised, port)
    url = server_url(describe(pid), "")
    assert url == f"http://127.0.0.1:{port}" == supervised.env["GATE_UPSTREAM"]
    assert VllmControl(url, 10).is_sleeping() is False  # sleep mode is on: the endpoint answers there


@pytest.mark.slow
def test_supervisord_runs_the_gate_in_front_of_vllm(standin):
    """Program `gate` runs next to `vllm`; requests to the gate's port reach the server and come back."""
    supervised, port = standin
    gate_pid = ensure_gate(supervised, port)
    assert "entrypoint.gate" in title(psutil.Process(gate_pid))
    status = supervised.ctl("status", "gate")
    assert re.match(r"gate\s+RUNNING\s+pid \d+", status.stdout), status.stdout + status.stderr
    models = requests.get(f"{supervised.gate_url}/v1/models", timeout=5)
    assert [m["id"] for m in models.json()["data"]] == [SERVED_NAME]
    assert requests.get(f"{supervised.gate_url}/health", timeout=5).status_code == 200  # the HEALTHCHECK
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    chat = requests.post(f"{supervised.gate_url}/v1/chat/completions", json=body, timeout=30)
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]
    gate_status = requests.get(f"{supervised.gate_url}/gate/status", timeout=5).json()
    assert (gate_status["state"], gate_status["last_failure_at"]) == ("running", None)
    supervised.wait_for_log("vllm-gate listening on http://127.0.0.1:")


@pytest.mark.slow
def test_gate_hides_the_dev_endpoints_that_sleep_mode_opens(standin):
    """Sleep mode reaches vLLM (flag and VLLM_SERVER_DEV_MODE=1), its endpoints answer on the internal
    port, and through the gate they are 404 and never forwarded."""
    supervised, port = standin
    pid = ensure_running(supervised, port)
    ensure_gate(supervised, port)
    api = psutil.Process(pid)
    assert "--enable-sleep-mode" in title(api).split()
    assert api.environ().get("VLLM_SERVER_DEV_MODE") == "1"
    internal = f"http://127.0.0.1:{port}"
    assert requests.get(f"{internal}/is_sleeping", timeout=5).json() == {"is_sleeping": False}
    for method, path in [("POST", "/sleep?level=1"), ("GET", "/is_sleeping"), ("POST", "/collective_rpc")]:
        response = requests.request(method, supervised.gate_url + path, timeout=5)
        assert response.status_code == 404, (method, path, response.text)
    assert requests.get(f"{internal}/is_sleeping", timeout=5).json() == {"is_sleeping": False}  # not forwarded


def assert_all_gone(tree: list[psutil.Process], log: str) -> None:
    def survivors():
        return [f"{p.pid} {title(p)!r} {p.status()}" for p in tree if alive(p)]

    try:
        wait_until(lambda: not survivors(), "every process of the tree to end", 15)
    except AssertionError:
        raise AssertionError(f"survivors: {survivors()}\n{log[-3000:]}") from None


@pytest.mark.slow
def test_supervisorctl_stop_ends_the_whole_tree(standin):
    """`supervisorctl stop vllm` leaves no process of the server's tree behind."""
    supervised, port = standin
    pid = ensure_running(supervised, port)
    engine_and_workers(pid)
    tree = process_tree(pid)
    assert "vllm: stopped" in supervised.ctl("stop", "vllm").stdout
    assert_all_gone(tree, supervised.log())
    assert supervised.info()["statename"] == "STOPPED"


@pytest.mark.slow
def test_supervisorctl_stop_ends_a_suspended_server(standin):
    """With EngineCore SIGSTOPped (as while suspended), `supervisorctl stop vllm` still ends every process."""
    supervised, port = standin
    pid = ensure_running(supervised, port)
    engine, _ = engine_and_workers(pid)
    tree = process_tree(pid)
    engine.suspend()
    wait_until(lambda: engine.status() == psutil.STATUS_STOPPED, "EngineCore stopped", 5)
    started = time.monotonic()
    result = supervised.ctl("stop", "vllm")
    assert "vllm: stopped" in result.stdout, result.stdout + result.stderr
    assert_all_gone(tree, supervised.log())
    # Ended by SIGTERM: supervisord's SIGKILL comes only once vllm's stopwaitsecs (the first in the file) passed.
    stopwaitsecs = int(re.findall(r"^stopwaitsecs=(\d+)$", (REPO / "supervisord.conf").read_text(), re.M)[0])
    assert time.monotonic() - started < stopwaitsecs
    supervised.wait_for_log(f"vllm (pid {pid}) is stopping: sent SIGCONT", 10)


@pytest.mark.slow
def test_supervisorctl_stop_all_ends_the_gate_and_the_server():
    """`supervisorctl stop all` stops the gate and vLLM: no process of either is left, the port is closed."""
    supervised, port = start_standin()
    try:
        gate_pid = ensure_gate(supervised, port)
        pid = supervised.info()["pid"]
        engine_and_workers(pid)
        tree = process_tree(pid) + process_tree(gate_pid)
        result = supervised.ctl("stop", "all")
        assert "gate: stopped" in result.stdout and "vllm: stopped" in result.stdout, result.stdout + result.stderr
        assert_all_gone(tree, supervised.log())
        assert supervised.info("gate")["statename"] == supervised.info()["statename"] == "STOPPED"
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{supervised.gate_url}/health", timeout=5)
    finally:
        supervised.shutdown()
        shutil.rmtree(supervised.tmp, ignore_errors=True)


@pytest.mark.slow
def test_container_stop_ends_a_suspended_server():
    """SIGTERM to supervisord (docker stop) with EngineCore stopped: supervisord exits, nothing survives."""
    supervised, port = start_standin()
    try:
        wait_until(lambda: supervised.info()["pid"], "vllm spawned", 30)
        pid = supervised.info()["pid"]
        engine, _ = engine_and_workers(pid)
        supervised.wait_for_log("standin: ready")
        gate_pid = ensure_gate(supervised, port)
        tree = process_tree(pid) + process_tree(gate_pid)
        engine.suspend()
        supervised.process.terminate()
        assert supervised.process.wait(timeout=60) == 0
        assert_all_gone(tree, supervised.log())
    finally:
        supervised.shutdown()
        shutil.rmtree(supervised.tmp, ignore_errors=True)


# A server that exits at once on SIGTERM and leaves its child behind: what vllm-reaper is for.
LEAKY_SERVER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    mode, marker = sys.argv[1], sys.argv[2]
    child_code = (
        "import os, signal, sys, time\\n"
        "mode, marker = sys.argv[1], sys.argv[2]\\n"
        "def graceful(*_):\\n"
        "    open(marker, 'w').close()\\n"
        "    os._exit(0)\\n"
        "signal.signal(signal.SIGTERM, graceful if mode == 'graceful' else signal.SIG_IGN)\\n"
        "print('leaky child ready', flush=True)\\n"
        "time.sleep(600)\\n"
    )
    child = subprocess.Popen([sys.executable, "-c", child_code, mode, marker])
    def leave(*_):
        time.sleep(1)  # a server takes a moment to shut down; its child is left behind regardless
        os._exit(0)
    signal.signal(signal.SIGTERM, leave)
    print(f"leaky server: child {child.pid}", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def leaky_server(tmp_path: Path) -> Iterator[Callable[[str], tuple[Supervised, psutil.Process]]]:
    """Start supervisord with LEAKY_SERVER as vLLM; returns it and the child the server will leave."""
    started: list[Supervised] = []
    script = tmp_path / "leaky.py"
    script.write_text(LEAKY_SERVER)

    def start(mode: str) -> tuple[Supervised, psutil.Process]:
        supervised = start_supervised(f"{sys.executable} {script}", [mode, str(tmp_path / "graceful")])
        started.append(supervised)
        supervised.wait_for_log("leaky child ready")
        child_pid = int(re.search(r"leaky server: child (\d+)", supervised.log())[1])
        return supervised, psutil.Process(child_pid)

    yield start
    for supervised in started:
        supervised.shutdown()
        shutil.rmtree(supervised.tmp, ignore_errors=True)


@pytest.mark.slow
def test_stopped_child_gets_its_sigterm_when_the_server_stops(leaky_server, tmp_path: Path):
    """vllm-reaper sends SIGCONT to the group on stop: a SIGSTOPped child handles its SIGTERM and exits."""
    supervised, child = leaky_server("graceful")
    child.suspend()
    wait_until(lambda: child.status() == psutil.STATUS_STOPPED, "child stopped", 5)
    assert "vllm: stopped" in supervised.ctl("stop", "vllm").stdout
    assert_all_gone([child], supervised.log())
    assert (tmp_path / "graceful").exists(), "the child was killed instead of handling its SIGTERM"


@pytest.mark.slow
def test_child_left_behind_by_the_server_is_killed(leaky_server):
    """A stopped child that ignores SIGTERM and outlives the server is killed when the stop is reported."""
    supervised, child = leaky_server("stubborn")
    child.suspend()
    assert "vllm: stopped" in supervised.ctl("stop", "vllm").stdout
    assert_all_gone([child], supervised.log())
    supervised.wait_for_log("members of its process group remain: sending SIGKILL", 10)
