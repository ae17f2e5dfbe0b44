"""vLLM's sleep mode over HTTP, for the hybrid suspend: sleep level 1 (weights to host RAM, KV cache
dropped) before the checkpoint, so the checkpoint copies only the CUDA context and NCCL buffers.

The endpoints exist only with `--enable-sleep-mode` and VLLM_SERVER_DEV_MODE=1, which also exposes
internals such as /collective_rpc: the server must listen on an internal address behind the gate.
"""

from __future__ import annotations

import shlex

import requests

from .processes import ProcessInfo


class SleepModeError(Exception):
    pass


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


class SleepClient:
    def __init__(self, url: str, timeout_s: float):
        self.url = url
        self.timeout_s = timeout_s

    def is_sleeping(self) -> bool | None:
        """True/False, or None when the server has no sleep endpoints (or does not answer)."""
        try:
            response = requests.get(f"{self.url}/is_sleeping", timeout=5)
        except requests.RequestException:
            return None
        if response.status_code != 200:
            return None
        try:
            return bool(response.json()["is_sleeping"])
        except (ValueError, KeyError, TypeError):
            return None

    def _post(self, path: str) -> None:
        try:
            response = requests.post(f"{self.url}{path}", timeout=self.timeout_s)
        except requests.RequestException as error:
            raise SleepModeError(f"POST {path}: {error}")
        if response.status_code != 200:
            raise SleepModeError(f"POST {path} answered {response.status_code}: {response.text[:200]}")

    def sleep(self, level: int = 1) -> None:
        self._post(f"/sleep?level={level}")
        if self.is_sleeping() is not True:
            raise SleepModeError("POST /sleep succeeded but /is_sleeping does not say so")

    def wake_up(self) -> None:
        self._post("/wake_up")
        if self.is_sleeping() is not False:
            raise SleepModeError("POST /wake_up succeeded but the server still says it is sleeping")
