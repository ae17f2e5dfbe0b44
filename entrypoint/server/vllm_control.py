"""vLLM's own controls over HTTP: what the running server can do, and its scheduler pause and sleep mode.

Why: a checkpointed vLLM process must receive no work (a step that reaches it segfaults it), and vLLM
can hold its requests itself. With VLLM_SERVER_DEV_MODE=1 (vLLM 0.20.2, vllm/entrypoints/serve/rlhf and
serve/sleep routers) it serves:

- `POST /pause?mode=abort|wait|keep`, `POST /resume`, `GET /is_paused`: the scheduler stops stepping;
  `keep` freezes the requests in flight and queues new ones inside EngineCore (no error, no timeout),
  and EngineCore then makes no CUDA call until `/resume`.
- `POST /sleep?level=N&mode=...`, `POST /wake_up`, `GET /is_sleeping` (with --enable-sleep-mode):
  since vLLM 0.17.0 (vLLM PR #34528) sleep pauses the scheduler first, with that mode; `/sleep`
  without `mode` means `abort` (every request in flight is finished at once with finish_reason
  "abort"), so we always pass `mode=keep`. Older releases (e.g. v0.11.0) sleep without pausing: a
  request during their sleep crashes the engine, so their sleep is never used with requests possible.

Nothing here is assumed from the version alone where it can be observed: the endpoints' answers decide.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import asdict, dataclass

import requests

from ..base.processes import ProcessInfo

# The first vLLM release whose /sleep pauses the scheduler (and takes `mode`): vLLM PR #34528.
SLEEP_PAUSES_SCHEDULER_SINCE = (0, 17, 0)


class VllmControlError(Exception):
    """A control endpoint failed, or did not reach the state it promised."""


def server_url(root: ProcessInfo, configured: str) -> str:
    """The server's own address: CUDA_TOGGLE_SERVER_URL, else --host/--port from its command line."""
    if configured:
        return configured.rstrip("/")
    try:
        words = shlex.split(root.title)
    except ValueError:
        words = root.title.split()
    host, port = "127.0.0.1", "8000"
    for index, word in enumerate(words):
        for flag in ("--host", "--port"):
            value = None
            if word == flag and index + 1 < len(words):
                value = words[index + 1]
            elif word.startswith(flag + "="):
                value = word.split("=", 1)[1]
            if value is not None:
                if flag == "--port":
                    port = value
                else:
                    host = value
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """(0, 20, 2) from '0.20.2' or 'v0.11.0rc1.dev5+g...'; None when it is not a version."""
    if not text:
        return None
    match = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not match:
        return None
    return tuple(int(part or 0) for part in match.groups())


@dataclass(frozen=True)
class Capabilities:
    """What the running server answered (not what its version promises)."""

    url: str
    reachable: bool  # /health or /version answered at all
    version: str | None  # GET /version
    pause: bool  # GET /is_paused answered: /pause?mode=keep and /resume exist
    sleep: bool  # GET /is_sleeping answered: sleep mode is on
    sleep_pauses_scheduler: bool  # version >= 0.17.0: /sleep?mode=keep holds the requests

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ProbeAnswer:
    ok: bool
    seconds: float
    model: str = ""
    finish_reason: str = ""
    error: str = ""

    def to_json(self) -> dict:
        return asdict(self)


class VllmControl:
    def __init__(self, url: str, timeout_s: float, query_timeout_s: float = 5.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s  # /sleep and /wake_up copy the weights: they can take a while
        self.query_timeout_s = query_timeout_s

    # reading -----------------------------------------------------------------------------------------
    def _get_json(self, path: str) -> dict | None:
        """The JSON object a GET answers with 200, else None (absent endpoint, error, no server)."""
        try:
            response = requests.get(f"{self.url}{path}", timeout=self.query_timeout_s)
        except requests.RequestException:
            return None
        if response.status_code != 200:
            return None
        try:
            body = response.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _flag(self, path: str, key: str) -> bool | None:
        body = self._get_json(path)
        if body is None or not isinstance(body.get(key), bool):
            return None
        return body[key]

    def is_paused(self) -> bool | None:
        """True/False, or None when the server has no /is_paused (older vLLM, or no dev mode)."""
        return self._flag("/is_paused", "is_paused")

    def is_sleeping(self) -> bool | None:
        """True/False, or None when the server has no sleep mode."""
        return self._flag("/is_sleeping", "is_sleeping")

    def version(self) -> str | None:
        body = self._get_json("/version")
        value = body.get("version") if body else None
        return value if isinstance(value, str) else None

    def capabilities(self, engine_frozen: bool = False) -> Capabilities:
        """What the server answers. With its dispatcher frozen (SIGSTOP), /is_paused and /is_sleeping, which
        go through EngineCore, are not asked (each would wait out its timeout): pause and sleep read False."""
        version = self.version()
        pause = not engine_frozen and self.is_paused() is not None
        sleep = not engine_frozen and self.is_sleeping() is not None
        reachable = version is not None or pause or sleep or self._answers("/health")
        parsed = parse_version(version)
        return Capabilities(
            url=self.url,
            reachable=reachable,
            version=version,
            pause=pause,
            sleep=sleep,
            sleep_pauses_scheduler=sleep and parsed is not None and parsed >= SLEEP_PAUSES_SCHEDULER_SINCE,
        )

    def answers(self) -> bool:
        """Some HTTP server answers at this address (vLLM's /health, or anything below 500)."""
        return self._answers("/health")

    def _answers(self, path: str) -> bool:
        try:
            return requests.get(f"{self.url}{path}", timeout=self.query_timeout_s).status_code < 500
        except requests.RequestException:
            return False

    def models(self) -> list[str]:
        body = self._get_json("/v1/models")
        data = body.get("data") if body else None
        if not isinstance(data, list):
            return []
        return [item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]

    # acting ------------------------------------------------------------------------------------------
    def _post(self, path: str) -> None:
        try:
            response = requests.post(f"{self.url}{path}", timeout=self.timeout_s)
        except requests.RequestException as error:
            raise VllmControlError(f"POST {path}: {error}")
        if response.status_code != 200:
            raise VllmControlError(f"POST {path} answered {response.status_code}: {response.text[:200]}")

    def _expect(self, what: str, read, wanted: bool) -> None:
        """Re-read a flag until it says `wanted` (the POST returned, but prove it): a few reads, 0.1 s apart."""
        seen = None
        for _ in range(20):
            seen = read()
            if seen is wanted:
                return
            time.sleep(0.1)
        raise VllmControlError(f"{what} reads {seen}, not {wanted}")

    def pause(self) -> None:
        """Pause the scheduler, keeping every request (frozen in flight, new ones queued)."""
        self._post("/pause?mode=keep")
        self._expect("after POST /pause?mode=keep, /is_paused", self.is_paused, True)

    def resume(self) -> None:
        self._post("/resume")
        self._expect("after POST /resume, /is_paused", self.is_paused, False)

    def sleep(self, level: int = 1) -> None:
        """Sleep with mode=keep: requests are kept (preempted and recomputed after the wake-up), never aborted."""
        self._post(f"/sleep?level={level}&mode=keep")
        self._expect(f"after POST /sleep?level={level}&mode=keep, /is_sleeping", self.is_sleeping, True)

    def wake_up(self) -> None:
        """Wake up (weights and KV cache back); vLLM then resumes its scheduler itself."""
        self._post("/wake_up")
        self._expect("after POST /wake_up, /is_sleeping", self.is_sleeping, False)
        if self.is_paused():  # wake_up resumes the scheduler in vLLM >= 0.17; make sure of it
            self.resume()

    def probe(self, model: str | None = None, timeout_s: float = 60.0) -> ProbeAnswer:
        """A one-token completion: the only proof that the engine computes again (/health answers while
        the GPU state is away, so it proves nothing)."""
        began = time.monotonic()
        model = model or next(iter(self.models()), "")
        if not model:
            return ProbeAnswer(False, time.monotonic() - began, error="GET /v1/models lists no model")
        body = {"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0}
        try:
            response = requests.post(f"{self.url}/v1/completions", json=body, timeout=timeout_s)
            seconds = time.monotonic() - began
            if response.status_code != 200:
                return ProbeAnswer(False, seconds, model, error=f"HTTP {response.status_code}: {response.text[:200]}")
            choice = response.json()["choices"][0]
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as error:
            return ProbeAnswer(False, time.monotonic() - began, model, error=str(error))
        reason = str(choice.get("finish_reason") or "")
        if reason == "abort":
            return ProbeAnswer(False, seconds, model, reason, "the completion was aborted")
        return ProbeAnswer(True, seconds, model, reason)

    def chat_probe(self, model: str | None = None, timeout_s: float = 60.0) -> ProbeAnswer:
        """A two-token chat completion with logprobs (top 5): what warms up the paths a plain completion
        leaves cold (the chat template, the logprobs of the sampler)."""
        began = time.monotonic()
        model = model or next(iter(self.models()), "")
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "ping"}],
            "max_tokens": 2,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 5,
        }
        try:
            response = requests.post(f"{self.url}/v1/chat/completions", json=body, timeout=timeout_s)
            seconds = time.monotonic() - began
            if response.status_code != 200:
                return ProbeAnswer(False, seconds, model, error=f"HTTP {response.status_code}: {response.text[:200]}")
            reason = str(response.json()["choices"][0].get("finish_reason") or "")
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as error:
            return ProbeAnswer(False, time.monotonic() - began, model, error=str(error))
        return ProbeAnswer(
            reason != "abort", seconds, model, reason, "the chat was aborted" if reason == "abort" else ""
        )

    def warm_up(self) -> dict[str, float]:
        """One sleep/wake-up cycle on a fresh server, before it is announced ready.

        Why: vLLM's first sleep pins host memory for the weights (measured on an H200 with Qwen3-8B-AWQ's
        shape: 5.3 s for the first sleep, 0.17 s for later ones, since torch keeps the pinned memory), so
        the first real suspend would be several times slower than the others.
        """
        began = time.monotonic()
        self.sleep(level=1)
        slept = time.monotonic()
        self.wake_up()
        woke = time.monotonic()
        # The first completion of a fresh server builds its kernels (2.8 s for the 8B-AWQ shape on an H200):
        # done here, not in the first resume's proof.
        answer = self.probe()
        if not answer.ok:
            raise VllmControlError(f"the first completion after the warm-up failed: {answer.error}")
        completed = time.monotonic()
        # And the first chat with logprobs: measured on an H100 (8B-AWQ shape), after a plain completion the
        # first chat request with logprobs still took 2.8 s to its first token (the first request with
        # logprobs 1.6 s, the first chat 1.3 s), the later ones 0.07 s. A client's first request must not pay it.
        chat = self.chat_probe(answer.model or None)
        if not chat.ok:
            raise VllmControlError(f"the first chat with logprobs after the warm-up failed: {chat.error}")
        return {
            "sleep_s": slept - began,
            "wake_up_s": woke - slept,
            "first_completion_s": completed - woke,
            "first_chat_s": time.monotonic() - completed,
        }
