#!/usr/bin/env python3
"""The GPU suite: a real vLLM (or, with --target cpu, the stand-in over the fake GPU) under the real
supervisord with the project's supervisord.conf, driven by selftest and cuda-toggle-all's library.

Each subcommand is one step; they share a work folder (SUITE_WORK, default /tmp/gpu-suite) where the
server keeps running between steps (supervisord runs in its own session), and every step adds its figures
to one JSON file (SUITE_WORK/results.json). `start` writes what it launched (model, TP size, dtype, ports)
to SUITE_WORK/server.json, and every later step serves that server, so a run can be split over several
commands. tests/gpu/README.md has the command lines of a whole run.

The server's settings (options before the step, or SUITE_* in the environment):
    --model tiny | 8b-shaped | PATH   tiny: the tiny random Qwen3 (SUITE_TINY_DIR); 8b-shaped: Qwen3-8B-AWQ's
                                     shape built by scripts/build_dummy_model.py (SUITE_SHAPED_DIR), served
                                     with --load-format dummy --quantization awq
    --tp 1|2|4|8                     tensor-parallel size (SUITE_TP, default 2)
    --dtype D                        SUITE_DTYPE (default: float16 for 8b-shaped, which AWQ needs, else bfloat16)

    run_suite.py machine                         what the figures come from (cards, driver, versions)
    run_suite.py build-model                     write the 8B-shaped model directory (no weights)
    run_suite.py start --gb 64 [--sleep-mode]    start the server sized to ~64 GB per GPU, warm it up, wait until ready
    run_suite.py cycles --modes plain,hybrid --cycles 3
                                                 per-cycle suspend/resume figures, first token through the gate,
                                                 logprob equality of requests run alone before and after
    run_suite.py acceptance                      plain and hybrid with requests in flight and queued, load
    run_suite.py selftest --label 12gb --cycles 3
    run_suite.py protocols --cycles 2            our parallel protocol against the seed's, same server
    run_suite.py load --clients 4 --cycles 10    suspend/resume under streaming load
    run_suite.py gate --cycles 3                 wake on request through the gate: first-request latency
    run_suite.py hybrid --cycles 2               plain against hybrid, with requests during the suspend
    run_suite.py refusal                         misconfigured servers are refused, and still answer
    run_suite.py stop
    run_suite.py report                          the results as Markdown tables
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from entrypoint.base.config import load_config  # noqa: E402
from entrypoint.base.errors import ToolError  # noqa: E402
from entrypoint.cuda.choose import select_backend  # noqa: E402
from entrypoint.cuda.driver_backend import DriverBackend  # noqa: E402
from entrypoint.cuda.gpus import read_gpus  # noqa: E402
from entrypoint.cycle.openai_client import OpenAIClient  # noqa: E402
from entrypoint.suspend.api import RESUME, SUSPEND, move_to  # noqa: E402
from entrypoint.suspend.records import SuspendRecord  # noqa: E402
from entrypoint.suspend.safety import REQUIRED_SERVER_ENV  # noqa: E402
from entrypoint.suspend.status import status  # noqa: E402
from tests.testing import free_port  # noqa: E402

WORK = Path(os.environ.get("SUITE_WORK", "/tmp/gpu-suite"))
RESULTS = Path(os.environ.get("SUITE_RESULTS", str(WORK / "results.json")))
SERVER_FILE = WORK / "server.json"
SITE = os.environ.get("SUITE_SITE", "/tmp/site")
# On the GPU machine vLLM listens where the container's does (8001, the gate on 8000); the CPU run takes
# free ports, since another stand-in on the same machine may hold those.
GPU_VLLM_PORT = int(os.environ.get("SUITE_VLLM_PORT", "8001"))
GPU_GATE_PORT = int(os.environ.get("SUITE_GATE_PORT", "8000"))
MIB_PER_GB = 1000**3 / 2**20
# vLLM's OpenAI server clamps a logprob of -inf to -9999.0 so that its JSON stays valid (its serving_chat.py
# and serving_completion.py): such a value is no finite figure.
VLLM_NEG_INF = -9999.0
PROMPTS = [
    "Say hello in one short sentence.",
    "List three colours.",
    "What is the capital of France?",
    "Count from one to five.",
]
# What TP>1 suspend/resume needs; NVLS stays off on the device machine in any case.
SAFE_ENV = {**REQUIRED_SERVER_ENV, "VLLM_ALLREDUCE_USE_FLASHINFER": "0"}
VLLM_ENV = {
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600",
    "TRITON_CACHE_DIR": "/tmp/triton-cache",
}


def log(message: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- results ---------------------------------------------------------------------------------------------


def load_results() -> dict:
    try:
        return json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        return {"steps": []}


def save_step(name: str, data: dict) -> None:
    results = load_results()
    results["steps"].append({"step": name, "at": time.strftime("%Y-%m-%d %H:%M:%S"), **data})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    out = os.environ.get("OUT")
    if out:
        shutil.copy(RESULTS, Path(out) / "results.json")


# --- the server's settings --------------------------------------------------------------------------------


@dataclass
class Server:
    """What `start` launched; saved in SUITE_WORK/server.json so that later steps (later commands) find it."""

    model: str  # tiny | 8b-shaped | a path
    path: str
    served_name: str
    tp: int
    dtype: str
    vllm_port: int
    gate_port: int
    gb: float = 0.0
    util: float = 0.0
    sleep_mode: bool = False
    suspends: int = 0  # suspends since the start: the first one of a fresh server is reported apart
    # GPU memory in use before the server started (0 on an idle real GPU; the fake GPU's baseline on the
    # CPU run): what a suspended server must be back to
    idle_mib: list[int] = field(default_factory=list)
    quantization: str = ""  # vLLM's --quantization; empty: vLLM picks from the config (awq_marlin for AWQ)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.vllm_port}"

    @property
    def gate_url(self) -> str:
        return f"http://127.0.0.1:{self.gate_port}"

    @property
    def shaped(self) -> bool:
        return self.model == "8b-shaped"

    def save(self) -> None:
        SERVER_FILE.write_text(json.dumps(asdict(self), indent=2))

    def held_mib(self, used: list[int]) -> int:
        """GPU memory the server holds, of `used` (all GPUs together)."""
        idle = self.idle_mib or [0] * len(used)
        return sum(max(0, u - i) for u, i in zip(used, idle, strict=False))

    def count_suspend(self) -> bool:
        """Count one suspend; True when it is the first of this server."""
        first = self.suspends == 0
        self.suspends += 1
        self.save()
        return first


def server_from_settings(args: argparse.Namespace) -> Server:
    """The server the settings describe (not yet started): model directory, TP size, dtype, ports."""
    if args.model == "tiny":
        path, served = args.tiny_dir, "tiny"
    elif args.model == "8b-shaped":
        path, served = args.shaped_dir, "qwen3-8b-shaped"
    else:
        path, served = args.model, "tiny"  # a model path given as such (the suite's earlier setting)
    dtype = args.dtype or ("float16" if args.model == "8b-shaped" else "bfloat16")
    if args.target == "cpu":
        vllm_port, gate_port = free_port(), free_port()
    else:
        vllm_port, gate_port = GPU_VLLM_PORT, GPU_GATE_PORT
    quantization = args.quantization if args.quantization is not None else ("awq" if args.model == "8b-shaped" else "")
    return Server(args.model, path, served, args.tp, dtype, vllm_port, gate_port, quantization=quantization)


_SERVER: Server | None = None


def server() -> Server:
    """The server `start` launched (SUITE_WORK/server.json); the settings' server when none was started."""
    assert _SERVER is not None, "target_from() first"
    return _SERVER


def load_server(args: argparse.Namespace) -> Server:
    try:
        return Server(**json.loads(SERVER_FILE.read_text()))
    except (OSError, ValueError, TypeError):
        return server_from_settings(args)


# --- the environment of the server and of the tool -------------------------------------------------------


class Target:
    """What the suite runs against: real vLLM on GPUs, or the CPU stand-in over the fake GPU."""

    def __init__(self, name: str):
        self.name = name
        self.fake_dir = WORK / "fake-gpu"

    def tool_env(self) -> dict[str, str]:
        env = {
            "CUDA_TOGGLE_SUPERVISOR_URL": f"unix://{WORK}/sv/supervisord.sock",
            "CUDA_TOGGLE_RUN_DIR": str(WORK / "run"),
            "CUDA_TOGGLE_BUSY_WAIT_S": "600",
            "CUDA_TOGGLE_PROGRESS_S": "10",
        }
        if self.name == "cpu":
            env.update(
                {
                    "FAKE_CUDA_STATE_DIR": str(self.fake_dir),
                    "PATH": f"{REPO / 'tests' / 'fakes'}:{os.environ['PATH']}",
                    "CUDA_TOGGLE_BACKEND": "cli",
                    "CUDA_TOGGLE_GPU_QUERY": "nvidia-smi",
                    # the fake GPU's memory is not copied to this machine's RAM: no host-RAM refusal
                    "CUDA_TOGGLE_HOST_RAM_MIB": str(2**24),
                }
            )
        else:
            env["CUDA_TOGGLE_BACKEND"] = "driver"  # there is no cuda-checkpoint binary on the GPU machine
            ram_gib = psutil.virtual_memory().total / 2**30
            if ram_gib < 200 and "CUDA_TOGGLE_HOST_RAM_MIB" not in os.environ:
                # A VM whose memory grows on demand reads a small MemTotal (31 GiB at the start of a
                # 256 GiB two-H200 machine); state what it really has.
                env["CUDA_TOGGLE_HOST_RAM_MIB"] = str(240 * 1024)
        return env

    def prepare(self) -> None:
        os.environ.update(self.tool_env())
        if self.name == "cpu" and not (self.fake_dir / "gpus").exists():
            sys.path.insert(0, str(REPO / "tests" / "fakes"))
            import fakegpu

            fakegpu.write_gpus(self.fake_dir, [(0, "GPU-fake-0", 81559, 4), (1, "GPU-fake-1", 81559, 4)])

    def supervised_env(self, gate_launcher: str) -> dict[str, str]:
        """What docker/start-services.sh and supervisord.conf read, pointed at this checkout and SUITE_WORK."""
        return {
            "SUPERVISOR_RUN_DIR": str(WORK / "sv"),
            "SUPERVISOR_CONF": str(REPO / "supervisord.conf"),
            "SUPERVISORD_BIN": str(supervisord_wrapper()),
            "VLLM_ARGS_FILE": str(WORK / "vllm-args"),
            "VLLM_LAUNCHER": str(REPO / "docker" / "run-vllm.sh"),
            "VLLM_REAPER": str(REPO / "docker" / "vllm-reaper.sh"),
            "GATE_LAUNCHER": gate_launcher,
            "VLLM_SERVER_CMD": self.server_command(),
        }

    def server_command(self) -> str:
        if self.name == "cpu":
            return f"{sys.executable} {REPO / 'tests' / 'fakes' / 'standin_vllm.py'}"
        return "python3 -m vllm.entrypoints.openai.api_server"

    def server_args(self, srv: Server, sleep_mode: bool, safe: bool = True) -> list[str]:
        args = [
            "--model",
            srv.path,
            "--served-model-name",
            srv.served_name,
            "--tensor-parallel-size",
            str(srv.tp),
            "--enforce-eager",
            "--attention-backend",
            "TRITON_ATTN",
            "--dtype",
            srv.dtype,
            "--max-num-seqs",
            "16",
            "--max-model-len",
            "512",  # the acceptance's longest request: 400 tokens and a short prompt
            "--gpu-memory-utilization",
            f"{srv.util:.3f}",
            "--host",
            "127.0.0.1",
            "--port",
            str(srv.vllm_port),
        ]
        if srv.shaped:
            args += ["--load-format", "dummy"]  # random weights drawn by vLLM itself: no weight files
        if srv.quantization:
            args += ["--quantization", srv.quantization]
        if safe:
            args.append("--disable-custom-all-reduce")
        if sleep_mode:
            args.append("--enable-sleep-mode")
        return args

    def server_env(self, sleep_mode: bool, safe: bool = True) -> dict[str, str]:
        env = {**os.environ, **VLLM_ENV, "PYTHONPATH": f"{SITE}:{REPO}"}
        for name in SAFE_ENV:
            env.pop(name, None)
        env.update(SAFE_ENV if safe else {"NCCL_NVLS_ENABLE": "0", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"})
        if sleep_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env


def target_from(args: argparse.Namespace) -> Target:
    global _SERVER
    target = Target(args.target)
    target.prepare()
    _SERVER = load_server(args)
    return target


def gpu_totals_mib() -> list[int]:
    return [gpu.total_mib for gpu in read_gpus(load_config()).gpus]


def gpu_used_mib() -> list[int]:
    return [gpu.used_mib for gpu in read_gpus(load_config()).gpus]


# --- server lifecycle ------------------------------------------------------------------------------------


def supervisord_wrapper() -> Path:
    """supervisord as a command (pip --target installs no scripts on the GPU machine)."""
    path = WORK / "supervisord"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -m supervisor.supervisord "$@"\n')
    path.chmod(0o755)
    return path


def build_model(args: argparse.Namespace) -> None:
    """Write the 8B-shaped model directory (config and tokenizer, no weights) where --model 8b-shaped finds it."""
    ensure_shaped_model(Path(args.shaped_dir))


def ensure_shaped_model(path: Path) -> None:
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "build_dummy_model.py"), str(path)])
    if done.returncode != 0:
        raise SystemExit(f"could not build the 8B-shaped model directory {path}")


def start(args: argparse.Namespace) -> None:
    global _SERVER
    target = target_from(args)
    stop_supervisord(quiet=True)
    srv = _SERVER = server_from_settings(args)
    srv.idle_mib = gpu_used_mib()
    if srv.shaped:
        ensure_shaped_model(Path(srv.path))
    totals = gpu_totals_mib()
    srv.gb, srv.sleep_mode = args.gb, args.sleep_mode or args.container_like
    # --gb is GB per GPU, whatever the card: 64 GB is 0.80 of an 80 GB card, 0.45 of a 141 GB H200.
    srv.util = round(args.gb * MIB_PER_GB / min(totals), 3) if totals else 0.15
    srv.save()
    (WORK / "sv").mkdir(parents=True, exist_ok=True)
    env = target.server_env(args.sleep_mode)
    gate_launcher = "sleep infinity"
    if args.container_like:
        # As the compose file runs it: sleep mode switched on by run-vllm.sh (VLLM_SLEEP_MODE=1 adds
        # --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1), and the real gate as supervisord's program `gate`.
        env.update(
            {
                "VLLM_SLEEP_MODE": "1",
                "GATE_HOST": "127.0.0.1",
                "GATE_PORT": str(srv.gate_port),
                "GATE_UPSTREAM": srv.url,
            }
        )
        gate_launcher = f"{sys.executable} -m entrypoint.gate"
    # supervisord.conf's program `gate` needs a command; unless --container-like, the suite starts its own gate
    # per step (gate_running), so the supervised one is a placeholder holding no port.
    env.update(target.supervised_env(gate_launcher))
    log_path = WORK / "server.log"
    with log_path.open("ab") as log_file:
        supervisord = subprocess.Popen(
            [str(REPO / "docker" / "start-services.sh"), *target.server_args(srv, args.sleep_mode)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    began = time.monotonic()
    log(
        f"server starting: {srv.model} ({srv.path}), TP={srv.tp}, {srv.dtype}, {args.gb} GB per GPU "
        f"(--gpu-memory-utilization {srv.util:.3f}), sleep mode {srv.sleep_mode}, port {srv.vllm_port}"
    )
    client = OpenAIClient(srv.url)
    while True:  # in slices, so that a supervisord that exits at once is reported at once
        try:
            client.wait_ready(srv.served_name, 10, progress_s=15)
            break
        except TimeoutError as error:
            if supervisord.poll() is not None or time.monotonic() - began > args.timeout:
                print(log_path.read_text()[-6000:])
                raise SystemExit(f"server did not start (supervisord exit code {supervisord.poll()}): {error}")
            log(f"waiting for the server: {time.monotonic() - began:.0f} s")
    seconds = time.monotonic() - began
    used = gpu_used_mib()
    log(f"server ready after {seconds:.1f} s; GPU memory used: {used} MiB")
    warmup = warm_up(srv) if args.warmup else None
    save_step(
        "start" if not args.container_like else "start-container-like",
        {
            "server": asdict(srv),
            "gb_target": args.gb,
            "util": srv.util,
            "sleep_mode": srv.sleep_mode,
            "ready_s": round(seconds, 1),
            "gpu_used_mib": used,
            "warmup": warmup,
        },
    )


def warm_up(srv: Server) -> dict | None:
    """One sleep/wake cycle of vLLM's own before the first measured suspend, where the server has sleep mode.

    The first sleep of a fresh vLLM pins host memory for the weights (5.5 s for 6.7 GiB on an H200,
    measured); torch keeps it cached, so later sleeps take 0.2 s. Its own figures are recorded.
    """
    try:
        if requests.get(f"{srv.url}/is_sleeping", timeout=10).status_code != 200:
            log("warm-up skipped: the server has no sleep mode")
            return None
        used_before = gpu_used_mib()
        began = time.monotonic()
        requests.post(f"{srv.url}/sleep", params={"level": "1", "mode": "keep"}, timeout=600).raise_for_status()
        sleep_s = time.monotonic() - began
        used_asleep = gpu_used_mib()
        began = time.monotonic()
        requests.post(f"{srv.url}/wake_up", timeout=600).raise_for_status()
        wake_s = time.monotonic() - began
        sleeping = requests.get(f"{srv.url}/is_sleeping", timeout=10).json().get("is_sleeping")
    except (requests.RequestException, ValueError) as error:
        raise SystemExit(f"warm-up sleep/wake failed: {error}")
    if sleeping:
        raise SystemExit("warm-up: the server still says it is sleeping after /wake_up")
    answer = ask(srv.url, chat_body(srv, PROMPTS[0], 4))
    result = {
        "sleep_s": round(sleep_s, 3),
        "wake_s": round(wake_s, 3),
        "used_before_mib": used_before,
        "used_asleep_mib": used_asleep,
        "answer_ok": answer.complete(4),
    }
    log(f"warm-up: sleep {sleep_s:.2f} s, wake {wake_s:.2f} s, GPU memory asleep {used_asleep} MiB")
    if not result["answer_ok"]:
        raise SystemExit(f"warm-up: the server did not answer after /wake_up: {answer.error or answer.finish_reason}")
    return result


def supervisor_proxy():
    from entrypoint.server.discovery import supervisor_proxy as proxy

    return proxy(f"unix://{WORK}/sv/supervisord.sock")


def stop_supervisord(quiet: bool = False) -> None:
    """Stop the program and supervisord; kill whatever is left of the server's tree."""
    pidfile = WORK / "sv" / "supervisord.pid"
    if not pidfile.exists():
        return
    with contextlib.suppress(Exception):
        move_to(RESUME, load_config())  # never stop a suspended server: resume it first
    with contextlib.suppress(Exception):
        supervisor_proxy().supervisor.stopProcess("vllm", True)
    with contextlib.suppress(Exception):
        supervisor_proxy().supervisor.shutdown()
    with contextlib.suppress(ValueError, OSError):
        pid = int(pidfile.read_text())
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=60)
    pidfile.unlink(missing_ok=True)
    if not quiet:
        log("server stopped")


def stop(args: argparse.Namespace) -> None:
    target_from(args)
    stop_supervisord()


# --- steps ------------------------------------------------------------------------------------------------


def run_selftest(args: argparse.Namespace) -> None:
    target_from(args)
    report_file = WORK / f"selftest-{args.label}.json"
    command = [
        sys.executable,
        "-m",
        "entrypoint.selftest",
        "--url",
        f"http://127.0.0.1:{args.port}" if args.port else server().url,
        "--model",
        server().served_name,
        "--cycles",
        str(args.cycles),
        "--max-tokens",
        "32",
        "--report",
        str(report_file),
    ]
    if args.mode:
        os.environ["CUDA_TOGGLE_MODE"] = args.mode
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": f"{SITE}:{REPO}"})
    report = json.loads(report_file.read_text())
    save_step("selftest", {"label": args.label, "exit_code": done.returncode, "report": report})
    if done.returncode != 0:
        raise SystemExit(f"selftest failed (exit {done.returncode})")


def cuda_pids() -> list[int]:
    return [entry["pid"] for entry in status(load_config()).pids]


def protocols(args: argparse.Namespace) -> None:
    """Our protocol against the seed's on the same idle server, alternating: medians and the ratio."""
    from benchmarks.seed_protocol import seed_toggle_all

    target_from(args)
    config = load_config()
    backend = select_backend(config)
    ours = {"suspend": [], "resume": []}
    seed = {"suspend": [], "resume": []}
    for cycle in range(1, args.cycles + 1):
        down = move_to(SUSPEND, config, mode="plain")
        up = move_to(RESUME, config)
        ours["suspend"].append(down.seconds)
        ours["resume"].append(up.seconds)
        pids = cuda_pids()
        began = time.monotonic()
        seed_toggle_all(backend, pids, "checkpointed")
        seed["suspend"].append(time.monotonic() - began)
        began = time.monotonic()
        seed_toggle_all(backend, pids, "running")
        seed["resume"].append(time.monotonic() - began)
        log(
            f"cycle {cycle}: ours {ours['suspend'][-1]:.2f}/{ours['resume'][-1]:.2f} s, seed "
            f"{seed['suspend'][-1]:.2f}/{seed['resume'][-1]:.2f} s (suspend/resume)"
        )
    summary = {}
    for phase in ("suspend", "resume"):
        summary[phase] = {
            "ours_median_s": round(statistics.median(ours[phase]), 3),
            "seed_median_s": round(statistics.median(seed[phase]), 3),
            "seed_over_ours": round(statistics.median(seed[phase]) / statistics.median(ours[phase]), 2),
            "ours_s": [round(x, 3) for x in ours[phase]],
            "seed_s": [round(x, 3) for x in seed[phase]],
        }
    log(json.dumps(summary))
    save_step(
        "protocols", {"cycles": args.cycles, "gpu_used_mib": [g.used_mib for g in read_gpus(config).gpus], **summary}
    )


class ClientThreads:
    """`clients` threads running run_client(number) from `with` until its end (then told to stop, and joined)."""

    clients: int
    stop: threading.Event

    def run_client(self, number: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.threads = [threading.Thread(target=self.run_client, args=(n,), daemon=True) for n in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=900)


class LoadClients(ClientThreads):
    """Clients that send greedy requests (half of them streamed) without pause, checking every answer."""

    def __init__(self, url: str, clients: int, max_tokens: int = 24):
        self.url = url
        self.clients = clients
        self.max_tokens = max_tokens
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failed: list[str] = []
        self.waits: list[float] = []
        self.reference: dict[str, str] = {}
        self.threads: list[threading.Thread] = []

    def body(self, prompt: str, stream: bool) -> dict:
        return {
            "model": server().served_name,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "seed": 0,
            "max_tokens": self.max_tokens,
            "stream": stream,
        }

    def ask(self, session: requests.Session, prompt: str, stream: bool) -> str:
        response = session.post(
            f"{self.url}/v1/chat/completions", json=self.body(prompt, stream), timeout=900, stream=stream
        )
        response.raise_for_status()
        if not stream:
            return response.json()["choices"][0]["message"]["content"]
        text = []
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                text.append(delta.get("content") or "")
        return "".join(text)

    def make_reference(self) -> None:
        with requests.Session() as session:
            for prompt in PROMPTS:
                self.reference[prompt] = self.ask(session, prompt, stream=False)
                assert self.ask(session, prompt, stream=True) == self.reference[prompt], "stream differs from plain"

    def run_client(self, number: int) -> None:
        with requests.Session() as session:
            count = 0
            while not self.stop.is_set():
                prompt = PROMPTS[(number + count) % len(PROMPTS)]
                stream = (number + count) % 2 == 0
                began = time.monotonic()
                try:
                    text = self.ask(session, prompt, stream)
                    with self.lock:
                        if text == self.reference[prompt]:
                            self.ok += 1
                            self.waits.append(time.monotonic() - began)
                        else:
                            self.failed.append(f"different answer for {prompt!r}: {text!r}")
                except Exception as error:  # any failure of a request is what this scenario counts
                    with self.lock:
                        self.failed.append(f"{type(error).__name__}: {error}")
                count += 1

    def __enter__(self) -> LoadClients:
        self.make_reference()
        return super().__enter__()


def tree_pids() -> dict[int, str]:
    from entrypoint.base.processes import walk_tree

    pid = supervisor_proxy().supervisor.getProcessInfo("vllm")["pid"]
    return {p.pid: p.title for p in walk_tree(pid)}


def load(args: argparse.Namespace) -> None:
    """Suspend/resume cycles while clients stream without pause: no failed request, no dead process."""
    target_from(args)
    config = load_config()
    before = tree_pids()
    cycles = []
    with LoadClients(server().url, args.clients) as clients:
        time.sleep(2)
        for cycle in range(1, args.cycles + 1):
            try:
                down = move_to(SUSPEND, config, mode="plain")
                time.sleep(args.hold_s)
                up = move_to(RESUME, config)
            except ToolError as error:
                cycles.append({"error": error.message})
                log(f"cycle {cycle} FAILED: {error.message}")
                break
            cycles.append(
                {"suspend_s": round(down.seconds, 3), "resume_s": round(up.seconds, 3), "lock_rounds": down.lock_rounds}
            )
            log(
                f"cycle {cycle}: suspend {down.seconds:.2f} s ({down.lock_rounds} lock rounds),"
                f" resume {up.seconds:.2f} s; {clients.ok} answers so far, {len(clients.failed)} failed"
            )
            time.sleep(args.gap_s)
    after = tree_pids()
    dead = sorted(set(before) - set(after))
    result = {
        "clients": args.clients,
        "cycles": cycles,
        "answers_ok": clients.ok,
        "failed": len(clients.failed),
        "failures": clients.failed[:10],
        "dead_processes": dead,
        "max_wait_s": round(max(clients.waits), 2) if clients.waits else None,
        "lock_rounds_max": max((c.get("lock_rounds", 0) for c in cycles), default=0),
    }
    log(json.dumps({k: v for k, v in result.items() if k != "cycles"}))
    save_step("load", result)
    if clients.failed or dead or any("error" in c for c in cycles):
        raise SystemExit("load scenario failed")


@contextlib.contextmanager
def gate_running(extra_env: dict[str, str] | None = None):
    env = {
        **os.environ,
        "PYTHONPATH": f"{SITE}:{REPO}",
        "GATE_HOST": "127.0.0.1",
        "GATE_PORT": str(server().gate_port),
        "GATE_UPSTREAM": server().url,
        **(extra_env or {}),
    }
    with (WORK / "gate.log").open("ab") as log_file:
        gate = subprocess.Popen(
            [sys.executable, "-m", "entrypoint.gate"], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{server().gate_url}/gate/status", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield server().gate_url
    finally:
        gate.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            gate.wait(timeout=30)
        if gate.poll() is None:
            gate.kill()


def first_request_after_suspend(gate_url: str, config, mode: str) -> dict:
    """Suspend, then time one request through the gate: it wakes the server and must give the reference."""
    client = OpenAIClient(gate_url)
    reference = client.chat(server().served_name, PROMPTS[0], 24, 0).text
    down = move_to(SUSPEND, config, mode=mode)
    answer = client.chat(server().served_name, PROMPTS[0], 24, 0)
    return {
        "mode": down.mode,
        "suspend_s": round(down.seconds, 3),
        "first_request_s": round(answer.seconds, 3),
        "same_answer": answer.text == reference,
    }


def gate(args: argparse.Namespace) -> None:
    """Wake on request: latency of the first request after a suspend, and a client load across cycles."""
    target_from(args)
    config = load_config()
    results = {"first_request": [], "load": None}
    with gate_running() as url:
        for _ in range(args.cycles):
            results["first_request"].append(first_request_after_suspend(url, config, args.mode))
            log(f"wake on request: {results['first_request'][-1]}")
        before = tree_pids()
        with LoadClients(url, args.clients) as clients:
            for _ in range(args.cycles):
                time.sleep(1)
                move_to(SUSPEND, config, mode=args.mode)
                time.sleep(args.hold_s)  # the clients' requests wake it: the gate resumes on demand
                deadline = time.monotonic() + 300
                while SuspendRecord.any(str(WORK / "run")) and time.monotonic() < deadline:
                    time.sleep(0.2)
        results["load"] = {
            "clients": args.clients,
            "cycles": args.cycles,
            "answers_ok": clients.ok,
            "failed": len(clients.failed),
            "failures": clients.failed[:10],
            "dead_processes": sorted(set(before) - set(tree_pids())),
            "max_wait_s": round(max(clients.waits), 2) if clients.waits else None,
        }
        results["gate_status"] = requests.get(f"{url}/gate/status", timeout=10).json()
    log(json.dumps(results["load"]))
    save_step("gate", results)
    if (
        results["load"]["failed"]
        or results["load"]["dead_processes"]
        or not all(r["same_answer"] for r in results["first_request"])
    ):
        raise SystemExit("gate scenario failed")


def hybrid(args: argparse.Namespace) -> None:
    """Plain against hybrid on the same sleep-mode server, alternating; then requests during a hybrid suspend
    through the gate must get the reference answers."""
    target_from(args)
    config = load_config()
    runs = {"plain": [], "hybrid": []}
    for cycle in range(1, args.cycles + 1):
        for mode in ("plain", "hybrid"):
            used_before = [g.used_mib for g in read_gpus(config).gpus]
            down = move_to(SUSPEND, config, mode=mode)
            used_suspended = [g.used_mib for g in read_gpus(config).gpus]
            up = move_to(RESUME, config)
            runs[mode].append(
                {
                    "mode": down.mode,
                    "suspend_s": round(down.seconds, 3),
                    "resume_s": round(up.seconds, 3),
                    "phases_suspend": {k: round(v, 3) for k, v in down.phases.items()},
                    "phases_resume": {k: round(v, 3) for k, v in up.phases.items()},
                    "used_before_mib": used_before,
                    "used_suspended_mib": used_suspended,
                }
            )
            log(
                f"cycle {cycle} {mode}: suspend {down.seconds:.2f} s, resume {up.seconds:.2f} s, "
                f"suspended memory {used_suspended} MiB (mode ran: {down.mode})"
            )
    summary = {
        mode: {
            "suspend_median_s": round(statistics.median(r["suspend_s"] for r in rows), 3),
            "resume_median_s": round(statistics.median(r["resume_s"] for r in rows), 3),
        }
        for mode, rows in runs.items()
    }
    summary["suspend_plain_over_hybrid"] = round(
        summary["plain"]["suspend_median_s"] / summary["hybrid"]["suspend_median_s"], 1
    )
    summary["resume_plain_over_hybrid"] = round(
        summary["plain"]["resume_median_s"] / summary["hybrid"]["resume_median_s"], 1
    )
    during = []
    with gate_running() as url:
        client = OpenAIClient(url)
        reference = {prompt: client.chat(server().served_name, prompt, 24, 0).text for prompt in PROMPTS}
        for _ in range(args.cycles):
            move_to(SUSPEND, config, mode="hybrid")
            answers: dict[str, str] = {}

            def ask(prompt: str, answers: dict[str, str] = answers) -> None:
                answers[prompt] = client.chat(server().served_name, prompt, 24, 0).text

            threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
            began = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(600)
            during.append(
                {
                    "requests": len(PROMPTS),
                    "same_answers": sum(answers.get(p) == reference[p] for p in PROMPTS),
                    "all_answered_s": round(time.monotonic() - began, 3),
                }
            )
            log(f"requests during a hybrid suspend: {during[-1]}")
    save_step("hybrid", {"cycles": args.cycles, "runs": runs, "summary": summary, "requests_during_suspend": during})
    log(json.dumps(summary))
    if not all(d["same_answers"] == d["requests"] for d in during):
        raise SystemExit("requests during a hybrid suspend got different answers")


# --- requests whose every answer is checked ---------------------------------------------------------------


@dataclass
class Answer:
    """One chat completion as the client saw it."""

    status: int | None = None
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    first_token_s: float | None = None
    total_s: float = 0.0
    # per generated token: [token, logprob, [[top token, logprob], ...]], when asked for
    logprobs: list | None = None
    error: str = ""

    def complete(self, max_tokens: int) -> bool:
        return self.verdict(max_tokens) == "ok"

    def verdict(self, max_tokens: int) -> str:
        """ok, failed (no answer), aborted (vLLM gave up on it) or truncated (fewer tokens than asked).

        Every request of the suite sets ignore_eos, so a whole answer has exactly max_tokens tokens.
        """
        if self.error or self.status != 200:
            return "failed"
        if self.finish_reason == "abort":
            return "aborted"
        if self.finish_reason != "length" or self.tokens != max_tokens:
            return "truncated"
        return "ok"

    def brief(self) -> dict:
        return {
            "status": self.status,
            "finish_reason": self.finish_reason,
            "tokens": self.tokens,
            "first_token_s": None if self.first_token_s is None else round(self.first_token_s, 3),
            "total_s": round(self.total_s, 3),
            "error": self.error[:300],
        }


def chat_body(srv: Server, prompt: str, max_tokens: int, stream: bool = False, logprobs: bool = False) -> dict:
    return chat_request(srv.served_name, prompt, max_tokens, stream, logprobs)


def chat_request(model: str, prompt: str, max_tokens: int, stream: bool = False, logprobs: bool = False) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "seed": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,  # vLLM's extension: random weights may end early; every answer has max_tokens
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    if logprobs:
        body.update(logprobs=True, top_logprobs=5)
    return body


def _logprob_rows(content: list | None) -> list:
    return [
        [item["token"], item["logprob"], [[top["token"], top["logprob"]] for top in item.get("top_logprobs") or []]]
        for item in content or []
    ]


def ask(url: str, body: dict, timeout: float = 900) -> Answer:
    """Send one chat completion; never raises: a failure is recorded in the answer."""
    answer = Answer()
    began = time.monotonic()
    try:
        with requests.post(f"{url}/v1/chat/completions", json=body, timeout=timeout, stream=body.get("stream")) as r:
            answer.status = r.status_code
            if r.status_code != 200:
                answer.error = r.text[:500]
            elif not body.get("stream"):
                data = r.json()
                choice = data["choices"][0]
                answer.text = choice["message"].get("content") or ""
                answer.finish_reason = choice.get("finish_reason")
                answer.tokens = data.get("usage", {}).get("completion_tokens", 0)
                if choice.get("logprobs"):
                    answer.logprobs = _logprob_rows(choice["logprobs"].get("content"))
            else:
                chunks, text = 0, []
                for line in r.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if data.get("usage"):
                        answer.tokens = data["usage"].get("completion_tokens", 0)
                    for choice in data.get("choices") or []:
                        if choice.get("logprobs"):
                            rows = _logprob_rows(choice["logprobs"].get("content"))
                            answer.logprobs = (answer.logprobs or []) + rows
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            chunks += 1
                            text.append(content)
                            if answer.first_token_s is None:
                                answer.first_token_s = time.monotonic() - began
                        if choice.get("finish_reason"):
                            answer.finish_reason = choice["finish_reason"]
                answer.text = "".join(text)
                answer.tokens = answer.tokens or chunks  # a server without usage in streams: one chunk a token
    except (requests.RequestException, ValueError, KeyError, IndexError) as error:
        answer.error = f"{type(error).__name__}: {error}"
    answer.total_s = time.monotonic() - began
    return answer


class Background:
    """Requests sent in threads without waiting; joined later."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.answers: list[tuple[str, int, Answer]] = []  # (where, max_tokens, answer)
        self.lock = threading.Lock()

    def send(self, where: str, url: str, body: dict) -> None:
        def run() -> None:
            answer = ask(url, body)
            with self.lock:
                self.answers.append((where, body["max_tokens"], answer))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.threads = [t for t in self.threads if t.is_alive()]


def count_verdicts(answers: list[tuple[str, int, Answer]], missing: int = 0) -> dict:
    counts = {"requests": len(answers) + missing, "ok": 0, "failed": missing, "truncated": 0, "aborted": 0}
    for _where, max_tokens, answer in answers:
        counts[answer.verdict(max_tokens)] += 1
    return counts


# --- equality by logprobs of requests run alone -----------------------------------------------------------

ALONE_PROMPTS = PROMPTS[:2]
ALONE_TOKENS = 16


def run_alone(srv: Server) -> list[Answer]:
    """The reference prompts, one at a time on an otherwise idle server, with per-token logprobs."""
    return [ask(srv.url, chat_body(srv, prompt, ALONE_TOKENS, logprobs=True)) for prompt in ALONE_PROMPTS]


def compare_alone(before: list[Answer], after: list[Answer], target: str) -> dict:
    """Equal per-token logprobs (and top-5 logprobs) before and after; finite, and not all equal.

    A random model's greedy text is degenerate (equal text proves little); its logprobs are not. The CPU
    stand-in may answer without logprobs: there the text is compared, and the result says so.
    """
    answered = all(a.complete(ALONE_TOKENS) for a in before + after)
    has_logprobs = answered and all(a.logprobs for a in before + after)
    result: dict = {"requests": len(before), "answered": answered, "by": "logprobs" if has_logprobs else "text"}
    if has_logprobs:
        values = [v for a in before for row in a.logprobs for v in [row[1], *(lp for _t, lp in row[2])]]
        result.update(
            equal=all(b.logprobs == a.logprobs for b, a in zip(before, after, strict=True)),
            finite=all(math.isfinite(v) and v > VLLM_NEG_INF for v in values),
            varied=len(set(values)) > 1,
            values=len(values),
        )
        result["ok"] = result["equal"] and result["finite"] and result["varied"]
    else:
        result["equal"] = answered and all(b.text == a.text for b, a in zip(before, after, strict=True))
        result["ok"] = result["equal"] and target == "cpu"  # on GPUs vLLM must give logprobs
    if not result["ok"]:
        result["first_difference"] = next(
            (
                {"before": b.brief(), "after": a.brief()}
                for b, a in zip(before, after, strict=True)
                if (b.text, b.logprobs) != (a.text, a.logprobs)
            ),
            None,
        )
    return result


# --- one measured suspend/resume --------------------------------------------------------------------------


def released_gb(before: list[int], after: list[int]) -> float:
    return round(sum(max(0, b - a) for b, a in zip(before, after, strict=True)) / MIB_PER_GB, 2)


def measured_suspend(config, mode: str) -> tuple[dict, bool]:
    """Suspend; the figures of it (seconds, phases, GB released, GB/s, memory left) and whether it was ok."""
    srv = server()
    used_before = gpu_used_mib()
    first = srv.count_suspend()
    try:
        down = move_to(SUSPEND, config, mode=mode)
    except ToolError as error:
        result = getattr(error, "result", None)
        return {
            "mode_asked": mode,
            "first_of_server": first,
            "used_suspended_mib": gpu_used_mib(),
            "error": error.message,
            "suspend": result.to_json() if result else None,
        }, False
    used_suspended = gpu_used_mib()
    gb = released_gb(used_before, used_suspended)
    row = {
        "mode_asked": mode,
        "mode": down.mode,
        "quiesce": getattr(down, "quiesce", None),
        "first_of_server": first,
        "suspend_s": round(down.seconds, 3),
        "released_gb": gb,
        "suspend_gb_s": round(gb / down.seconds, 2) if down.seconds else None,
        "used_before_mib": used_before,
        "used_suspended_mib": used_suspended,
        "server_suspended_mib": srv.held_mib(used_suspended),
        "phases_suspend": {k: round(v, 3) for k, v in down.phases.items()},
        "suspend": down.to_json(),
    }
    return row, bool(down.ok)


def measured_resume(config, row: dict) -> bool:
    try:
        up = move_to(RESUME, config)
    except ToolError as error:
        result = getattr(error, "result", None)
        row.update(error=error.message, resume=result.to_json() if result else None)
        return False
    used_after = gpu_used_mib()
    gb = released_gb(used_after, row["used_suspended_mib"])  # what came back
    row.update(
        resume_s=round(up.seconds, 3),
        restored_gb=gb,
        resume_gb_s=round(gb / up.seconds, 2) if up.seconds else None,
        used_after_mib=used_after,
        phases_resume={k: round(v, 3) for k, v in up.phases.items()},
        resume=up.to_json(),
    )
    return bool(up.ok)


def wait_resumed(timeout_s: float = 600) -> bool:
    """Wait until no suspend record is left (the gate resumed the server)."""
    run_dir = load_config().run_dir
    deadline = time.monotonic() + timeout_s
    while SuspendRecord.any(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not SuspendRecord.any(run_dir)


def cycle_log(label: str, row: dict) -> None:
    if "error" in row:
        log(f"{label}: FAILED: {row['error']}")
        return
    log(
        f"{label}: {row['mode']} suspend {row['suspend_s']:.2f} s ({row['released_gb']} GB, "
        f"{row['suspend_gb_s']} GB/s; {row['used_suspended_mib']} MiB left), resume {row.get('resume_s', 0):.2f} s"
        + (" [first suspend of this server]" if row["first_of_server"] else "")
    )


# --- step: cycles -----------------------------------------------------------------------------------------


def cycles(args: argparse.Namespace) -> None:
    """Per-cycle figures of plain and hybrid suspend/resume, the first token of a request that wakes the
    server through the gate, and the equality of requests run alone before and after."""
    target_from(args)
    srv, config = server(), load_config()
    modes = [m for m in args.modes.replace(",", " ").split() if m]
    reference = run_alone(srv)
    rows: list[dict] = []
    equality: list[dict] = []
    ok = True
    for mode in modes:
        for number in range(1, args.cycles + 1):
            row, good = measured_suspend(config, mode)
            good = measured_resume(config, row) and good  # resumed even after a failed suspend
            row["cycle"] = number
            rows.append(row)
            cycle_log(f"cycle {number}", row)
            ok = ok and good
            if not good:
                break
        equality.append({"after": f"{mode} cycles", **compare_alone(reference, run_alone(srv), args.target)})
    wake: list[dict] = []
    with gate_running() as gate_url:
        for mode in modes:
            for number in range(1, args.wake_cycles + 1):
                row, good = measured_suspend(config, mode)
                if good:
                    answer = ask(gate_url, chat_body(srv, PROMPTS[2], 16, stream=True))
                    good = answer.complete(16) and wait_resumed()
                    gate_status = requests.get(f"{gate_url}/gate/status", timeout=10).json()
                    row.update(
                        resume_by="gate",
                        first_token_s=answer.brief()["first_token_s"],
                        answer_s=round(answer.total_s, 3),
                        answer=answer.brief(),
                        gate_resume_s=gate_status.get("last_resume_s"),
                        used_after_mib=gpu_used_mib(),
                    )
                else:
                    measured_resume(config, row)
                row["cycle"] = number
                wake.append(row)
                log(
                    f"wake through the gate ({mode}): suspend {row.get('suspend_s')} s, first token "
                    f"{row.get('first_token_s')} s, whole answer {row.get('answer_s')} s"
                )
                ok = ok and good
        equality.append({"after": "wake through the gate", **compare_alone(reference, run_alone(srv), args.target)})
    summary = summarize(rows, wake)
    save_step(
        "cycles",
        {
            "server": asdict(srv),
            "cycles": rows,
            "wake_through_gate": wake,
            "equality": equality,
            "summary": summary,
        },
    )
    log(json.dumps(summary))
    if not ok or not all(e["ok"] for e in equality):
        raise SystemExit("cycles: a cycle failed or the requests run alone differ (see results.json)")


def summarize(rows: list[dict], wake: list[dict]) -> dict:
    summary: dict = {}
    for mode in sorted({r.get("mode", r["mode_asked"]) for r in rows + wake}):
        mine = [r for r in rows if r.get("mode") == mode and "resume_s" in r]
        later = [r for r in mine if not r["first_of_server"]]
        first = next((r for r in rows + wake if r.get("mode") == mode and r["first_of_server"]), None)
        woken = [r["first_token_s"] for r in wake if r.get("mode") == mode and r.get("first_token_s") is not None]
        summary[mode] = {
            "cycles": len(mine),
            "first_suspend_s": first.get("suspend_s") if first else None,
            "suspend_median_s": round(statistics.median(r["suspend_s"] for r in later), 3) if later else None,
            "resume_median_s": round(statistics.median(r["resume_s"] for r in mine), 3) if mine else None,
            "released_gb_median": round(statistics.median(r["released_gb"] for r in mine), 2) if mine else None,
            "first_token_through_gate_s": max(woken) if woken else None,
        }
    return summary


# --- step: acceptance -------------------------------------------------------------------------------------


def acceptance(args: argparse.Namespace) -> None:
    """The acceptance run: plain and hybrid cycles with a long request in flight at every suspend and
    requests sent while suspended (straight to vLLM, then through the gate, which wakes the server), and
    client load over hybrid cycles. Nothing may fail, be truncated or aborted; requests run alone must
    be equal by logprobs before and after; the GPUs must read 0 MiB while suspended."""
    target_from(args)
    srv, config = server(), load_config()
    parts = [p for p in args.parts.replace(",", " ").split() if p]
    reference = run_alone(srv)
    report: dict = {"server": asdict(srv), "parts": {}, "equality": []}
    with gate_running() as gate_url:
        for part in parts:
            if part == "load":
                report["parts"][part] = acceptance_load(args, config)
            else:
                report["parts"][part] = acceptance_cycles(args, config, part, gate_url)
            report["equality"].append({"after": part, **compare_alone(reference, run_alone(srv), args.target)})
    totals = {"failed": 0, "truncated": 0, "aborted": 0, "toggle_errors": 0, "dead_processes": 0}
    max_suspended = 0
    for result in report["parts"].values():
        for key in totals:
            totals[key] += result["counts"].get(key, 0)
        max_suspended = max(max_suspended, result["max_suspended_mib"])
    report["totals"] = {
        **totals,
        "max_suspended_mib": max_suspended,
        "equal_by_logprobs": all(e["ok"] and e["by"] == "logprobs" for e in report["equality"]),
    }
    passed = (
        not any(totals.values())
        and max_suspended == 0
        and all(e["ok"] for e in report["equality"])
        and all(r["cycles_done"] == r["cycles_asked"] for r in report["parts"].values())
    )
    report["passed"] = passed
    save_step("acceptance", report)
    log(json.dumps({"totals": report["totals"], "passed": passed}))
    if not passed:
        raise SystemExit("acceptance failed (see results.json)")


def acceptance_cycles(args: argparse.Namespace, config, mode: str, gate_url: str) -> dict:
    srv = server()
    answers: list[tuple[str, int, Answer]] = []
    cycles_done, toggle_errors, max_suspended, missing = 0, 0, 0, 0
    rows = []
    for number in range(1, args.cycles + 1):
        pending = Background()
        long_body = chat_body(srv, PROMPTS[3], args.inflight_tokens, stream=True)
        pending.send("in flight", srv.url, long_body)
        # suspend once the long request is decoding, not while it waits for its first token
        deadline = time.monotonic() + 120
        while not vllm_running_requests(srv) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(args.inflight_lead_s)
        in_flight = vllm_running_requests(srv) > 0  # else the long request ended first: no test of it
        row, good = measured_suspend(config, mode)
        row.update(cycle=number, in_flight_at_suspend=in_flight)
        if not in_flight:
            log(f"acceptance {mode} cycle {number}: no request was in flight at the suspend")
            good = False
        if "error" not in row:
            max_suspended = max(max_suspended, row["server_suspended_mib"])
            for index in range(args.straight):  # queued inside vLLM: answered after the resume
                pending.send("straight", srv.url, chat_body(srv, PROMPTS[index % len(PROMPTS)], args.max_tokens))
            time.sleep(0.5)
            for index in range(args.through_gate):  # the first of these wakes the server
                pending.send("gate", gate_url, chat_body(srv, PROMPTS[index % len(PROMPTS)], args.max_tokens, True))
            good = wait_resumed() and good
            row["gate_status"] = requests.get(f"{gate_url}/gate/status", timeout=10).json()
        else:
            measured_resume(config, row)  # put it back; the cycle counts as failed
        pending.join()
        missing += len(pending.threads)
        answers.extend(pending.answers)
        row["answers"] = [{"where": w, **a.brief()} for w, _m, a in pending.answers]
        row["counts"] = count_verdicts(pending.answers, len(pending.threads))
        rows.append(row)
        cycle_log(f"acceptance {mode} cycle {number}", row)
        log(f"acceptance {mode} cycle {number}: answers {row['counts']}")
        cycles_done += good
        toggle_errors += not good
        if not good:
            break
    counts = {**count_verdicts(answers, missing), "toggle_errors": toggle_errors}
    return {
        "cycles_asked": args.cycles,
        "cycles_done": cycles_done,
        "counts": counts,
        "max_suspended_mib": max_suspended,
        "cycles": rows,
    }


def vllm_running_requests(srv: Server) -> float:
    """vllm:num_requests_running from /metrics (0 when it cannot be read)."""
    with contextlib.suppress(requests.RequestException, ValueError):
        for line in requests.get(f"{srv.url}/metrics", timeout=5).text.splitlines():
            if line.startswith("vllm:num_requests_running"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


class CheckedClients(ClientThreads):
    """Clients that stream greedy ignore_eos requests without pause; every answer must come back whole.

    Their text is not compared: a request running across a suspend is preempted and recomputed, or joins
    another batch, and vLLM is not batch-invariant (equality is tested on requests run alone).
    """

    def __init__(self, srv: Server, clients: int, max_tokens: int):
        self.srv, self.clients, self.max_tokens = srv, clients, max_tokens
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[str, int, Answer]] = []
        self.threads: list[threading.Thread] = []

    def run_client(self, number: int) -> None:
        count = 0
        while not self.stop.is_set():
            prompt = PROMPTS[(number + count) % len(PROMPTS)]
            answer = ask(self.srv.url, chat_body(self.srv, prompt, self.max_tokens, stream=True))
            with self.lock:
                self.answers.append((f"client {number}", self.max_tokens, answer))
            count += 1


def acceptance_load(args: argparse.Namespace, config) -> dict:
    rows, cycles_done, toggle_errors, max_suspended = [], 0, 0, 0
    before = tree_pids()
    with CheckedClients(server(), args.clients, args.max_tokens) as clients:
        time.sleep(args.gap_s)
        for number in range(1, args.load_cycles + 1):
            row, good = measured_suspend(config, "hybrid")
            if good:
                max_suspended = max(max_suspended, row["server_suspended_mib"])
                time.sleep(args.hold_s)
            good = measured_resume(config, row) and good
            row["cycle"] = number
            rows.append(row)
            cycle_log(f"acceptance load cycle {number}", row)
            cycles_done += good
            toggle_errors += not good
            if not good:
                break
            time.sleep(args.gap_s)
    dead = sorted(set(before) - set(tree_pids()))
    counts = {**count_verdicts(clients.answers), "toggle_errors": toggle_errors, "dead_processes": len(dead)}
    log(f"acceptance load: {counts}")
    return {
        "clients": args.clients,
        "cycles_asked": args.load_cycles,
        "cycles_done": cycles_done,
        "counts": counts,
        "failures": [{"where": w, **a.brief()} for w, m, a in clients.answers if a.verdict(m) != "ok"][:10],
        "max_suspended_mib": max_suspended,
        "cycles": rows,
    }


def refusal(args: argparse.Namespace) -> None:
    """vLLM with NCCL P2P/SHM on and without --disable-custom-all-reduce: refused, and still answering."""
    target = target_from(args)
    srv = server_from_settings(args)
    # the unsafe NCCL transports exist only between GPUs: the check needs TP >= 2
    srv.tp, srv.util = max(srv.tp, 2), args.util
    srv.vllm_port = free_port() if args.target == "cpu" else 8011
    env = target.server_env(sleep_mode=False, safe=False)
    log_path = WORK / "refusal-server.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            target.server_command().split() + target.server_args(srv, False, safe=False),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        client = OpenAIClient(srv.url)
        client.wait_ready(srv.served_name, args.timeout, progress_s=15)
        before = client.chat(srv.served_name, PROMPTS[0], 24, 0).text
        done = subprocess.run(
            [sys.executable, "-m", "entrypoint.cuda_toggle_all", "checkpointed", "--pid", str(process.pid), "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        report = json.loads(done.stdout)
        states = status(load_config(), pid=process.pid)
        after = client.chat(srv.served_name, PROMPTS[0], 24, 0).text
        result = {
            "exit_code": done.returncode,
            "error": report.get("error"),
            "states_after": states.state,
            "answers_after": after == before,
            "names_p2p": "NCCL_P2P_DISABLE=1" in (report.get("error") or ""),
            "names_custom_all_reduce": "--disable-custom-all-reduce" in (report.get("error") or ""),
        }
        log(json.dumps(result))
        save_step("refusal", result)
        if not (
            done.returncode == 5
            and result["names_p2p"]
            and result["names_custom_all_reduce"]
            and states.state == "running"
            and result["answers_after"]
        ):
            raise SystemExit("refusal scenario failed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def machine(args: argparse.Namespace) -> None:
    target_from(args)
    info = {
        "target": args.target,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }
    if args.target == "gpu":
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["gpus"] = smi.stdout.strip().splitlines()
        with contextlib.suppress(Exception):
            info["cuda_driver_api_version"] = DriverBackend(load_config()).driver_version()
        for package in ("torch", "vllm"):
            with contextlib.suppress(Exception):
                info[package] = __import__(package).__version__
    log(json.dumps(info))
    save_step("machine", info)


def report(args: argparse.Namespace) -> None:
    results = load_results()
    print(json.dumps(results, indent=1)[:200000] if args.raw else markdown(results))


def markdown(results: dict) -> str:
    """Markdown tables of the figures: what they come from, then each step that has a table."""
    sections = [machine_lines(results)]
    selftest_rows = [selftest_row(step, n, c) for step in steps_of(results, "selftest") for n, c in cycles_of(step)]
    if selftest_rows:
        sections.append(
            "\n".join(
                [
                    "| size | cycle | mode | GB per GPU | suspend s | GB/s | resume s | GB/s | MiB while suspended "
                    "| answer |",
                    "|---|---|---|---|---|---|---|---|---|---|",
                    *selftest_rows,
                ]
            )
        )
    for step in steps_of(results, "start"):
        if step.get("warmup"):
            w = step["warmup"]
            sections.append(
                f"Warm-up after the start ({server_line(step.get('server'))}): vLLM's sleep "
                f"{w['sleep_s']:.2f} s (GPU memory {fmt_mib(w['used_before_mib'])} -> "
                f"{fmt_mib(w['used_asleep_mib'])}), "
                f"wake-up {w['wake_s']:.2f} s."
            )
    for step in steps_of(results, "cycles"):
        sections.append(cycles_table(step))
    for step in steps_of(results, "acceptance"):
        sections.append(acceptance_table(step))
    return "\n\n".join(s for s in sections if s)


def steps_of(results: dict, name: str) -> list[dict]:
    return [step for step in results["steps"] if step["step"] == name]


def cycles_of(step: dict):
    return enumerate(step["report"]["cycles"], 1)


def selftest_row(step: dict, number: int, cycle: dict) -> str:
    rep = step["report"]
    gpu = rep["gpus"][0] if rep["gpus"] else {}
    return (
        f"| {step['label']} | {number} | {cycle.get('mode', 'plain')} | {cycle['released_gb_per_gpu']:.1f} "
        f"| {cycle['suspend_s']:.2f} | {cycle['suspend_gb_s_per_gpu']} | {cycle['resume_s']:.2f} "
        f"| {cycle['resume_gb_s_per_gpu']} | {gpu.get('suspended_mib')} | "
        f"{'same' if rep['answer_before'] == rep['answer_after'] else 'DIFFERENT'} |"
    )


def machine_lines(results: dict) -> str:
    machines = steps_of(results, "machine")
    if not machines:
        return ""
    m = machines[-1]
    cards = "; ".join(m.get("gpus") or []) or "the fake GPU (CPU run)"
    return f"Machine: {cards}; vLLM {m.get('vllm', '-')}, torch {m.get('torch', '-')}, Python {m.get('python')}."


def server_line(srv: dict | None) -> str:
    if not srv:
        return "server unknown"
    return (
        f"model {srv['model']}, TP={srv['tp']}, {srv['dtype']}"
        f"{', --quantization ' + srv['quantization'] if srv.get('quantization') else ''}, {srv['gb']:g} GB per GPU "
        f"(util {srv['util']:.3f}), sleep mode {'on' if srv['sleep_mode'] else 'off'}"
    )


def fmt_mib(values: list[int] | None) -> str:
    return "/".join(str(v) for v in values or []) + " MiB"


def phases_text(phases: dict | None) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in (phases or {}).items())


def cycles_table(step: dict) -> str:
    lines = [
        f"Suspend/resume cycles ({server_line(step.get('server'))}):",
        "",
        "| mode | cycle | first of server | GB released | suspend s | GB/s | resume s | GB/s | MiB while "
        "suspended | suspend phases (s) | resume phases (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in step["cycles"]:
        if "error" in row:
            lines.append(f"| {row['mode_asked']} | {row['cycle']} | | FAILED: {row['error'][:80]} | | | | | | | |")
            continue
        lines.append(
            f"| {row['mode']} | {row['cycle']} | {'yes' if row['first_of_server'] else ''} | {row['released_gb']} "
            f"| {row['suspend_s']:.2f} | {row['suspend_gb_s']} | {row.get('resume_s', 0):.2f} "
            f"| {row.get('resume_gb_s')} | {fmt_mib(row['used_suspended_mib'])} "
            f"({row.get('server_suspended_mib')} the server's) "
            f"| {phases_text(row.get('phases_suspend'))} | {phases_text(row.get('phases_resume'))} |"
        )
    lines += [
        "",
        "| mode | suspend s | request through the gate: first token s | whole answer s | gate's resume s |",
        "|---|---|---|---|---|",
    ]
    for row in step["wake_through_gate"]:
        lines.append(
            f"| {row.get('mode', row['mode_asked'])} | {row.get('suspend_s')} | {row.get('first_token_s')} "
            f"| {row.get('answer_s')} | {row.get('gate_resume_s')} |"
        )
    lines += ["", "| requests run alone, before and after | compared by | equal | finite | not all equal |"]
    lines.append("|---|---|---|---|---|")
    for check in step["equality"]:
        lines.append(
            f"| {check['after']} | {check['by']} | {check['equal']} | {check.get('finite', '-')} "
            f"| {check.get('varied', '-')} |"
        )
    return "\n".join(lines)


def acceptance_table(step: dict) -> str:
    lines = [
        f"Acceptance ({server_line(step.get('server'))}): {'PASSED' if step['passed'] else 'FAILED'}",
        "",
        "| part | cycles | requests | failed | truncated | aborted | toggle errors | max MiB the server held suspended "
        "| suspend s (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for part, result in step["parts"].items():
        c = result["counts"]
        suspends = [r["suspend_s"] for r in result["cycles"] if "suspend_s" in r]
        median = f"{statistics.median(suspends):.2f}" if suspends else "-"
        lines.append(
            f"| {part} | {result['cycles_done']}/{result['cycles_asked']} | {c['requests']} | {c['failed']} "
            f"| {c['truncated']} | {c['aborted']} | {c['toggle_errors']} | {result['max_suspended_mib']} | {median} |"
        )
    equal = all(e["ok"] for e in step["equality"])
    by = {e["by"] for e in step["equality"]}
    lines += [
        "",
        f"Requests run alone before and after each part: {'equal' if equal else 'DIFFERENT'} (by {', '.join(by)}).",
    ]
    return "\n".join(lines)


# --- the gate's idle stages and the operator's hold ------------------------------------------------------

IDLE_SLEEP_S, IDLE_SUSPEND_S = 1.0, 6.0


def gate_state(gate_url: str) -> dict:
    return requests.get(f"{gate_url}/gate/status", timeout=5).json()


def wait_for_gate_state(gate_url: str, state: str, timeout_s: float = 60) -> float:
    began = time.monotonic()
    while gate_state(gate_url)["state"] != state:
        if time.monotonic() - began > timeout_s:
            raise RuntimeError(f"the gate did not reach {state} in {timeout_s:g} s: {gate_state(gate_url)}")
        time.sleep(0.05)
    return time.monotonic() - began


def toggle_cli(*args: str) -> tuple[int, dict, float]:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "entrypoint.cuda_toggle_all", *args, "--json"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": f"{SITE}:{REPO}"}, timeout=300,
    )  # fmt: skip
    seconds = time.monotonic() - began
    try:
        return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]), seconds
    except (ValueError, IndexError):
        return done.returncode, {"stderr": done.stderr[-600:]}, seconds


def idle(args: argparse.Namespace) -> None:
    """Through the gate: the first token from its light sleep and from its deep suspend, 4 clients of load across
    both stages, and the operator's hold with a request in flight (503 + Retry-After meanwhile, whole after)."""
    target_from(args)
    srv = server()
    before = run_alone(srv)
    data: dict = {"idle_sleep_s": IDLE_SLEEP_S, "idle_suspend_s": IDLE_SUSPEND_S}
    settings = {
        "GATE_IDLE_SLEEP_S": str(IDLE_SLEEP_S),
        "GATE_IDLE_SUSPEND_S": str(IDLE_SUSPEND_S),
        "GATE_POLL_S": "0.1",
    }
    with gate_running(settings) as gate_url:
        light, deep = [], []
        for _ in range(args.cycles):
            wait_for_gate_state(gate_url, "asleep")
            answer = ask(gate_url, chat_body(srv, PROMPTS[0], 16, stream=True, logprobs=True))
            light.append({**answer.brief(), "gate_wake_s": gate_state(gate_url)["last_wake_s"]})
        log(f"from the light sleep: {light}")
        for _ in range(args.cycles):
            wait_for_gate_state(gate_url, "suspended")
            answer = ask(gate_url, chat_body(srv, PROMPTS[0], 16, stream=True, logprobs=True))
            state = gate_state(gate_url)
            deep.append({**answer.brief(), "gate_resume_s": state["last_resume_s"], "proof": state["proof"]})
        log(f"from the deep suspend: {deep}")
        data.update(light_sleep=light, deep_suspend=deep)

        # 4 clients, each a burst of requests, then a pause longer than GATE_IDLE_SLEEP_S: both stages under load.
        answers: list[tuple[str, int, Answer]] = []
        lock = threading.Lock()

        def client(number: int) -> None:
            for burst in range(3):
                for _ in range(3):
                    answer = ask(gate_url, chat_body(srv, PROMPTS[number % len(PROMPTS)], 24))
                    with lock:
                        answers.append((f"client {number}", 24, answer))
                time.sleep(IDLE_SLEEP_S * 1.6 + burst)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        data["load"] = {**count_verdicts(answers), "gate": gate_state(gate_url)}
        log(f"load: {data['load']}")

        # The hold, with a 200-token request in flight (kept across the suspend), released later.
        background = Background()
        background.send("in flight", gate_url, chat_body(srv, PROMPTS[1], 200, stream=True))
        time.sleep(1.0)
        code, held, hold_s = toggle_cli("hold")
        refused = requests.post(f"{gate_url}/v1/chat/completions", json=chat_body(srv, PROMPTS[0], 4), timeout=30)
        time.sleep(3.0)
        during = gate_state(gate_url)
        code_release, released, release_s = toggle_cli("release")
        background.join()
        data["hold"] = {
            "exit": code,
            "command_s": round(hold_s, 3),
            "suspend_s": (held.get("suspend") or {}).get("seconds"),
            "suspend_phases": (held.get("suspend") or {}).get("phases"),
            "refused": {"status": refused.status_code, "retry_after": refused.headers.get("Retry-After")},
            "state_while_held": during["state"],
            "hold_in_status": during["hold"],
            "release_exit": code_release,
            "release_command_s": round(release_s, 3),
            "resume_s": (released.get("resume") or {}).get("seconds"),
            "resume_phases": (released.get("resume") or {}).get("phases"),
            "in_flight_request": count_verdicts(background.answers),
        }
        log(f"hold: {data['hold']}")
    data["alone_before_after"] = compare_alone(before, run_alone(srv), args.target)
    save_step("idle", data)
    log(f"idle: requests alone equal: {data['alone_before_after']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["gpu", "cpu"], default=os.environ.get("SUITE_TARGET", "gpu"))
    env = os.environ.get
    parser.add_argument(
        "--model",
        default=env("SUITE_MODEL", "tiny"),
        help="tiny | 8b-shaped | a model directory (SUITE_MODEL; default tiny)",
    )
    parser.add_argument(
        "--tp",
        type=int,
        choices=[1, 2, 4, 8],
        default=int(env("SUITE_TP", "2")),
        help="tensor-parallel size (SUITE_TP)",
    )
    parser.add_argument(
        "--dtype", default=env("SUITE_DTYPE") or None, help="SUITE_DTYPE; default float16 for 8b-shaped, else bfloat16"
    )
    parser.add_argument(
        "--quantization",
        default=env("SUITE_QUANTIZATION"),
        help="vLLM's --quantization (SUITE_QUANTIZATION); default awq for 8b-shaped (its GEMM kernels); empty: "
        "vLLM's own choice",
    )
    parser.add_argument(
        "--tiny-dir", default=env("SUITE_TINY_DIR", "/tmp/tiny-qwen3"), help="the tiny model (SUITE_TINY_DIR)"
    )
    parser.add_argument(
        "--shaped-dir",
        default=env("SUITE_SHAPED_DIR", str(WORK / "qwen3-8b-shaped")),
        help="where build-model writes the 8B-shaped model and start finds it (SUITE_SHAPED_DIR)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("machine").set_defaults(func=machine)
    sub.add_parser("build-model").set_defaults(func=build_model)
    p = sub.add_parser("start")
    p.add_argument("--gb", type=float, required=True, help="GB of GPU memory per GPU the server takes")
    p.add_argument("--sleep-mode", action="store_true")
    p.add_argument(
        "--container-like",
        action="store_true",
        help="the compose file's setup: sleep mode through VLLM_SLEEP_MODE=1, the gate under supervisord",
    )
    p.add_argument("--timeout", type=float, default=400)
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=env("SUITE_WARMUP", "1") == "1",
        help="one sleep/wake of vLLM's own once the server is ready, where it has sleep mode (SUITE_WARMUP)",
    )
    p.set_defaults(func=start)
    p = sub.add_parser("cycles")
    p.add_argument("--modes", default="plain,hybrid", help="plain, hybrid or both (comma- or space-separated)")
    p.add_argument("--cycles", type=int, default=3, help="measured suspend/resume cycles per mode")
    p.add_argument("--wake-cycles", type=int, default=1, help="suspends per mode woken by a request through the gate")
    p.set_defaults(func=cycles)
    p = sub.add_parser("acceptance")
    p.add_argument("--parts", default="plain,hybrid,load", help="plain, hybrid, load (a run may be split over calls)")
    p.add_argument("--cycles", type=int, default=3, help="cycles of the plain and hybrid parts")
    p.add_argument("--load-cycles", type=int, default=10, help="hybrid cycles of the load part")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--inflight-tokens", type=int, default=400, help="tokens of the request in flight at each suspend")
    p.add_argument("--inflight-lead-s", type=float, default=0.5, help="seconds it decodes before the suspend")
    p.add_argument("--straight", type=int, default=2, help="requests sent straight to vLLM while suspended")
    p.add_argument("--through-gate", type=int, default=8, help="requests sent through the gate while suspended")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens of every other request")
    p.add_argument("--hold-s", type=float, default=1.0)
    p.add_argument("--gap-s", type=float, default=1.0)
    p.set_defaults(func=acceptance)
    sub.add_parser("stop").set_defaults(func=stop)
    p = sub.add_parser("selftest")
    p.add_argument("--label", required=True)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--mode", choices=["plain", "hybrid", "auto"])
    p.add_argument("--port", type=int, help="where the selftest sends its requests (default: the server)")
    p.set_defaults(func=run_selftest)
    p = sub.add_parser("protocols")
    p.add_argument("--cycles", type=int, default=2)
    p.set_defaults(func=protocols)
    p = sub.add_parser("load")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument("--hold-s", type=float, default=1.0)
    p.add_argument("--gap-s", type=float, default=1.0)
    p.set_defaults(func=load)
    p = sub.add_parser("gate")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--hold-s", type=float, default=1.0)
    p.add_argument("--mode", choices=["plain", "hybrid", "auto"], default="auto")
    p.set_defaults(func=gate)
    p = sub.add_parser("hybrid")
    p.add_argument("--cycles", type=int, default=2)
    p.set_defaults(func=hybrid)
    p = sub.add_parser("refusal")
    p.add_argument("--util", type=float, default=0.08)
    p.add_argument("--timeout", type=float, default=400)
    p.set_defaults(func=refusal)
    p = sub.add_parser("idle")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.set_defaults(func=idle)
    p = sub.add_parser("report")
    p.add_argument("--raw", action="store_true")
    p.set_defaults(func=report)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()
