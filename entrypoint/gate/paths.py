"""Which requests the gate forwards to vLLM: an allow-list of (route, method) pairs, and nothing else.

The rule (docs/gate.md, "Public routes"): a request is forwarded only when its path and method are
those of a route of vLLM's public inference API (vLLM 0.20.2: the OpenAI-compatible routers under
vllm/entrypoints/openai/ and the operational ones under vllm/entrypoints/serve/instrumentator/ and
tokenize). Everything else gets its answer from the gate itself and never reaches vLLM:
- vLLM's administration and development endpoints (LoRA loading, sleep mode, pause, weight transfer,
  collective_rpc, profiling, cache resets, ...): they load server-side files, freeze, wake or reconfigure
  the engine behind the gate's back. No setting opens them; the gate refuses to start when
  GATE_EXTRA_PATHS names one. They stay reachable inside the container on vLLM's loopback address.
- a path vLLM does not serve (404), a method its route does not take (405), a body its route cannot
  parse (400): answered before a suspended server is woken, so junk never costs a resume.
- the Realtime API's WebSocket (/v1/realtime): 501 without waking (the gate forwards HTTP only).
GATE_EXTRA_PATHS opens a few more public routes that serve other model kinds (pooling, scoring,
reranking); they are off by default because a chat model does not serve them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Body(str, Enum):
    NONE = "none"  # a GET: whatever body comes along is not looked at
    JSON = "json"  # a JSON object: anything else is a 400 before the server is woken
    FORM = "form"  # multipart/form-data (audio uploads)


@dataclass(frozen=True)
class Route:
    path: str  # exact, or with {name} for one path segment (an id)
    methods: tuple[str, ...]
    body: Body
    passive: bool = False  # vLLM answers it without the GPUs: forwarded as is, suspended or not

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(self.path)) + "$")


def _get(path: str, passive: bool = False) -> Route:
    return Route(path, ("GET",), Body.NONE, passive)


def _post(path: str, body: Body = Body.JSON) -> Route:
    return Route(path, ("POST",), body)


# Forwarded by default: what a chat or embedding model serves (vLLM 0.20.2).
PUBLIC_ROUTES = (
    _get("/health", passive=True),
    _get("/metrics", passive=True),
    _get("/version"),
    _get("/v1/models", passive=True),
    _get("/load"),
    Route("/ping", ("GET", "POST"), Body.NONE),
    _post("/tokenize"),
    _post("/detokenize"),
    _post("/v1/chat/completions"),
    _post("/v1/completions"),
    _post("/v1/embeddings"),
    _post("/v1/responses"),
    _get("/v1/responses/{response_id}"),
    Route("/v1/responses/{response_id}/cancel", ("POST",), Body.NONE),
    _post("/v1/audio/transcriptions", Body.FORM),
    _post("/v1/audio/translations", Body.FORM),
)
# Public routes of other model kinds, forwarded when GATE_EXTRA_PATHS names them.
OPTIONAL_ROUTES = (
    _post("/pooling"),
    _post("/classify"),
    _post("/v1/classify"),
    _post("/score"),
    _post("/v1/score"),
    _post("/rerank"),
    _post("/v1/rerank"),
    _post("/v2/rerank"),
    _post("/invocations"),
)
OPTIONAL_PATHS = tuple(route.path for route in OPTIONAL_ROUTES)
DEFAULT_PASSIVE_PATHS = tuple(route.path for route in PUBLIC_ROUTES if route.passive)
# The Realtime API (a WebSocket): the gate forwards HTTP only, and answers 501 without waking the server.
REALTIME_PATH = "/v1/realtime"

# vLLM's administration and development endpoints (vLLM 0.20.2: vllm/entrypoints/serve/ — lora, sleep,
# rlhf, rpc, cache, profile, elastic_ep, server_info — and names of earlier versions). Never forwarded;
# listed so that GATE_EXTRA_PATHS naming one gets an error saying so. Any other unknown path is refused too.
PRIVATE_PATHS = (
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/adapters",
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/pause",
    "/resume",
    "/is_paused",
    "/abort_requests",
    "/collective_rpc",
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/reset_encoder_cache",
    "/server_info",
    "/start_profile",
    "/stop_profile",
    "/init_weight_transfer_engine",
    "/init_weights_update_group",
    "/start_weight_update",
    "/update_weights",
    "/finish_weight_update",
    "/update_weight_version",
    "/weight_info",
    "/weight_checker",
    "/get_world_size",
    "/scale_elastic_ep",
    "/is_scaling_elastic_ep",
)


class PathClass(str, Enum):
    WAKING = "waking"  # forwarded; needs the GPUs, so it wakes a suspended server first
    PASSIVE = "passive"  # forwarded as it is, suspended or not
    BLOCKED = "blocked"  # answered by the gate (404, 405, 501), never forwarded


@dataclass(frozen=True)
class Verdict:
    """What the gate does with one request line: forward it (route set) or answer `status` itself."""

    path_class: PathClass
    route: Route | None = None
    status: int = 0  # for BLOCKED: 404 unknown path, 405 wrong method, 501 WebSocket
    allowed_methods: tuple[str, ...] = ()  # for 405: the Allow header


def is_clean(path: str) -> bool:
    """True for a plain absolute path: no empty, `.` or `..` segment (checked after %-decoding).

    `/v1/../sleep` or `/v1/%2e%2e/sleep` must not slip past the route check into a server that
    normalises paths; vLLM serves nothing that needs such a path.
    """
    if not path.startswith("/") or "\\" in path or "\x00" in path:
        return False
    segments = path[1:].split("/")
    return all(segment not in ("", ".", "..") for segment in segments)


def is_private(path: str) -> bool:
    return path in PRIVATE_PATHS


class RouteTable:
    """The routes forwarded with the settings in force: the public ones and the opted-in optional ones."""

    def __init__(self, extra_paths: tuple[str, ...] = (), passive_paths: tuple[str, ...] = DEFAULT_PASSIVE_PATHS):
        self.routes = PUBLIC_ROUTES + tuple(route for route in OPTIONAL_ROUTES if route.path in extra_paths)
        self.passive_paths = passive_paths
        self._patterns = [(route, route.pattern) for route in self.routes]

    def find(self, path: str) -> Route | None:
        if not is_clean(path) or is_private(path):
            return None
        return next((route for route, pattern in self._patterns if pattern.match(path)), None)

    def classify(self, method: str, path: str) -> Verdict:
        """`path` is the %-decoded request path (aiohttp's request.path)."""
        if path == REALTIME_PATH:
            return Verdict(PathClass.BLOCKED, status=501)
        route = self.find(path)
        if route is None:
            return Verdict(PathClass.BLOCKED, status=404)
        # Starlette answers HEAD on every GET route; CORS preflights are answered by vLLM's middleware.
        methods = route.methods + (("HEAD",) if "GET" in route.methods else ()) + ("OPTIONS",)
        if method not in methods:
            return Verdict(PathClass.BLOCKED, route, 405, methods)
        passive = route.path in self.passive_paths or method == "OPTIONS"
        return Verdict(PathClass.PASSIVE if passive else PathClass.WAKING, route)
