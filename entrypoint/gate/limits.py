"""The gate's resource limits: client connections (GATE_MAX_CONNECTIONS), request bodies in memory
(GATE_MAX_REQUEST_MIB each, GATE_MAX_BODIES_MIB together) and the open files they need.

A flood of idle connections must not lock other clients out (the gate's open files run out and every
accept fails), and bodies held while a suspended server is woken must not grow without bound (the host
RAM also holds the suspended GPU state). Idle keep-alive connections are closed by aiohttp after
GATE_KEEPALIVE_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from loguru import logger

from ..base.errors import ExitCode, ToolError

MIB = 2**20
# Open files the gate needs besides its connections: Python, the listening socket, logs, the lock probe,
# refusals in progress.
FILES_BESIDES_CONNECTIONS = 64
# A refused connection gets its 503 once its request head arrived, or after this long without one.
REFUSAL_WAIT_S = 1.0
MAX_REFUSING = 32  # beyond this many refusals in progress, a refused connection is closed without a word
ACCEPT_RETRY_S = 0.1
READ_CHUNK = 2**16
SERVER_NAME = "vllm-gate"  # the Server header of every answer the gate gives itself


def ensure_open_file_limit(max_connections: int) -> int:
    """Raise the soft open-file limit to what max_connections needs (two files each: client and vLLM).

    Returns the limit in force; ToolError(USAGE) when even the hard limit is too low.
    """
    needed = 2 * max_connections + FILES_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise ToolError(
            f"GATE_MAX_CONNECTIONS={max_connections} needs {needed} open files, but the limit is {soft}:"
            f" lower GATE_MAX_CONNECTIONS to at most {max(1, (soft - FILES_BESIDES_CONNECTIONS) // 2)}, or raise"
            " the limit (`ulimits: nofile` in docker-compose.yml, `ulimit -n`)",
            ExitCode.USAGE,
        )
    return soft


def refusal_bytes(status: int, reason: str, message: str, error_type: str) -> bytes:
    """A whole HTTP/1.1 response with a JSON error, for a connection the gate will not serve."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": status}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nServer: {SERVER_NAME}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
    )
    return head.encode() + body


TOO_MANY_CONNECTIONS = refusal_bytes(
    503, "Service Unavailable", "the server has too many connections; try again", "ServiceUnavailableError"
)


class _Refusal(asyncio.Protocol):
    """Answers 503 to a connection over the limit, once its request head arrived (so the client reads
    the answer instead of a reset), then closes it; never reads further."""

    def __init__(self, limiter: ConnectionLimiter):
        self.limiter = limiter
        limiter.refusing += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_WAIT_S, self.answer)
        self.tail = b""

    def data_received(self, data: bytes) -> None:
        seen = self.tail + data
        self.tail = seen[-3:]  # a head's end split across two reads is still found
        if b"\r\n\r\n" in seen or len(data) > 8192:
            self.answer()

    def answer(self) -> None:
        self.timer.cancel()
        if not self.transport.is_closing():
            self.transport.write(TOO_MANY_CONNECTIONS)  # type: ignore[attr-defined]
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.timer.cancel()
        self.limiter.refusing -= 1


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted by the limiter while the connection is open.

    It keeps the connection's deadlines itself (aiohttp before 3.14 starts its keep-alive timer only after
    a first request, so a connection that never sends one would stay open): without a request, the
    connection is closed after GATE_KEEPALIVE_S, and once a request head has begun, after
    GATE_HEADER_TIMEOUT_S unless the head is whole by then (its request is being handled).
    """

    def __init__(self, inner: asyncio.Protocol, limiter: ConnectionLimiter):
        self.inner, self.limiter = inner, limiter
        self.transport: asyncio.BaseTransport | None = None
        self.request: web.BaseRequest | None = None  # the request being handled
        self.head_begun = False
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.limiter.opened(self)
        self.idle()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.request is None and not self.head_begun:
            self.head_begun = True
            self.limiter.waits_again(self)
            self.close_after(self.limiter.header_timeout_s)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.limiter.forget(self)
        self.inner.connection_lost(exc)

    def handling(self, request: web.BaseRequest) -> None:
        """Its request's head arrived whole: the handler runs (the body's deadline is the reader's)."""
        self.request = request
        if self.deadline is not None:
            self.deadline.cancel()
        self.limiter.waits_again(self)

    def idle(self) -> None:
        """No request on it: waiting for the client's next one."""
        self.request, self.head_begun = None, False
        self.limiter.waits_again(self)
        self.close_after(self.limiter.keepalive_s)

    def served(self) -> bool:
        """Its request is being served: the whole request arrived (it is forwarded, or waits for a resume)."""
        return self.request is not None and self.request.content.is_eof()

    def close_after(self, seconds: float) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = asyncio.get_running_loop().call_later(seconds, self.close)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ConnectionLimiter:
    """Accepts the gate's connections one at a time and keeps at most `limit` of them open.

    At the limit, a new connection closes the one that has waited longest for its client: idle between
    requests, or a request head or body that has not arrived (HTTP lets a server close those at any time).
    A connection whose whole request arrived is being served and is never closed to make room; when every
    connection is, the new one gets a 503 at once. So clients that open connections and send nothing, or
    promise bodies they never send, cannot lock others out: each new client pushes out the staler of them.
    Accepting one at a time (not asyncio's batches of up to `backlog`) keeps the open files within the
    limit however many clients wait in the kernel's queue.
    """

    def __init__(self, limit: int, keepalive_s: float = 75.0, header_timeout_s: float = 10.0):
        self.limit = limit
        self.keepalive_s, self.header_timeout_s = keepalive_s, header_timeout_s
        self.factory: Callable[[], asyncio.Protocol] | None = None  # aiohttp's (runner.server), set before serve()
        self.connections: dict[_Counted, None] = {}
        # The connections that wait for their client (not served), in the order they began waiting. One that
        # is being served stays here until the next eviction finds it (then leaves until its request ends).
        self.waiting: OrderedDict[_Counted, None] = OrderedDict()
        self.by_transport: dict[asyncio.BaseTransport, _Counted] = {}
        self.refusing = 0  # refused connections still open (each waits up to REFUSAL_WAIT_S)
        self.refused = 0
        self.evicted = 0
        self.accept_failures = 0

    def protocol(self) -> asyncio.Protocol | None:
        """The protocol for a newly accepted connection: aiohttp's, a 503, or None (close it at once)."""
        assert self.factory is not None, "set the factory before accepting"
        if len(self.connections) >= self.limit and not self.evict_one():
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:
                logger.warning("{} connection(s) refused: all {} connections are busy", self.refused, self.limit)
            if self.refusing >= MAX_REFUSING:
                return None
            return _Refusal(self)
        counted = _Counted(self.factory(), self)
        self.connections[counted] = None
        return counted

    async def serve(self, listener: socket.socket) -> None:
        """Accept connections on `listener` until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(listener)
            except OSError as error:
                # Out of files or memory (other processes, or a limit lowered after the start): wait, retry.
                self.accept_failures += 1
                if self.accept_failures == 1 or self.accept_failures % 100 == 0:
                    logger.warning("accepting a connection failed ({}); retrying", error.strerror or error)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            protocol = self.protocol()
            if protocol is None:
                connection.close()
                continue
            try:
                await loop.connect_accepted_socket(lambda protocol=protocol: protocol, connection)
            except OSError:
                connection.close()

    def evict_one(self) -> bool:
        while self.waiting:
            connection, _ = self.waiting.popitem(last=False)
            if connection.served():
                continue  # back in `waiting` when its request ends
            self.forget(connection)
            connection.close()
            self.evicted += 1
            if self.evicted == 1 or self.evicted % 100 == 0:
                logger.info(
                    "closed {} idle connection(s) to make room for new ones (between requests, or waiting"
                    " for a request's head or body)",
                    self.evicted,
                )
            return True
        return False

    def opened(self, connection: _Counted) -> None:
        if connection.transport is not None:
            self.by_transport[connection.transport] = connection

    def waits_again(self, connection: _Counted) -> None:
        if connection in self.connections:
            self.waiting[connection] = None
            self.waiting.move_to_end(connection)

    def forget(self, connection: _Counted) -> None:
        self.connections.pop(connection, None)
        self.waiting.pop(connection, None)
        if connection.transport is not None:
            self.by_transport.pop(connection.transport, None)

    @web.middleware
    async def track_busy(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Middleware: a connection's request is being handled; the connection waits for the next one after."""
        connection = self.by_transport.get(request.transport) if request.transport is not None else None
        if connection is None:
            return await handler(request)
        connection.handling(request)
        try:
            return await handler(request)
        finally:
            if connection in self.connections:
                connection.idle()


class ClientLeft(Exception):
    """The client closed its connection before its request body arrived whole."""


class BodyRefused(Exception):
    def __init__(self, status: int, message: str, log: str):
        super().__init__(message)
        self.status, self.message, self.log = status, message, log


class BodyBudget:
    """Request bodies in memory: each at most per_request bytes, all together at most total bytes, each
    arrived whole within timeout_s of its head.

    A body is charged for the bytes received, not for those its Content-Length promises: promises cost a
    client nothing, so charging them would let a few connections that never send their bodies refuse
    every other client's.
    """

    def __init__(self, per_request_mib: int, total_mib: int, timeout_s: float = 60.0):
        self.per_request, self.total = per_request_mib * MIB, total_mib * MIB
        self.timeout_s = timeout_s
        self.held = 0

    def _charge(self, size: int) -> None:
        if self.held + size > self.total:
            raise BodyRefused(
                503,
                "the server is busy; try again",
                f"{self.held // MIB} MiB of request bodies held, one more would pass GATE_MAX_BODIES_MIB",
            )
        self.held += size

    async def _receive(self, request: web.Request, charged: list[int]) -> bytes:
        """The body, charged to charged[0] as it arrives (the caller gives the charge back)."""
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(READ_CHUNK):
            size += len(chunk)
            if size > self.per_request:
                raise BodyRefused(413, "the request body is too large", "a body over GATE_MAX_REQUEST_MIB (chunked)")
            self._charge(len(chunk))
            charged[0] += len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    @contextlib.asynccontextmanager
    async def read(self, request: web.Request) -> AsyncIterator[bytes]:
        """The whole body, held (and counted) until the block ends; BodyRefused (408, 413, 503) past a limit."""
        declared = request.content_length
        if declared is not None and declared > self.per_request:
            raise BodyRefused(413, "the request body is too large", f"a body over GATE_MAX_REQUEST_MIB ({declared})")
        charged = [0]
        try:
            try:
                body = await asyncio.wait_for(self._receive(request, charged), self.timeout_s)
            except ConnectionResetError:  # aiohttp's payload says so when the connection is lost
                raise ClientLeft() from None
            except asyncio.TimeoutError:
                raise BodyRefused(
                    408,
                    "the request body did not arrive in time",
                    f"{charged[0]} of {declared if declared is not None else 'chunked'} bytes of the body arrived"
                    " within GATE_BODY_TIMEOUT_S",
                ) from None
            yield body
        finally:
            self.held -= charged[0]
