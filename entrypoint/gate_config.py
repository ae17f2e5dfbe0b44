"""The gate's settings: read once from GATE_* environment variables into a frozen dataclass, by one
pure function. The library's own CUDA_TOGGLE_* settings stay in config.py."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field

from yarl import URL

from .config import Setting
from .errors import ExitCode, SuspendError
from .gate_paths import DEFAULT_PASSIVE_PATHS, is_clean, is_dev_only, is_forwardable

GATE_SETTINGS: dict[str, Setting] = {
    s.env: s
    for s in [
        Setting("GATE_HOST", "0.0.0.0", "address the gate listens on (the port the compose file publishes)"),
        Setting("GATE_PORT", "8000", "port the gate listens on"),
        Setting("GATE_UPSTREAM", "http://127.0.0.1:8001", "the vLLM server behind the gate (keep it on loopback)"),
        Setting(
            "GATE_PASSIVE_PATHS",
            ",".join(DEFAULT_PASSIVE_PATHS),
            "comma-separated paths forwarded without waking a suspended server (vLLM answers them"
            " without the GPUs); every other forwarded path wakes it first",
        ),
        Setting(
            "GATE_EXTRA_PATHS",
            "",
            "comma-separated exact paths forwarded besides /v1/... and the operational ones (e.g."
            " /rerank,/score,/pooling); vLLM's dev endpoints are refused",
        ),
        Setting(
            "GATE_IDLE_SUSPEND_S",
            "0",
            "suspend after this many seconds without a request in flight (0 = never)",
        ),
        Setting("GATE_SERVER_PID", "", "PID of vLLM's API server (default: the library finds it itself)"),
        Setting(
            "GATE_BUSY_WAIT_S",
            "900",
            "how long a suspend or resume of the gate waits for one run by cuda-toggle-all to finish",
        ),
        Setting("GATE_POLL_S", "0.5", "how often the gate re-reads the suspend record and the tool's lock"),
        Setting("GATE_CONNECT_TIMEOUT_S", "10", "timeout for connecting to the upstream server"),
        Setting("GATE_MAX_REQUEST_MIB", "100", "largest request body accepted (images travel inside it)"),
    ]
}


@dataclass(frozen=True)
class GateConfig:
    host: str
    port: int
    upstream: str  # scheme://host:port, no trailing slash
    passive_paths: tuple[str, ...]
    extra_paths: tuple[str, ...]
    idle_suspend_s: float  # 0: never
    server_pid: int | None
    busy_wait_s: float
    poll_s: float
    connect_timeout_s: float
    max_request_mib: int
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, value in force, where it came from) for every GATE_* setting."""
        return [
            (env, self.sources.get(env, setting.default), "environment" if env in self.sources else "default")
            for env, setting in GATE_SETTINGS.items()
        ]


def _usage_error(env: str, value: str, problem: str) -> SuspendError:
    return SuspendError(f"{env}={value!r} {problem}: fix or unset it", ExitCode.USAGE)


def _number(env: str, value: str, kind: type, minimum: float, maximum: float | None = None) -> float:
    try:
        number = kind(value)
    except ValueError:
        raise _usage_error(env, value, f"is not a{'n' if kind is int else ''} {kind.__name__}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise _usage_error(env, value, f"must be {bounds}")
    return number


def _paths(env: str, value: str) -> tuple[str, ...]:
    paths = tuple(item.strip() for item in value.split(",") if item.strip())
    for path in paths:
        if not is_clean(path):
            raise _usage_error(env, value, f"has {path!r}, not a plain absolute path like /v1/models")
        if is_dev_only(path):
            raise _usage_error(env, value, f"names {path}, one of vLLM's dev endpoints, which the gate never forwards")
    return paths


def _upstream(value: str) -> str:
    env = "GATE_UPSTREAM"
    try:
        url = URL(value.strip())
    except ValueError as error:
        raise _usage_error(env, value, f"is not a URL ({error})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise _usage_error(env, value, "must look like http://127.0.0.1:8001")
    if url.path not in ("", "/") or url.query_string or url.fragment:
        raise _usage_error(env, value, "must have no path, query or fragment")
    return str(url.with_path("")).rstrip("/")


def load_gate_config(environ: Mapping[str, str]) -> GateConfig:
    """Parse GATE_* variables of `environ` into a GateConfig; a bad value raises SuspendError(USAGE)."""
    sources = {env: environ[env] for env in GATE_SETTINGS if environ.get(env, "").strip() != ""}

    def get(env: str) -> str:
        return sources.get(env, GATE_SETTINGS[env].default)

    extra_paths = _paths("GATE_EXTRA_PATHS", get("GATE_EXTRA_PATHS"))
    passive_paths = _paths("GATE_PASSIVE_PATHS", get("GATE_PASSIVE_PATHS"))
    for path in passive_paths:
        if not is_forwardable(path, extra_paths):
            raise _usage_error(
                "GATE_PASSIVE_PATHS",
                get("GATE_PASSIVE_PATHS"),
                f"has {path}, which the gate does not forward (add it to GATE_EXTRA_PATHS)",
            )
    pid_text = get("GATE_SERVER_PID").strip()
    return GateConfig(
        host=get("GATE_HOST").strip(),
        port=int(_number("GATE_PORT", get("GATE_PORT"), int, 1, 65535)),
        upstream=_upstream(get("GATE_UPSTREAM")),
        passive_paths=passive_paths,
        extra_paths=extra_paths,
        idle_suspend_s=_number("GATE_IDLE_SUSPEND_S", get("GATE_IDLE_SUSPEND_S"), float, 0),
        server_pid=int(_number("GATE_SERVER_PID", pid_text, int, 1)) if pid_text else None,
        busy_wait_s=_number("GATE_BUSY_WAIT_S", get("GATE_BUSY_WAIT_S"), float, 0),
        poll_s=_number("GATE_POLL_S", get("GATE_POLL_S"), float, 0.01),
        connect_timeout_s=_number("GATE_CONNECT_TIMEOUT_S", get("GATE_CONNECT_TIMEOUT_S"), float, 0.1),
        max_request_mib=int(_number("GATE_MAX_REQUEST_MIB", get("GATE_MAX_REQUEST_MIB"), int, 1)),
        sources=sources,
    )


def gate_settings_help() -> str:
    """The GATE_* variables for --help (click keeps the lines after a \\b marker as they are)."""
    lines = ["\b", "Environment variables (default):"]
    for setting in GATE_SETTINGS.values():
        lines.append(f"  {setting.env} ({setting.default})")
        lines += textwrap.wrap(setting.help, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
