"""The one place that turns the outcome of a console script into its exit code.

Every console script is a `click.command(cls=ExitCodeCommand)`: the command's return value (an ExitCode, or
None for 0) is its exit code; a ToolError prints its message and exits with its code (after the script's
own failure rendering, e.g. its JSON result); click's usage errors exit 2 (click's own); Ctrl-C exits 130;
anything else is a bug, said in one line (the traceback only with -v) with its own code. The class, not a
wrapper around `main()`, so that click's test runner sees the same exit codes as a shell.
"""

from __future__ import annotations

from collections.abc import Callable

import click
from loguru import logger

from .errors import ExitCode, ToolError

# Renders a failure the way the script's output promises (its JSON on stdout, its table), from the parsed
# parameters; the message itself is already logged.
FailureRenderer = Callable[[ToolError, dict], None]


class ExitCodeCommand(click.Command):
    """A click command whose every outcome leaves as an ExitCode, never as a traceback unasked."""

    def __init__(self, *args, render_failure: FailureRenderer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.render_failure = render_failure

    def invoke(self, ctx: click.Context) -> None:
        try:
            code = int(super().invoke(ctx) or ExitCode.OK)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise  # click's own outcomes (--help, usage errors) keep click's codes
        except KeyboardInterrupt:
            logger.error("interrupted (Ctrl-C)")
            code = int(ExitCode.INTERRUPTED)
        except ToolError as failure:
            logger.error(failure.message)
            if self.render_failure is not None:
                self.render_failure(failure, ctx.params)
            code = int(failure.exit_code)
        except Exception as error:  # a bug: one line for the user, the traceback for whoever runs it with -v
            if ctx.params.get("verbose"):
                logger.opt(exception=error).debug("the unexpected error's traceback")
            what = " ".join(f"{type(error).__name__}: {error}".split())[:500]
            logger.error("unexpected error (a bug, please report it; run again with -v for the traceback): {}", what)
            code = int(ExitCode.UNEXPECTED)
        ctx.exit(code)
