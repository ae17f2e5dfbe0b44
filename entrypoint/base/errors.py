"""The one error type for expected failures, and the exit codes it maps to, each with its meaning once."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the console scripts: the one table that --help, the README and the tests read."""

    meaning: str

    def __new__(cls, value: int, meaning: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    OK = 0, "done"
    USAGE = 2, "bad option or environment variable"
    SERVER_NOT_FOUND = 3, "server not found (or several candidates)"
    NO_CUDA_PROCESSES = 4, "no CUDA processes in the server's tree"
    REFUSED = 5, "refused by a safety check; nothing changed"
    TRANSITION_FAILED = 6, "transition failed, rolled back"
    INCONSISTENT = 7, "left inconsistent: could not roll back (restart the server)"
    BUSY = 8, "busy: another cuda-toggle-all is running"
    MEMORY_KEPT = 9, "a GPU kept the server's memory after the checkpoint; undone, server running"
    # selftest only
    NOT_READY = 10, "server not ready in time"
    MODEL_NOT_SERVED = 11, "model not served"
    CHAT_FAILED = 12, "chat completion failed or empty"
    NOT_SUSPENDED = 13, "suspend not proven (state or GPU memory)"
    NOT_RESUMED = 14, "resume not proven (state or GPU memory)"
    INFLIGHT_LOST = 16, "request sent while suspended was lost"
    INFLIGHT_CUT = 17, "request in flight at the suspend was aborted or cut short"
    LOGPROBS_DIFFER = 18, "request run alone after resume differs by tokens or logprobs"
    LOGPROBS_UNFIT = 19, "reference logprobs missing, not finite or all equal"
    # 70 is sysexits' EX_SOFTWARE; Python's own 1 would be confused with a failure the code knows.
    UNEXPECTED = 70, "unexpected error (a bug): one line names it, -v shows the traceback"
    INTERRUPTED = 130, "interrupted (SIGINT/SIGTERM) before anything changed; nothing was done"  # 128 + SIGINT


# Every command can exit with these: its own success, a bad input, a bug, Ctrl-C.
COMMON_EXIT_CODES = [ExitCode.OK, ExitCode.USAGE, ExitCode.UNEXPECTED, ExitCode.INTERRUPTED]
TOGGLE_EXIT_CODES = sorted({*COMMON_EXIT_CODES, *(code for code in ExitCode if code < ExitCode.NOT_READY)})
SELFTEST_EXIT_CODES = list(ExitCode)  # its suspends and resumes are cuda-toggle-all's, plus its own checks
GATE_EXIT_CODES = COMMON_EXIT_CODES  # a failed suspend or resume is answered to the client, not an exit


class ToolError(Exception):
    """An expected failure of any of our tools (cuda-toggle-all, selftest, the gate): a message for the user
    (naming the fix) and the exit code it maps to."""

    def __init__(self, message: str, exit_code: ExitCode, result: object = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.result = result  # the ToggleResult / selftest report, when one exists


def exit_codes_help(codes: list[ExitCode]) -> str:
    """A table for --help (click keeps lines after a \\b marker as they are)."""
    lines = ["\b", "Exit codes:"]
    lines += [f"  {int(code):>3}  {code.meaning}" for code in codes]
    return "\n".join(lines)
