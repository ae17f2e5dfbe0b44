"""`vllm-gate`: the front door of the vLLM server, in its container.

Listens where clients expect vLLM (GATE_HOST:GATE_PORT) and forwards the OpenAI API and the usual
operational paths to vLLM on loopback (GATE_UPSTREAM); vLLM's development endpoints stay private.
A request that needs the GPUs wakes a suspended server first; an idle server is suspended after
GATE_IDLE_SUSPEND_S. The gate serves /gate/status (JSON) and /gate/metrics (Prometheus) itself.
With GATE_MODELS it fronts several vLLM servers, one per model, and swaps them on the GPUs (gate/fleet.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import click
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_protocol import RequestHandler
from loguru import logger

from ..base.cli_exit import ExitCodeCommand
from ..base.config import Config, load_config
from ..base.errors import GATE_EXIT_CODES, ExitCode, ToolError, exit_codes_help
from ..base.render import print_settings, setup_logging
from .config import GateConfig, gate_settings_help, load_gate_config
from .control import UNREACHABLE, Phase, PowerController, upstream_answers
from .fleet import Fleet
from .hold import hold_metrics
from .limits import SERVER_NAME, ConnectionLimiter, ensure_open_file_limit
from .metrics import CONTENT_TYPE, GateMetrics
from .programs import write_programs
from .proxy import Forwarder, json_error, shown
from .servers import check_host_ram

CONTROLLER = web.AppKey("controller", PowerController)
STATUS_PATH, METRICS_PATH = "/gate/status", "/gate/metrics"
# How long shutdown lets the requests in flight finish before it cuts them off (supervisord's
# stopwaitsecs is 10 s by default).
SHUTDOWN_GRACE_S = 5.0


class OneLineLog(logging.Handler):
    """aiohttp's server log (a malformed request, a client speaking TLS to plain HTTP) as one line, without
    the traceback aiohttp attaches: bad input from outside is not a bug of the gate."""

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        detail = shown(" ".join(f"{type(error).__name__}: {error}".split())) if error else ""
        level = "DEBUG" if record.levelno < logging.WARNING else "WARNING"
        logger.log(level, "{}{}", record.getMessage(), f": {detail}" if detail else "")


def quiet_aiohttp_server_log() -> None:
    server_log = logging.getLogger("aiohttp.server")
    server_log.handlers = [OneLineLog()]
    server_log.propagate = False


async def name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    """The gate's own answers say `vllm-gate`, not aiohttp's and Python's versions; vLLM's keep its own."""
    if response.headers.get("Server") == SERVER_SOFTWARE:  # aiohttp's default, set just before this hook
        response.headers["Server"] = SERVER_NAME


# What the gate answers when aiohttp itself fails a request (its parser, or an unexpected error): generic.
PARSER_ERRORS = {
    400: ("the request could not be parsed", "BadRequestError"),
    500: ("the gate failed to handle the request", "InternalServerError"),
}


class GateRequestHandler(RequestHandler):
    """aiohttp's protocol, whose own error answers (a malformed request, an unexpected error) are generic.

    aiohttp answers those itself, outside the application (no on_response_prepare hook runs): a text body
    that repeats the bad request line and `Server: Python/3.x aiohttp/3.x`. The gate's rule is generic bodies
    naming nothing but `vllm-gate`; what was wrong goes to the log (aiohttp's, one line: OneLineLog).
    """

    __slots__ = ()  # the same layout as aiohttp's, so that a protocol aiohttp made can become one

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it; raises when an answer has begun
        text, error_type = PARSER_ERRORS.get(status, PARSER_ERRORS[400 if status < 500 else 500])
        response = json_error(status, text, error_type, headers={"Server": SERVER_NAME})
        response.force_close()
        return response


def gate_protocols(server: web.Server) -> Callable[[], RequestHandler]:
    """aiohttp's protocol factory, making GateRequestHandler's: the class is swapped after aiohttp made one with
    the settings of the runner (how it passes them to RequestHandler is its own business)."""

    def protocol() -> RequestHandler:
        handler = server()
        handler.__class__ = GateRequestHandler
        return handler

    return protocol


def build_app(gate: GateConfig, toggle_config: Config, limiter: ConnectionLimiter | None = None) -> web.Application:
    metrics = GateMetrics()
    # With GATE_MODELS, one controller per model; the default model's stands for "the server" in the
    # single-server fields of /gate/status and /gate/metrics.
    fleet = Fleet(gate, toggle_config, metrics) if gate.models else None
    controller = fleet.default.controller if fleet else PowerController(gate, toggle_config, metrics)
    forwarder = Forwarder(gate, controller, metrics, fleet)

    async def gate_status(request: web.Request) -> web.Response:
        status = controller.status_json()
        # Once a request found vLLM unreachable (503 or 502), "running" is checked against vLLM's /health (asked
        # only then: it would show in the upstream's log and traffic for every status read otherwise).
        failed_before = metrics.errors["upstream_unreachable"] > 0
        running = status["state"] == Phase.RUNNING.value
        if not fleet and running and failed_before and not await upstream_answers(gate.upstream):
            status["state"] = UNREACHABLE  # what was observed: "running" would promise answers it cannot give
        return web.json_response({**status, **fleet.status_json()} if fleet else status)

    async def gate_metrics(request: web.Request) -> web.Response:
        if limiter is not None:
            metrics.errors["connection_refused"] = limiter.refused
        text = metrics.render(
            phase=controller.refresh().value, in_flight=controller.in_flight, waiting=controller.waiting
        )
        if fleet is not None:
            text += fleet.render_metrics()
        held = [(s.name, s.controller.held()) for s in fleet.servers.values()] if fleet else [("", controller.held())]
        text += hold_metrics(held)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def on_startup(app: web.Application) -> None:
        await forwarder.open()
        if fleet is not None:
            await fleet.open()  # starts every controller's watcher, and the servers one after another
        else:
            controller.start_watching()

    async def on_shutdown(app: web.Application) -> None:  # after the gate stopped accepting connections
        await forwarder.drain(SHUTDOWN_GRACE_S)

    async def on_cleanup(app: web.Application) -> None:
        if fleet is not None:
            await fleet.close()
        else:
            await controller.close()
        await forwarder.close()

    middlewares = [limiter.track_busy] if limiter is not None else []
    app = web.Application(client_max_size=gate.max_request_mib * 2**20, middlewares=middlewares)
    app.router.add_get(STATUS_PATH, gate_status, allow_head=False)
    app.router.add_get(METRICS_PATH, gate_metrics, allow_head=False)
    app.router.add_route("*", "/{path:.*}", forwarder.handle)
    app.on_response_prepare.append(name_the_server)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    app[CONTROLLER] = controller  # for embedding the gate in another aiohttp application
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as error:  # the port is taken, or the address is not this machine's
        raise ToolError(
            f"cannot listen on {host}:{port}: {error}; set GATE_HOST and GATE_PORT", ExitCode.USAGE
        ) from None
    listener.listen(1024)
    listener.setblocking(False)
    return listener


async def serve(gate: GateConfig, toggle_config: Config) -> None:
    ensure_open_file_limit(gate.max_connections)
    check_host_ram(gate, toggle_config)
    quiet_aiohttp_server_log()
    limiter = ConnectionLimiter(gate.max_connections, gate.keepalive_s, gate.header_timeout_s)
    app = build_app(gate, toggle_config, limiter)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the upstream request.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        keepalive_timeout=gate.keepalive_s,
    )
    listener = listening_socket(gate.host, gate.port)
    await runner.setup()
    accepting: asyncio.Task | None = None
    try:
        limiter.factory = gate_protocols(runner.server)  # the limiter hands each connection to one
        accepting = asyncio.get_running_loop().create_task(limiter.serve(listener))
        logger.info(
            "vllm-gate listening on http://{}:{}, forwarding to {} (idle suspend: {}; at most {} connections)",
            gate.host,
            gate.port,
            ", ".join(f"{m.name} at {gate.model_upstream(m)}" for m in gate.models) or gate.upstream,
            f"{gate.idle_suspend_s:g} s" if gate.idle_suspend_s else "off",
            gate.max_connections,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        logger.info("vllm-gate stopping")
    finally:
        if accepting is not None:  # no new connections; the open ones finish below
            accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accepting
        listener.close()
        await runner.cleanup()


def load_settings() -> tuple[GateConfig, Config]:
    gate = load_gate_config(os.environ)
    toggle_config = load_config()
    # The gate waits for a transition of cuda-toggle-all rather than failing the requests behind it, and
    # the hybrid suspend calls vLLM's /sleep where the gate knows vLLM is (the only place it is served).
    toggle_config = toggle_config.replace(
        busy_wait_s=gate.busy_wait_s, server_url=toggle_config.server_url or gate.upstream
    )
    return gate, toggle_config


EPILOG = "\n\n".join(
    [
        exit_codes_help(GATE_EXIT_CODES),
        gate_settings_help(),
        "\b\nThe CUDA_TOGGLE_* variables of cuda-toggle-all (see cuda-toggle-all --help) set how the\n"
        "gate suspends and resumes; it takes GATE_BUSY_WAIT_S instead of CUDA_TOGGLE_BUSY_WAIT_S, and\n"
        "CUDA_TOGGLE_SERVER_URL defaults to GATE_UPSTREAM (where the hybrid suspend calls /sleep).",
        "\b\nServed by the gate itself:"
        "\n  GET /gate/status    JSON: state, since, in_flight, waiting, last_suspend_s, last_resume_s,"
        "\n                      last_failure_at (details of a failure are in the gate's log)"
        "\n                      (with GATE_MODELS also `started` and `models`: per model its state, swaps,"
        "\n                      swap seconds, waits; docs/gate.md, Several models)"
        "\n  GET /gate/metrics   Prometheus text",
    ]
)


@click.command(
    cls=ExitCodeCommand,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.option("--print-config", is_flag=True, help="Print the settings in force (GATE_* and CUDA_TOGGLE_*), then exit.")
@click.option("--json", "as_json", is_flag=True, help="With --print-config: one JSON object.")
@click.option(
    "--write-programs",
    "programs_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With GATE_MODELS: write DIR/models.conf (a supervisord program per model) and each model's"
    " arguments next to VLLM_ARGS_FILE, then exit (docker/start-services.sh runs it).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(print_config: bool, as_json: bool, programs_dir: Path | None, verbose: bool) -> None:
    """Forward requests to vLLM, wake it on request, suspend it when idle, keep its internals private.

    Forwards vLLM's public API only: each known route with its methods (/v1/chat/completions,
    /v1/completions, /v1/embeddings, /v1/responses, /v1/audio/..., /v1/models, /tokenize, /detokenize,
    /health, /metrics, /version, /ping, /load; more with GATE_EXTRA_PATHS). vLLM's admin and dev
    endpoints (/v1/load_lora_adapter, /sleep, /wake_up, /collective_rpc, ...) are never forwarded.
    Unknown paths get 404, wrong methods 405, unparsable JSON 400, WebSocket /v1/realtime 501, all
    without waking a suspended server. The rules: docs/gate.md, "Public routes".
    """
    setup_logging(verbose)
    if as_json and not print_config:  # else a typo of an option would start a gate on the public port
        raise ToolError("--json only goes with --print-config: run `vllm-gate --print-config --json`", ExitCode.USAGE)
    gate, toggle_config = load_settings()
    if programs_dir is not None:
        try:
            programs = write_programs(gate, Path(os.environ.get("VLLM_ARGS_FILE", "/run/vllm/args")), programs_dir)
        except OSError as error:  # the folder cannot be written: say which, as for a bad setting
            raise ToolError(f"cannot write the programs to {programs_dir}: {error}", ExitCode.USAGE)
        logger.info("supervisord programs for GATE_MODELS: {}", ", ".join(programs) or "none (GATE_MODELS unset)")
        return
    if print_config:
        rows = gate.describe() + toggle_config.describe()
        replaced = {
            "CUDA_TOGGLE_BUSY_WAIT_S": (str(gate.busy_wait_s), "GATE_BUSY_WAIT_S"),
            "CUDA_TOGGLE_SERVER_URL": (toggle_config.server_url, "environment or GATE_UPSTREAM"),
        }
        print_settings([(env, *replaced.get(env, (value, source))) for env, value, source in rows], as_json)
        return
    asyncio.run(serve(gate, toggle_config))


def main() -> None:
    cli(prog_name="vllm-gate")


if __name__ == "__main__":
    main()
