"""selftest's verdicts on answers: pure checks that return their evidence or raise SelftestFailure.

Which comparisons are fair (measured on an H200 with vLLM 0.20.2, tiny and Qwen3-8B-shaped models):
- A greedy request run alone gives the same tokens and the same per-token logprobs before and after a
  suspend, so those are compared exactly. Equal text alone proves little: a random tiny model's greedy
  text is mostly newlines; logprobs carry every number the model computed for the answer.
- A request running across a suspend is not compared bitwise: under `/sleep?mode=keep` it is preempted
  and recomputed (prefill instead of decode), under `/pause?mode=keep` other requests join its batch
  after the resume, and vLLM is not batch-invariant (near-tied logits flip). Its text differed from an
  undisturbed run while it still finished whole. So it must finish whole: every token, nothing aborted.
"""

from __future__ import annotations

import math

from ..base.errors import ExitCode, ToolError
from .openai_client import Outcome, TokenTrace

# vLLM's OpenAI server writes a logprob of -inf as -9999.0 (JSON has no infinity), so anything at or
# below it is an infinity in disguise.
NOT_FINITE_AT = -9999.0
FINISHED_WHOLE = ("length", "stop")


class SelftestFailure(ToolError):
    """A check failed: the message says what was observed and the fix."""


def is_finite(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > NOT_FINITE_AT
    )


def _figures(values: list) -> dict:
    numbers = [v for v in values if is_finite(v)]
    return {
        "logprobs": len(values),
        "min": min(numbers) if numbers else None,
        "max": max(numbers) if numbers else None,
        "distinct": len(set(numbers)),
    }


def fair_reference(name: str, trace: TokenTrace) -> dict:
    """A reference is a fair test only when it carries logprobs for every token, all finite and not all equal."""
    unfit = ExitCode.LOGPROBS_UNFIT
    if not trace.tokens:
        raise SelftestFailure(
            f"{name}: the answer carries no per-token logprobs (finish_reason {trace.finish_reason!r}, "
            f"{trace.completion_tokens} tokens): the server must answer the OpenAI `logprobs` fields "
            "(vLLM does; raise --max-logprobs on the server if it refused)",
            unfit,
        )
    if len(trace.logprobs) != len(trace.tokens) or len(trace.top_logprobs) != len(trace.tokens):
        raise SelftestFailure(
            f"{name}: {len(trace.tokens)} tokens but {len(trace.logprobs)} logprobs and "
            f"{len(trace.top_logprobs)} lists of top logprobs",
            unfit,
        )
    empty = [index for index, candidates in enumerate(trace.top_logprobs) if not candidates]
    if empty:
        raise SelftestFailure(f"{name}: no top_logprobs at token {empty[0]} (of {len(trace.tokens)})", unfit)
    values = trace.values()
    bad = [value for value in values if not is_finite(value)]
    if bad:
        raise SelftestFailure(
            f"{name}: {len(bad)} of {len(values)} logprobs are not finite (e.g. {bad[:3]}; vLLM writes -inf as "
            "-9999.0): the model gives no usable numbers to compare (a broken or all-masked model)",
            unfit,
        )
    if len(set(values)) < 2:
        raise SelftestFailure(
            f"{name}: all {len(values)} logprobs are equal ({values[0]}): equal answers would prove nothing",
            unfit,
        )
    return {"tokens": len(trace.tokens), **_figures(values)}


def _first_difference(reference: TokenTrace, again: TokenTrace) -> str:
    if len(reference.tokens) != len(again.tokens):
        return f"{len(reference.tokens)} tokens before, {len(again.tokens)} after"
    for index in range(len(reference.tokens)):
        before = (reference.tokens[index], reference.logprobs[index], reference.top_logprobs[index])
        after = (again.tokens[index], again.logprobs[index], again.top_logprobs[index])
        if before[0] != after[0]:
            return f"token {index}: {before[0]!r} before, {after[0]!r} after"
        if before[1] != after[1]:
            return f"token {index} ({before[0]!r}): logprob {before[1]!r} before, {after[1]!r} after"
        if list(before[2]) != list(after[2]):
            return f"token {index} ({before[0]!r}): top logprobs {before[2]!r} before, {after[2]!r} after"
    return ""


def same_as_reference(name: str, reference: TokenTrace, again: TokenTrace) -> dict:
    """The same request run alone again: the same tokens, and bit-for-bit the same logprobs and candidates."""
    difference = _first_difference(reference, again)
    if difference:
        raise SelftestFailure(
            f"{name} differs after the resume: {difference}\n  before: {reference.text[:120]!r}\n"
            f"  after:  {again.text[:120]!r}\n(a request run alone must compute the same numbers: the GPU "
            "state or the weights changed across the checkpoint)",
            ExitCode.LOGPROBS_DIFFER,
        )
    return {"tokens": len(again.tokens), "identical": True, **_figures(again.values())}


def held_while_suspended(inflight: Outcome, queued: list[Outcome], held_from: float, held_until: float) -> dict:
    """While suspended, nothing computes: the request in flight gets no token, those sent meanwhile wait."""
    answered = [o for o in queued if o.finished_at is not None and o.finished_at <= held_until]
    failed = [o for o in answered if o.status != 200 or o.error]
    if failed:
        raise SelftestFailure(
            f"{failed[0].label} failed while the server was suspended ({failed[0].error or failed[0].status}): "
            "requests that arrive while suspended must wait inside vLLM, not fail",
            ExitCode.INFLIGHT_LOST,
        )
    if answered:
        raise SelftestFailure(
            f"{answered[0].label} was answered while the server was suspended: something still computes "
            "(a CUDA process was not checkpointed, or vLLM's scheduler was not paused)",
            ExitCode.NOT_SUSPENDED,
        )
    moved = inflight.pieces_by(held_until) - inflight.pieces_by(held_from)
    if moved:
        raise SelftestFailure(
            f"the request in flight received {moved} tokens while the server was suspended: something still "
            "computes (a CUDA process was not checkpointed, or vLLM's scheduler was not paused)",
            ExitCode.NOT_SUSPENDED,
        )
    return {
        "held_s": round(held_until - held_from, 3),
        "inflight_tokens_while_suspended": moved,
        "queued_waiting": len(queued),
    }


def inflight_whole(inflight: Outcome, max_tokens: int, suspend_began: float, suspended_at: float) -> dict:
    """The request that ran across the suspend finished whole: HTTP 200, `length`, every token, no abort."""
    cut = ExitCode.INFLIGHT_CUT
    # usage.completion_tokens of the final chunk (stream_options.include_usage); the chunks counted otherwise
    tokens = inflight.completion_tokens if inflight.completion_tokens is not None else inflight.pieces
    if inflight.finished_at is None:
        raise SelftestFailure(
            f"the request in flight at the suspend got no answer (after {inflight.pieces} tokens)", cut
        )
    if inflight.finish_reason == "abort":
        raise SelftestFailure(
            f"the request in flight at the suspend was aborted after {tokens} of {max_tokens} tokens "
            "(finish_reason abort): vLLM's sleep or pause without mode=keep aborts what is in flight",
            cut,
        )
    if inflight.status != 200 or inflight.error:
        raise SelftestFailure(f"the request in flight at the suspend failed: {inflight.error or inflight.status}", cut)
    if inflight.finish_reason != "length" or tokens != max_tokens:
        raise SelftestFailure(
            f"the request in flight at the suspend was cut short: finish_reason {inflight.finish_reason!r} after "
            f"{tokens} of {max_tokens} tokens (it asked for ignore_eos)",
            cut,
        )
    # Held across the suspend: still unfinished when the suspend was complete (not only when it began).
    when_suspended = inflight.pieces_by(suspended_at)
    if inflight.finished_at <= suspended_at or when_suspended >= inflight.pieces:
        raise SelftestFailure(
            f"the request meant to be in flight finished before the suspend was complete ({when_suspended} of "
            f"{inflight.pieces} tokens streamed by then): it proves nothing; raise --inflight-tokens",
            cut,
        )
    return {
        "finish_reason": inflight.finish_reason,
        "completion_tokens": tokens,
        "max_tokens": max_tokens,
        "tokens_before_suspend": inflight.pieces_by(suspend_began),
        "tokens_when_suspended": when_suspended,
        "seconds": round(inflight.seconds or 0.0, 3),
    }


def queued_answered(queued: list[Outcome], resumed_from: float) -> dict:
    """Every request sent while suspended was answered whole (HTTP 200, finished, not aborted)."""
    for outcome in queued:
        if outcome.finished_at is None or outcome.status != 200 or outcome.error:
            raise SelftestFailure(
                f"{outcome.label}, sent while suspended, was lost: "
                f"{outcome.error or outcome.status or 'no answer in time'}",
                ExitCode.INFLIGHT_LOST,
            )
        if outcome.finish_reason not in FINISHED_WHOLE:
            raise SelftestFailure(
                f"{outcome.label}, sent while suspended, ended with finish_reason {outcome.finish_reason!r}",
                ExitCode.INFLIGHT_LOST,
            )
    first = min(queued, key=lambda o: o.finished_at or 0.0, default=None)
    return {
        "answered": len(queued),
        # the request answered first: from its sending, and from the resume
        "first_answer_s": round(first.seconds or 0.0, 3) if first else None,
        "first_answer_after_resume_s": round((first.finished_at or 0.0) - resumed_from, 3) if first else None,
    }
