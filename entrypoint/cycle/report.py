"""selftest's report: the steps, each cycle's timings, GPU memory and evidence; JSON and a text table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MIB_PER_GB = 1000**3 / 2**20  # figures in GB (10^9 bytes), as GPU vendors use


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class GpuFigures:
    index: int
    uuid: str
    before_mib: int
    suspended_mib: int | None = None
    after_mib: int | None = None

    @property
    def released_gb(self) -> float:
        if self.suspended_mib is None:
            return 0.0
        return (self.before_mib - self.suspended_mib) / MIB_PER_GB

    def to_json(self) -> dict:
        return {**asdict(self), "released_gb": round(self.released_gb, 3)}


@dataclass
class Cycle:
    """One suspend/resume cycle: how it ran (mode, quiesce path), what it cost, and what proved it."""

    number: int
    mode: str = ""  # plain, or hybrid (vLLM slept first), as the library reports
    quiesce: str = ""  # scheduler (vLLM's /pause or /sleep, mode=keep), sigstop, or none
    server: dict = field(default_factory=dict)  # what the library found the server can do
    resumed_by: str = ""  # "selftest" (the library), or "gate" (woken by requests through the gate)
    suspend_s: float | None = None
    resume_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # the library's phases, suspend and resume
    sleep_s: float | None = None
    checkpoint_s: float | None = None
    restore_s: float | None = None
    wake_up_s: float | None = None
    lock_rounds: int = 0
    released_gb_per_gpu: float = 0.0
    suspend_gb_s_per_gpu: float | None = None
    resume_gb_s_per_gpu: float | None = None  # None where the gate resumed (its timing only)
    inflight_s: float | None = None  # the request running across the suspend, sent to answered
    queued_first_answer_s: float | None = None  # the first request sent while suspended, sent to answered
    gpus: list[GpuFigures] = field(default_factory=list)
    inflight: dict = field(default_factory=dict)
    queued: list[dict] = field(default_factory=list)
    checks: dict[str, dict] = field(default_factory=dict)  # check name -> its evidence
    evidence: dict[str, dict] = field(default_factory=dict)  # "suspend", "resume": the library's evidence

    def to_json(self) -> dict:
        data = asdict(self)
        data["gpus"] = [gpu.to_json() for gpu in self.gpus]
        return data


@dataclass
class Report:
    url: str
    vllm_url: str = ""  # vLLM's own address (requests sent while suspended go there)
    ok: bool = False
    exit_code: int = 0
    error: str = ""
    model: str = ""
    gate: bool = False
    steps: list[Step] = field(default_factory=list)
    references: dict[str, dict] = field(default_factory=dict)  # name -> evidence of the fairness check
    answer_before: str = ""  # the chat reference's text, before the first suspend
    answer_after: str = ""  # and after the last resume
    cycles: list[Cycle] = field(default_factory=list)
    gpus: list[GpuFigures] = field(default_factory=list)  # the last cycle's figures
    gpu_source: str = ""
    resumed_after_failure: str = ""

    def to_json(self) -> dict:
        data = asdict(self)
        data["cycles"] = [cycle.to_json() for cycle in self.cycles]
        data["gpus"] = [gpu.to_json() for gpu in self.gpus]
        return data


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def render(report: Report) -> str:
    lines = [f"{'STEP':<34} {'':<4} {'SECONDS':>8}  DETAIL"]
    for step in report.steps:
        detail = step.detail.replace("\n", " ")
        lines.append(f"{step.name:<34} {'ok' if step.ok else 'FAIL':<4} {step.seconds:>8.2f}  {detail[:110]}")
    for cycle in report.cycles:
        resumed = (
            f"resume {_seconds(cycle.resume_s)} ({cycle.resume_gb_s_per_gpu} GB/s per GPU)"
            if cycle.resumed_by == "selftest"
            else f"resumed by the gate in {_seconds(cycle.resume_s)}"
        )
        lines.append(
            f"cycle {cycle.number} ({cycle.mode or '?'}, quiesce {cycle.quiesce or '?'}):"
            f" {cycle.released_gb_per_gpu:.2f} GB per GPU freed; suspend {_seconds(cycle.suspend_s)}"
            f" ({cycle.suspend_gb_s_per_gpu} GB/s per GPU), {resumed}; request in flight"
            f" {_seconds(cycle.inflight_s)}, first request sent while suspended {_seconds(cycle.queued_first_answer_s)}"
        )
        if cycle.gpus:
            lines.append(
                "  GPU memory (MiB): "
                + "; ".join(
                    f"GPU{g.index} {g.before_mib} -> {g.suspended_mib} -> {g.after_mib} ({g.released_gb:.2f} GB freed)"
                    for g in cycle.gpus
                )
            )
    if any(cycle.mode == "hybrid" for cycle in report.cycles):
        lines.append("hybrid: vLLM's sleep drops the KV cache, so its GB/s is memory freed per second, not copied")
    if report.references:
        compared = sum(evidence.get("logprobs", 0) for evidence in report.references.values())
        lines.append(
            f"references: {len(report.references)} requests run alone, {compared} logprobs each time, "
            "compared exactly after every resume"
        )
    if report.resumed_after_failure:
        lines.append(f"after the failure: {report.resumed_after_failure}")
    verdict = "PASSED" if report.ok else f"FAILED: {report.error.splitlines()[0]} (exit {report.exit_code})"
    lines.append(f"selftest {verdict}")
    return "\n".join(lines)
