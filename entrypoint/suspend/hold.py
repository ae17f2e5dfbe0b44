"""The operator's hold: a server kept suspended until released, whatever requests arrive meanwhile.

`cuda-toggle-all hold [--model M] [--inflight keep|drain]` writes RUN_DIR/hold.json (the model's run
directory, with GATE_MODELS) and then suspends the server; `cuda-toggle-all release` removes it and
resumes the server. The gate reads the file (it shares the run directory with the tool): while it is
there the gate resumes nothing for that server, and its requests get 503 with Retry-After, or wait up to
GATE_HOLD_WAIT_S for the release. The file is the only way to set a hold: nothing on the gate's public
port writes it. Which server `--model` names under GATE_MODELS is the gate's to say (gate/hold.py).

What is in flight when the hold begins: `keep` holds it across the suspend (vLLM's sleep with mode=keep:
those requests finish after the release); `drain` first waits, up to --drain-timeout, for vLLM to have
no request running or waiting (new ones are already kept out by the hold), then suspends.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests
from loguru import logger

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..cuda.choose import select_backend
from .api import RESUME, SUSPEND, move_to
from .light_sleep import clear_asleep
from .observe import observe

HOLD_FILE = "hold.json"
INFLIGHT_CHOICES = ("keep", "drain")
DRAIN_POLL_S = 0.2
# vLLM's Prometheus gauges of the requests it has (vllm/v1/metrics/loggers.py).
QUEUE_GAUGES = re.compile(r"^vllm:num_requests_(?:running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


@dataclass(frozen=True)
class Hold:
    """RUN_DIR/hold.json: who holds the server suspended, since when, and what became of its requests."""

    model: str  # the model of GATE_MODELS; "" for the one server
    inflight: str  # keep | drain
    since: float  # time.time()
    by: str  # the command and its PID, for the log and `status`

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def path(run_dir: str) -> Path:
        return Path(run_dir) / HOLD_FILE

    @classmethod
    def read(cls, run_dir: str) -> Hold | None:
        """The hold in force, or None. A file of the wrong shape still holds (an operator wrote it), with
        what could be read from it: a hold must never be lost to a typo."""
        path = cls.path(run_dir)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.warning("cannot read the hold {}: {}; treated as held", path, error)
            return cls("", "keep", 0.0, "unreadable hold file")
        try:
            data = json.loads(text)
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        return cls(
            model=str(data.get("model", "")),
            inflight=data.get("inflight") if data.get("inflight") in INFLIGHT_CHOICES else "keep",
            since=float(data["since"]) if isinstance(data.get("since"), (int, float)) else 0.0,
            by=str(data.get("by", "")),
        )

    def save(self, run_dir: str) -> None:
        path = self.path(run_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.to_json()))
            tmp.replace(path)
        except OSError as error:
            raise ToolError(
                f"cannot write the hold {path}: {error}; set CUDA_TOGGLE_RUN_DIR to a writable folder", ExitCode.USAGE
            )

    @classmethod
    def clear(cls, run_dir: str) -> bool:
        """Remove the hold; True when there was one."""
        path = cls.path(run_dir)
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as error:
            raise ToolError(f"cannot remove the hold {path}: {error}", ExitCode.USAGE)


@dataclass(frozen=True)
class Target:
    """The server a hold names: the library's settings for it, and its PID when GATE_MODELS says where."""

    model: str
    config: Config
    pid: int | None


def queued_requests(url: str, timeout_s: float = 2.0) -> float | None:
    """Requests vLLM is running or holds waiting (its /metrics); None when it does not answer."""
    try:
        response = requests.get(f"{url.rstrip('/')}/metrics", timeout=timeout_s)
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    return sum(float(value) for value in QUEUE_GAUGES.findall(response.text))


def drain(url: str, timeout_s: float) -> dict:
    """Wait until vLLM has no request running or waiting, at most `timeout_s`."""
    began = time.monotonic()
    left = queued_requests(url)
    while left and time.monotonic() - began < timeout_s:
        time.sleep(DRAIN_POLL_S)
        left = queued_requests(url)
    return {"drained": not left, "drain_s": round(time.monotonic() - began, 3), "left": left}


def hold(
    target: Target,
    *,
    inflight: str = "keep",
    drain_timeout_s: float = 60.0,
    backend_name: str | None = None,
) -> dict:
    """Hold the server suspended: write the hold, drain if asked, suspend. A suspend that fails removes the
    hold again (the server runs, so nothing may keep requests from it)."""
    if inflight not in INFLIGHT_CHOICES:
        raise ToolError(f"--inflight {inflight}: give keep or drain", ExitCode.USAGE)
    record = Hold(target.model, inflight, time.time(), f"cuda-toggle-all hold (PID {os.getpid()})")
    earlier = Hold.read(target.config.run_dir)
    record.save(target.config.run_dir)
    report: dict = {"held": True, "model": target.model, "inflight": inflight}
    try:
        if inflight == "drain":
            url = target.config.server_url
            if not url:
                obs = observe(target.config, select_backend(target.config, backend_name), target.pid, force=True)
                url = obs.capabilities.url
            report["drain"] = drain(url, drain_timeout_s)
            if not report["drain"]["drained"]:
                logger.warning(
                    "{} request(s) still in vLLM after {:g} s: held across the suspend (mode=keep)",
                    report["drain"]["left"],
                    drain_timeout_s,
                )
        suspended = move_to(SUSPEND, target.config, pid=target.pid, backend_name=backend_name)
    except BaseException:
        if earlier is None:
            Hold.clear(target.config.run_dir)
        else:
            earlier.save(target.config.run_dir)
        raise
    clear_asleep(target.config.run_dir)  # a light sleep, if any, is now a suspend
    report["suspend"] = suspended.to_json()
    return report


def release(target: Target, *, resume: bool = True, backend_name: str | None = None) -> dict:
    """End the hold, then resume the server (unless `resume` is False: the gate wakes it on the next request)."""
    report: dict = {"released": Hold.clear(target.config.run_dir), "model": target.model}
    if resume:
        report["resume"] = move_to(RESUME, target.config, pid=target.pid, backend_name=backend_name).to_json()
    return report
