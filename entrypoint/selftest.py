"""`selftest`: prove suspend and resume on a running server (the CLI; the run is in cycle/run.py).

Every option is checked before anything is sent or changed: a bad one exits 2 with a message naming
the fix, never after a wait or a suspend.
"""

from __future__ import annotations

import json
import math
import os
from urllib.parse import urlsplit

import click
from loguru import logger

from .base.cli_exit import ExitCodeCommand
from .base.config import load_config, settings_help
from .base.errors import SELFTEST_EXIT_CODES, ExitCode, ToolError, exit_codes_help
from .base.render import setup_logging
from .cycle.report import render
from .cycle.run import Options, Selftest

DAY_S = 86400


class Bounded(click.ParamType):
    """A finite number within [minimum, maximum]: NaN, infinities and out-of-range values exit 2."""

    def __init__(self, kind: type, minimum: float, maximum: float, unit: str = ""):
        self.kind, self.minimum, self.maximum, self.unit = kind, minimum, maximum, unit
        self.name = "integer" if kind is int else "number"

    @property
    def allowed(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        return f"{noun} from {self.minimum} to {self.maximum}" + (f" ({self.unit})" if self.unit else "")

    def convert(self, value, param, ctx):
        if isinstance(value, self.kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = self.kind(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not {self.allowed.split(' from ')[0]}: give {self.allowed}", param, ctx)
        if not math.isfinite(number) or not self.minimum <= number <= self.maximum:
            self.fail(f"{value!r} is out of bounds: give {self.allowed}", param, ctx)
        return number


class HttpUrl(click.ParamType):
    """http(s)://host[:port], nothing else: a URL that cannot work fails at once, not after --timeout."""

    name = "url"

    def convert(self, value, param, ctx):
        text = str(value).strip().rstrip("/")
        fix = "give http://HOST[:PORT] or https://HOST[:PORT], e.g. http://127.0.0.1:8000"
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as error:
            self.fail(f"{value!r} is not a URL ({error}): {fix}", param, ctx)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(f"{value!r} is not an http(s) address with a host: {fix}", param, ctx)
        if parts.path or parts.query or parts.fragment or parts.username or port == 0:
            self.fail(f"{value!r} has more than a scheme, host and port: {fix}", param, ctx)
        return text


class ReportPath(click.ParamType):
    """A file to write the JSON report to, whose folder exists and is writable (checked before the run)."""

    name = "file"

    def convert(self, value, param, ctx):
        path = os.path.abspath(str(value))
        folder = os.path.dirname(path)
        if os.path.isdir(path):
            self.fail(
                f"{value!r} is a folder: give a file name in it, e.g. {os.path.join(str(value), 'selftest.json')}"
            )
        if not os.path.isdir(folder):
            self.fail(f"{value!r}: the folder {folder} does not exist: create it or choose another", param, ctx)
        existed = os.path.exists(path)
        try:  # the only sure test (root passes os.access, a read-only file system does not): open it
            open(path, "a").close()
            if not existed:
                os.remove(path)
        except OSError as error:
            problem = f"{value!r} cannot be written ({error.strerror})"
            self.fail(f"{problem}: choose a writable place (e.g. /tmp)", param, ctx)
        return path


EPILOG = "\n\n".join(
    [
        "\b\nExamples:\n  docker exec vllm-qwen3-8b-awq selftest\n  selftest --model qwen3-8b-awq --cycles 3 --json"
        " --report /root/.cache/selftest.json",
        exit_codes_help(SELFTEST_EXIT_CODES),
        settings_help(),
    ]
)


@click.command(
    cls=ExitCodeCommand,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.option(
    "--url",
    type=HttpUrl(),
    envvar="SELFTEST_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="Where requests go: the server, or the gate in front of it (env SELFTEST_URL).",
)
@click.option("--model", help="Served model id (default: the only one listed).")
@click.option(
    "--timeout",
    "timeout_s",
    type=Bounded(float, 1, DAY_S, "seconds"),
    default=1800,
    show_default=True,
    help="Seconds to wait for the server to become ready (a model load takes minutes), and for each answer.",
)
@click.option("--prompt", default="Say hello in one short sentence.", show_default=True, help="The chat reference.")
@click.option(
    "--max-tokens",
    type=Bounded(int, 1, 4096),
    default=32,
    show_default=True,
    help="Tokens of each reference request (compared by tokens and logprobs).",
)
@click.option("--seed", type=Bounded(int, 0, 2**31 - 1), default=0, show_default=True)
@click.option(
    "--memory-threshold-mib",
    "threshold_mib",
    type=Bounded(int, 0, 10**6, "MiB"),
    default=64,
    show_default=True,
    help="A suspended GPU must use at most this much.",
)
@click.option(
    "--inflight-tokens",
    type=Bounded(int, 16, 8192),
    default=400,
    show_default=True,
    help="Tokens of the request running across each suspend (ignore_eos): it must come back whole.",
)
@click.option(
    "--inflight-wait",
    "inflight_wait_s",
    type=Bounded(float, 0.1, 3600, "seconds"),
    default=2.0,
    show_default=True,
    help="Seconds the server stays suspended while requests wait (none may be answered meanwhile).",
)
@click.option(
    "--queued",
    type=Bounded(int, 0, 64),
    default=2,
    show_default=True,
    help="Requests sent straight to vLLM while suspended: they must wait and be answered after the resume.",
)
@click.option(
    "--gate-requests",
    type=Bounded(int, 0, 64),
    default=2,
    show_default=True,
    help="Behind a gate: requests sent through it while suspended; they make the gate resume the server.",
)
@click.option("--cycles", type=Bounded(int, 1, 1000), default=1, show_default=True, help="Suspend/resume cycles.")
@click.option(
    "--pid", type=Bounded(int, 1, 2**22), help="The server's root PID (default: as cuda-toggle-all finds it)."
)
@click.option("--backend", type=click.Choice(["auto", "cli", "driver"]), help="As cuda-toggle-all --backend.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")
@click.option("--report", "report_file", type=ReportPath(), help="Write the JSON report here.")
@click.option("-v", "--verbose", is_flag=True)
def cli(as_json: bool, report_file: str | None, verbose: bool, **settings: object) -> int:
    """Prove suspend and resume on this server, comparing what can fairly be compared.

    \b
    1. wait until /v1/models lists the model and a one-token completion succeeds
    2. references, run alone: greedy completions and a chat with per-token logprobs (top 5);
       every logprob finite and not all equal, or there is nothing to compare
    3. each cycle: a long request (ignore_eos) streams; suspend while it runs; every CUDA process
       checkpointed, every GPU of the server near 0 MiB; requests sent straight to vLLM must wait;
       resume (behind a gate: requests through it wake the server); everything running, memory back
    4. the request in flight finished whole (finish_reason length, every token, no abort), every
       request sent while suspended answered, the references run alone again identical by tokens
       and logprobs (requests that ran across the suspend are not compared bit for bit: vLLM
       recomputes or rebatches them, and it is not batch-invariant)
    5. a report: steps, per-cycle timings, quiesce path and mode, GPU memory (--json, --report FILE)

    On any failure after a suspend, the server is resumed before the report.
    """
    setup_logging(verbose)
    report = Selftest(Options(**settings), load_config()).run()
    data = report.to_json()
    if report_file:
        try:
            with open(report_file, "w") as handle:
                json.dump(data, handle, indent=2, default=str)  # the library's evidence may hold any value
        except OSError as error:  # checked before the run; the disk can still fill up or vanish meanwhile
            raise ToolError(f"could not write the report to {report_file}: {error}", ExitCode.USAGE)
    logger.info("\n" + render(report))
    if as_json:
        click.echo(json.dumps(data, default=str))
    return report.exit_code


def main() -> None:
    cli(prog_name="selftest")


if __name__ == "__main__":
    main()
