"""`vllm-gate`: the front door of the vLLM server, in its container.

Listens where clients expect vLLM (GATE_HOST:GATE_PORT) and forwards the OpenAI API and the usual
operational paths to vLLM on loopback (GATE_UPSTREAM); vLLM's development endpoints stay private.
A request that needs the GPUs wakes a suspended server first; an idle server is suspended after
GATE_IDLE_SUSPEND_S. The gate serves /gate/status (JSON) and /gate/metrics (Prometheus) itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import click
from aiohttp import web
from loguru import logger

from .config import Config, load_config
from .errors import ExitCode, SuspendError
from .gate_config import GateConfig, gate_settings_help, load_gate_config
from .gate_control import PowerController
from .gate_metrics import CONTENT_TYPE, GateMetrics
from .gate_proxy import Forwarder
from .render import print_settings, setup_logging

CONTROLLER = web.AppKey("controller", PowerController)
STATUS_PATH, METRICS_PATH = "/gate/status", "/gate/metrics"
# How long shutdown lets the requests in flight finish before it cuts them off (supervisord's
# stopwaitsecs is 10 s by default).
SHUTDOWN_GRACE_S = 5.0


def build_app(gate: GateConfig, toggle_config: Config) -> web.Application:
    metrics = GateMetrics()
    controller = PowerController(gate, toggle_config, metrics)
    forwarder = Forwarder(gate, controller, metrics)

    async def gate_status(request: web.Request) -> web.Response:
        return web.json_response(controller.status_json())

    async def gate_metrics(request: web.Request) -> web.Response:
        text = metrics.render(
            phase=controller.refresh().value, in_flight=controller.in_flight, waiting=controller.waiting
        )
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def on_startup(app: web.Application) -> None:
        await forwarder.open()
        controller.start_watching()

    async def on_shutdown(app: web.Application) -> None:  # after the gate stopped accepting connections
        await forwarder.drain(SHUTDOWN_GRACE_S)

    async def on_cleanup(app: web.Application) -> None:
        await controller.close()
        await forwarder.close()

    app = web.Application(client_max_size=gate.max_request_mib * 2**20)
    app.router.add_get(STATUS_PATH, gate_status, allow_head=False)
    app.router.add_get(METRICS_PATH, gate_metrics, allow_head=False)
    app.router.add_route("*", "/{path:.*}", forwarder.handle)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    app[CONTROLLER] = controller  # for embedding the gate in another aiohttp application
    return app


async def serve(gate: GateConfig, toggle_config: Config) -> None:
    app = build_app(gate, toggle_config)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the upstream request.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, gate.host, gate.port).start()
        except OSError as error:  # the port is taken, or the address is not this machine's
            raise SuspendError(
                f"cannot listen on {gate.host}:{gate.port}: {error}; set GATE_HOST and GATE_PORT",
                ExitCode.USAGE,
            ) from None
        logger.info(
            "vllm-gate listening on http://{}:{}, forwarding to {} (idle suspend: {})",
            gate.host,
            gate.port,
            gate.upstream,
            f"{gate.idle_suspend_s:g} s" if gate.idle_suspend_s else "off",
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        logger.info("vllm-gate stopping")
    finally:
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
        gate_settings_help(),
        "\b\nThe CUDA_TOGGLE_* variables of cuda-toggle-all (see cuda-toggle-all --help) set how the\n"
        "gate suspends and resumes; it takes GATE_BUSY_WAIT_S instead of CUDA_TOGGLE_BUSY_WAIT_S, and\n"
        "CUDA_TOGGLE_SERVER_URL defaults to GATE_UPSTREAM (where the hybrid suspend calls /sleep).",
        "\b\nServed by the gate itself:"
        "\n  GET /gate/status    JSON: state, since, in_flight, waiting, last_suspend_s, last_resume_s,"
        "\n                      last_error, idle_suspend_s"
        "\n  GET /gate/metrics   Prometheus text",
    ]
)


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--print-config", is_flag=True, help="Print the settings in force (GATE_* and CUDA_TOGGLE_*), then exit.")
@click.option("--json", "as_json", is_flag=True, help="With --print-config: one JSON object.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(print_config: bool, as_json: bool, verbose: bool) -> None:
    """Forward requests to vLLM, wake it on request, suspend it when idle, keep its internals private.

    Forwards /v1/... (every method) and /health, /metrics, /version, /tokenize, /detokenize, /ping,
    /load; answers 404 to everything else (vLLM's /sleep, /wake_up, /collective_rpc and the like).
    """
    setup_logging(verbose)
    try:
        gate, toggle_config = load_settings()
    except SuspendError as failure:
        logger.error(failure.message)
        sys.exit(int(failure.exit_code))
    if print_config:
        rows = gate.describe() + toggle_config.describe()
        replaced = {
            "CUDA_TOGGLE_BUSY_WAIT_S": (str(gate.busy_wait_s), "GATE_BUSY_WAIT_S"),
            "CUDA_TOGGLE_SERVER_URL": (toggle_config.server_url, "environment or GATE_UPSTREAM"),
        }
        print_settings([(env, *replaced.get(env, (value, source))) for env, value, source in rows], as_json)
        return
    try:
        asyncio.run(serve(gate, toggle_config))
    except SuspendError as failure:
        logger.error(failure.message)
        sys.exit(int(failure.exit_code))


def main() -> None:
    cli(prog_name="vllm-gate")


if __name__ == "__main__":
    main()
