"""What one suspend or resume did and observed: a record per PID, and the evidence the verdict rests on.

The exit code and `--json` output are derived from these records; `ok` is set only from what was read
back (CUDA states, GPU memory, vLLM's own flags, a completion), never from the steps that were attempted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import ExitCode


@dataclass
class PidResult:
    pid: int
    name: str
    role: str  # "model" (holds GPU memory), "context" (a CUDA context without memory of its own)
    before: str | None
    after: str | None = None
    seconds: float = 0.0
    error: str = ""
    gpu_mib: int | None = None  # the process's own GPU memory before the transition, where it can be seen


@dataclass
class ToggleResult:
    target: str
    ok: bool = False
    exit_code: int = int(ExitCode.OK)
    error: str = ""
    root_pid: int | None = None
    root_how: str = ""
    backend: str = ""
    mode: str = "plain"  # plain, or hybrid (vLLM slept at level 1 before the checkpoint)
    # How nothing could send work to a process while it was not running: "scheduler" (vLLM's own
    # /pause or /sleep with mode=keep), "sigstop" (the dispatcher frozen: older vLLM), or "none".
    quiesce: str = "none"
    server: dict = field(default_factory=dict)  # Capabilities.to_json(): version, pause, sleep
    seconds: float = 0.0
    pids: list[PidResult] = field(default_factory=list)
    dispatchers: list[dict] = field(default_factory=list)  # {pid, name, frozen_before, frozen_after}
    skipped: list[dict] = field(default_factory=list)  # {pid, name, reason}
    phases: dict[str, float] = field(default_factory=dict)
    lock_rounds: int = 0
    refusals: list[str] = field(default_factory=list)
    forced: bool = False
    interrupted: str = ""
    gpus_before: list[dict] = field(default_factory=list)
    gpus_after: list[dict] = field(default_factory=list)
    gpu_source: str = ""
    # What the verdict rests on, read back after the transition: {"states": {pid: state},
    # "gpus": [GPU proof], "vllm": {"is_paused", "is_sleeping"}, "probe": {...}, "dead": [...]}
    evidence: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)  # PIDs whose call had not returned when the run ended

    def record(self, pid: int) -> PidResult:
        return next(r for r in self.pids if r.pid == pid)

    def to_json(self) -> dict:
        return asdict(self)
