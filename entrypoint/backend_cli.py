"""Backend that runs NVIDIA's `cuda-checkpoint` binary, one process per call, each with a timeout."""

from __future__ import annotations

import subprocess

from .backends import STATES, BackendError
from .config import Config
from .processes import describe

NO_CUDA_MESSAGE = "initialization error"  # what the binary says for a PID without a CUDA context


class CliBackend:
    name = "cli"

    def __init__(self, config: Config):
        self.binary = config.cuda_checkpoint_bin
        self.op_timeout_s = config.op_timeout_s
        self.state_timeout_s = config.state_timeout_s

    def _run(self, op: str, pid: int, args: list[str], timeout_s: float) -> str:
        command = [self.binary, *args, "--pid", str(pid)]
        try:
            # A session of its own: a Ctrl-C at the terminal goes to the tool's process group, and must not
            # kill a checkpoint or restore half-way (the driver does not roll those back); the tool defers
            # the signal and finishes or undoes the phase itself.
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, check=False, start_new_session=True
            )
        except subprocess.TimeoutExpired:
            raise BackendError(op, pid, f"{' '.join(command)} did not return in {timeout_s:g} s", timed_out=True)
        except OSError as error:
            raise BackendError(op, pid, f"cannot run {self.binary}: {error}")
        if done.returncode != 0:
            message = done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}"
            raise BackendError(op, pid, message)
        return done.stdout

    def get_state(self, pid: int) -> str | None:
        try:
            output = self._run("get-state", pid, ["--get-state"], self.state_timeout_s)
        except BackendError as error:
            if NO_CUDA_MESSAGE in error.message or describe(pid) is None:
                return None
            raise
        state = output.strip().lower()
        if state not in STATES:
            raise BackendError("get-state", pid, f"unexpected answer {output.strip()!r}")
        return state

    def lock(self, pid: int, timeout_ms: int) -> None:
        self._run(
            "lock",
            pid,
            ["--action", "lock", "--timeout", str(timeout_ms)],
            timeout_ms / 1000.0 + self.state_timeout_s,
        )

    def checkpoint(self, pid: int) -> None:
        self._run("checkpoint", pid, ["--action", "checkpoint"], self.op_timeout_s)

    def restore(self, pid: int) -> None:
        self._run("restore", pid, ["--action", "restore"], self.op_timeout_s)

    def unlock(self, pid: int) -> None:
        self._run("unlock", pid, ["--action", "unlock"], self.state_timeout_s)

    def toggle(self, pid: int) -> None:
        """The seed's blind toggle (kept for the benchmark that compares against it)."""
        self._run("toggle", pid, ["--toggle"], self.op_timeout_s)
