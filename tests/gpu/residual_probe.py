#!/usr/bin/env python3
"""What vLLM's sleep leaves on the GPU, by kind, and what each resume phase costs (GPU suite, TP=1).

    PYTHONPATH=/tmp/site:. python3 tests/gpu/residual_probe.py OUT_DIR

Starts its own vLLM (the 8B-AWQ shape, dummy weights, sleep mode, this folder's worker extension), then:
the cost of the first request of each kind (plain completion, with logprobs, chat, chat with logprobs);
light sleep cycles (sleep level 1 mode=keep, wake-up, first token); the residual after the sleep by kind
(NVML per process, torch's allocator, vLLM's sleep pool by tag, live tensors), freed step by step; deep
cycles by hand (lock + checkpoint, restore + unlock, wake-up, first token) with and without the frees;
and the library's own suspend/resume with its phases, from the light sleep too. Writes OUT_DIR/residual.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from entrypoint.base.config import load_config  # noqa: E402
from entrypoint.cuda.driver_backend import DriverBackend  # noqa: E402
from entrypoint.cuda.gpus import read_gpus  # noqa: E402
from entrypoint.suspend.api import RESUME, SUSPEND, move_to  # noqa: E402

PORT = 8011
URL = f"http://127.0.0.1:{PORT}"
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/residual")
MODEL_DIR = Path(os.environ.get("PROBE_MODEL_DIR", "/tmp/qwen3-8b-shaped"))
RESULTS: dict = {}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def save() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "residual.json").write_text(json.dumps(RESULTS, indent=1))


def post(path: str, body: dict | None = None, timeout: float = 120) -> requests.Response:
    return requests.post(URL + path, json=body, timeout=timeout)


def rpc(method: str, *args: object) -> object:
    response = post("/collective_rpc", {"method": method, "args": list(args)})
    try:
        body = response.json()
    except ValueError:
        return {"http": response.status_code, "text": response.text[:300]}
    results = body.get("results", body) if isinstance(body, dict) else body
    return results[0] if isinstance(results, list) and results else results


def per_process_mib() -> dict[str, int]:
    reading = read_gpus(load_config())
    return {str(pid): mib for pid, mib in reading.pids_mib.items()} | {"gpu_used": reading.gpus[0].used_mib}


def first_token(body: dict) -> dict:
    """Stream a request; seconds to its first token and to its end."""
    began = time.monotonic()
    first = None
    with requests.post(URL + body.pop("_path"), json={**body, "stream": True}, stream=True, timeout=300) as response:
        for line in response.iter_lines():
            if line and first is None and line.startswith(b"data: {"):
                first = time.monotonic() - began
    return {"first_token_s": round(first or -1, 4), "total_s": round(time.monotonic() - began, 4)}


def chat(logprobs: bool, tokens: int = 8) -> dict:
    body = {
        "_path": "/v1/chat/completions",
        "model": "m",
        "max_tokens": tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
    }
    if logprobs:
        body |= {"logprobs": True, "top_logprobs": 5}
    return first_token(body)


def completion(logprobs: bool, tokens: int = 8) -> dict:
    body = {"_path": "/v1/completions", "model": "m", "prompt": "ping", "max_tokens": tokens, "temperature": 0}
    if logprobs:
        body["logprobs"] = 5
    return first_token(body)


def timed(call) -> float:
    began = time.monotonic()
    call()
    return round(time.monotonic() - began, 4)


def sleep_light() -> float:
    return timed(lambda: post("/sleep?level=1&mode=keep").raise_for_status())


def wake() -> float:
    return timed(lambda: post("/wake_up").raise_for_status())


def cuda_pids(root: int) -> list[int]:
    backend = DriverBackend(load_config())
    tree = [root] + [child.pid for child in psutil.Process(root).children(recursive=True)]
    return [pid for pid in tree if backend.get_state(pid) is not None]


def in_parallel(pids: list[int], operation) -> float:
    began = time.monotonic()
    threads = [threading.Thread(target=operation, args=(pid,)) for pid in pids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return round(time.monotonic() - began, 4)


def deep_cycle_by_hand(pids: list[int], free_variant: str | None) -> dict:
    backend = DriverBackend(load_config())
    row: dict = {"variant": free_variant or "none", "sleep_s": sleep_light()}
    if free_variant:
        row["free_s"] = timed(lambda: row.__setitem__("report", rpc("residual_free", free_variant)))
    row["before_checkpoint_mib"] = per_process_mib()
    row["lock_s"] = in_parallel(pids, lambda pid: backend.lock(pid, 5000))
    row["checkpoint_s"] = in_parallel(pids, backend.checkpoint)
    row["suspended_mib"] = per_process_mib()
    row["restore_s"] = in_parallel(pids, backend.restore)
    row["unlock_s"] = in_parallel(pids, backend.unlock)
    row["wake_up_s"] = wake()
    row["first_chat"] = chat(logprobs=True)
    return row


def start_server() -> subprocess.Popen:
    if not (MODEL_DIR / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_dummy_model.py"), str(MODEL_DIR)], check=True)
    env = {
        **os.environ,
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_USE_FLASHINFER_SAMPLER": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{REPO / 'tests' / 'gpu'}",
    }
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL_DIR),
        "--served-model-name",
        "m",
        "--load-format",
        "dummy",
        "--quantization",
        "awq",
        "--dtype",
        "float16",
        "--enforce-eager",
        "--attention-backend",
        "TRITON_ATTN",
        "--max-num-seqs",
        "16",
        "--max-model-len",
        "512",
        "--gpu-memory-utilization",
        os.environ.get("PROBE_UTIL", "0.80"),
        "--enable-sleep-mode",
        "--worker-extension-cls",
        "residual_ext.ResidualProbe",
        "--host",
        "127.0.0.1",
        "--port",
        str(PORT),
    ]
    with open(OUT / "vllm.log", "w") as log_file:  # the child keeps its own descriptor
        server = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    began = time.monotonic()
    while time.monotonic() - began < 300:
        try:
            if requests.get(URL + "/v1/models", timeout=2).status_code == 200:
                RESULTS["server_start_s"] = round(time.monotonic() - began, 1)
                return server
        except requests.RequestException:
            pass
        if server.poll() is not None:
            raise SystemExit(f"vLLM exited {server.returncode}; see vllm.log")
        time.sleep(1)
    raise SystemExit("vLLM did not start in 300 s")


def bare_context() -> None:
    code = (
        "import torch,time,os,subprocess;a=torch.randn(256,256,device='cuda');b=a@a;torch.cuda.synchronize();"
        "print(subprocess.run(['nvidia-smi','--query-compute-apps=pid,used_memory','--format=csv,noheader'],"
        "capture_output=True,text=True).stdout)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    RESULTS["bare_context_plus_cublas"] = done.stdout.strip() or done.stderr[-400:]


def step(name: str, call) -> None:
    try:
        RESULTS[name] = call()
    except Exception as error:  # one failed step must not lose the others
        RESULTS[name] = {"error": repr(error)}
    log(f"{name}: {json.dumps(RESULTS[name])[:600]}")
    save()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    step("bare_context", lambda: bare_context() or RESULTS.get("bare_context_plus_cublas"))
    server = start_server()
    log(f"vLLM ready after {RESULTS['server_start_s']} s")
    try:
        step("resident_mib", per_process_mib)
        step("warm_up_sleep_wake", lambda: {"sleep_s": sleep_light(), "wake_up_s": wake()})
        step(
            "first_requests",
            lambda: [
                ("completion", completion(False)),
                ("completion", completion(False)),
                ("completion+logprobs", completion(True)),
                ("chat", chat(False)),
                ("chat+logprobs", chat(True)),
                ("chat+logprobs", chat(True)),
                ("chat", chat(False)),
            ],
        )
        step("resident_report", lambda: rpc("residual_report"))

        def light_cycles() -> list[dict]:
            rows = []
            for _ in range(3):
                row = {"sleep_s": sleep_light(), "asleep_mib": per_process_mib()}
                began = time.monotonic()
                row["wake_up_s"] = wake()
                row["first_chat"] = chat(logprobs=True)
                row["wake_to_first_token_s"] = round(
                    time.monotonic() - began - row["first_chat"]["total_s"] + row["first_chat"]["first_token_s"], 4
                )
                rows.append(row)
            return rows

        step("light_sleep_cycles", light_cycles)

        def residual_by_kind() -> dict:
            found = {"sleep_s": sleep_light(), "nvml": per_process_mib(), "asleep": rpc("residual_report")}
            for variant in ("empty_cache", "cublas"):
                found[variant] = {"report": rpc("residual_free", variant), "nvml": per_process_mib()}
            found["wake_up_s"] = wake()
            return found

        step("residual_by_kind", residual_by_kind)
        pids = cuda_pids(server.pid)
        RESULTS["cuda_pids"] = pids
        step("deep_by_hand", lambda: [deep_cycle_by_hand(pids, v) for v in (None, "all", None, "all")])
        config = load_config().replace(server_url=URL)

        def library_cycles() -> list[dict]:
            rows = []
            for light_first in (False, False, True):
                row = {"from_light_sleep": light_first}
                if light_first:
                    row["light_sleep_s"] = sleep_light()
                suspended = move_to(SUSPEND, config, pid=server.pid).to_json()
                row["suspend_s"], row["suspend_phases"] = suspended.get("seconds"), suspended.get("phases")
                row["suspended_mib"] = per_process_mib()
                row["suspend_proof"] = json.dumps(suspended.get("evidence", {}).get("gpus"))[:400]
                resumed = move_to(RESUME, config, pid=server.pid).to_json()
                row["resume_s"], row["resume_phases"] = resumed.get("seconds"), resumed.get("phases")
                row["first_chat"] = chat(logprobs=True)
                rows.append(row)
            return rows

        step("library_cycles", library_cycles)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        save()


if __name__ == "__main__":
    main()
