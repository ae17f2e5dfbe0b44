"""Every outcome of a console script leaves as its ExitCode: a real process runs a command built on
ExitCodeCommand (as the three scripts are) and is made to fail each way."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from entrypoint.base.errors import ExitCode
from tests.testing import REPO

PROBE = """
import time
import click
from entrypoint.base.cli_exit import ExitCodeCommand
from entrypoint.base.errors import ExitCode, ToolError
from entrypoint.base.render import setup_logging

def show_refusal_as_json(failure, params):
    if params["as_json"]:
        click.echo('{"refused": "%s"}' % failure.message)

@click.command(cls=ExitCodeCommand, render_failure=show_refusal_as_json)
@click.argument("outcome", type=click.Choice(["done", "bug", "refused", "not-ready", "waits"]))
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
def cli(outcome, as_json, verbose):
    setup_logging(verbose)
    if outcome == "bug":
        return {}["a key nobody set"]
    if outcome == "refused":
        raise ToolError("refused: the reason, naming the fix", ExitCode.REFUSED)
    if outcome == "not-ready":
        return ExitCode.NOT_READY
    if outcome == "waits":
        print("waiting", flush=True)
        time.sleep(30)

cli(prog_name="probe")
"""


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=REPO, timeout=30)


@pytest.mark.parametrize(
    "args, code", [(["done"], ExitCode.OK), (["not-ready"], ExitCode.NOT_READY), (["refused"], ExitCode.REFUSED)]
)
def test_a_commands_outcome_is_its_exit_code(args, code):
    """What the command returns, or the code of the ToolError it raises, is the process's exit code."""
    assert probe(*args).returncode == code


def test_an_expected_failure_prints_its_message_and_the_scripts_own_rendering():
    """A ToolError logs its message on stderr; the script's renderer still prints its JSON on stdout."""
    done = probe("refused", "--json")
    assert done.returncode == ExitCode.REFUSED
    assert "refused: the reason, naming the fix" in done.stderr
    assert done.stdout.strip() == '{"refused": "refused: the reason, naming the fix"}'


@pytest.mark.parametrize("args", [[], ["nonsense"], ["done", "--no-such-option"]])
def test_bad_usage_exits_2_without_a_traceback(args):
    """click's usage errors keep code 2 and its message, no traceback."""
    done = probe(*args)
    assert done.returncode == ExitCode.USAGE
    assert "Usage:" in done.stderr and "Traceback" not in done.stderr


def test_a_bug_is_one_line_with_a_hint_and_its_own_code():
    """An unexpected exception exits 70 with one line naming it and the hint; the traceback only with -v."""
    done = probe("bug")
    assert done.returncode == ExitCode.UNEXPECTED == 70
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unexpected error" in lines[0] and "KeyError" in lines[0] and "-v" in lines[0]
    verbose = probe("bug", "-v")
    assert verbose.returncode == ExitCode.UNEXPECTED
    assert "Traceback" in verbose.stderr and "a key nobody set" in verbose.stderr


def test_ctrl_c_exits_130():
    """SIGINT while the command runs exits 130 (128 + SIGINT) with one line, no traceback."""
    running = subprocess.Popen(
        [sys.executable, "-c", PROBE, "waits"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        # A suite started in the background inherits SIGINT ignored, and Python then keeps it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert running.stdout.readline().strip() == "waiting"
        running.send_signal(signal.SIGINT)
        _, stderr = running.communicate(timeout=10)
    finally:
        running.kill()
        running.wait()
    assert running.returncode == ExitCode.INTERRUPTED == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
