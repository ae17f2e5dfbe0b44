"""The gate's side of the operator's hold (the hold itself: suspend/hold.py): which server a hold names
under GATE_MODELS, and the gauge of the servers held."""

from __future__ import annotations

import contextlib
import os

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..suspend.hold import Hold, Target


def target_of(config: Config, model: str | None, pid: int | None, environ: dict | None = None) -> Target:
    """The server of `model` under GATE_MODELS (its run directory, program and address, as the gate keeps
    them), else the one server. ToolError(USAGE) for a model GATE_MODELS does not have."""
    from .config import load_gate_config  # the gate's settings only when a hold names a model
    from .servers import run_dir_of, server_pid

    environ = dict(os.environ if environ is None else environ)
    if not environ.get("GATE_MODELS"):
        if model:
            raise ToolError(
                f"--model {model}: GATE_MODELS is not set, so there is one server; leave --model out", ExitCode.USAGE
            )
        return Target("", config, pid)
    gate = load_gate_config(environ)
    names = [entry.name for entry in gate.models]
    entry = next((e for e in gate.models if e.name == model), None) if model else gate.models[0]
    if entry is None:
        raise ToolError(f"--model {model}: GATE_MODELS has no such model; it has {', '.join(names)}", ExitCode.USAGE)
    config = config.replace(
        program=entry.program, run_dir=run_dir_of(config.run_dir, entry), server_url=gate.model_upstream(entry)
    )
    if pid is None:
        with contextlib.suppress(ToolError):  # not found: the library says so with its own words
            pid = server_pid(entry, config)
    return Target(entry.name, config, pid)


def hold_metrics(held: list[tuple[str, Hold | None]]) -> str:
    """Prometheus lines: 1 per server held (model "" for the one server)."""
    lines = [
        "# HELP vllm_gate_held 1 while an operator holds the server suspended (cuda-toggle-all hold).",
        "# TYPE vllm_gate_held gauge",
    ]
    for model, record in held:
        label = f'{{model="{model}"}}' if model else ""
        lines.append(f"vllm_gate_held{label} {1 if record else 0}")
    return "\n".join(lines) + "\n"
