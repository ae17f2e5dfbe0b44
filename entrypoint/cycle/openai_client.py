"""The few OpenAI-compatible HTTP calls the selftest (and the GPU suite) make, with requests.

Shapes as vLLM's OpenAI server answers them: `/v1/completions` with `"logprobs": k` gives the legacy
`choices[0].logprobs.{tokens, token_logprobs, top_logprobs: [{token: logprob}]}`; `/v1/chat/completions`
with `"logprobs": true, "top_logprobs": k` gives `choices[0].logprobs.content[{token, logprob,
top_logprobs: [{token, logprob}]}]`; `"stream": true` gives Server-Sent Events ending in `data: [DONE]`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import requests
from loguru import logger


class ApiError(Exception):
    pass


@dataclass
class ChatAnswer:
    text: str
    seconds: float
    completion_tokens: int


@dataclass
class TokenTrace:
    """A greedy answer token by token, with the logprobs the server computed for each position."""

    text: str
    tokens: list[str]
    logprobs: list[float | None]  # of the chosen token, per position
    top_logprobs: list[list[tuple[str, float | None]]]  # per position, in the server's order
    finish_reason: str
    completion_tokens: int
    seconds: float

    def values(self) -> list[float | None]:
        """Every logprob of the answer: the chosen tokens' and the candidates'."""
        return self.logprobs + [value for position in self.top_logprobs for _, value in position]

    def to_json(self) -> dict:
        return asdict(self)


def _completion_logprobs(logprobs: dict) -> tuple[list, list, list]:
    """(tokens, chosen logprobs, top candidates) from the legacy completions shape."""
    tokens = [str(token) for token in logprobs.get("tokens") or []]
    chosen = list(logprobs.get("token_logprobs") or [])
    top = [list((candidates or {}).items()) for candidates in logprobs.get("top_logprobs") or []]
    return tokens, chosen, top


def _chat_logprobs(logprobs: dict) -> tuple[list, list, list]:
    """(tokens, chosen logprobs, top candidates) from the chat shape."""
    content = logprobs.get("content") or []
    tokens = [str(entry.get("token")) for entry in content]
    chosen = [entry.get("logprob") for entry in content]
    top = [[(str(c.get("token")), c.get("logprob")) for c in entry.get("top_logprobs") or []] for entry in content]
    return tokens, chosen, top


@dataclass
class Outcome:
    """How one request sent in the background ended, as its client saw it (times: time.monotonic())."""

    label: str
    sent_at: float
    status: int | None = None  # HTTP status; None while there is no answer
    finish_reason: str | None = None
    completion_tokens: int | None = None  # usage.completion_tokens (a stream: its final usage chunk)
    pieces: int = 0  # streamed chunks that carried a token
    first_token_at: float | None = None
    finished_at: float | None = None
    error: str = ""
    piece_times: list[float] = field(default_factory=list, repr=False)

    @property
    def seconds(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.sent_at

    def pieces_by(self, moment: float) -> int:
        """How many streamed tokens had arrived by `moment`."""
        return sum(1 for at in self.piece_times if at <= moment)

    def to_json(self) -> dict:
        data = asdict(self)
        del data["piece_times"]
        data["seconds"] = None if self.seconds is None else round(self.seconds, 3)
        return data


class BackgroundRequest:
    """One completion sent from its own thread, so the caller can suspend the server while it runs.

    A stream records when each token arrives, which shows whether the request was really in flight.
    """

    def __init__(self, url: str, body: dict, label: str, timeout_s: float):
        self.url = url.rstrip("/")
        self.body = body
        self.timeout_s = timeout_s
        self.outcome = Outcome(label, time.monotonic())
        self.first_token = threading.Event()
        self.thread = threading.Thread(target=self._run, name=label, daemon=True)

    def start(self) -> BackgroundRequest:
        self.outcome.sent_at = time.monotonic()
        self.thread.start()
        return self

    @property
    def done(self) -> bool:
        return self.outcome.finished_at is not None

    def join(self, timeout_s: float) -> bool:
        self.thread.join(timeout_s)
        return self.done

    def _run(self) -> None:
        outcome, stream = self.outcome, bool(self.body.get("stream"))
        try:
            with requests.post(
                f"{self.url}/v1/completions", json=self.body, timeout=self.timeout_s, stream=stream
            ) as response:
                outcome.status = response.status_code
                if response.status_code != 200:
                    outcome.error = f"HTTP {response.status_code}: {response.text[:200]}"
                elif stream:
                    self._read_stream(response)
                else:
                    data = response.json()
                    outcome.finish_reason = data["choices"][0].get("finish_reason")
                    outcome.completion_tokens = int((data.get("usage") or {}).get("completion_tokens", 0))
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as error:
            outcome.error = outcome.error or f"{type(error).__name__}: {error}"
        finally:
            outcome.finished_at = time.monotonic()
            self.first_token.set()  # nobody waits for a token that will never come

    def _read_stream(self, response: requests.Response) -> None:
        outcome = self.outcome
        for line in response.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                return
            chunk = json.loads(payload)
            if "error" in chunk:  # vLLM reports an error inside a stream that already answered 200
                outcome.error = f"error in the stream: {json.dumps(chunk['error'])[:200]}"
                return
            if chunk.get("usage"):
                outcome.completion_tokens = int(chunk["usage"].get("completion_tokens", 0))
            for choice in chunk.get("choices") or []:
                if choice.get("text") or not choice.get("finish_reason"):
                    now = time.monotonic()
                    outcome.pieces += 1
                    outcome.piece_times.append(now)
                    if outcome.first_token_at is None:
                        outcome.first_token_at = now
                        self.first_token.set()
                if choice.get("finish_reason"):
                    outcome.finish_reason = choice["finish_reason"]


def _greedy_chat(model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    """The body of a one-message chat completion that should answer the same twice (temperature 0, a seed)."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "seed": seed,
        "max_tokens": max_tokens,
    }


def request_failure(error: Exception) -> str:
    """Why a request failed, in one line: the operating system's reason where requests wrapped one (its
    message otherwise buries it behind the pool's and the connection object's descriptions)."""
    text = " ".join(str(error).split())
    reason = re.search(r"\[Errno -?\d+\][^'\"()]*", text)
    return reason.group(0).strip() if reason else text


class OpenAIClient:
    def __init__(self, url: str, request_timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.session = requests.Session()

    def models(self, timeout_s: float = 10.0) -> list[str]:
        response = self.session.get(f"{self.url}/v1/models", timeout=timeout_s)
        if response.status_code != 200:
            raise ApiError(f"/v1/models answered {response.status_code}: {response.text[:200]}")
        return [entry["id"] for entry in response.json().get("data", [])]

    def tiny_completion(self, model: str, timeout_s: float = 60.0) -> None:
        response = self.session.post(
            f"{self.url}/v1/completions",
            timeout=timeout_s,
            json={"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0},
        )
        if response.status_code != 200:
            raise ApiError(f"/v1/completions answered {response.status_code}: {response.text[:200]}")

    def chat(self, model: str, prompt: str, max_tokens: int, seed: int, timeout_s: float | None = None) -> ChatAnswer:
        began = time.monotonic()
        data = self._post_json("/v1/chat/completions", _greedy_chat(model, prompt, max_tokens, seed), timeout_s)
        text = ((data["choices"][0].get("message") or {}).get("content") or "").strip()
        tokens = int(data.get("usage", {}).get("completion_tokens", 0))
        return ChatAnswer(text, time.monotonic() - began, tokens)

    def _post_json(self, path: str, body: dict, timeout_s: float | None) -> dict:
        try:
            response = self.session.post(f"{self.url}{path}", json=body, timeout=timeout_s or self.request_timeout_s)
        except requests.RequestException as error:
            raise ApiError(f"POST {path} failed: {error}")
        if response.status_code != 200:
            raise ApiError(f"{path} answered {response.status_code}: {response.text[:300]}")
        try:
            data = response.json()
            data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ApiError(f"{path} answered 200 without a choice: {response.text[:300]}")
        return data

    def completion_trace(
        self, model: str, prompt: str, max_tokens: int, top: int, timeout_s: float | None = None
    ) -> TokenTrace:
        """A greedy completion with the logprobs of each token and of its `top` candidates."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": top}
        return self._trace("/v1/completions", body, timeout_s, lambda choice: choice.get("text"), _completion_logprobs)

    def chat_trace(
        self, model: str, prompt: str, max_tokens: int, top: int, seed: int, timeout_s: float | None = None
    ) -> TokenTrace:
        """A greedy chat completion with the logprobs of each token and of its `top` candidates."""
        body = {**_greedy_chat(model, prompt, max_tokens, seed), "logprobs": True, "top_logprobs": top}
        return self._trace(
            "/v1/chat/completions",
            body,
            timeout_s,
            lambda choice: (choice.get("message") or {}).get("content"),
            _chat_logprobs,
        )

    def _trace(
        self,
        path: str,
        body: dict,
        timeout_s: float | None,
        text_of: Callable[[dict], str | None],
        logprobs_of: Callable[[dict], tuple[list, list, list]],
    ) -> TokenTrace:
        """POST a request for logprobs; its first choice as a TokenTrace (the text and logprobs are where
        `text_of` and `logprobs_of` find them: completions and chat completions place them differently)."""
        began = time.monotonic()
        data = self._post_json(path, body, timeout_s)
        choice = data["choices"][0]
        tokens, chosen, candidates = logprobs_of(choice.get("logprobs") or {})
        return TokenTrace(
            text=text_of(choice) or "",
            tokens=tokens,
            logprobs=chosen,
            top_logprobs=candidates,
            finish_reason=str(choice.get("finish_reason")),
            completion_tokens=int((data.get("usage") or {}).get("completion_tokens", 0)),
            seconds=time.monotonic() - began,
        )

    def wait_ready(self, model: str | None, timeout_s: float, progress_s: float = 10.0) -> tuple[list[str], float]:
        """Wait until /v1/models lists a model and a one-token completion succeeds (readiness; /health
        alone answers before the model is usable in some versions). Returns (models, seconds waited)."""
        began = time.monotonic()
        next_progress = began + progress_s
        waiting_for = "the server to answer /v1/models"
        while True:
            # Each request gets what is left of the timeout: a server that accepts and never answers must not
            # stretch the wait beyond it.
            left_s = max(0.1, timeout_s - (time.monotonic() - began))
            try:
                models = self.models(timeout_s=min(10.0, left_s))
                if models:
                    waiting_for = "a first completion"
                    left_s = max(0.1, timeout_s - (time.monotonic() - began))
                    self.tiny_completion(model if model in models else models[0], timeout_s=left_s)
                    return models, time.monotonic() - began
                waiting_for = "/v1/models to list a model"
            except (requests.RequestException, ApiError, ValueError, KeyError) as error:
                waiting_for = f"{waiting_for.split(' (')[0]} ({request_failure(error)})"
            now = time.monotonic()
            if now - began >= timeout_s:
                raise TimeoutError(f"not ready after {timeout_s:g} s: still waiting for {waiting_for}")
            if now >= next_progress:
                logger.info("waiting for {} at {}: {:.0f} s of {:g} s", waiting_for, self.url, now - began, timeout_s)
                next_progress = now + progress_s
            time.sleep(1.0)
