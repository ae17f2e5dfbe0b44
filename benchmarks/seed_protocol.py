"""The seed's suspend/resume algorithm (the project's starting scripts), over any Backend.

Kept as the baseline cuda-toggle-all is measured against, on the fake GPU (bench_toggle.py) and on real GPUs
(with the driver backend). It reproduces the seed on purpose, flaws included:

- it toggles blindly, one PID after the other: `cuda-checkpoint --toggle` flips running <-> checkpointed
  whatever the target is, so a second `suspend` resumes the server (and a second `resume` suspends it);
- an error of one toggle is ignored (the seed's `|| true`) and the next PID is toggled anyway;
- nothing freezes the dispatcher, and each PID is locked+checkpointed (or restored+unlocked) before the next
  one is touched, which can hang NCCL peers on real GPUs (docs/facts.md).

Two readings of the seed differ: its inline script toggles every PID once and prints the states once; its
prose says the helper re-toggles the PIDs not yet in the target on every verify attempt. The baseline here is
the blind toggle followed by the verify loop (re-reading only), which is what the inline script does plus the
prose's CUDA_TOGGLE_VERIFY_ATTEMPTS / CUDA_TOGGLE_VERIFY_SLEEP_S loop.
"""

from __future__ import annotations

import subprocess
import time
from collections import deque

from entrypoint.cuda.backend import Backend, BackendError

# What `cuda-checkpoint --toggle` does to a process in each state (as tests/fakes/cuda-checkpoint models the
# binary); a process in any other state cannot be toggled.
TOGGLE_FROM = {"running": "checkpointed", "checkpointed": "running"}


def seed_cuda_pids(backend: Backend, root_pid: int) -> list[int]:
    """The PIDs the seed would toggle: the root and every descendant (a BFS over `ps -e -o pid=,ppid=`) whose
    get-state answers running or checkpointed, asked one after the other, as the seed's bash loop does.

    Not entrypoint.base.processes.walk_tree, on purpose: the baseline pays what the seed paid (one `ps`, no
    titles or create times read), so the benchmark compares the seed's cost with the tool's."""
    listing = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in listing.splitlines():
        pid_text, ppid_text = line.split()
        children.setdefault(int(ppid_text), []).append(int(pid_text))
    seen: set[int] = set()
    queue = deque([root_pid])
    while queue:
        pid = queue.popleft()
        if pid in seen:
            continue
        seen.add(pid)
        queue.extend(children.get(pid, []))
    controllable = []
    for pid in sorted(seen):
        try:
            state = backend.get_state(pid)
        except BackendError:
            state = None  # the seed's `2>/dev/null || true`: an unreadable PID is simply not CUDA-controllable
        if state in TOGGLE_FROM:
            controllable.append(pid)
    return controllable


def _emulated_toggle(backend: Backend, pid: int, lock_timeout_ms: int) -> None:
    """`cuda-checkpoint --toggle` built from the four driver primitives, for backends without a binary."""
    state = backend.get_state(pid)
    if state == "running":
        backend.lock(pid, lock_timeout_ms)
        backend.checkpoint(pid)
    elif state == "checkpointed":
        backend.restore(pid)
        backend.unlock(pid)
    else:
        raise BackendError("toggle", pid, f"cannot toggle a process in state {state!r}")


def _read_states(backend: Backend, pids: list[int]) -> dict[int, str]:
    states = {}
    for pid in pids:  # one after the other: the seed runs `cuda-checkpoint --get-state` in a bash loop
        try:
            states[pid] = backend.get_state(pid) or "gone"
        except BackendError as error:
            states[pid] = f"error: {error.message}"
    return states


def seed_toggle_all(
    backend: Backend,
    pids: list[int],
    target: str,
    verify_attempts: int = 50,
    verify_sleep_s: float = 0.2,
    lock_timeout_ms: int = 0,
) -> dict:
    """Toggle each of `pids` in turn, then re-read their states until all are `target` (or attempts run out).

    `pids` must be exactly the PIDs to move (see seed_cuda_pids for the seed's own choice); `target` only
    decides when the verify loop stops, never what a toggle does. `lock_timeout_ms` applies where the toggle
    is emulated (backends without `toggle`); 0 means no timeout (CUDA's CUcheckpointLockArgs), which is what
    the binary gets from the seed, since the seed passes no `--timeout`.

    Returns {target, pids, seconds, toggle_seconds, verify_seconds, verify_reads, converged, states, errors,
    pid_seconds}; `states` and `errors` are keyed by PID.
    """
    began = time.monotonic()
    errors: dict[int, str] = {}
    pid_seconds: dict[int, float] = {}
    for pid in pids:
        pid_began = time.monotonic()
        try:
            if hasattr(backend, "toggle"):
                backend.toggle(pid)  # the real `cuda-checkpoint --toggle --pid N`
            else:
                _emulated_toggle(backend, pid, lock_timeout_ms)
        except BackendError as error:
            errors[pid] = error.message  # the seed's `|| true`: ignored, on to the next PID
        pid_seconds[pid] = time.monotonic() - pid_began
    toggled = time.monotonic()

    # The seed sleeps CUDA_TOGGLE_VERIFY_SLEEP_S "between attempts", and its inline script reads the states
    # right after the last toggle: so the first read comes at once and a sleep only precedes a retry.
    reads = 0
    states: dict[int, str] = {}
    for attempt in range(1, verify_attempts + 1):
        states = _read_states(backend, pids)
        reads = attempt
        if all(state == target for state in states.values()):
            break
        if attempt < verify_attempts:
            time.sleep(verify_sleep_s)
    finished = time.monotonic()
    return {
        "target": target,
        "pids": list(pids),
        "seconds": finished - began,
        "toggle_seconds": toggled - began,
        "verify_seconds": finished - toggled,
        "verify_reads": reads,
        "converged": all(state == target for state in states.values()),
        "states": states,
        "errors": errors,
        "pid_seconds": pid_seconds,
    }
