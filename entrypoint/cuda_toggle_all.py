"""`cuda-toggle-all`: suspend (checkpointed) or resume (running) every CUDA process of a vLLM server.

The click layer only parses, calls the library (suspend/api.py) and renders; base/cli_exit.py turns failures into
exit codes.
"""

from __future__ import annotations

import json

import click
from loguru import logger

from .base.cli_exit import ExitCodeCommand
from .base.config import load_config, settings_help
from .base.errors import TOGGLE_EXIT_CODES, ToolError, exit_codes_help
from .base.render import print_settings, setup_logging, status_table, toggle_table
from .gate.hold import target_of
from .suspend.api import TARGET_ALIASES, move_to
from .suspend.hold import INFLIGHT_CHOICES, hold, release
from .suspend.status import status, warm_up

EPILOG = "\n\n".join(
    [
        "\b\nExamples:\n  cuda-toggle-all checkpointed          # suspend: GPUs handed back, 0 MiB left"
        "\n  cuda-toggle-all running               # resume: same server, same weights"
        "\n  cuda-toggle-all status --json\n  cuda-toggle-all checkpointed --pid 4242 --backend cli",
        exit_codes_help(TOGGLE_EXIT_CODES),
        settings_help(),
    ]
)


def render_failure(failure: ToolError, params: dict) -> None:
    """The result table of a failed transition, and with --json the one JSON object the output promises."""
    report = failure.result.to_json() if hasattr(failure.result, "to_json") else None
    if report is not None and "pids" in report and "target" in report:
        logger.info("\n" + toggle_table(report))
    if params.get("as_json"):
        report = report or {
            "ok": False,
            "target": TARGET_ALIASES.get(params.get("target"), params.get("target")),  # as a result names it
            "root_pid": None,
            "backend": params.get("backend"),
            "seconds": 0.0,
            "pids": [],
        }
        report.update(ok=False, error=failure.message, exit_code=int(failure.exit_code))
        click.echo(json.dumps(report))


@click.command(
    cls=ExitCodeCommand,
    render_failure=render_failure,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.argument(
    "target", type=click.Choice([*TARGET_ALIASES, "status", "config", "warm-up", "hold", "release"]), metavar="TARGET"
)
@click.option("--pid", type=int, help="PID of the server's root process (default: ask supervisord, then match).")
@click.option(
    "--match",
    "match",
    multiple=True,
    help="Command-line substring that finds the server (repeatable; env CUDA_TOGGLE_MATCH).",
)
@click.option("--program", help="supervisord program name (env CUDA_TOGGLE_PROGRAM).")
@click.option("--supervisor-url", help="supervisord XML-RPC URL (env CUDA_TOGGLE_SUPERVISOR_URL).")
@click.option(
    "--backend",
    type=click.Choice(["auto", "cli", "driver"]),
    help="driver = libcuda API, cli = the cuda-checkpoint binary (env CUDA_TOGGLE_BACKEND).",
)
@click.option(
    "--mode",
    type=click.Choice(["auto", "plain", "hybrid"]),
    help="hybrid: sleep vLLM (level 1) first, "
    "then checkpoint what remains; auto: hybrid when the server has sleep mode (env CUDA_TOGGLE_MODE).",
)
@click.option(
    "--quiesce",
    type=click.Choice(["auto", "scheduler", "sigstop", "none"]),
    help="What holds the requests while suspended: scheduler = vLLM's own /pause or /sleep (mode=keep), "
    "sigstop = freeze the dispatcher (older vLLM, TP >= 2), none = nothing (env CUDA_TOGGLE_QUIESCE).",
)
@click.option("--model", help="hold/release: the model of GATE_MODELS (default: the default model, or the one server).")
@click.option(
    "--inflight",
    type=click.Choice(INFLIGHT_CHOICES),
    default="keep",
    show_default=True,
    help="hold: the requests in flight are kept across the suspend (finished after the release) or drained first.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0, 86400),
    default=60.0,
    show_default=True,
    help="hold --inflight drain: seconds to wait for them; those left are kept across the suspend.",
)
@click.option("--no-resume", is_flag=True, help="release: leave the server suspended (the gate wakes it on request).")
@click.option("--force", is_flag=True, help="Go on despite the safety refusals (loudly).")
@click.option("--no-freeze", is_flag=True, help="The same as --quiesce none.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(
    target: str,
    pid: int | None,
    match: tuple[str, ...],
    program: str | None,
    supervisor_url: str | None,
    backend: str | None,
    mode: str | None,
    quiesce: str | None,
    model: str | None,
    inflight: str,
    drain_timeout: float,
    no_resume: bool,
    force: bool,
    no_freeze: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Suspend or resume every CUDA process of a vLLM server with cuda-checkpoint.

    TARGET is one of: checkpointed (alias suspend), running (alias resume), status, config, warm-up,
    hold, release.

    \b
    checkpointed  hold the requests (vLLM's scheduler pause or sleep with mode=keep; on older
                  vLLM, freeze the dispatcher), lock every CUDA process of the server, checkpoint
                  them all (in parallel), verify the states and that the GPUs gave the memory
                  back; refuses (nothing changed) what would fail or could not be proven.
    running       check each GPU has room, restore every process, unlock them all, let the
                  requests go (resume or wake up vLLM, continue the dispatcher), then prove it:
                  states, GPU memory back, vLLM's flags, a one-token completion. Also repairs
                  what a crashed or killed run left behind.
    status        each process's CUDA state, whether the dispatcher is frozen, GPU memory.
    config        the settings in force (environment variables and defaults).
    warm-up       once per server: one vLLM sleep/wake-up, so that the first suspend is as fast
                  as the later ones (vLLM's first sleep pins host memory). `make wait` runs it.
    hold          suspend and keep suspended until `release`: the gate resumes nothing meanwhile and
                  answers its requests 503 with Retry-After (or lets them wait GATE_HOLD_WAIT_S).
                  --inflight keep|drain, --model M with GATE_MODELS. `make hold`.
    release       end the hold and resume (--no-resume: leave it to the next request). `make release`.
    """
    setup_logging(verbose)
    config = load_config()
    changes = {
        key: value
        for key, value in {
            "match": tuple(match) or None,
            "program": program,
            "supervisor_url": supervisor_url,
        }.items()
        if value
    }
    config = config.replace(**changes)
    if target == "config":
        print_settings(config.describe(), as_json)
        return
    if target == "status":
        result = status(config, pid=pid, backend_name=backend, force=force).to_json()
        logger.info("\n" + status_table(result))
    elif target == "hold":
        result = hold(
            target_of(config, model, pid), inflight=inflight, drain_timeout_s=drain_timeout, backend_name=backend
        )
        logger.info("held{}: {}", f" model {model}" if model else "", "suspended until `cuda-toggle-all release`")
        logger.info("\n" + toggle_table(result["suspend"]))
    elif target == "release":
        result = release(target_of(config, model, pid), resume=not no_resume, backend_name=backend)
        logger.info(
            "released{}{}", f" model {model}" if model else "", "" if result["released"] else " (it was not held)"
        )
        if "resume" in result:
            logger.info("\n" + toggle_table(result["resume"]))
    elif target == "warm-up":
        result = warm_up(config, pid=pid, backend_name=backend)
        logger.info(
            "warm-up: slept {sleep_s} s, woke up in {wake_up_s} s, first completion {first_completion_s} s,"
            " first chat with logprobs {first_chat_s} s".format(**result)
            if result["done"]
            else f"warm-up: nothing done ({result['reason']})"
        )
    else:
        result = move_to(
            target,
            config,
            pid=pid,
            force=force,
            freeze_dispatcher=not no_freeze,
            backend_name=backend,
            mode=mode,
            quiesce=quiesce,
        ).to_json()
        result["proof"] = (result.get("evidence", {}).get("gpus") or {}).get("how", "")
        logger.info("\n" + toggle_table(result))
    if as_json:
        click.echo(json.dumps(result))


def main() -> None:
    cli(prog_name="cuda-toggle-all")


if __name__ == "__main__":
    main()
