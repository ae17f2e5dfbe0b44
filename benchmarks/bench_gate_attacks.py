"""A legitimate client's latency through the gate while other clients try to starve it (docs/gate.md, Limits).

    python -m benchmarks.bench_gate_attacks [--requests 300] [--json-out attacks.json]

Self-contained, loopback only: an upstream that answers at once (in a thread), the gate (`python -m
entrypoint.gate`, a subprocess) in front of it, and per scenario attacker threads that open connections to
the gate while one client sends requests one after another, each on a new connection, and times them:
- `promised-bodies`: connections whose heads promise a body of GATE_MAX_REQUEST_MIB and send none,
  enough to promise all of GATE_MAX_BODIES_MIB, held open;
- `stalled-heads`: GATE_MAX_CONNECTIONS connections with a whole POST head and no body, held open;
- `*-flood`: the same connections opened one after another for as long as the client runs (at most
  --flood-connections, GATE_MAX_CONNECTIONS of them open at once);
- `partial-heads-flood`: connections that never finish their request head.
Every scenario is bounded in connections and in time; every connection is closed at its end. The report:
per scenario the client's answers (all must be 200), the p50, p99 and largest latency, the connections the
attackers opened, and the CPU seconds the gate spent meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
LEGIT_PATH = "/v1/completions"
LEGIT_BODY = {"model": "any", "prompt": "hello", "max_tokens": 1}
PARTIAL_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\n"


def promised_body_head(size: int, path: str = LEGIT_PATH) -> bytes:
    """A whole POST head that promises a body of `size` bytes (the attacker then sends none)."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    ).encode()


@dataclass
class Attack:
    """Attacker connections to 127.0.0.1:port, each sending one of `heads` (in turn) and nothing more, from a thread.

    Held (flood False): keeps `hold` connections open, and opens a new one for each that the gate answers or
    closes, as an attacker who wants to keep the slots would. Flood: opens connection after connection,
    closing its own oldest beyond `hold`. Either way at most `total` connections in all, until stop().
    """

    port: int
    heads: tuple[bytes, ...]
    hold: int
    total: int
    flood: bool = False
    opened: int = 0
    failed: int = 0  # connect or send failed (the gate's queue was full, or it closed the connection first)
    dropped: int = 0  # held connections the gate answered or closed
    cpu_s: float = 0.0  # the attacker thread's own CPU time
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _all_open: threading.Event = field(default_factory=threading.Event, repr=False)

    def start(self) -> Attack:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def wait_until_all_open(self, timeout: float = 60) -> None:
        """Wait until `hold` connections were opened and their heads sent."""
        if not self._all_open.wait(timeout):
            raise TimeoutError(f"opened {self.opened} of {self.hold} attacker connections in {timeout} s")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        started_cpu = time.thread_time()
        held: collections.OrderedDict[socket.socket, None] = collections.OrderedDict()
        watch = selectors.DefaultSelector()  # held connections that the gate answers or closes become readable

        def drop(connection: socket.socket) -> None:
            watch.unregister(connection)
            del held[connection]
            connection.close()

        try:
            while not self._stop.is_set():
                for key, _ in watch.select(timeout=0):
                    self.dropped += 1
                    drop(key.fileobj)  # type: ignore[arg-type]
                if len(held) >= self.hold:
                    self._all_open.set()
                    if self.flood:
                        drop(next(iter(held)))
                    else:
                        for key, _ in watch.select(timeout=0.05):
                            self.dropped += 1
                            drop(key.fileobj)  # type: ignore[arg-type]
                        continue
                if self.opened >= self.total:
                    break
                head = self.heads[self.opened % len(self.heads)]
                self.opened += 1
                try:
                    connection = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                    connection.sendall(head)
                except OSError:
                    self.failed += 1
                    continue
                held[connection] = None
                watch.register(connection, selectors.EVENT_READ)
            self._all_open.set()
            self._stop.wait()
        finally:
            self.cpu_s = time.thread_time() - started_cpu
            for connection in list(held):
                drop(connection)
            watch.close()


@dataclass
class Latencies:
    """One client's requests, one after another, each on a new connection: (HTTP status or error, seconds)."""

    answers: list[tuple[str, float]]

    @property
    def seconds(self) -> list[float]:
        return sorted(seconds for _, seconds in self.answers)

    def percentile(self, fraction: float) -> float:
        ordered = self.seconds
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def statuses(self) -> collections.Counter[str]:
        return collections.Counter(status for status, _ in self.answers)

    def summary(self) -> dict:
        return {
            "requests": len(self.answers),
            "statuses": dict(self.statuses()),
            "p50_ms": round(1000 * statistics.median(self.seconds), 2),
            "p99_ms": round(1000 * self.percentile(0.99), 2),
            "max_ms": round(1000 * max(self.seconds), 2),
        }


def time_requests(base_url: str, count: int, timeout: float = 30) -> Latencies:
    """`count` POSTs to base_url + LEGIT_PATH, one after another, each on a new connection."""
    answers = []
    for _ in range(count):
        started = time.monotonic()
        try:
            status = str(requests.post(base_url + LEGIT_PATH, json=LEGIT_BODY, timeout=timeout).status_code)
        except requests.RequestException as error:
            status = type(error).__name__
        answers.append((status, time.monotonic() - started))
    return Latencies(answers)


# (name, heads, connections open at once, flood, connections in all)
def scenarios(max_connections: int, max_request_mib: int, max_bodies_mib: int, most: int) -> list[tuple]:
    """Each attack with the gate's limits: held, or a flood of at most `most` connections."""
    promised = [promised_body_head(max_request_mib * MIB)] * (max_bodies_mib // max_request_mib)
    if max_bodies_mib % max_request_mib:
        promised.append(promised_body_head(max_bodies_mib % max_request_mib * MIB))
    stalled = (promised_body_head(len(json.dumps(LEGIT_BODY))),)
    return [
        ("baseline", (), 0, False, 0),
        ("promised-bodies", tuple(promised), len(promised), False, most),
        ("promised-bodies-flood", tuple(promised), max_connections, True, most),
        ("stalled-heads", stalled, max_connections, False, most),
        ("stalled-heads-flood", stalled, max_connections, True, most),
        ("partial-heads-flood", (PARTIAL_HEAD,), max_connections, True, most),
    ]


def run_scenario(
    gate_url: str, gate_pid: int, heads: tuple[bytes, ...], hold: int, flood: bool, total: int, requests_count: int
) -> dict:
    """The client's latencies while the attack runs, and what the attack and the gate spent meanwhile."""
    port = int(gate_url.rsplit(":", 1)[1])
    gate = psutil.Process(gate_pid)
    attack = Attack(port, heads, hold, total, flood) if heads else None
    cpu_before = sum(gate.cpu_times()[:2])
    if attack is not None:
        attack.start()
        attack.wait_until_all_open()
    latencies = time_requests(gate_url, requests_count)
    if attack is not None:
        attack.stop()
    report = latencies.summary()
    report["gate_cpu_s"] = round(sum(gate.cpu_times()[:2]) - cpu_before, 3)
    if attack is not None:
        report.update(
            attack_connections=attack.opened,
            attack_dropped_by_gate=attack.dropped,
            attack_failed=attack.failed,
            attack_cpu_s=round(attack.cpu_s, 3),
        )
    return report


@contextlib.contextmanager
def serving(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Iterator[str]:
    """An aiohttp server on a free loopback port that answers every request with `handler`, from a thread;
    yields its URL, stops it after."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, int] = {}

    async def serve() -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(serve())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the upstream did not start")
    try:
        yield f"http://127.0.0.1:{holder['port']}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


async def answer_at_once(request: web.Request) -> web.Response:
    """The upstream of the benchmark: reads the request, answers 200 with a small JSON."""
    await request.read()
    return web.json_response({"choices": [{"text": "ok"}]})


@contextlib.contextmanager
def running_gate(upstream: str, settings: dict[str, str]) -> Iterator[tuple[str, int]]:
    """The gate on a free loopback port in front of `upstream`; yields (its URL, its PID); stopped after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as folder:
        environ = {
            **os.environ,
            "GATE_HOST": "127.0.0.1",
            "GATE_PORT": str(port),
            "GATE_UPSTREAM": upstream,
            "CUDA_TOGGLE_RUN_DIR": folder,
            "CUDA_TOGGLE_SUPERVISOR_URL": "unix:///nonexistent",
            **settings,
        }
        log = open(Path(folder) / "gate.log", "wb")  # noqa: SIM115 (closed below)
        process = subprocess.Popen([sys.executable, "-m", "entrypoint.gate"], cwd=REPO, env=environ, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the gate exited: {(Path(folder) / 'gate.log').read_text()[-2000:]}")
                with contextlib.suppress(requests.RequestException):
                    if requests.get(url + "/gate/status", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("the gate did not answer within 30 s")
                time.sleep(0.05)
            yield url, process.pid
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="the client's requests per scenario")
    parser.add_argument("--max-connections", type=int, default=100, help="GATE_MAX_CONNECTIONS")
    parser.add_argument("--max-request-mib", type=int, default=100, help="GATE_MAX_REQUEST_MIB")
    parser.add_argument("--max-bodies-mib", type=int, default=1024, help="GATE_MAX_BODIES_MIB")
    parser.add_argument("--most-connections", type=int, default=5000, help="attacker connections per scenario, at most")
    parser.add_argument("--json-out", type=Path, help="write the report as JSON")
    args = parser.parse_args()
    settings = {
        "GATE_MAX_CONNECTIONS": str(args.max_connections),
        "GATE_MAX_REQUEST_MIB": str(args.max_request_mib),
        "GATE_MAX_BODIES_MIB": str(args.max_bodies_mib),
    }
    report: dict = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {platform.platform()}",
        "settings": settings,
        "scenarios": {},
    }
    print(report["machine"], flush=True)
    with serving(answer_at_once) as upstream, running_gate(upstream, settings) as (url, pid):
        for name, heads, hold, flood, total in scenarios(
            args.max_connections, args.max_request_mib, args.max_bodies_mib, args.most_connections
        ):
            result = run_scenario(url, pid, heads, hold, flood, total, args.requests)
            report["scenarios"][name] = result
            print(f"{name:<22} {json.dumps(result)}", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
