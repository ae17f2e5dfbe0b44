"""The one error type for expected failures, and the exit codes it maps to (in exactly one place)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of `cuda-toggle-all` and `selftest` (listed in --help and the README)."""

    OK = 0
    USAGE = 2  # bad option or bad environment variable (click uses 2 as well)
    SERVER_NOT_FOUND = 3  # no vLLM server process, or more than one and no way to choose
    NO_CUDA_PROCESSES = 4  # the server's tree has no process with a CUDA context
    REFUSED = 5  # a safety check refused; nothing was changed
    TRANSITION_FAILED = 6  # the transition failed and was rolled back: every process is as before
    INCONSISTENT = 7  # failed and could not roll back: processes are in mixed or failed states
    BUSY = 8  # another cuda-toggle-all holds the lock
    MEMORY_KEPT = 9  # every process read checkpointed, but a GPU kept the server's memory: undone
    # selftest only
    NOT_READY = 10  # the server did not become ready in time
    MODEL_NOT_SERVED = 11  # the model id is not listed by /v1/models
    CHAT_FAILED = 12  # a chat completion failed or came back empty
    NOT_SUSPENDED = 13  # after suspend, a process is not checkpointed or a GPU still holds memory
    NOT_RESUMED = 14  # after resume, a process is not running or the memory did not come back
    INFLIGHT_LOST = 16  # the request sent while suspended was not answered after resume
    INFLIGHT_CUT = 17  # the request running across the suspend was aborted, cut short, or not in flight
    LOGPROBS_DIFFER = 18  # a request run alone after resume differs from before (tokens or logprobs)
    LOGPROBS_UNFIT = 19  # the reference logprobs are missing, not finite or all equal: no fair comparison
    INTERRUPTED = 130  # SIGINT or SIGTERM arrived before anything changed: nothing was done (128 + SIGINT)

    @property
    def meaning(self) -> str:
        return EXIT_CODE_MEANINGS[self]


EXIT_CODE_MEANINGS = {
    ExitCode.OK: "done",
    ExitCode.USAGE: "bad option or environment variable",
    ExitCode.SERVER_NOT_FOUND: "server not found (or several candidates)",
    ExitCode.NO_CUDA_PROCESSES: "no CUDA processes in the server's tree",
    ExitCode.REFUSED: "refused by a safety check; nothing changed",
    ExitCode.TRANSITION_FAILED: "transition failed, rolled back",
    ExitCode.INCONSISTENT: "left inconsistent: could not roll back (restart the server)",
    ExitCode.BUSY: "busy: another cuda-toggle-all is running",
    ExitCode.MEMORY_KEPT: "a GPU kept the server's memory after the checkpoint; undone, server running",
    ExitCode.NOT_READY: "server not ready in time",
    ExitCode.MODEL_NOT_SERVED: "model not served",
    ExitCode.CHAT_FAILED: "chat completion failed or empty",
    ExitCode.NOT_SUSPENDED: "suspend not proven (state or GPU memory)",
    ExitCode.NOT_RESUMED: "resume not proven (state or GPU memory)",
    ExitCode.INFLIGHT_LOST: "request sent while suspended was lost",
    ExitCode.INFLIGHT_CUT: "request in flight at the suspend was aborted or cut short",
    ExitCode.LOGPROBS_DIFFER: "request run alone after resume differs by tokens or logprobs",
    ExitCode.LOGPROBS_UNFIT: "reference logprobs missing, not finite or all equal",
    ExitCode.INTERRUPTED: "interrupted (SIGINT/SIGTERM) before anything changed; nothing was done",
}

TOGGLE_EXIT_CODES = [code for code in ExitCode if code < ExitCode.NOT_READY or code == ExitCode.INTERRUPTED]


class SuspendError(Exception):
    """An expected failure: a message for the user (naming the fix) and the exit code it maps to."""

    def __init__(self, message: str, exit_code: ExitCode, result: object = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.result = result  # the ToggleResult / selftest report, when one exists


def exit_codes_help(codes: list[ExitCode]) -> str:
    """A table for --help (click keeps lines after a \\b marker as they are)."""
    lines = ["\b", "Exit codes:"]
    lines += [f"  {int(code):>2}  {code.meaning}" for code in codes]
    return "\n".join(lines)
