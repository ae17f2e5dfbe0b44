"""The gate's start-up of the model servers: one after another, because vLLM sizes its KV cache from the GPU
memory free when it starts; each is started (through supervisord, when it runs the server's program), waited
for, warmed up, and suspended before the next starts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import xmlrpc.client
from pathlib import Path

import aiohttp
from loguru import logger

from ..base.errors import ToolError
from ..server.discovery import supervisor_proxy
from ..suspend.status import warm_up as warm_up_server
from .config import GateConfig
from .control import Phase
from .servers import ModelServer

READY_PATH = "/v1/models"


async def start_one_after_another(
    servers: list[ModelServer], session: aiohttp.ClientSession, gate: GateConfig, supervisor_url: str
) -> None:
    """Start the servers in this order, each suspended once ready but the last, which is left running."""
    for server in servers:
        await start_program(server, supervisor_url)
        if not await wait_ready(session, server, gate):
            continue
        await warm_up(server)
        if server is servers[-1] or server.controller.refresh() is not Phase.RUNNING:
            continue
        outcome = await asyncio.shield(server.controller.start(Phase.SUSPENDING, "start-up: next server"))
        if not outcome.ok:
            logger.error("model {} could not be suspended at start-up: {}", server.name, outcome.message)


async def start_program(server: ModelServer, supervisor_url: str) -> None:
    """Ask supervisord to start the server's program, when supervisord runs it and it is not running."""
    url = supervisor_url

    def start() -> str:
        if url.startswith("unix://") and not Path(url[len("unix://") :]).exists():
            return "no supervisord"
        try:
            rpc = supervisor_proxy(url).supervisor
            state = rpc.getProcessInfo(server.entry.program)["statename"]
            if state in ("RUNNING", "STARTING"):
                return state
            rpc.startProcess(server.entry.program, False)
            return "started"
        except xmlrpc.client.Fault as fault:
            return f"not started ({fault.faultString})"
        except OSError as error:
            return f"not started (supervisord: {error})"

    outcome = await asyncio.get_running_loop().run_in_executor(None, start)
    logger.info("model {}: supervisord program {}: {}", server.name, server.entry.program, outcome)


async def wait_ready(session: aiohttp.ClientSession, server: ModelServer, gate: GateConfig) -> bool:
    deadline = time.monotonic() + gate.start_timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            async with session.get(server.upstream + READY_PATH) as response:
                if response.status == 200:
                    return True
        await asyncio.sleep(gate.poll_s)
    logger.error("model {} did not load within {:g} s; going on without it", server.name, gate.start_timeout_s)
    return False


async def warm_up(server: ModelServer) -> None:
    """One sleep/wake-up cycle of a fresh server, so that its first suspend is as fast as the later ones."""
    controller = server.controller
    call = functools.partial(controller.call_library, warm_up_server)
    try:
        report = await asyncio.get_running_loop().run_in_executor(controller.executor, call)
        logger.info("model {} warm-up: {}", server.name, report.get("reason") or "done")
    except ToolError as failure:
        logger.warning("model {} warm-up failed: {}", server.name, failure.message)
