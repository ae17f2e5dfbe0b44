"""The gate's settings: GATE_* environment variables, one Setting row each, parsed once into a frozen
dataclass (the field is the name without GATE_, lower-cased). The library's CUDA_TOGGLE_* settings stay
in base/config.py; both tables use base/settings.py."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from yarl import URL

from ..base.errors import ExitCode, ToolError
from ..base.settings import DAY_S, BadValue, Setting, describe, parse_settings, settings_help
from .paths import DEFAULT_PASSIVE_PATHS, OPTIONAL_PATHS, RouteTable, is_clean, is_private

WEEK_S = 7 * DAY_S


def _upstream(value: str) -> str:
    try:
        url = URL(value)
    except ValueError as error:
        raise BadValue(f"is not a URL ({error})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise BadValue("is not an http URL")
    if url.path not in ("", "/") or url.query_string or url.fragment:
        raise BadValue("has a path, query or fragment")
    return str(url.with_path("")).rstrip("/")


def _plain_paths(paths: tuple[str, ...]) -> tuple[str, ...]:
    for path in paths:
        if not is_clean(path):
            raise BadValue(f"has {path!r}, not a plain absolute path like /v1/models")
    return paths


def _extra_paths(paths: tuple[str, ...]) -> tuple[str, ...]:
    for path in _plain_paths(paths):
        if is_private(path):
            raise BadValue(
                f"names {path}, one of vLLM's administration or development endpoints, which the gate never"
                " forwards (inside the container vLLM serves it on its own address)",
                f"remove {path}",
            )
        if path not in OPTIONAL_PATHS:
            raise BadValue(
                f"names {path}, which is not one of the public routes the gate can add",
                f"remove {path}; the routes it can add: {', '.join(OPTIONAL_PATHS)}",
            )
    return paths


# A served name becomes part of a supervisord program name and of a directory name: letters, digits, . _ -
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODELS_FORMAT = "served-name:model:port:memory-share"
MODELS_EXAMPLE = "qwen3-8b-awq:Qwen/Qwen3-8B-AWQ:8001:0.45,tiny:Qwen/Qwen3-0.6B:8002:0.45"


@dataclass(frozen=True)
class ModelEntry:
    """One vLLM server of GATE_MODELS: its served name, the model it loads, its loopback port, and the
    share of each GPU's memory it takes (its --gpu-memory-utilization)."""

    name: str
    model: str
    port: int
    share: float
    default: bool = False

    @property
    def program(self) -> str:
        """The supervisord program that runs it: the default model keeps `vllm` (make suspend acts on it)."""
        return "vllm" if self.default else f"vllm-{self.name}"


def _model_entry(text: str, index: int) -> ModelEntry:
    parts = text.split(":")
    fix = f"write each entry as {MODELS_FORMAT}, like {MODELS_EXAMPLE}"
    if len(parts) < 4:
        raise BadValue(f"has {text!r}, which is not {MODELS_FORMAT}", fix)
    name, model, port_text, share_text = parts[0], ":".join(parts[1:-2]), parts[-2], parts[-1]
    if not MODEL_NAME.fullmatch(name):
        raise BadValue(
            f"has the served name {name!r}",
            "use letters, digits, '.', '_' and '-' only (at most 64), first a letter or digit",
        )
    if not model.strip():
        raise BadValue(f"has no model in {text!r}", fix)
    try:
        port = int(port_text)
    except ValueError:
        raise BadValue(f"has the port {port_text!r} in {text!r}", "give a port from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise BadValue(f"has the port {port} in {text!r}", "give a port from 1 to 65535")
    try:
        share = float(share_text)
    except ValueError:
        raise BadValue(f"has the memory share {share_text!r} in {text!r}", "give a number above 0, at most 1") from None
    if not 0 < share <= 1:  # NaN fails this too
        raise BadValue(f"has the memory share {share_text} in {text!r}", "give a number above 0, at most 1")
    return ModelEntry(name, model.strip(), port, share, default=index == 0)


def _models(entries: tuple[str, ...]) -> tuple[ModelEntry, ...]:
    models = tuple(_model_entry(text, index) for index, text in enumerate(entries))
    for attribute, what in (("name", "served name"), ("port", "port")):
        values = [getattr(model, attribute) for model in models]
        repeated = sorted({str(value) for value in values if values.count(value) > 1})
        if repeated:
            listed = ", ".join(repeated)
            raise BadValue(f"gives the {what} {listed} to several models", f"give each model its own {what}")
    return models


GATE_SETTINGS: dict[str, Setting] = {
    s.env: s
    for s in [
        Setting("GATE_HOST", "0.0.0.0", "address the gate listens on (the port the compose file publishes)"),
        Setting("GATE_PORT", "8000", "port the gate listens on", "int", 1, 65535),
        Setting(
            "GATE_UPSTREAM",
            "http://127.0.0.1:8001",
            "the vLLM server behind the gate (keep it on loopback), like http://127.0.0.1:8001",
            check=_upstream,
        ),
        Setting(
            "GATE_MODELS",
            "",
            "several models, one vLLM server each, sharing the GPUs: comma-separated "
            + MODELS_FORMAT
            + " entries, the first the default (requests without a model). Each server listens on the"
            " host of GATE_UPSTREAM at its own port; the gate starts them one after another, keeps"
            " resident those whose shares fit (sum at most 1) and swaps the others in on request"
            " (docs/gate.md, Several models). Unset: one server, at GATE_UPSTREAM",
            "list",
            check=_models,
        ),
        Setting(
            "GATE_START_TIMEOUT_S",
            "1800",
            "with GATE_MODELS: how long one server may take to load before the gate gives up on it and starts the next",
            "float",
            1,
            DAY_S,
            "seconds",
        ),
        Setting(
            "GATE_PASSIVE_PATHS",
            ",".join(DEFAULT_PASSIVE_PATHS),
            "comma-separated routes forwarded without waking a suspended server (vLLM answers them without"
            " the GPUs); every other route wakes it first. Set but empty: every route wakes it",
            "list",
            blank_is_default=False,
            check=_plain_paths,
        ),
        Setting(
            "GATE_EXTRA_PATHS",
            "",
            "comma-separated public routes of other model kinds to forward too: "
            + ", ".join(OPTIONAL_PATHS)
            + " (docs/gate.md, Public routes); vLLM's admin and dev endpoints are refused",
            "list",
            check=_extra_paths,
        ),
        Setting(
            "GATE_IDLE_SUSPEND_S",
            "0",
            "suspend after this long without a request in flight (0 = never)",
            "float",
            0,
            WEEK_S,
            "seconds",
        ),
        Setting(
            "GATE_IDLE_SLEEP_S",
            "0",
            "the first stage of idleness: after this long without a request in flight, vLLM's light sleep"
            " (level 1, no checkpoint: ~0.9 GiB per GPU stays, wakes in ~0.4 s); GATE_IDLE_SUSPEND_S, when"
            " longer, then suspends what remains (0 MiB). Needs sleep mode (0 = never)",
            "float",
            0,
            WEEK_S,
            "seconds",
        ),
        Setting(
            "GATE_SWAP_EARLY_WAKE",
            "1",
            "with GATE_MODELS: a swap wakes its target as soon as the servers in its way have slept, before"
            " their checkpoint ends, where the target's whole share fits beside what their sleep left"
            " (per-process GPU figures needed); a server in the way whose checkpoint then fails stays asleep."
            " 0: the target wakes only once their suspends ended",
            "bool",
        ),
        Setting(
            "GATE_HOLD_WAIT_S",
            "0",
            "while an operator holds a server (cuda-toggle-all hold), how long a request waits for the"
            " release before it gets 503 with Retry-After (0 = at once)",
            "float",
            0,
            DAY_S,
            "seconds",
        ),
        Setting(
            "GATE_HOLD_RETRY_AFTER_S",
            "30",
            "the Retry-After of the 503 a request gets while its server is held",
            "int",
            1,
            DAY_S,
            "seconds",
        ),
        Setting(
            "GATE_SERVER_PID",
            "",
            "PID of vLLM's API server (default: the library finds it itself)",
            "int",
            2,
            2**22,  # Linux's largest pid_max
        ),
        Setting(
            "GATE_BUSY_WAIT_S",
            "900",
            "how long a suspend or resume of the gate waits for one run by cuda-toggle-all to finish",
            "float",
            0,
            DAY_S,
            "seconds",
        ),
        Setting(
            "GATE_POLL_S",
            "0.5",
            "how often the gate re-reads the suspend record and the tool's lock",
            "float",
            0.05,
            3600,
            "seconds",
        ),
        Setting(
            "GATE_CONNECT_TIMEOUT_S",
            "10",
            "timeout for connecting to the upstream server",
            "float",
            0.1,
            DAY_S,
            "seconds",
        ),
        Setting(
            "GATE_MAX_REQUEST_MIB",
            "100",
            "largest request body accepted (images travel inside it); larger: 413",
            "int",
            1,
            4096,
            "MiB",
        ),
        Setting(
            "GATE_MAX_BODIES_MIB",
            "1024",
            "request bodies held in memory at once, all requests together (they wait there during a"
            " resume); a request that would go over it: 503",
            "int",
            1,
            2**20,
            "MiB",
        ),
        Setting(
            "GATE_MAX_CONNECTIONS",
            "1000",
            "client connections open at once; at the limit an idle one is closed to make room, and when"
            " none is idle the new one gets a 503. Each takes two open files (client and vLLM): the gate"
            " refuses to start when the open-file limit is too low for it",
            "int",
            1,
            1_000_000,
        ),
        Setting(
            "GATE_KEEPALIVE_S",
            "75",
            "an idle client connection (no request in progress) is closed after this long",
            "float",
            1,
            3600,
            "seconds",
        ),
        Setting(
            "GATE_HEADER_TIMEOUT_S",
            "10",
            "a request head must arrive whole within this long of its first byte; else the connection is closed",
            "float",
            0.1,
            3600,
            "seconds",
        ),
        Setting(
            "GATE_BODY_TIMEOUT_S",
            "60",
            "a request body must arrive whole within this long of its head; else 408 and the connection is closed"
            " (raise it for large uploads over slow links)",
            "float",
            0.1,
            DAY_S,
            "seconds",
        ),
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
    max_bodies_mib: int
    max_connections: int
    keepalive_s: float
    models: tuple[ModelEntry, ...] = ()  # empty: one server, at `upstream`
    start_timeout_s: float = 1800.0
    idle_sleep_s: float = 0.0  # 0: no light sleep
    hold_wait_s: float = 0.0
    hold_retry_after_s: int = 30
    swap_early_wake: bool = True
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, value in force, where it came from) for every GATE_* setting."""
        return describe(GATE_SETTINGS.values(), self.sources)

    def model_upstream(self, model: ModelEntry) -> str:
        """Where a model's server listens: GATE_UPSTREAM's scheme and host, the model's port."""
        return str(URL(self.upstream).with_port(model.port)).rstrip("/")

    @property
    def routes(self) -> RouteTable:
        return RouteTable(self.extra_paths, self.passive_paths)


def load_gate_config(environ: Mapping[str, str]) -> GateConfig:
    """Parse GATE_* variables of `environ` into a GateConfig; a bad value raises ToolError(USAGE)."""
    values, sources = parse_settings(GATE_SETTINGS.values(), environ)
    config = GateConfig(**values, sources=sources)
    models_text = environ.get("GATE_MODELS", "")
    if not config.models and models_text.strip():  # "," or blanks: a list of nothing is no choice of one server
        raise ToolError(
            f"GATE_MODELS={models_text!r} lists no model: give {MODELS_FORMAT} entries, or unset it for the one "
            "server at GATE_UPSTREAM",
            ExitCode.USAGE,
        )
    if config.models and config.server_pid is not None:
        raise ToolError(
            "GATE_SERVER_PID names one server, but GATE_MODELS runs several (the gate finds each by its port):"
            " unset GATE_SERVER_PID",
            ExitCode.USAGE,
        )
    if any(model.port == config.port for model in config.models):
        raise ToolError(
            f"GATE_MODELS gives a model the gate's own port {config.port} (GATE_PORT): give it another port",
            ExitCode.USAGE,
        )
    forwarded = config.routes
    for path in config.passive_paths:
        if forwarded.find(path) is None:
            setting = GATE_SETTINGS["GATE_PASSIVE_PATHS"]
            text = sources.get(setting.env, setting.default)
            raise ToolError(
                f"{setting.env}={text!r} names {path}, which the gate does not forward: remove it"
                + (" or add it to GATE_EXTRA_PATHS" if path in OPTIONAL_PATHS else ""),
                ExitCode.USAGE,
            )
    return config


def gate_settings_help() -> str:
    """The GATE_* variables for --help."""
    return settings_help(GATE_SETTINGS.values())
