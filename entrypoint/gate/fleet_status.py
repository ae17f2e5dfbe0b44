"""What the gate shows of its model servers: /gate/status's models, /gate/metrics's per-model lines, and the
/v1/models of them all."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from .metrics import PHASES
from .servers import ModelServer


def status_json(servers: list[ModelServer], started: bool) -> dict:
    """The models of /gate/status: each server's state, requests, swaps and last transitions."""
    models = {}
    for server in servers:
        controller, stats = server.controller, server.stats
        models[server.name] = {
            "default": server.entry.default,
            "state": controller.refresh().value,
            "since": controller.since,
            "in_flight": controller.in_flight,
            "waiting": controller.waiting,
            "swaps": stats.swaps,
            "swap_seconds": round(stats.swap_seconds, 6),
            "last_swap_s": stats.last_swap_s,
            "last_swap_steps": {
                name: {phase: round(seconds, 4) for phase, seconds in phases.items()}
                for name, phases in stats.last_swap_steps.items()
            },
            "failed_swaps": stats.failed_swaps,
            "waited_requests": stats.waited_requests,
            "waited_seconds": round(stats.waited_seconds, 6),
            "last_suspend_s": controller.last_suspend_s,
            "last_resume_s": controller.last_resume_s,
            "last_failure_at": controller.last_failure_at,
            "last_sleep_s": controller.last_sleep_s,
            "last_wake_s": controller.last_wake_s,
            "proof": controller.last_proof,
            "last_swap_path": stats.last_swap_path,
            "hold": hold.to_json() if (hold := controller.held()) else None,
        }
    return {"started": started, "models": models}


def render_metrics(servers: list[ModelServer]) -> str:
    """The per-model lines of /gate/metrics."""
    out: list[str] = []
    per_model = [
        ("vllm_gate_model_swaps_total", "counter", "Swaps that brought the model in.", lambda s: s.stats.swaps),
        (
            "vllm_gate_model_swap_seconds_total",
            "counter",
            "Seconds of those swaps (from the start of the swap to the model resumed), all together.",
            lambda s: round(s.stats.swap_seconds, 6),
        ),
        ("vllm_gate_model_failed_swaps_total", "counter", "Swaps that failed.", lambda s: s.stats.failed_swaps),
        (
            "vllm_gate_model_waited_requests_total",
            "counter",
            "Requests that waited for the model to be swapped in.",
            lambda s: s.stats.waited_requests,
        ),
        (
            "vllm_gate_model_waited_seconds_total",
            "counter",
            "Seconds those requests waited, all together.",
            lambda s: round(s.stats.waited_seconds, 6),
        ),
        ("vllm_gate_model_in_flight", "gauge", "Requests in flight.", lambda s: s.controller.in_flight),
        ("vllm_gate_model_waiting", "gauge", "Requests waiting for a swap.", lambda s: s.controller.waiting),
    ]
    for name, kind, help_text, value in per_model:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        out += [f'{name}{{model="{s.name}"}} {value(s)}' for s in servers]
    out += ["# HELP vllm_gate_model_state 1 for the state of the model's server."]
    out += ["# TYPE vllm_gate_model_state gauge"]
    for server in servers:
        phase = server.controller.refresh().value
        out += [f'vllm_gate_model_state{{model="{server.name}",state="{p}"}} {int(p == phase)}' for p in PHASES]
    return "\n".join(out) + "\n"


async def list_models(session: aiohttp.ClientSession, servers: list[ModelServer]) -> dict:
    """vLLM's /v1/models of every server, resident or not (a suspended server still answers it)."""

    async def models_of(server: ModelServer) -> list[dict]:
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
            async with session.get(server.upstream + "/v1/models") as response:
                if response.status == 200:
                    data = (await response.json()).get("data")
                    if isinstance(data, list) and data:
                        return data
        # Not started yet, or not answering: listed from the configuration.
        return [{"id": server.name, "object": "model", "owned_by": "vllm", "root": server.entry.model}]

    lists = await asyncio.gather(*(models_of(server) for server in servers))
    return {"object": "list", "data": [entry for entries in lists for entry in entries]}
