"""`selftest`: models -> chat -> suspend -> (request while suspended) -> resume -> chat, with proof.

Run inside the container (`docker exec <container> selftest`). It drives the same library as
`cuda-toggle-all` (not a subprocess) and talks to the server over HTTP. Whatever fails after the
suspend, the server is resumed before the report is written.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field

import click
import requests
from loguru import logger

from .config import Config, load_config, settings_help
from .errors import ExitCode, SuspendError, exit_codes_help
from .gpus import read_gpus
from .openai_client import ApiError, ChatAnswer, OpenAIClient
from .render import setup_logging
from .toggle import RESUME, SUSPEND, status, toggle

SELFTEST_EXIT_CODES = [c for c in ExitCode if c not in (ExitCode.USAGE,)]
MIB_PER_GB = 1000**3 / 2**20  # figures in GB (10^9 bytes), as GPU vendors and FACTS.md use


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
        return (self.before_mib - (self.suspended_mib or 0)) / MIB_PER_GB if self.suspended_mib is not None else 0.0


@dataclass
class Report:
    url: str
    ok: bool = False
    exit_code: int = 0
    error: str = ""
    model: str = ""
    gate: bool = False
    steps: list[Step] = field(default_factory=list)
    answer_before: str = ""
    answer_after: str = ""
    inflight_answer: str | None = None
    inflight_seconds: float | None = None
    cycles: list[dict] = field(default_factory=list)  # per cycle: suspend/resume seconds, GB, GB/s
    gpus: list[GpuFigures] = field(default_factory=list)
    gpu_source: str = ""
    resumed_after_failure: str = ""

    def to_json(self) -> dict:
        data = asdict(self)
        for gpu, figures in zip(data["gpus"], self.gpus, strict=True):
            gpu["released_gb"] = round(figures.released_gb, 3)
        return data


class SelftestFailure(SuspendError):
    pass


@dataclass(frozen=True)
class Options:
    url: str
    model: str | None
    timeout_s: float
    prompt: str
    max_tokens: int
    seed: int
    threshold_mib: int
    inflight: bool
    inflight_wait_s: float
    allow_different: bool
    cycles: int
    pid: int | None
    backend: str | None


class Selftest:
    def __init__(self, options: Options, config: Config):
        self.options = options
        self.config = config
        self.client = OpenAIClient(options.url)
        self.report = Report(url=options.url)
        self.suspended = False
        self.mode = "plain"  # of the last suspend: plain, or hybrid (vLLM slept first)

    def step(self, name: str, began: float, detail: str, ok: bool = True) -> None:
        seconds = time.monotonic() - began
        self.report.steps.append(Step(name, ok, round(seconds, 3), detail))
        logger.info("{} {}: {} ({:.2f} s)", "ok  " if ok else "FAIL", name, detail, seconds)

    def fail(self, name: str, began: float, message: str, code: ExitCode) -> SelftestFailure:
        self.step(name, began, message, ok=False)
        return SelftestFailure(message, code)

    # 1-3 ------------------------------------------------------------------------------------------------
    def wait_and_chat(self) -> None:
        began = time.monotonic()
        try:
            models, waited = self.client.wait_ready(self.options.model, self.options.timeout_s)
        except TimeoutError as error:
            raise self.fail(
                "wait for the server",
                began,
                f"{error}; see the server's log (docker compose logs)",
                ExitCode.NOT_READY,
            )
        self.step("wait for the server", began, f"ready after {waited:.1f} s")

        began = time.monotonic()
        if self.options.model:
            if self.options.model not in models:
                raise self.fail(
                    "list models",
                    began,
                    f"{self.options.model!r} is not served; /v1/models lists {models}: pass one of them with --model",
                    ExitCode.MODEL_NOT_SERVED,
                )
            self.report.model = self.options.model
        elif len(models) == 1:
            self.report.model = models[0]
        else:
            raise self.fail(
                "list models",
                began,
                f"several models are served ({models}): choose one with --model",
                ExitCode.MODEL_NOT_SERVED,
            )
        self.step("list models", began, f"{self.report.model!r} served")
        self.report.gate = self._behind_gate()

        began = time.monotonic()
        answer = self._chat("chat", began)
        self.report.answer_before = answer.text
        self.step("chat", began, f"{answer.completion_tokens} tokens: {answer.text[:60]!r}")

    def _behind_gate(self) -> bool:
        try:
            return requests.get(f"{self.options.url}/gate/status", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def _chat(self, name: str, began: float) -> ChatAnswer:
        try:
            answer = self.client.chat(
                self.report.model, self.options.prompt, self.options.max_tokens, self.options.seed
            )
        except ApiError as error:
            raise self.fail(name, began, str(error), ExitCode.CHAT_FAILED)
        if not answer.text:
            raise self.fail(name, began, "the answer is empty", ExitCode.CHAT_FAILED)
        return answer

    # 4-7 ------------------------------------------------------------------------------------------------
    def gpu_reading(self) -> dict[str, int]:
        reading = read_gpus(self.config)
        self.report.gpu_source = reading.source if reading.gpus else reading.problem
        return {gpu.uuid: gpu.used_mib for gpu in reading.gpus}

    def suspend(self, cycle: int) -> dict:
        began = time.monotonic()
        before = read_gpus(self.config)
        if cycle == 1:
            self.report.gpus = [
                GpuFigures(g.index, g.uuid, g.used_mib) for g in before.gpus if g.used_mib > self.options.threshold_mib
            ]
        try:
            result = toggle(SUSPEND, self.config, pid=self.options.pid, backend_name=self.options.backend)
        except SuspendError as error:
            self.step(f"suspend #{cycle}", began, error.message, ok=False)
            raise
        self.suspended = True
        states = status(self.config, pid=self.options.pid, backend_name=self.options.backend)
        not_suspended = [p for p in states.pids if p["role"] != "dispatcher" and p["state"] != "checkpointed"]
        if not_suspended:
            raise self.fail(f"suspend #{cycle}", began, f"not checkpointed: {not_suspended}", ExitCode.NOT_SUSPENDED)
        if not self.report.gpus:
            raise self.fail(
                f"suspend #{cycle}",
                began,
                f"no GPU held more than {self.options.threshold_mib} MiB before "
                f"the suspend ({before.summary()}): nothing to prove",
                ExitCode.NOT_SUSPENDED,
            )
        now = self.gpu_reading()
        still = [
            f"GPU{g.index} {now.get(g.uuid)} MiB"
            for g in self.report.gpus
            if now.get(g.uuid, 10**9) > self.options.threshold_mib
        ]
        for gpu in self.report.gpus:
            gpu.suspended_mib = now.get(gpu.uuid)
        if still:
            raise self.fail(
                f"suspend #{cycle}",
                began,
                f"GPU memory not released: {', '.join(still)} (threshold "
                f"{self.options.threshold_mib} MiB, --memory-threshold-mib)",
                ExitCode.NOT_SUSPENDED,
            )
        released = sum(g.released_gb for g in self.report.gpus)
        per_gpu = released / len(self.report.gpus)
        self.mode = result.mode
        figures = {
            "mode": result.mode,
            "sleep_s": round(result.phases.get("sleep", 0), 3),
            "suspend_s": round(result.seconds, 3),
            "checkpoint_s": round(result.phases.get("checkpoint", 0), 3),
            "released_gb_per_gpu": round(per_gpu, 3),
            "suspend_gb_s_per_gpu": round(per_gpu / result.seconds, 3) if result.seconds else None,
            "lock_rounds": result.lock_rounds,
        }
        self.step(
            f"suspend #{cycle}",
            began,
            f"{len(result.pids)} CUDA processes checkpointed in {result.seconds:.2f} s; "
            + ", ".join(f"GPU{g.index} {g.before_mib} -> {g.suspended_mib} MiB" for g in self.report.gpus),
        )
        return figures

    def send_inflight(self) -> tuple[threading.Thread, dict]:
        outcome: dict = {}

        def send() -> None:
            began = time.monotonic()
            try:
                outcome["answer"] = self.client.chat(
                    self.report.model, self.options.prompt, self.options.max_tokens, self.options.seed
                )
            except ApiError as error:
                outcome["error"] = str(error)
            outcome["seconds"] = time.monotonic() - began

        thread = threading.Thread(target=send, name="inflight", daemon=True)
        thread.start()
        began = time.monotonic()
        thread.join(self.options.inflight_wait_s)
        if not self.report.gate and not thread.is_alive() and "answer" in outcome:
            raise self.fail(
                "request while suspended",
                began,
                "it was answered while the server was suspended: the workers were not really suspended",
                ExitCode.NOT_SUSPENDED,
            )
        if self.report.gate:
            thread.join(self.options.timeout_s)  # the gate wakes the server for it (wake on request)
            answer = outcome.get("answer")
            if answer is None:
                raise self.fail(
                    "request while suspended",
                    began,
                    f"lost: {outcome.get('error', 'no answer')}",
                    ExitCode.INFLIGHT_LOST,
                )
            self.suspended = False
            self.step(
                "request while suspended",
                began,
                f"the gate woke the server: answered after {outcome['seconds']:.2f} s",
            )
        else:
            self.step(
                "request while suspended",
                began,
                f"sent; still waiting after {self.options.inflight_wait_s:g} s, as it must",
            )
        return thread, outcome

    def resume(self, cycle: int) -> dict:
        began = time.monotonic()
        try:
            result = toggle(RESUME, self.config, pid=self.options.pid, backend_name=self.options.backend)
        except SuspendError as error:
            self.step(f"resume #{cycle}", began, error.message, ok=False)
            raise
        self.suspended = False
        states = status(self.config, pid=self.options.pid, backend_name=self.options.backend)
        not_running = [p for p in states.pids if p["state"] != "running"]
        frozen = [d for d in states.dispatchers if d["frozen"]]
        if not_running or frozen:
            raise self.fail(
                f"resume #{cycle}",
                began,
                f"not running: {not_running}; frozen: {frozen}",
                ExitCode.NOT_RESUMED,
            )
        now = self.gpu_reading()
        missing = [
            f"GPU{g.index} {now.get(g.uuid)} of {g.before_mib} MiB"
            for g in self.report.gpus
            if now.get(g.uuid, 0) < 0.9 * g.before_mib
        ]
        for gpu in self.report.gpus:
            gpu.after_mib = now.get(gpu.uuid)
        if missing:
            raise self.fail(
                f"resume #{cycle}",
                began,
                f"GPU memory did not come back: {', '.join(missing)}",
                ExitCode.NOT_RESUMED,
            )
        per_gpu = sum(g.released_gb for g in self.report.gpus) / len(self.report.gpus)
        figures = {
            "resume_s": round(result.seconds, 3),
            "restore_s": round(result.phases.get("restore", 0), 3),
            "wake_up_s": round(result.phases.get("wake_up", 0), 3),
            # None when nothing was restored here: the gate had already woken the server for a request
            "resume_gb_s_per_gpu": round(per_gpu / result.seconds, 3) if "restore" in result.phases else None,
        }
        self.step(
            f"resume #{cycle}",
            began,
            f"running again in {result.seconds:.2f} s; "
            + ", ".join(f"GPU{g.index} {g.after_mib} MiB" for g in self.report.gpus)
            + ("" if result.pids and result.phases else f" ({'; '.join(result.notes)})"),
        )
        return figures

    def compare(self, inflight: tuple[threading.Thread, dict] | None) -> None:
        began = time.monotonic()
        answer = self._chat("chat again", began)
        self.report.answer_after = answer.text
        if answer.text != self.report.answer_before and not self.options.allow_different:
            raise self.fail(
                "chat again",
                began,
                f"the answer changed after resume:\n  before: "
                f"{self.report.answer_before!r}\n  after:  {answer.text!r}\n(--allow-different for "
                "servers where greedy decoding is not deterministic)",
                ExitCode.ANSWER_CHANGED,
            )
        self.step(
            "chat again",
            began,
            "same answer as before the suspend"
            if answer.text == self.report.answer_before
            else "answer differs (allowed)",
        )
        if inflight is None:
            return
        began = time.monotonic()
        thread, outcome = inflight
        thread.join(self.options.timeout_s)
        answer = outcome.get("answer")
        if answer is None:
            raise self.fail(
                "request while suspended, answered",
                began,
                f"lost: {outcome.get('error', 'no answer in time')}",
                ExitCode.INFLIGHT_LOST,
            )
        self.report.inflight_answer, self.report.inflight_seconds = answer.text, round(outcome["seconds"], 3)
        if answer.text != self.report.answer_before and not self.options.allow_different:
            hint = ""
            if self.mode == "hybrid" and not self.report.gate:
                hint = (
                    " (a hybrid suspend: vLLM schedules a request queued while it was suspended before "
                    "/wake_up brings the weights back; send requests through the gate, which holds them "
                    "until the wake-up, or use CUDA_TOGGLE_MODE=plain)"
                )
            raise self.fail(
                "request while suspended, answered",
                began,
                f"answered, but differently: {answer.text!r}{hint}",
                ExitCode.ANSWER_CHANGED,
            )
        self.step(
            "request while suspended, answered",
            began,
            f"answered {outcome['seconds']:.2f} s after it was sent, same answer",
        )

    def run(self) -> Report:
        try:
            self.wait_and_chat()
            for cycle in range(1, self.options.cycles + 1):
                figures = self.suspend(cycle)
                inflight = self.send_inflight() if self.options.inflight and cycle == 1 else None
                figures.update(self.resume(cycle))
                self.report.cycles.append(figures)
                self.compare(inflight)
            self.report.ok = True
        except SuspendError as failure:
            self.report.error, self.report.exit_code = failure.message, int(failure.exit_code)
        finally:
            if self.suspended:
                self.resume_after_failure()
        return self.report

    def resume_after_failure(self) -> None:
        """Never leave the server suspended: resume before reporting, and say how that went."""
        logger.warning("resuming the server before reporting the failure")
        try:
            result = toggle(RESUME, self.config, pid=self.options.pid, backend_name=self.options.backend)
            self.report.resumed_after_failure = f"resumed ({result.seconds:.2f} s)"
        except SuspendError as error:
            self.report.resumed_after_failure = f"resume failed too: {error.message}"
            logger.error(self.report.resumed_after_failure)
        self.suspended = False


def render(report: Report) -> str:
    lines = [f"{'STEP':<34} {'':<4} {'SECONDS':>8}  DETAIL"]
    for step in report.steps:
        detail = step.detail.replace("\n", " ")
        lines.append(f"{step.name:<34} {'ok' if step.ok else 'FAIL':<4} {step.seconds:>8.2f}  {detail[:110]}")
    if report.gpus:
        lines.append(
            "GPU memory (MiB): "
            + "; ".join(
                f"GPU{g.index} before {g.before_mib}, suspended {g.suspended_mib}, after {g.after_mib} "
                f"({g.released_gb:.2f} GB released)"
                for g in report.gpus
            )
        )
    for number, cycle in enumerate(report.cycles, 1):
        back = (
            f"{cycle['resume_gb_s_per_gpu']} GB/s per GPU"
            if cycle["resume_gb_s_per_gpu"] is not None
            else "already resumed by the gate for a request"
        )
        lines.append(
            f"cycle {number} ({cycle['mode']}): {cycle['released_gb_per_gpu']:.2f} GB per GPU freed;"
            f" suspend {cycle['suspend_s']:.2f} s ({cycle['suspend_gb_s_per_gpu']} GB/s per GPU),"
            f" resume {cycle['resume_s']:.2f} s ({back})"
        )
    if any(cycle["mode"] == "hybrid" for cycle in report.cycles):
        lines.append("hybrid: vLLM's sleep drops the KV cache, so its GB/s is memory freed per second, not copied")
    if report.resumed_after_failure:
        lines.append(f"after the failure: {report.resumed_after_failure}")
    lines.append(
        f"selftest {'PASSED' if report.ok else 'FAILED: ' + report.error.splitlines()[0]}"
        + (f" (exit {report.exit_code})" if not report.ok else "")
    )
    return "\n".join(lines)


EPILOG = "\n\n".join(
    [
        "\b\nExamples:\n  docker exec vllm-qwen3-8b-awq selftest\n  selftest --model qwen3-8b-awq --cycles 3 --json"
        " --report /root/.cache/selftest.json",
        exit_codes_help(SELFTEST_EXIT_CODES),
        settings_help(),
    ]
)


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--url",
    envvar="SELFTEST_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="The server (env SELFTEST_URL).",
)
@click.option("--model", help="Served model id (default: the only one listed).")
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=1800,
    show_default=True,
    help="Seconds to wait for the server to become ready (a model load takes minutes).",
)
@click.option("--prompt", default="Say hello in one short sentence.", show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--memory-threshold-mib",
    "threshold_mib",
    type=int,
    default=64,
    show_default=True,
    help="A suspended GPU must use at most this much.",
)
@click.option(
    "--inflight/--no-inflight",
    default=True,
    show_default=True,
    help="Send a request while suspended; it must be answered after the resume.",
)
@click.option(
    "--inflight-wait",
    "inflight_wait_s",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds the request must stay unanswered while suspended.",
)
@click.option("--allow-different", is_flag=True, help="Do not fail when the answer after resume differs.")
@click.option("--cycles", type=click.IntRange(1, 1000), default=1, show_default=True, help="Suspend/resume cycles.")
@click.option("--pid", type=int, help="The server's root PID (default: as cuda-toggle-all finds it).")
@click.option("--backend", type=click.Choice(["auto", "cli", "driver"]), help="As cuda-toggle-all --backend.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")
@click.option(
    "--report",
    "report_file",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the JSON report here.",
)
@click.option("-v", "--verbose", is_flag=True)
def cli(as_json: bool, report_file: str | None, verbose: bool, **settings: object) -> None:
    """Prove suspend and resume on this server: models -> chat -> suspend -> resume -> chat.

    \b
    1. wait until /v1/models lists the model and a one-token completion succeeds
    2. the model must be listed            3. a greedy chat completion (kept as the reference)
    4. suspend: every CUDA process checkpointed, every GPU of the server near 0 MiB
    5. a request sent while suspended      6. resume: every process running, memory back
    7. the same chat again: the same answer; the request from 5 answered, the same answer
    8. a report of the steps, timings, GPU memory and GB/s (--json, --report FILE)

    On any failure after the suspend, the server is resumed before the report.
    """
    setup_logging(verbose)
    try:
        config = load_config()
    except SuspendError as error:
        logger.error(error.message)
        raise SystemExit(int(error.exit_code))
    options = Options(**settings)
    report = Selftest(options, config).run()
    logger.info("\n" + render(report))
    data = report.to_json()
    if report_file:
        with open(report_file, "w") as handle:
            json.dump(data, handle, indent=2)
    if as_json:
        click.echo(json.dumps(data))
    raise SystemExit(report.exit_code)


def main() -> None:
    cli(prog_name="selftest")


if __name__ == "__main__":
    main()
