"""The gate's counters, and their Prometheus text exposition (format 0.0.4) for GET /gate/metrics.

Hand-written rather than prometheus_client: a dozen series, and the gate keeps its dependencies to
what vLLM's image already has.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from .paths import PathClass

TRANSITIONS = ("suspend", "resume", "sleep", "wake")
OUTCOMES = ("ok", "failed")
ERROR_REASONS = ("resume_failed", "upstream_unreachable", "body_refused", "connection_refused", "held")
PHASES = ("running", "suspending", "suspended", "resuming", "asleep")
# A resume takes about a second with the hybrid suspend, minutes for a large model without it.
WAIT_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class GateMetrics:
    requests: Counter = field(default_factory=Counter)  # PathClass value -> count
    errors: Counter = field(default_factory=Counter)  # reason -> count of answers the gate made itself
    transitions: Counter = field(default_factory=Counter)  # (transition, outcome) -> count
    transition_seconds: Counter = field(default_factory=Counter)  # (transition, outcome) -> seconds
    wait_bucket_counts: list[int] = field(default_factory=lambda: [0] * len(WAIT_BUCKETS_S))
    waited_requests: int = 0
    waited_seconds: float = 0.0

    def count_request(self, path_class: PathClass) -> None:
        self.requests[path_class.value] += 1

    def count_error(self, reason: str) -> None:
        self.errors[reason] += 1

    def record_transition(self, transition: str, ok: bool, seconds: float) -> None:
        key = (transition, "ok" if ok else "failed")
        self.transitions[key] += 1
        self.transition_seconds[key] += seconds

    def record_wait(self, seconds: float) -> None:
        """A request that had to wait for a transition before it could be forwarded (or answered 503)."""
        self.waited_requests += 1
        self.waited_seconds += seconds
        first_bucket = bisect.bisect_left(WAIT_BUCKETS_S, seconds)
        for index in range(first_bucket, len(WAIT_BUCKETS_S)):
            self.wait_bucket_counts[index] += 1

    def render(self, *, phase: str, in_flight: int, waiting: int) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("vllm_gate_requests_total", "counter", "Requests received, by how the gate treats their path.")
        for path_class in PathClass:
            count = self.requests[path_class.value]
            out.append(f'vllm_gate_requests_total{{path_class="{path_class.value}"}} {count}')
        family("vllm_gate_errors_total", "counter", "Requests refused with 502, 503 or 413 by the gate itself.")
        for reason in ERROR_REASONS:
            out.append(f'vllm_gate_errors_total{{reason="{reason}"}} {self.errors[reason]}')
        family("vllm_gate_transitions_total", "counter", "Suspends and resumes run by the gate, by outcome.")
        # Every (transition, outcome) pair with its labels; each family lists them all, zeros included.
        series = [
            ((transition, outcome), f'transition="{transition}",outcome="{outcome}"')
            for transition in TRANSITIONS
            for outcome in OUTCOMES
        ]
        for key, labels in series:
            out.append(f"vllm_gate_transitions_total{{{labels}}} {self.transitions[key]}")
        family("vllm_gate_transition_seconds", "summary", "Duration of the gate's suspends and resumes.")
        for key, labels in series:
            out.append(f"vllm_gate_transition_seconds_sum{{{labels}}} {self.transition_seconds[key]:.6f}")
            out.append(f"vllm_gate_transition_seconds_count{{{labels}}} {self.transitions[key]}")
        family("vllm_gate_waited_requests_total", "counter", "Requests that waited for a suspend or resume.")
        out.append(f"vllm_gate_waited_requests_total {self.waited_requests}")
        family("vllm_gate_waited_seconds_total", "counter", "Seconds requests spent waiting, all together.")
        out.append(f"vllm_gate_waited_seconds_total {self.waited_seconds:.6f}")
        family("vllm_gate_request_wait_seconds", "histogram", "How long requests that had to wait waited.")
        for bound, count in zip(WAIT_BUCKETS_S, self.wait_bucket_counts, strict=True):
            out.append(f'vllm_gate_request_wait_seconds_bucket{{le="{bound}"}} {count}')
        out.append(f'vllm_gate_request_wait_seconds_bucket{{le="+Inf"}} {self.waited_requests}')
        out.append(f"vllm_gate_request_wait_seconds_sum {self.waited_seconds:.6f}")
        out.append(f"vllm_gate_request_wait_seconds_count {self.waited_requests}")
        family(
            "vllm_gate_in_flight",
            "gauge",
            "Requests forwarded to vLLM and not finished (passive paths aside).",
        )
        out.append(f"vllm_gate_in_flight {in_flight}")
        family("vllm_gate_waiting", "gauge", "Requests waiting for a suspend or resume to finish.")
        out.append(f"vllm_gate_waiting {waiting}")
        family("vllm_gate_suspended", "gauge", "1 while the server is suspended (its GPUs handed back).")
        out.append(f"vllm_gate_suspended {1 if phase == 'suspended' else 0}")
        family("vllm_gate_state", "gauge", "1 for the state the server is in now.")
        for name in PHASES:
            out.append(f'vllm_gate_state{{state="{name}"}} {1 if phase == name else 0}')
        return "\n".join(out) + "\n"
