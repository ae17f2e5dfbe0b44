"""Helpers shared by the tests (and the GPU suite): the repository's root, the fakes, the tool's command line,
a free port, a wait loop, a small local HTTP endpoint."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
FAKES_DIR = REPO / "tests" / "fakes"
# The real `cuda-toggle-all`, run as a module of this checkout (no install needed).
TOGGLE_ALL_CLI = [sys.executable, "-m", "entrypoint.cuda_toggle_all"]

sys.path.insert(0, str(FAKES_DIR))  # the fakes are scripts as well as modules: they import each other by name
import fakegpu  # noqa: E402, F401 (the fake GPU's state, for the tests to import from here)

T = TypeVar("T")


def _lowest_ephemeral_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports this process handed out: never twice, though the server given one may not have bound it yet.
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server the test starts next.

    Taken below the kernel's ephemeral range: a port from that range (what binding port 0 gives) can be taken
    in the meantime as the local port of any outgoing connection of the machine, and the server then fails
    with "Address already in use" (seen in CI under load). Below it, only another test's pick could collide:
    random, and checked by a bind."""
    low = _lowest_ephemeral_port()
    if low > 11000:
        for _ in range(200):
            port = random.randrange(10000, low)
            if port in _handed_out:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# A bound a test waits under is a failure bound, not an expectation: the test goes on as soon as what it waits
# for has happened. A loaded machine (a shared CI runner, or make check's own workers on two cores) takes several
# times as long as an idle one, so each bound is stretched WAIT_SCALE times (TEST_WAIT_SCALE, 3 by default).
WAIT_SCALE = float(os.environ.get("TEST_WAIT_SCALE", "3"))


def scaled(timeout: float) -> float:
    """A failure bound of `timeout` seconds (on an idle machine), stretched for a loaded one."""
    return timeout * WAIT_SCALE


def wait_until(condition: Callable[[], T], what: str, timeout: float = 10.0, interval: float = 0.02) -> T:
    """Call `condition` until it returns something true, and return that; fail naming `what` after
    scaled(`timeout`) s."""
    bound = scaled(timeout)
    deadline = time.monotonic() + bound
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {bound:g} s waiting for {what}")
        time.sleep(interval)
    return result


class JsonHandler(BaseHTTPRequestHandler):
    """Base of the tests' small HTTP endpoints: answers JSON, writes no access log to stderr."""

    def send_json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on a free port of 127.0.0.1 from a thread; yields its base URL, shuts it down after."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
