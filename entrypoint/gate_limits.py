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
from collections import Counter
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from loguru import logger

from .errors import ExitCode, ToolError

MIB = 2**20
# Open files the gate needs besides its connections: Python, the listening socket, logs, the lock probe,
# refusals in progress.
FILES_BESIDES_CONNECTIONS = 64
# A refused connection gets its 503 once its request head arrived, or after this long without one.
REFUSAL_WAIT_S = 1.0
MAX_REFUSING = 32  # beyond this many refusals in progress, a refused connection is closed without a word
ACCEPT_RETRY_S = 0.1
READ_CHUNK = 2**16


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
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\nRetry-After: 1\r\n\r\n"
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
    """aiohttp's protocol for one connection, counted by the limiter while the connection is open."""

    def __init__(self, inner: asyncio.Protocol, limiter: ConnectionLimiter):
        self.inner, self.limiter = inner, limiter
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.limiter.forget(self)
        self.inner.connection_lost(exc)


class ConnectionLimiter:
    """Accepts the gate's connections one at a time and keeps at most `limit` of them open.

    At the limit, a new connection closes the oldest idle one (no request being handled: a keep-alive
    connection between requests, or one that never finished its request head; HTTP lets a server close
    those at any time); when every connection is busy with a request, the new one gets a 503 at once.
    Accepting one at a time (not asyncio's batches of up to `backlog`) keeps the open files within the
    limit however many clients wait in the kernel's queue.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.factory: Callable[[], asyncio.Protocol] | None = None  # aiohttp's (runner.server), set before serve()
        self.connections: dict[_Counted, None] = {}  # oldest first
        self.busy: Counter[asyncio.BaseTransport] = Counter()  # requests being handled per connection
        self.refusing = 0  # refused connections still open (each waits up to REFUSAL_WAIT_S)
        self.refused = 0
        self.evicted = 0
        self.accept_failures = 0

    def protocol(self) -> asyncio.Protocol | None:
        """The protocol for a newly accepted connection: aiohttp's, a 503, or None (close it at once)."""
        assert self.factory is not None, "set the factory before accepting"
        if len(self.connections) >= self.limit and not self.evict_one_idle():
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

    def evict_one_idle(self) -> bool:
        for connection in self.connections:
            transport = connection.transport
            if transport is not None and self.busy[transport] == 0:
                self.forget(connection)
                transport.close()
                self.evicted += 1
                if self.evicted == 1 or self.evicted % 100 == 0:
                    logger.info("closed {} idle connection(s) to make room for new ones", self.evicted)
                return True
        return False

    def forget(self, connection: _Counted) -> None:
        self.connections.pop(connection, None)
        if connection.transport is not None:
            self.busy.pop(connection.transport, None)

    @web.middleware
    async def track_busy(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Middleware: a connection handling a request is busy, and never closed to make room."""
        transport = request.transport
        if transport is None:
            return await handler(request)
        self.busy[transport] += 1
        try:
            return await handler(request)
        finally:
            if self.busy[transport] > 1:
                self.busy[transport] -= 1
            else:
                self.busy.pop(transport, None)


class BodyRefused(Exception):
    def __init__(self, status: int, message: str, log: str):
        super().__init__(message)
        self.status, self.message, self.log = status, message, log


class BodyBudget:
    """Request bodies in memory: each at most per_request bytes, all together at most total bytes."""

    def __init__(self, per_request_mib: int, total_mib: int):
        self.per_request, self.total = per_request_mib * MIB, total_mib * MIB
        self.held = 0

    def _reserve(self, size: int) -> None:
        if self.held + size > self.total:
            raise BodyRefused(
                503,
                "the server is busy; try again",
                f"{self.held // MIB} MiB of request bodies held, one more would pass GATE_MAX_BODIES_MIB",
            )
        self.held += size

    @contextlib.asynccontextmanager
    async def read(self, request: web.Request) -> AsyncIterator[bytes]:
        """The whole body, held (and counted) until the block ends; BodyRefused (413, 503) past a limit."""
        declared = request.content_length
        too_large = BodyRefused(
            413, "the request body is too large", f"a body over GATE_MAX_REQUEST_MIB ({declared or 'chunked'})"
        )
        if declared is not None and declared > self.per_request:
            raise too_large
        reserved = 0
        try:
            if declared:
                self._reserve(declared)
                reserved = declared
            chunks, size = [], 0
            async for chunk in request.content.iter_chunked(READ_CHUNK):
                size += len(chunk)
                if size > self.per_request:
                    raise too_large
                if size > reserved:
                    self._reserve(size - reserved)
                    reserved = size
                chunks.append(chunk)
            yield b"".join(chunks)
        finally:
            self.held -= reserved
