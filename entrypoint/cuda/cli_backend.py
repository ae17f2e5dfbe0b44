"""Backend that runs NVIDIA's `cuda-checkpoint` binary, one process per call.

A state read is killed after its timeout (it changes nothing). A call that changes a state is never
killed: the driver does not roll a checkpoint or restore back, so it runs to its end, journaled with
its child's PID (cuda/owned_calls.py) so that a run killed meanwhile leaves it owned.
"""

from __future__ import annotations

import contextlib
import subprocess

from ..base.config import Config
from ..base.processes import describe
from .backend import STATES, BackendError
from .owned_calls import OwnedOperation

NO_CUDA_MESSAGE = "initialization error"  # what the binary says for a PID without a CUDA context


class CliBackend:
    name = "cli"

    def __init__(self, config: Config):
        self.binary = config.cuda_checkpoint_bin
        self.run_dir = config.run_dir
        self.state_timeout_s = config.state_timeout_s

    def _run(self, op: str, pid: int, args: list[str], timeout_s: float | None) -> str:
        """Run the binary on `pid`; `timeout_s` None: an owned call, journaled and waited for to its end."""
        command = [self.binary, *args, "--pid", str(pid)]
        owned = timeout_s is None
        try:
            operation = OwnedOperation(self.run_dir, op, pid) if owned else contextlib.nullcontext()
            with operation:
                try:
                    # A session of its own: a Ctrl-C at the terminal goes to the tool's process group, and
                    # must not kill a checkpoint or restore half-way; the tool defers the signal and
                    # finishes or undoes the phase itself.
                    child = subprocess.Popen(
                        command,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        start_new_session=True,
                    )
                except OSError as error:
                    raise BackendError(op, pid, f"cannot run {self.binary}: {error}")
                if owned:
                    operation.record_child(child.pid)
                try:
                    stdout, stderr = child.communicate(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.communicate()
                    raise BackendError(
                        op, pid, f"{' '.join(command)} did not return in {timeout_s:g} s", timed_out=True
                    )
        except OSError as error:  # the journal entry could not be written: the call was not made
            raise BackendError(op, pid, f"not started: cannot journal it in {self.run_dir}: {error}")
        if child.returncode != 0:
            message = stderr.strip() or stdout.strip() or f"exit code {child.returncode}"
            raise BackendError(op, pid, message)
        return stdout

    def get_state(self, pid: int, timeout_s: float | None = None) -> str | None:
        try:
            output = self._run("get-state", pid, ["--get-state"], timeout_s or self.state_timeout_s)
        except BackendError as error:
            if NO_CUDA_MESSAGE in error.message or describe(pid) is None:
                return None
            raise
        state = output.strip().lower()
        if state not in STATES:
            raise BackendError("get-state", pid, f"unexpected answer {output.strip()!r}")
        return state

    # The caller (cuda/parallel.py) bounds how long it waits for these; the call itself runs on.
    def lock(self, pid: int, timeout_ms: int) -> None:
        self._run("lock", pid, ["--action", "lock", "--timeout", str(timeout_ms)], None)

    def checkpoint(self, pid: int) -> None:
        self._run("checkpoint", pid, ["--action", "checkpoint"], None)

    def restore(self, pid: int) -> None:
        self._run("restore", pid, ["--action", "restore"], None)

    def unlock(self, pid: int) -> None:
        self._run("unlock", pid, ["--action", "unlock"], None)

    def toggle(self, pid: int) -> None:
        """The seed's blind toggle (kept for the benchmark that compares against it)."""
        self._run("toggle", pid, ["--toggle"], None)
