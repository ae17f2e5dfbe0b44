"""selftest's run: references alone, then cycles of suspend (a request in flight) and resume, with proof.

It drives the same library as `cuda-toggle-all` (not a subprocess) and talks to the server over HTTP.
Whatever fails after a suspend, the server is resumed before the report is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import requests
from loguru import logger

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..base.processes import describe
from ..base.results import ToggleResult
from ..cuda.gpus import read_gpus
from ..server.discovery import find_server
from ..server.vllm_control import VllmControl, server_url
from ..suspend.api import RESUME, SUSPEND, move_to
from ..suspend.status import status
from .checks import (
    SelftestFailure,
    fair_reference,
    held_while_suspended,
    inflight_whole,
    queued_answered,
    same_as_reference,
)
from .openai_client import ApiError, BackgroundRequest, OpenAIClient, TokenTrace
from .report import Cycle, GpuFigures, Report, Step

TOP_LOGPROBS = 5
COMPLETION_PROMPTS = ("The capital of France is", "def fibonacci(n):")
INFLIGHT_PROMPT = "selftest in flight: tell a long story about a lighthouse keeper."
QUEUED_PROMPT = "selftest sent while suspended, number {number}:"
QUEUED_MAX_TOKENS = 8
RESUME_BUSY_WAIT_S = 60.0  # how long the resume after a failure waits for another holder of the tool's lock
RESUMED_SHARE = 0.9  # after a resume each GPU must hold at least this share of what it held before


@dataclass(frozen=True)
class Options:
    url: str
    model: str | None
    timeout_s: float
    prompt: str
    max_tokens: int
    seed: int
    threshold_mib: int
    inflight_tokens: int
    inflight_wait_s: float
    queued: int
    gate_requests: int
    cycles: int
    pid: int | None
    backend: str | None


class Selftest:
    def __init__(self, options: Options, config: Config):
        self.options = options
        self.config = config
        self.client = OpenAIClient(options.url, request_timeout_s=options.timeout_s)
        self.report = Report(url=options.url)
        self.references: dict[str, TokenTrace] = {}
        self.suspended = False

    # bookkeeping ----------------------------------------------------------------------------------------
    def step(self, name: str, began: float, detail: str, ok: bool = True) -> None:
        seconds = time.monotonic() - began
        self.report.steps.append(Step(name, ok, round(seconds, 3), detail))
        logger.log("INFO" if ok else "ERROR", "{} {}: {} ({:.2f} s)", "ok  " if ok else "FAIL", name, detail, seconds)

    def checked(self, name: str, began: float, check, *args) -> dict:
        """Run a check; log it as a step either way and return its evidence."""
        try:
            evidence = check(*args)
        except SelftestFailure as failure:
            self.step(name, began, failure.message, ok=False)
            raise
        return evidence

    def fail(self, name: str, began: float, message: str, code: ExitCode) -> SelftestFailure:
        self.step(name, began, message, ok=False)
        return SelftestFailure(message, code)

    def library(self, target: str) -> ToggleResult:
        return move_to(target, self.config, pid=self.options.pid, backend_name=self.options.backend)

    # before the first suspend ---------------------------------------------------------------------------
    def wait_ready(self) -> None:
        began = time.monotonic()
        try:
            models, waited = self.client.wait_ready(self.options.model, self.options.timeout_s)
        except TimeoutError as error:
            raise self.fail(
                "wait for the server", began, f"{error}; see the server's log (docker compose logs)", ExitCode.NOT_READY
            )
        self.step("wait for the server", began, f"ready after {waited:.1f} s")
        began = time.monotonic()
        if self.options.model and self.options.model not in models:
            raise self.fail(
                "list models",
                began,
                f"{self.options.model!r} is not served; /v1/models lists {models}: pass one of them with --model",
                ExitCode.MODEL_NOT_SERVED,
            )
        if not self.options.model and len(models) != 1:
            raise self.fail(
                "list models",
                began,
                f"several models are served ({models}): choose one with --model",
                ExitCode.MODEL_NOT_SERVED,
            )
        self.report.model = self.options.model or models[0]
        self.step("list models", began, f"{self.report.model!r} served")

    def run_alone(self) -> dict[str, TokenTrace]:
        """The reference requests, one at a time with nothing else of ours in flight (see cycle/checks.py)."""
        model, options, traces = self.report.model, self.options, {}
        try:
            for number, prompt in enumerate(COMPLETION_PROMPTS, 1):
                traces[f"completion {number}"] = self.client.completion_trace(
                    model, prompt, options.max_tokens, TOP_LOGPROBS
                )
            traces["chat"] = self.client.chat_trace(
                model, options.prompt, options.max_tokens, TOP_LOGPROBS, options.seed
            )
        except ApiError as error:
            raise SelftestFailure(str(error), ExitCode.CHAT_FAILED)
        return traces

    def take_references(self) -> None:
        began = time.monotonic()
        try:
            self.references = self.run_alone()
        except SelftestFailure as failure:
            raise self.fail("references, run alone", began, failure.message, failure.exit_code)
        for name, trace in self.references.items():
            self.report.references[name] = self.checked("references, run alone", began, fair_reference, name, trace)
        self.report.answer_before = self.references["chat"].text
        compared = sum(e["logprobs"] for e in self.report.references.values())
        self.step(
            "references, run alone",
            began,
            f"{len(self.references)} greedy requests, {compared} logprobs, all finite and not all equal",
        )

    def find_vllm(self) -> None:
        """vLLM's own address, found as the library finds it, and whether a gate is in front of --url."""
        began = time.monotonic()
        try:
            root = find_server(self.config, self.options.pid)
        except ToolError as error:
            self.step("find the server", began, error.message, ok=False)
            raise
        process = describe(root.pid)
        if process is None:
            raise self.fail("find the server", began, f"PID {root.pid} is gone", ExitCode.SERVER_NOT_FOUND)
        self.report.vllm_url = server_url(process, self.config.server_url)
        self.report.gate = self.report.vllm_url.rstrip("/") != self.options.url.rstrip("/") and self.behind_gate()
        front = "a gate in front" if self.report.gate else "no gate in front"
        self.step("find the server", began, f"PID {root.pid} ({root.how}); vLLM at {self.report.vllm_url}, {front}")

    def behind_gate(self) -> bool:
        try:
            return requests.get(f"{self.options.url}/gate/status", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    # one cycle ------------------------------------------------------------------------------------------
    def background(self, url: str, prompt: str, max_tokens: int, label: str, **extra: object) -> BackgroundRequest:
        body = {"model": self.report.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        return BackgroundRequest(url, body, label, self.options.timeout_s).start()

    def start_inflight(self, cycle: Cycle) -> BackgroundRequest:
        """A long streamed request, running (its first token seen) before the suspend begins.

        Sent straight to vLLM, never through a gate: a gate resumes the server at once when a suspend
        catches requests it forwards in flight (so they are not held), which would undo this very test."""
        began = time.monotonic()
        inflight = self.background(
            self.report.vllm_url,
            INFLIGHT_PROMPT,
            self.options.inflight_tokens,
            "the request in flight",
            stream=True,
            stream_options={"include_usage": True},
            ignore_eos=True,  # every token is generated: a whole answer has exactly max_tokens
        )
        inflight.first_token.wait(self.options.timeout_s)
        if inflight.outcome.first_token_at is None:
            raise self.fail(
                f"request in flight #{cycle.number}",
                began,
                f"it never started: {inflight.outcome.error or 'no token in time'}",
                ExitCode.INFLIGHT_CUT,
            )
        return inflight

    def gpu_figures(self) -> dict[str, int]:
        reading = read_gpus(self.config)
        self.report.gpu_source = reading.source if reading.gpus else reading.problem
        return {gpu.uuid: gpu.used_mib for gpu in reading.gpus}

    def suspend(self, cycle: Cycle) -> float:
        """Suspend with the library and prove it; returns when the library said it was done."""
        name, began = f"suspend #{cycle.number}", time.monotonic()
        before = read_gpus(self.config)
        self.report.gpu_source = before.source if before.gpus else before.problem
        cycle.gpus = [
            GpuFigures(g.index, g.uuid, g.used_mib) for g in before.gpus if g.used_mib > self.options.threshold_mib
        ]
        self.report.gpus = cycle.gpus  # the report's figures are the latest cycle's
        try:
            result = self.library(SUSPEND)
        except ToolError as error:
            if isinstance(error.result, ToggleResult):  # what the library tried and saw, for the report
                cycle.mode, cycle.quiesce, cycle.server = error.result.mode, error.result.quiesce, error.result.server
                cycle.evidence["suspend"] = error.result.evidence
            self.step(name, began, error.message, ok=False)
            raise
        self.suspended = True
        suspended_at = time.monotonic()
        cycle.mode, cycle.quiesce, cycle.server = result.mode, result.quiesce, result.server
        cycle.suspend_s = round(result.seconds, 3)
        cycle.phases.update({f"suspend_{key}": round(value, 3) for key, value in result.phases.items()})
        cycle.sleep_s = round(result.phases.get("sleep", 0.0), 3)
        cycle.checkpoint_s = round(result.phases.get("checkpoint", 0.0), 3)
        cycle.lock_rounds = result.lock_rounds
        cycle.evidence["suspend"] = result.evidence
        cycle.checks["suspended"] = self.prove_suspended(name, began, cycle, result)
        per_gpu = sum(g.released_gb for g in cycle.gpus) / len(cycle.gpus)
        cycle.released_gb_per_gpu = round(per_gpu, 3)
        cycle.suspend_gb_s_per_gpu = round(per_gpu / result.seconds, 3) if result.seconds else None
        self.step(
            name,
            began,
            f"{cycle.mode}, quiesce {cycle.quiesce}: {len(result.pids)} CUDA processes checkpointed in "
            f"{result.seconds:.2f} s; "
            + ", ".join(f"GPU{g.index} {g.before_mib} -> {g.suspended_mib} MiB" for g in cycle.gpus),
        )
        return suspended_at

    def read_back(self, expected: str) -> tuple[list[int], list[str], list[int]]:
        """The server's CUDA processes read now: their PIDs, those not `expected` ("PID state"), frozen dispatchers."""
        states = status(self.config, pid=self.options.pid, backend_name=self.options.backend)
        wrong = [f"{p['pid']} {p['state']}" for p in states.pids if p["state"] != expected]
        frozen = [d["pid"] for d in states.dispatchers if d["frozen"]]
        return [p["pid"] for p in states.pids], wrong, frozen

    def prove_suspended(self, name: str, began: float, cycle: Cycle, result: ToggleResult) -> dict:
        """Read it back ourselves: every CUDA process checkpointed, every GPU the server used near 0 MiB."""
        pids, not_checkpointed, frozen = self.read_back("checkpointed")
        if not_checkpointed:
            raise self.fail(name, began, f"not checkpointed: {', '.join(not_checkpointed)}", ExitCode.NOT_SUSPENDED)
        if cycle.quiesce == "sigstop" and not frozen:
            raise self.fail(name, began, "the sigstop path ran but no dispatcher is frozen", ExitCode.NOT_SUSPENDED)
        if not cycle.gpus:
            raise self.fail(
                name,
                began,
                f"no GPU held more than {self.options.threshold_mib} MiB before the suspend: nothing to prove "
                f"({self.report.gpu_source})",
                ExitCode.NOT_SUSPENDED,
            )
        now = self.gpu_figures()
        for gpu in cycle.gpus:
            gpu.suspended_mib = now.get(gpu.uuid)
        kept = [
            f"GPU{g.index} {g.suspended_mib} MiB"
            for g in cycle.gpus
            if (g.suspended_mib or 0) > self.options.threshold_mib
        ]
        if kept or any(g.suspended_mib is None for g in cycle.gpus):
            raise self.fail(
                name,
                began,
                f"GPU memory not released: {', '.join(kept) or 'a GPU is gone'} (threshold "
                f"{self.options.threshold_mib} MiB, --memory-threshold-mib)",
                ExitCode.NOT_SUSPENDED,
            )
        return {
            "checkpointed": pids,
            "frozen_dispatchers": frozen,
            "gpus_mib": {f"GPU{g.index}": g.suspended_mib for g in cycle.gpus},
        }

    def hold_requests(self, cycle: Cycle, inflight: BackgroundRequest) -> list[BackgroundRequest]:
        """Requests straight to vLLM while suspended (sent without waiting): they must wait, not fail."""
        name, began = f"requests while suspended #{cycle.number}", time.monotonic()
        queued = [
            self.background(
                self.report.vllm_url,
                QUEUED_PROMPT.format(number=number),
                QUEUED_MAX_TOKENS,
                f"request {number} straight to vLLM",
            )
            for number in range(1, self.options.queued + 1)
        ]
        time.sleep(self.options.inflight_wait_s)
        outcomes = [request.outcome for request in queued]
        cycle.checks["held"] = self.checked(
            name, began, held_while_suspended, inflight.outcome, outcomes, began, time.monotonic()
        )
        self.step(
            name,
            began,
            f"{len(queued)} sent to {self.report.vllm_url}; all waiting after {self.options.inflight_wait_s:g} s, "
            "and the request in flight got no token",
        )
        return queued

    def resume(self, cycle: Cycle) -> tuple[list[BackgroundRequest], float]:
        """Resume: through the gate when there is one (its requests wake the server), else with the library.

        Returns the requests sent through the gate, and the moment the server was resumed from a client's
        view (the library returned, or the requests that woke it were sent)."""
        name, began = f"resume #{cycle.number}", time.monotonic()
        resumed_from = began
        if self.report.gate and self.options.gate_requests:
            woken = [
                self.background(
                    self.options.url,
                    QUEUED_PROMPT.format(number=f"g{n}"),
                    QUEUED_MAX_TOKENS,
                    f"request {n} through the gate",
                )
                for n in range(1, self.options.gate_requests + 1)
            ]
            for request in woken:
                request.join(self.options.timeout_s)
            cycle.checks["woken"] = self.checked(
                name, began, queued_answered, [request.outcome for request in woken], began
            )
            cycle.resumed_by = "gate"
            cycle.resume_s = self.gate_resume_seconds()
        else:
            woken = []
            try:
                result = self.library(RESUME)
            except ToolError as error:
                self.step(name, began, error.message, ok=False)
                raise
            resumed_from = time.monotonic()
            cycle.resumed_by = "selftest"
            cycle.resume_s = round(result.seconds, 3)
            cycle.phases.update({f"resume_{key}": round(value, 3) for key, value in result.phases.items()})
            cycle.restore_s = round(result.phases.get("restore", 0.0), 3)
            cycle.wake_up_s = round(result.phases.get("wake_up", 0.0), 3)
            cycle.evidence["resume"] = result.evidence
            per_gpu = sum(g.released_gb for g in cycle.gpus) / len(cycle.gpus)
            cycle.resume_gb_s_per_gpu = round(per_gpu / result.seconds, 3) if "restore" in result.phases else None
        cycle.checks["resumed"] = self.prove_resumed(name, began, cycle)
        self.suspended = False
        self.step(
            name,
            began,
            f"running again ({'woken by the gate' if woken else 'the library'}, {_text(cycle.resume_s)} s); "
            + ", ".join(f"GPU{g.index} {g.after_mib} MiB" for g in cycle.gpus),
        )
        return woken, resumed_from

    def gate_resume_seconds(self) -> float | None:
        try:
            value = requests.get(f"{self.options.url}/gate/status", timeout=5).json().get("last_resume_s")
        except (requests.RequestException, ValueError, AttributeError):
            return None
        return round(value, 3) if isinstance(value, (int, float)) else None

    def prove_resumed(self, name: str, began: float, cycle: Cycle) -> dict:
        """Every process running, nothing frozen, the memory back, and vLLM neither paused nor asleep."""
        pids, not_running, frozen = self.read_back("running")
        if not_running or frozen:
            raise self.fail(
                name, began, f"not running: {not_running or 'none'}; frozen: {frozen or 'none'}", ExitCode.NOT_RESUMED
            )
        now = self.gpu_figures()
        for gpu in cycle.gpus:
            gpu.after_mib = now.get(gpu.uuid)
        missing = [
            f"GPU{g.index} {g.after_mib} of {g.before_mib} MiB"
            for g in cycle.gpus
            if (g.after_mib or 0) < RESUMED_SHARE * g.before_mib
        ]
        if missing:
            raise self.fail(name, began, f"GPU memory did not come back: {', '.join(missing)}", ExitCode.NOT_RESUMED)
        control = VllmControl(self.report.vllm_url, self.options.timeout_s)
        flags = {"is_paused": control.is_paused(), "is_sleeping": control.is_sleeping()}
        held = [flag for flag, value in flags.items() if value]
        if held:
            raise self.fail(name, began, f"vLLM still answers {', '.join(held)} true", ExitCode.NOT_RESUMED)
        return {"running": pids, "vllm": flags}

    def cycle(self, number: int) -> None:
        cycle = Cycle(number)
        self.report.cycles.append(cycle)
        inflight = self.start_inflight(cycle)
        suspend_began = time.monotonic()
        suspended_at = self.suspend(cycle)
        queued = self.hold_requests(cycle, inflight)
        woken, resumed_from = self.resume(cycle)

        name, began = f"answers after resume #{number}", time.monotonic()
        for request in [inflight, *queued, *woken]:
            request.join(self.options.timeout_s)
        cycle.inflight = inflight.outcome.to_json()
        cycle.queued = [request.outcome.to_json() for request in [*queued, *woken]]
        cycle.inflight_s = cycle.inflight["seconds"]
        # The request that ran across the suspend must be whole, not equal to an undisturbed run: vLLM
        # preempts and recomputes it under /sleep?mode=keep, or batches it with newcomers after /pause, and
        # is not batch-invariant, so its tokens may fairly differ (the references below are compared exactly).
        cycle.checks["inflight"] = self.checked(
            name, began, inflight_whole, inflight.outcome, self.options.inflight_tokens, suspend_began, suspended_at
        )
        cycle.checks["queued"] = self.checked(
            name, began, queued_answered, [request.outcome for request in [*queued, *woken]], resumed_from
        )
        cycle.queued_first_answer_s = cycle.checks["queued"]["first_answer_s"]
        self.step(
            name,
            began,
            f"in flight: {cycle.checks['inflight']['completion_tokens']} tokens, whole; "
            f"{len(queued) + len(woken)} sent while suspended: all answered",
        )
        self.compare_references(number)

    def compare_references(self, number: int) -> None:
        # Run alone again (everything above has been answered): the only requests compared bit for bit.
        name, began = f"references again #{number}", time.monotonic()
        try:
            again = self.run_alone()
        except SelftestFailure as failure:
            raise self.fail(name, began, failure.message, failure.exit_code)
        compared = 0
        for key, trace in again.items():
            evidence = self.checked(name, began, same_as_reference, key, self.references[key], trace)
            self.report.cycles[-1].checks[f"same: {key}"] = evidence
            compared += evidence["logprobs"]
        self.report.answer_after = again["chat"].text
        self.step(name, began, f"{len(again)} requests: same tokens, {compared} logprobs identical")

    # the whole run --------------------------------------------------------------------------------------
    def run(self) -> Report:
        try:
            self.wait_ready()
            self.take_references()
            self.find_vllm()
            for number in range(1, self.options.cycles + 1):
                self.cycle(number)
            self.report.ok = True
        except ToolError as failure:
            self.report.error, self.report.exit_code = failure.message, int(failure.exit_code)
        finally:
            if self.suspended:
                self.resume_after_failure()
        return self.report

    def resume_after_failure(self) -> None:
        """Never leave the server suspended: resume before reporting, and say how that went."""
        logger.warning("resuming the server before reporting the failure")
        # Wait longer than usual for the tool's lock: a gate may be resuming the server at this moment.
        config = self.config.replace(busy_wait_s=max(self.config.busy_wait_s, RESUME_BUSY_WAIT_S))
        try:
            result = move_to(RESUME, config, pid=self.options.pid, backend_name=self.options.backend)
            self.report.resumed_after_failure = f"resumed ({result.seconds:.2f} s)"
        except ToolError as error:
            self.report.resumed_after_failure = f"resume failed too: {error.message}"
            logger.error(self.report.resumed_after_failure)
        self.suspended = False


def _text(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.2f}"
