#!/usr/bin/env python3
"""The GPU suite: a real vLLM (or, with --target cpu, the stand-in over the fake GPU) under the real
supervisord with the project's supervisord.conf, driven by selftest and cuda-toggle-all's library.

Each subcommand is one step; they share a work folder (SUITE_WORK, default /tmp/gpu-suite) where the
server keeps running between steps (supervisord runs in its own session), and every step adds its figures
to one JSON file (SUITE_WORK/results.json). tests/gpu/README.md has the command lines of a whole run.

    run_suite.py machine                         what the figures come from (cards, driver, versions)
    run_suite.py start --gb 12 [--sleep-mode]    start the server sized to ~12 GB per GPU; wait until ready
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
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from entrypoint.backend_driver import DriverBackend  # noqa: E402
from entrypoint.backends import select_backend  # noqa: E402
from entrypoint.config import load_config  # noqa: E402
from entrypoint.errors import SuspendError  # noqa: E402
from entrypoint.gpus import read_gpus  # noqa: E402
from entrypoint.openai_client import OpenAIClient  # noqa: E402
from entrypoint.safety import REQUIRED_SERVER_ENV  # noqa: E402
from entrypoint.toggle import RESUME, SUSPEND, status, toggle  # noqa: E402

WORK = Path(os.environ.get("SUITE_WORK", "/tmp/gpu-suite"))
RESULTS = Path(os.environ.get("SUITE_RESULTS", str(WORK / "results.json")))
VLLM_PORT, GATE_PORT = 8001, 8000
MIB_PER_GB = 1000**3 / 2**20
PROMPTS = [
    "Say hello in one short sentence.",
    "List three colours.",
    "What is the capital of France?",
    "Count from one to five.",
]
# What TP=2 suspend/resume needs (FACTS.md); NVLS stays off on the device machine in any case.
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


# --- the environment of the server and of the tool -------------------------------------------------------


class Target:
    """What the suite runs against: real vLLM on GPUs, or the CPU stand-in over the fake GPU."""

    def __init__(self, name: str, model: str):
        self.name = name
        self.model = model
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
                    "CUDA_TOGGLE_HOST_RAM_MIB": str(2**30),
                }
            )
        else:
            env["CUDA_TOGGLE_BACKEND"] = "driver"  # there is no cuda-checkpoint binary on the GPU machine
            ram_gib = psutil.virtual_memory().total / 2**30
            if ram_gib < 200 and "CUDA_TOGGLE_HOST_RAM_MIB" not in os.environ:
                # A VM whose memory grows on demand reads a small MemTotal (KINDS.md: 31 GiB at the start
                # of a 256 GiB two-H200 machine); state what it really has.
                env["CUDA_TOGGLE_HOST_RAM_MIB"] = str(240 * 1024)
        return env

    def prepare(self) -> None:
        os.environ.update(self.tool_env())
        if self.name == "cpu" and not (self.fake_dir / "gpus").exists():
            sys.path.insert(0, str(REPO / "tests" / "fakes"))
            import fakegpu

            fakegpu.write_gpus(self.fake_dir, [(0, "GPU-fake-0", 81559, 4), (1, "GPU-fake-1", 81559, 4)])

    def server_command(self) -> str:
        if self.name == "cpu":
            return f"{sys.executable} {REPO / 'tests' / 'fakes' / 'standin_vllm.py'}"
        return "python3 -m vllm.entrypoints.openai.api_server"

    def server_args(self, util: float, sleep_mode: bool, safe: bool = True, port: int = VLLM_PORT) -> list[str]:
        args = [
            "--model",
            self.model,
            "--served-model-name",
            "tiny",
            "--tensor-parallel-size",
            "2",
            "--enforce-eager",
            "--attention-backend",
            "TRITON_ATTN",
            "--dtype",
            "bfloat16",
            "--max-num-seqs",
            "8",
            "--max-model-len",
            "512",
            "--gpu-memory-utilization",
            f"{util:.3f}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        if safe:
            args.append("--disable-custom-all-reduce")
        if sleep_mode:
            args.append("--enable-sleep-mode")
        return args

    def server_env(self, sleep_mode: bool, safe: bool = True) -> dict[str, str]:
        env = {**os.environ, **VLLM_ENV, "PYTHONPATH": f"/tmp/site:{REPO}"}
        for name in SAFE_ENV:
            env.pop(name, None)
        env.update(SAFE_ENV if safe else {"NCCL_NVLS_ENABLE": "0", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"})
        if sleep_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env


def target_from(args: argparse.Namespace) -> Target:
    target = Target(args.target, args.model)
    target.prepare()
    return target


def gpu_totals_mib() -> list[int]:
    return [gpu.total_mib for gpu in read_gpus(load_config()).gpus]


# --- server lifecycle ------------------------------------------------------------------------------------


def supervisord_wrapper() -> Path:
    """supervisord as a command (pip --target installs no scripts on the GPU machine)."""
    path = WORK / "supervisord"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -m supervisor.supervisord "$@"\n')
    path.chmod(0o755)
    return path


def start(args: argparse.Namespace) -> None:
    target = target_from(args)
    stop_supervisord(quiet=True)
    totals = gpu_totals_mib()
    util = round(args.gb * MIB_PER_GB / min(totals), 3) if totals else 0.15
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
                "GATE_PORT": str(GATE_PORT),
                "GATE_UPSTREAM": f"http://127.0.0.1:{VLLM_PORT}",
            }
        )
        gate_launcher = f"{sys.executable} -m entrypoint.gate"
    env.update(
        {
            "SUPERVISOR_RUN_DIR": str(WORK / "sv"),
            "SUPERVISOR_CONF": str(REPO / "supervisord.conf"),
            "SUPERVISORD_BIN": str(supervisord_wrapper()),
            "VLLM_ARGS_FILE": str(WORK / "vllm-args"),
            "VLLM_LAUNCHER": str(REPO / "docker" / "run-vllm.sh"),
            "VLLM_REAPER": str(REPO / "docker" / "vllm-reaper.sh"),
            # supervisord.conf's program `gate` needs a command; unless --container-like, the suite starts
            # its own gate per step (gate_running), so the supervised one is a placeholder holding no port.
            "GATE_LAUNCHER": gate_launcher,
            "VLLM_SERVER_CMD": target.server_command(),
        }
    )
    log_path = WORK / "server.log"
    with log_path.open("ab") as log_file:
        supervisord = subprocess.Popen(
            [str(REPO / "docker" / "entrypoint.sh"), *target.server_args(util, args.sleep_mode)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    began = time.monotonic()
    log(f"server starting: {args.gb} GB per GPU (--gpu-memory-utilization {util:.3f}), sleep mode {args.sleep_mode}")
    client = OpenAIClient(f"http://127.0.0.1:{VLLM_PORT}")
    while True:  # in slices, so that a supervisord that exits at once is reported at once
        try:
            client.wait_ready("tiny", 10, progress_s=15)
            break
        except TimeoutError as error:
            if supervisord.poll() is not None or time.monotonic() - began > args.timeout:
                print(log_path.read_text()[-6000:])
                raise SystemExit(f"server did not start (supervisord exit code {supervisord.poll()}): {error}")
            log(f"waiting for the server: {time.monotonic() - began:.0f} s")
    seconds = time.monotonic() - began
    used = [gpu.used_mib for gpu in read_gpus(load_config()).gpus]
    log(f"server ready after {seconds:.1f} s; GPU memory used: {used} MiB")
    save_step(
        "start" if not args.container_like else "start-container-like",
        {
            "gb_target": args.gb,
            "util": util,
            "sleep_mode": args.sleep_mode,
            "ready_s": round(seconds, 1),
            "gpu_used_mib": used,
        },
    )


def supervisor_proxy():
    from entrypoint.discovery import supervisor_proxy as proxy

    return proxy(f"unix://{WORK}/sv/supervisord.sock")


def stop_supervisord(quiet: bool = False) -> None:
    """Stop the program and supervisord; kill whatever is left of the server's tree."""
    pidfile = WORK / "sv" / "supervisord.pid"
    if not pidfile.exists():
        return
    with contextlib.suppress(Exception):
        toggle(RESUME, load_config())  # never stop a suspended server: resume it first
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
        f"http://127.0.0.1:{args.port}",
        "--model",
        "tiny",
        "--cycles",
        str(args.cycles),
        "--max-tokens",
        "32",
        "--report",
        str(report_file),
    ]
    if args.mode:
        os.environ["CUDA_TOGGLE_MODE"] = args.mode
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": f"/tmp/site:{REPO}"})
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
        down = toggle(SUSPEND, config, mode="plain")
        up = toggle(RESUME, config)
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


class LoadClients:
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
            "model": "tiny",
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
        self.threads = [threading.Thread(target=self.run_client, args=(n,), daemon=True) for n in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=900)


def tree_pids() -> dict[int, str]:
    from entrypoint.processes import walk_tree

    pid = supervisor_proxy().supervisor.getProcessInfo("vllm")["pid"]
    return {p.pid: p.title for p in walk_tree(pid)}


def load(args: argparse.Namespace) -> None:
    """Suspend/resume cycles while clients stream without pause: no failed request, no dead process."""
    target_from(args)
    config = load_config()
    before = tree_pids()
    cycles = []
    with LoadClients(f"http://127.0.0.1:{VLLM_PORT}", args.clients) as clients:
        time.sleep(2)
        for cycle in range(1, args.cycles + 1):
            try:
                down = toggle(SUSPEND, config, mode="plain")
                time.sleep(args.hold_s)
                up = toggle(RESUME, config)
            except SuspendError as error:
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
        "PYTHONPATH": f"/tmp/site:{REPO}",
        "GATE_HOST": "127.0.0.1",
        "GATE_PORT": str(GATE_PORT),
        "GATE_UPSTREAM": f"http://127.0.0.1:{VLLM_PORT}",
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
                if requests.get(f"http://127.0.0.1:{GATE_PORT}/gate/status", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield f"http://127.0.0.1:{GATE_PORT}"
    finally:
        gate.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            gate.wait(timeout=30)
        if gate.poll() is None:
            gate.kill()


def first_request_after_suspend(gate_url: str, config, mode: str) -> dict:
    """Suspend, then time one request through the gate: it wakes the server and must give the reference."""
    client = OpenAIClient(gate_url)
    reference = client.chat("tiny", PROMPTS[0], 24, 0).text
    down = toggle(SUSPEND, config, mode=mode)
    answer = client.chat("tiny", PROMPTS[0], 24, 0)
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
                toggle(SUSPEND, config, mode=args.mode)
                time.sleep(args.hold_s)  # the clients' requests wake it: the gate resumes on demand
                deadline = time.monotonic() + 300
                while (WORK / "run" / "suspended.json").exists() and time.monotonic() < deadline:
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
            down = toggle(SUSPEND, config, mode=mode)
            used_suspended = [g.used_mib for g in read_gpus(config).gpus]
            up = toggle(RESUME, config)
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
        reference = {prompt: client.chat("tiny", prompt, 24, 0).text for prompt in PROMPTS}
        for _ in range(args.cycles):
            toggle(SUSPEND, config, mode="hybrid")
            answers: dict[str, str] = {}

            def ask(prompt: str, answers: dict[str, str] = answers) -> None:
                answers[prompt] = client.chat("tiny", prompt, 24, 0).text

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


def refusal(args: argparse.Namespace) -> None:
    """vLLM with NCCL P2P/SHM on and without --disable-custom-all-reduce: refused, and still answering."""
    target = target_from(args)
    port = 8011
    env = target.server_env(sleep_mode=False, safe=False)
    log_path = WORK / "refusal-server.log"
    with log_path.open("ab") as log_file:
        server = subprocess.Popen(
            target.server_command().split() + target.server_args(args.util, False, safe=False, port=port),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        client = OpenAIClient(f"http://127.0.0.1:{port}")
        client.wait_ready("tiny", args.timeout, progress_s=15)
        before = client.chat("tiny", PROMPTS[0], 24, 0).text
        done = subprocess.run(
            [sys.executable, "-m", "entrypoint.cuda_toggle_all", "checkpointed", "--pid", str(server.pid), "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        report = json.loads(done.stdout)
        states = status(load_config(), pid=server.pid)
        after = client.chat("tiny", PROMPTS[0], 24, 0).text
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
            os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)


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
    lines = []
    for step in results["steps"]:
        if step["step"] == "selftest":
            rep = step["report"]
            gpu = rep["gpus"][0] if rep["gpus"] else {}
            for number, cycle in enumerate(rep["cycles"], 1):
                lines.append(
                    f"| {step['label']} | {number} | {cycle.get('mode', 'plain')} | {cycle['released_gb_per_gpu']:.1f} "
                    f"| {cycle['suspend_s']:.2f} | {cycle['suspend_gb_s_per_gpu']} | {cycle['resume_s']:.2f} "
                    f"| {cycle['resume_gb_s_per_gpu']} | {gpu.get('suspended_mib')} | "
                    f"{'same' if rep['answer_before'] == rep['answer_after'] else 'DIFFERENT'} |"
                )
    header = [
        "| size | cycle | mode | GB per GPU | suspend s | GB/s | resume s | GB/s | MiB while suspended | answer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["gpu", "cpu"], default=os.environ.get("SUITE_TARGET", "gpu"))
    parser.add_argument("--model", default=os.environ.get("SUITE_MODEL", "/tmp/tiny-qwen3"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("machine").set_defaults(func=machine)
    p = sub.add_parser("start")
    p.add_argument("--gb", type=float, required=True, help="GB of GPU memory per GPU the server takes")
    p.add_argument("--sleep-mode", action="store_true")
    p.add_argument(
        "--container-like",
        action="store_true",
        help="the compose file's setup: sleep mode through VLLM_SLEEP_MODE=1, the gate under supervisord",
    )
    p.add_argument("--timeout", type=float, default=400)
    p.set_defaults(func=start)
    sub.add_parser("stop").set_defaults(func=stop)
    p = sub.add_parser("selftest")
    p.add_argument("--label", required=True)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--mode", choices=["plain", "hybrid", "auto"])
    p.add_argument("--port", type=int, default=VLLM_PORT)
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
    p = sub.add_parser("report")
    p.add_argument("--raw", action="store_true")
    p.set_defaults(func=report)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()
