"""Which request paths the gate forwards to vLLM, which of those may not wake it, and which it refuses.

An allow-list, not a deny-list: vLLM keeps adding development endpoints (VLLM_SERVER_DEV_MODE=1 exposes
/sleep, /wake_up, /collective_rpc and more, which the fast suspend needs), and any one of them reachable
from outside could freeze, wake or reconfigure the engine behind the gate's back.
"""

from __future__ import annotations

from enum import Enum

API_PREFIX = "/v1/"  # the OpenAI-compatible API: every method, every path below it
OPERATIONAL_PATHS = ("/health", "/metrics", "/version", "/tokenize", "/detokenize", "/ping", "/load")
DEFAULT_PASSIVE_PATHS = ("/health", "/metrics", "/v1/models")  # vLLM answers these without the GPUs

# vLLM's development and administration endpoints: never forwarded, whatever the settings say.
DEV_ONLY_PATHS = (
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/collective_rpc",
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/server_info",
    "/start_profile",
    "/stop_profile",
    "/pause",
    "/resume",
    "/is_paused",
    "/update_weights",
    "/init_weights_update_group",
    "/scale_elastic_ep",
    "/is_scaling_elastic_ep",
)


class PathClass(str, Enum):
    WAKING = "waking"  # forwarded; needs the GPUs, so it wakes a suspended server first
    PASSIVE = "passive"  # forwarded as it is, suspended or not
    BLOCKED = "blocked"  # answered 404 by the gate, never forwarded


def is_clean(path: str) -> bool:
    """True for a plain absolute path: no empty, `.` or `..` segment (checked after %-decoding).

    `/v1/../sleep` or `/v1/%2e%2e/sleep` must not slip past the prefix check into a server that
    normalises paths; vLLM serves nothing that needs such a path.
    """
    if not path.startswith("/") or "\\" in path or "\x00" in path:
        return False
    segments = path[1:].split("/")
    return all(segment not in ("", ".", "..") for segment in segments)


def is_dev_only(path: str) -> bool:
    return path in DEV_ONLY_PATHS


def is_forwardable(path: str, extra_paths: tuple[str, ...] = ()) -> bool:
    """The OpenAI API, the operational paths, and what GATE_EXTRA_PATHS adds; never a dev endpoint."""
    if not is_clean(path) or is_dev_only(path):
        return False
    return path.startswith(API_PREFIX) or path in OPERATIONAL_PATHS or path in extra_paths


def classify(path: str, passive_paths: tuple[str, ...], extra_paths: tuple[str, ...] = ()) -> PathClass:
    """`path` is the %-decoded request path (aiohttp's request.path)."""
    if not is_forwardable(path, extra_paths):
        return PathClass.BLOCKED
    return PathClass.PASSIVE if path in passive_paths else PathClass.WAKING
