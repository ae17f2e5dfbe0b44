"""Forwarding one request to vLLM with aiohttp's client, and its answer back, chunk by chunk.

Streams (SSE) are written on as each chunk arrives. A client that goes away cancels its handler
(the server runs with handler_cancellation), which closes the upstream connection: vLLM sees the
disconnect and aborts the request instead of generating for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from loguru import logger
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import GateConfig
from .control import Admission, Held, PowerController, ResumeFailed, TransitionOutcome
from .fleet import Fleet, requested_model
from .limits import BodyBudget, BodyRefused, ClientLeft
from .metrics import GateMetrics
from .paths import Body, PathClass, Verdict

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade",
    )
)  # fmt: skip
# Set anew by aiohttp's client for the upstream connection (Host) or the body it sends.
REQUEST_HEADERS_REMADE = frozenset({"host", "content-length", "expect"})
# Set by the gate alone: what a client sends under these names is dropped, never passed on (vLLM would
# log a client address the client chose).
FORWARDING_HEADERS = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"})
# What the gate answers itself: (status, message, OpenAI error type). Generic on purpose: the details
# (upstream address, PIDs, settings) go to the gate's log only.
NOT_FOUND = (404, "Not Found", "NotFoundError")
METHOD_NOT_ALLOWED = (405, "Method Not Allowed", "MethodNotAllowedError")
NO_WEBSOCKET = (501, "the Realtime API (WebSocket) is not served through this endpoint", "NotImplementedError")
NOT_JSON = (400, "the request body is not a JSON object", "BadRequestError")
NOT_FORM = (400, "the request body is not multipart/form-data", "BadRequestError")
UNAVAILABLE = (503, "the model is not available right now; try again later", "ServiceUnavailableError")
HELD = (503, "the model is held suspended by the operator; try again later", "ServiceUnavailableError")
BAD_GATEWAY = (502, "the model server did not answer", "BadGatewayError")
# Nothing listens where vLLM should: it is loading, or supervisord is restarting it (it died, say while
# suspended). A clear 503 with Retry-After tells a client to come back, where a 502 reads as a broken proxy.
NOT_LISTENING = (503, "the model server is starting or restarting; try again later", "ServiceUnavailableError")
NOT_LISTENING_RETRY_AFTER_S = 5
# Without these, aiohttp's client would add its own Accept-Encoding (and with auto_decompress off,
# a client that never asked for gzip would get gzip), User-Agent and Accept.
NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
MODELS_PATH = "/v1/models"
# A value from the client (a path, a model name) is shown in a body or the log up to this many characters: a
# 10 MB name echoed whole would cost the gate more than the client that sent it.
SHOWN_CHARACTERS = 100
BODY_REFUSAL_TYPES = {408: "RequestTimeoutError", 413: "BadRequestError", 503: "ServiceUnavailableError"}
RequestSlot = Callable[[str], contextlib.AbstractAsyncContextManager[Admission]]


def shown(value: str) -> str:
    """A client's value for a message: cut to SHOWN_CHARACTERS, with a marker saying how much was left out."""
    if len(value) <= SHOWN_CHARACTERS:
        return value
    return f"{value[:SHOWN_CHARACTERS]}...[{len(value) - SHOWN_CHARACTERS} more characters]"


def nothing_listens(error: BaseException) -> bool:
    """The upstream's port refused the connection: no process listens there (as opposed to one that answered
    badly or too late)."""
    if isinstance(error, aiohttp.ClientConnectorError):
        error = error.os_error
    return isinstance(error, ConnectionRefusedError)


class ClientGone(Exception):
    """Writing to the client failed: it closed its connection."""


async def to_client(write: Awaitable[object]) -> None:
    """Await a write to the client; its failure is told apart from the upstream's."""
    try:
        await write
    except ConnectionResetError as error:  # aiohttp's ClientConnectionResetError is one too
        raise ClientGone() from error


def json_error(status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error in the OpenAI shape that vLLM uses, so clients show the message."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    return web.json_response(body, status=status, headers=headers)


async def cut_off(sending: asyncio.Future[aiohttp.ClientResponse]) -> None:
    """Cancel an upstream request, and close its connection when the answer's head had come already: the
    closed connection is what tells vLLM to abort the request."""
    sending.cancel()
    with contextlib.suppress(BaseException):
        response = await sending
        response.close()


async def answer_and_close(request: web.Request, response: web.Response) -> None:
    """Send `response`, then close the connection: aiohttp would otherwise wait for the rest of a body that is
    late already (for up to its lingering time) before it closed it."""
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write_eof()
    if request.transport is not None:
        request.transport.close()


def is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def is_form(request: web.Request) -> bool:
    return request.content_type == "multipart/form-data"


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    """Headers named in Connection are hop-by-hop too."""
    return {token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")}


def forwarded_request_headers(request: web.Request) -> CIMultiDict[str]:
    dropped = HOP_BY_HOP | REQUEST_HEADERS_REMADE | FORWARDING_HEADERS | _connection_tokens(request.headers)
    headers = CIMultiDict((name, value) for name, value in request.headers.items() if name.lower() not in dropped)
    # The gate is the first proxy: the peer it sees is the client, over the gate's own scheme.
    headers["X-Forwarded-For"] = request.remote or ""
    headers["X-Forwarded-Proto"] = request.scheme
    if request.host:
        headers["X-Forwarded-Host"] = request.host
    return headers


def returned_response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    dropped = HOP_BY_HOP | _connection_tokens(upstream.headers)
    return CIMultiDict((name, value) for name, value in upstream.headers.items() if name.lower() not in dropped)


class Forwarder:
    def __init__(self, gate: GateConfig, controller: PowerController, metrics: GateMetrics, fleet: Fleet | None = None):
        self.gate = gate
        self.controller = controller
        self.fleet = fleet  # with GATE_MODELS: routes each request to its model's server
        self.metrics = metrics
        self.upstream = URL(gate.upstream)
        self.routes = gate.routes
        self.bodies = BodyBudget(gate.max_request_mib, gate.max_bodies_mib, gate.body_timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.handlers: set[asyncio.Task] = set()  # requests being handled, for a bounded shutdown

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(
            # One upstream connection per client connection at most (the open-file limit counts on it).
            connector=aiohttp.TCPConnector(limit=self.gate.max_connections),
            cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies must never reach another
            auto_decompress=False,  # bodies pass through as they are, Content-Encoding and all
            skip_auto_headers=NO_AUTO_HEADERS,
            # No overall or read timeout: a long generation may stay silent for minutes.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.gate.connect_timeout_s),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def drain(self, grace_s: float) -> None:
        """Let the requests in flight finish for up to grace_s, then cut them off (which aborts them upstream).

        aiohttp's own graceful shutdown may wait for a long stream to its end; the supervisor would kill
        the gate before that anyway.
        """
        if not self.handlers:
            return
        logger.info("letting {} request(s) finish for up to {:g} s", len(self.handlers), grace_s)
        _, unfinished = await asyncio.wait(set(self.handlers), timeout=grace_s)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if unfinished:
            logger.warning("cut off {} request(s) still in flight", len(unfinished))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self.handlers.add(task)
        try:
            return await self.handle_tracked(request)
        finally:
            self.handlers.discard(task)

    async def handle_tracked(self, request: web.Request) -> web.StreamResponse:
        verdict = self.routes.classify(request.method, request.path)
        self.metrics.count_request(verdict.path_class)
        label = f"{shown(request.method)} {shown(request.path)}"  # for the log
        if verdict.path_class is PathClass.BLOCKED:
            return self.refuse(label, verdict)
        assert verdict.route is not None
        try:
            async with self.bodies.read(request) as body:
                # Junk never wakes the server: a body its route cannot parse is answered here.
                if verdict.route.body is Body.JSON and request.method == "POST" and not is_json_object(body):
                    logger.info("{}: 400, the body is not a JSON object", label)
                    return json_error(*NOT_JSON)
                if verdict.route.body is Body.FORM and request.method == "POST" and not is_form(request):
                    logger.info("{}: 400, the body is not multipart/form-data", label)
                    return json_error(*NOT_FORM)
                upstream, slot = self.upstream, self.controller.request_slot
                if self.fleet is not None:
                    if request.method == "GET" and request.path == MODELS_PATH:
                        return web.json_response(await self.fleet.list_models())
                    model = requested_model(body) if verdict.route.body is Body.JSON else None
                    server = self.fleet.route(model)
                    if server is None:
                        logger.info("{}: 404, no model {!r}", label, shown(str(model)))
                        return json_error(404, f"The model `{shown(str(model))}` does not exist.", "NotFoundError")
                    upstream = URL(server.upstream)
                    slot = functools.partial(self.fleet.request_slot, server)
                if verdict.path_class is PathClass.PASSIVE:
                    return await self.forward(request, body, upstream)
                return await self.forward_awake(request, body, upstream, slot, label)
        except ClientLeft:  # quietly: a flood of clients that never send their bodies must not flood the log
            logger.debug("{}: the client went away before its body arrived", label)
            return json_error(400, "the request body did not arrive", "BadRequestError")  # for nobody
        except BodyRefused as refused:
            self.metrics.count_error("body_refused")
            logger.warning("{}: {}, {}", label, refused.status, refused.log)
            response = json_error(refused.status, refused.message, BODY_REFUSAL_TYPES[refused.status])
            if refused.status == 408:
                await answer_and_close(request, response)
            return response

    def refuse(self, label: str, verdict: Verdict) -> web.Response:
        if verdict.status == 405:
            logger.info("{}: 405, not a method of this route", label)
            return json_error(*METHOD_NOT_ALLOWED, headers={"Allow": ", ".join(verdict.allowed_methods)})
        if verdict.status == 501:
            logger.info("{}: 501, the gate forwards no WebSocket", label)
            return json_error(*NO_WEBSOCKET)
        logger.info("{}: 404, not a public route", label)
        return json_error(*NOT_FOUND)

    async def forward_awake(
        self, request: web.Request, body: bytes, upstream: URL, slot: RequestSlot, label: str
    ) -> web.StreamResponse:
        """Forward once the server runs: wake it first when it is suspended (swap it in, with GATE_MODELS)."""
        try:
            async with slot(label) as admission:
                return await self.forward(request, body, upstream, beside=admission.wake)
        except Held as held:
            self.metrics.count_error("held")
            return json_error(*HELD, headers={"Retry-After": str(int(held.retry_after_s))})
        except ResumeFailed as failure:
            self.metrics.count_error("resume_failed")
            logger.warning("{}: 503, the resume failed: {}", label, failure.message)
            return json_error(*UNAVAILABLE)

    @staticmethod
    async def unless_the_wake_failed(
        wake: asyncio.Task[TransitionOutcome], sending: asyncio.Future[aiohttp.ClientResponse]
    ) -> None:
        """Wait for the wake-up a request was sent beside; when it failed (or the client left meanwhile), take
        the request back from vLLM, which still queues it: a request left there would run at some later
        wake-up for nobody, or hang its client."""
        try:
            outcome = await asyncio.shield(wake)  # a client that goes away must not cancel the wake-up
        except BaseException:
            await cut_off(sending)
            raise
        if not outcome.ok:
            await cut_off(sending)
            raise ResumeFailed(outcome.message)

    @staticmethod
    def upstream_url(request: web.Request, upstream: URL) -> URL:
        # The raw (still %-encoded) path: vLLM decodes it exactly as the gate did when it classified it.
        target = request.rel_url.raw_path
        if request.rel_url.raw_query_string:
            target += "?" + request.rel_url.raw_query_string
        return URL(str(upstream) + target, encoded=True)

    async def forward(
        self,
        request: web.Request,
        body: bytes,
        upstream_base: URL,
        beside: asyncio.Task[TransitionOutcome] | None = None,
    ) -> web.StreamResponse:
        """Send the request upstream and pass the answer on. With `beside` (the wake-up from the light sleep it
        was sent beside), nothing is passed on before that wake-up ended well; when it failed, the upstream
        request is cut off (vLLM then aborts it) and ResumeFailed is raised."""
        assert self.session is not None, "Forwarder.open() was not awaited"
        sending = asyncio.ensure_future(
            self.session.request(
                request.method,
                self.upstream_url(request, upstream_base),
                headers=forwarded_request_headers(request),
                data=body if body else None,
                allow_redirects=False,
            )
        )
        if beside is not None:
            await self.unless_the_wake_failed(beside, sending)
        try:
            upstream = await sending
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
            self.metrics.count_error("upstream_unreachable")
            if nothing_listens(error):
                logger.warning(
                    "{} {}: 503, nothing listens at {} (vLLM loading or restarting): {!r}",
                    request.method,
                    shown(request.path),
                    upstream_base,
                    error,
                )
                return json_error(*NOT_LISTENING, headers={"Retry-After": str(NOT_LISTENING_RETRY_AFTER_S)})
            logger.warning(
                "{} {}: 502, {} did not answer: {!r}", request.method, shown(request.path), upstream_base, error
            )
            return json_error(*BAD_GATEWAY)
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=returned_response_headers(upstream)
        )
        finished = False
        try:
            await to_client(response.prepare(request))
            async for chunk in upstream.content.iter_any():
                await to_client(response.write(chunk))
            await to_client(response.write_eof())
            finished = True
        except ClientGone:
            logger.debug("{} {}: the client went away; upstream request aborted", request.method, shown(request.path))
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionError) as error:
            # The answer broke off after its headers went out: cut the client off too, so it sees a
            # broken answer rather than a short one that looks complete.
            logger.warning("{} {}: upstream answer broke off: {!r}", request.method, shown(request.path), error)
            if request.transport is not None:
                request.transport.close()
        finally:
            if finished:
                upstream.release()  # the connection goes back to the pool
            else:
                upstream.close()  # closing the connection is what tells vLLM to abort
        return response
