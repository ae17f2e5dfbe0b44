"""The gate's pieces that need no server: settings, path classes, the lock probe, metrics text, the CLI."""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from loguru import logger

from entrypoint.base.errors import ExitCode
from entrypoint.gate.app import cli
from entrypoint.gate.config import GATE_SETTINGS, load_gate_config
from entrypoint.gate.control import Phase, phase_of_tool_run, tool_lock_purpose
from entrypoint.gate.limits import FILES_BESIDES_CONNECTIONS
from entrypoint.gate.metrics import GateMetrics
from entrypoint.gate.paths import (
    DEFAULT_PASSIVE_PATHS,
    OPTIONAL_PATHS,
    OPTIONAL_ROUTES,
    PRIVATE_PATHS,
    PUBLIC_ROUTES,
    PathClass,
    RouteTable,
)
from entrypoint.suspend.records import ToolLock


def test_defaults_match_the_container_layout():
    """Without GATE_* variables the gate listens on 0.0.0.0:8000 and forwards to vLLM on 127.0.0.1:8001."""
    config = load_gate_config({})
    assert (config.host, config.port, config.upstream) == ("0.0.0.0", 8000, "http://127.0.0.1:8001")
    assert config.passive_paths == DEFAULT_PASSIVE_PATHS == ("/health", "/metrics", "/v1/models")
    assert (config.idle_suspend_s, config.server_pid, config.extra_paths) == (0, None, ())
    assert (config.max_connections, config.keepalive_s, config.max_bodies_mib) == (1000, 75, 1024)
    assert all(source == "default" for _, _, source in config.describe())


def test_gate_settings_are_parsed_and_the_config_is_frozen():
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
    ("method", "path", "expected", "status"),
    [
        ("POST", "/v1/chat/completions", PathClass.WAKING, 0),
        ("POST", "/v1/completions", PathClass.WAKING, 0),
        ("POST", "/v1/embeddings", PathClass.WAKING, 0),
        ("POST", "/v1/responses", PathClass.WAKING, 0),
        ("GET", "/v1/responses/resp_123", PathClass.WAKING, 0),
        ("POST", "/v1/responses/resp_123/cancel", PathClass.WAKING, 0),
        ("POST", "/v1/audio/transcriptions", PathClass.WAKING, 0),
        ("POST", "/tokenize", PathClass.WAKING, 0),
        ("GET", "/load", PathClass.WAKING, 0),
        ("GET", "/v1/models", PathClass.PASSIVE, 0),
        ("HEAD", "/health", PathClass.PASSIVE, 0),
        ("GET", "/metrics", PathClass.PASSIVE, 0),
        ("OPTIONS", "/v1/chat/completions", PathClass.PASSIVE, 0),
        ("DELETE", "/v1/completions", PathClass.BLOCKED, 405),
        ("GET", "/v1/chat/completions", PathClass.BLOCKED, 405),
        ("POST", "/v1/models", PathClass.BLOCKED, 405),
        ("POST", "/v1/nope", PathClass.BLOCKED, 404),
        ("POST", "/v1/load_lora_adapter", PathClass.BLOCKED, 404),
        ("POST", "/v1/unload_lora_adapter", PathClass.BLOCKED, 404),
        ("GET", "/v1/responses/a/b", PathClass.BLOCKED, 404),
        ("GET", "/v1/realtime", PathClass.BLOCKED, 501),
        ("POST", "/sleep", PathClass.BLOCKED, 404),
        ("POST", "/wake_up", PathClass.BLOCKED, 404),
        ("POST", "/collective_rpc", PathClass.BLOCKED, 404),
        ("GET", "/server_info", PathClass.BLOCKED, 404),
        ("POST", "/v1/../sleep", PathClass.BLOCKED, 404),
        ("GET", "/v1/./models", PathClass.BLOCKED, 404),
        ("POST", "//sleep", PathClass.BLOCKED, 404),
        ("GET", "/v1//models", PathClass.BLOCKED, 404),
        ("GET", "/health/", PathClass.BLOCKED, 404),
        ("GET", "/v1", PathClass.BLOCKED, 404),
        ("POST", "/rerank", PathClass.BLOCKED, 404),
        ("GET", "/", PathClass.BLOCKED, 404),
    ],
)
def test_requests_are_classified_by_an_allow_list_of_routes_and_methods(method, path, expected, status):
    """Known public routes with their methods pass; admin, dev, unknown paths and wrong methods do not."""
    verdict = RouteTable().classify(method, path)
    assert (verdict.path_class, verdict.status) == (expected, status)


@pytest.mark.parametrize("path", PRIVATE_PATHS)
def test_no_private_endpoint_is_forwarded_with_any_method_or_setting(path):
    """Every admin/dev endpoint is refused with every method, even with every optional route opened."""
    everything = RouteTable(OPTIONAL_PATHS)
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
        assert everything.classify(method, path).path_class is PathClass.BLOCKED


def test_extra_paths_open_optional_public_routes_only():
    """GATE_EXTRA_PATHS opens /rerank and its kind; the exact path only, POST only."""
    table = RouteTable(("/rerank",))
    assert table.classify("POST", "/rerank").path_class is PathClass.WAKING
    assert table.classify("GET", "/rerank").status == 405
    assert table.classify("POST", "/rerank/x").status == 404
    assert table.classify("POST", "/score").status == 404


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


def test_bad_environment_exits_2_naming_the_variable(restore_logging, monkeypatch):
    """A bad GATE_* value stops the gate before it listens, with exit code 2 and the variable's name."""
    monkeypatch.setenv("GATE_UPSTREAM", "not a url")
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == ExitCode.USAGE
    assert "GATE_UPSTREAM='not a url'" in result.output


GATE_DOC = (Path(__file__).resolve().parent.parent / "docs" / "gate.md").read_text()


@pytest.mark.parametrize("route", PUBLIC_ROUTES + OPTIONAL_ROUTES, ids=lambda route: route.path)
def test_every_forwarded_route_is_documented(route):
    """docs/gate.md's "Public routes" names every route the gate forwards (by default or on request)."""
    assert f"`{route.path}`" in GATE_DOC


@pytest.mark.parametrize("path", PRIVATE_PATHS)
def test_every_private_endpoint_is_documented_as_never_forwarded(path):
    """docs/gate.md lists each admin/dev endpoint that the gate refuses even in GATE_EXTRA_PATHS."""
    never = GATE_DOC[GATE_DOC.index("Never forwarded") : GATE_DOC.index("### What the gate answers itself")]
    assert f"`{path}`" in never


def test_compose_open_file_limit_fits_the_default_connection_limit():
    """The compose file's nofile limit holds the default GATE_MAX_CONNECTIONS (two files each, plus a reserve)."""
    compose = (Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text()
    found = re.search(r"ulimits:\n\s+nofile:\n\s+soft: (\d+)\n\s+hard: (\d+)", compose)
    assert found, "docker-compose.yml sets no nofile ulimit"
    needed = 2 * int(GATE_SETTINGS["GATE_MAX_CONNECTIONS"].default) + FILES_BESIDES_CONNECTIONS
    assert int(found.group(1)) >= needed and int(found.group(2)) >= needed
