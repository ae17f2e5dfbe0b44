"""The gate's pieces that need no server: settings, path classes, the lock probe, metrics text, the CLI."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from loguru import logger

from entrypoint.errors import ExitCode, SuspendError
from entrypoint.gate import cli
from entrypoint.gate_config import GATE_SETTINGS, load_gate_config
from entrypoint.gate_control import Phase, phase_of_tool_run, tool_lock_purpose
from entrypoint.gate_metrics import GateMetrics
from entrypoint.gate_paths import DEFAULT_PASSIVE_PATHS, PathClass, classify
from entrypoint.runstate import ToolLock


def test_defaults_match_the_container_layout():
    """Without GATE_* variables the gate listens on 0.0.0.0:8000 and forwards to vLLM on 127.0.0.1:8001."""
    config = load_gate_config({})
    assert (config.host, config.port, config.upstream) == ("0.0.0.0", 8000, "http://127.0.0.1:8001")
    assert config.passive_paths == DEFAULT_PASSIVE_PATHS == ("/health", "/metrics", "/v1/models")
    assert (config.idle_suspend_s, config.server_pid, config.extra_paths) == (0, None, ())
    assert all(source == "default" for _, _, source in config.describe())


def test_settings_are_parsed_and_the_config_is_frozen():
    """Every GATE_* value is parsed into its type; the dataclass cannot be changed afterwards."""
    config = load_gate_config(
        {
            "GATE_PORT": "9000",
            "GATE_UPSTREAM": "http://localhost:8001/",
            "GATE_IDLE_SUSPEND_S": "300",
            "GATE_SERVER_PID": "4242",
            "GATE_EXTRA_PATHS": " /rerank , /score ",
            "GATE_PASSIVE_PATHS": "/health,/rerank",
            "GATE_POLL_S": "0.2",
        }
    )
    assert (config.port, config.upstream, config.idle_suspend_s) == (9000, "http://localhost:8001", 300.0)
    assert (config.server_pid, config.extra_paths, config.passive_paths) == (
        4242,
        ("/rerank", "/score"),
        ("/health", "/rerank"),
    )
    assert config.poll_s == 0.2
    assert dict((env, source) for env, _, source in config.describe())["GATE_PORT"] == "environment"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "value", "complaint"),
    [
        ("GATE_PORT", "http", "is not an int"),
        ("GATE_PORT", "70000", "between 1 and 65535"),
        ("GATE_UPSTREAM", "ftp://127.0.0.1:8001", "must look like http://127.0.0.1:8001"),
        ("GATE_UPSTREAM", "http://127.0.0.1:8001/v1", "no path"),
        ("GATE_IDLE_SUSPEND_S", "-1", "at least 0"),
        ("GATE_IDLE_SUSPEND_S", "five", "is not a float"),
        ("GATE_SERVER_PID", "vllm", "is not an int"),
        ("GATE_PASSIVE_PATHS", "/health,/sleep", "dev endpoints"),
        ("GATE_PASSIVE_PATHS", "/rerank", "does not forward"),
        ("GATE_PASSIVE_PATHS", "health", "plain absolute path"),
        ("GATE_EXTRA_PATHS", "/collective_rpc", "dev endpoints"),
        ("GATE_EXTRA_PATHS", "/v1/../sleep", "plain absolute path"),
        ("GATE_POLL_S", "0", "at least 0.01"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(env, value, complaint):
    """A bad value raises a usage error that names the variable, the value and what is wrong."""
    with pytest.raises(SuspendError) as raised:
        load_gate_config({env: value})
    assert raised.value.exit_code == ExitCode.USAGE
    assert raised.value.message.startswith(f"{env}={value!r}") and complaint in raised.value.message


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/chat/completions", PathClass.WAKING),
        ("/v1/completions", PathClass.WAKING),
        ("/v1/embeddings", PathClass.WAKING),
        ("/tokenize", PathClass.WAKING),
        ("/load", PathClass.WAKING),
        ("/v1/models", PathClass.PASSIVE),
        ("/health", PathClass.PASSIVE),
        ("/metrics", PathClass.PASSIVE),
        ("/sleep", PathClass.BLOCKED),
        ("/wake_up", PathClass.BLOCKED),
        ("/collective_rpc", PathClass.BLOCKED),
        ("/server_info", PathClass.BLOCKED),
        ("/v1/../sleep", PathClass.BLOCKED),
        ("/v1/./models", PathClass.BLOCKED),
        ("//sleep", PathClass.BLOCKED),
        ("/v1//models", PathClass.BLOCKED),
        ("/health/", PathClass.BLOCKED),
        ("/v1", PathClass.BLOCKED),
        ("/rerank", PathClass.BLOCKED),
        ("/", PathClass.BLOCKED),
    ],
)
def test_paths_are_classified_by_an_allow_list(path, expected):
    """The OpenAI API and the operational paths pass, dev endpoints and odd spellings of paths do not."""
    assert classify(path, DEFAULT_PASSIVE_PATHS) is expected


def test_extra_paths_are_forwarded_but_dev_endpoints_never():
    """GATE_EXTRA_PATHS opens exact paths; a dev endpoint stays blocked even if listed there."""
    assert classify("/rerank", DEFAULT_PASSIVE_PATHS, ("/rerank",)) is PathClass.WAKING
    assert classify("/rerank/x", DEFAULT_PASSIVE_PATHS, ("/rerank",)) is PathClass.BLOCKED
    assert classify("/sleep", DEFAULT_PASSIVE_PATHS, ("/sleep",)) is PathClass.BLOCKED


def test_lock_probe_sees_a_transition_of_the_tool(tmp_path: Path):
    """tool_lock_purpose: None while the lock is free (or was never made), the purpose while it is held."""
    assert tool_lock_purpose(str(tmp_path / "never-made")) is None
    assert not (tmp_path / "never-made").exists(), "the probe must not create the run dir"
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with ToolLock(str(tmp_path), 1, purpose="cuda-toggle-all checkpointed"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        assert tool_lock_purpose(str(tmp_path)) == "cuda-toggle-all checkpointed"
    finally:
        release.set()
        holder.join(10)
    assert tool_lock_purpose(str(tmp_path)) is None
    with ToolLock(str(tmp_path), 0.1, purpose="cuda-toggle-all running"):
        pass  # the probe left the lock free for the tool
    assert phase_of_tool_run("cuda-toggle-all running") is Phase.RESUMING
    assert phase_of_tool_run("cuda-toggle-all checkpointed") is Phase.SUSPENDING
    assert phase_of_tool_run("") is Phase.SUSPENDING


def test_metrics_text_counts_and_buckets():
    """Counters carry their labels, the wait histogram is cumulative, gauges follow the state."""
    metrics = GateMetrics()
    metrics.count_request(PathClass.WAKING)
    metrics.record_transition("resume", True, 1.5)
    metrics.record_transition("suspend", False, 0.5)
    for seconds in (0.05, 0.3, 2.0):
        metrics.record_wait(seconds)
    text = metrics.render(phase="suspended", in_flight=2, waiting=1)
    lines = set(text.splitlines())
    assert 'vllm_gate_requests_total{path_class="waking"} 1' in lines
    assert 'vllm_gate_transitions_total{transition="resume",outcome="ok"} 1' in lines
    assert 'vllm_gate_transitions_total{transition="suspend",outcome="failed"} 1' in lines
    assert 'vllm_gate_transition_seconds_sum{transition="resume",outcome="ok"} 1.500000' in lines
    assert 'vllm_gate_request_wait_seconds_bucket{le="0.1"} 1' in lines
    assert 'vllm_gate_request_wait_seconds_bucket{le="0.5"} 2' in lines
    assert 'vllm_gate_request_wait_seconds_bucket{le="2.5"} 3' in lines
    assert 'vllm_gate_request_wait_seconds_bucket{le="+Inf"} 3' in lines
    assert "vllm_gate_waited_requests_total 3" in lines
    assert {"vllm_gate_in_flight 2", "vllm_gate_waiting 1", "vllm_gate_suspended 1"} <= lines
    assert 'vllm_gate_state{state="suspended"} 1' in lines and 'vllm_gate_state{state="running"} 0' in lines


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI points loguru at click's captured stderr; put it back on the real one afterwards."""
    yield
    logger.remove()
    logger.add(sys.stderr)


def test_help_lists_every_variable(restore_logging):
    """vllm-gate --help names every GATE_* variable and the two paths the gate serves itself."""
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for env in GATE_SETTINGS:
        assert env in result.output
    assert "/gate/status" in result.output and "/gate/metrics" in result.output


def test_print_config_shows_gate_and_library_settings(restore_logging, monkeypatch):
    """--print-config --json lists GATE_* and CUDA_TOGGLE_*; the gate's busy wait replaces the tool's."""
    monkeypatch.setenv("GATE_IDLE_SUSPEND_S", "120")
    monkeypatch.setenv("GATE_BUSY_WAIT_S", "42")
    monkeypatch.delenv("CUDA_TOGGLE_SERVER_URL", raising=False)
    result = CliRunner().invoke(cli, ["--print-config", "--json"])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)
    assert settings["GATE_IDLE_SUSPEND_S"] == {"value": "120", "from": "environment"}
    assert settings["GATE_PORT"] == {"value": "8000", "from": "default"}
    assert settings["CUDA_TOGGLE_BUSY_WAIT_S"]["value"] == "42.0"
    assert settings["CUDA_TOGGLE_SERVER_URL"]["value"] == "http://127.0.0.1:8001"  # vLLM behind the gate
    assert "CUDA_TOGGLE_RUN_DIR" in settings


def test_bad_environment_exits_2_naming_the_variable(restore_logging, monkeypatch):
    """A bad GATE_* value stops the gate before it listens, with exit code 2 and the variable's name."""
    monkeypatch.setenv("GATE_UPSTREAM", "not a url")
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == ExitCode.USAGE
    assert "GATE_UPSTREAM='not a url'" in result.output
