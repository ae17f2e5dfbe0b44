"""The few OpenAI-compatible HTTP calls the selftest (and the GPU suite) make, with requests."""

from __future__ import annotations

import time
from dataclasses import dataclass

import requests
from loguru import logger


class ApiError(Exception):
    pass


@dataclass
class ChatAnswer:
    text: str
    seconds: float
    completion_tokens: int


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
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "seed": seed,
            "max_tokens": max_tokens,
            "stream": False,
        }
        try:
            response = self.session.post(
                f"{self.url}/v1/chat/completions", json=body, timeout=timeout_s or self.request_timeout_s
            )
        except requests.RequestException as error:
            raise ApiError(f"chat request failed: {error}")
        if response.status_code != 200:
            raise ApiError(f"/v1/chat/completions answered {response.status_code}: {response.text[:300]}")
        data = response.json()
        text = (data["choices"][0]["message"].get("content") or "").strip()
        tokens = int(data.get("usage", {}).get("completion_tokens", 0))
        return ChatAnswer(text, time.monotonic() - began, tokens)

    def wait_ready(self, model: str | None, timeout_s: float, progress_s: float = 10.0) -> tuple[list[str], float]:
        """Wait until /v1/models lists a model and a one-token completion succeeds (readiness; /health
        alone answers before the model is usable in some versions). Returns (models, seconds waited)."""
        began = time.monotonic()
        next_progress = began + progress_s
        waiting_for = "the server to answer /v1/models"
        while True:
            try:
                models = self.models(timeout_s=10)
                if models:
                    waiting_for = "a first completion"
                    self.tiny_completion(model if model in models else models[0])
                    return models, time.monotonic() - began
                waiting_for = "/v1/models to list a model"
            except (requests.RequestException, ApiError, ValueError, KeyError) as error:
                last = str(error).splitlines()[0][:120]
                waiting_for = f"{waiting_for.split(' (')[0]} ({last})"
            now = time.monotonic()
            if now - began >= timeout_s:
                raise TimeoutError(f"not ready after {timeout_s:g} s: still waiting for {waiting_for}")
            if now >= next_progress:
                logger.info("waiting for {} at {}: {:.0f} s of {:g} s", waiting_for, self.url, now - began, timeout_s)
                next_progress = now + progress_s
            time.sleep(1.0)
