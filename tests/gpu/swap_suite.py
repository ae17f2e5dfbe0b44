#!/usr/bin/env python3
"""Several models on the same GPUs behind the gate: two vLLM servers that cannot be resident together, started
in turn by the gate under the real supervisord, then swapped by alternating requests.

    python3 tests/gpu/swap_suite.py [--target gpu|cpu] [--swaps 20] [--share 0.55]

Like the container (docker/start-services.sh, supervisord.conf, GATE_MODELS): the tiny model is the default
(program `vllm`), the 8B-shaped one (scripts/build_dummy_model.py, random weights) program `vllm-qwen3-8b-shaped`;
each gets `--gpu-memory-utilization SHARE`, so two shares over 1 cannot be resident together. Every request is
streamed through the gate, asks for per-token logprobs, and must give its model's first answer again; the time
to its first token is what a client waits for a swap. The gate's /gate/status gives the swap's steps.
Results go to SUITE_WORK/results.json (step `swap`) like run_suite.py's. --target cpu runs the same against
two stand-ins over the fake GPU (with the fake NVML, so that swaps overlap as on a GPU host).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests
from run_suite import (
    REPO,
    WORK,
    Answer,
    Target,
    ask,
    chat_request,
    ensure_shaped_model,
    free_port,
    gpu_used_mib,
    log,
    save_step,
)

PROMPT = "Name three rivers of Europe and one fact about each."


def model_list(args: argparse.Namespace, ports: dict[str, int]) -> str:
    """GATE_MODELS: served-name:model:port:share, the default (tiny) first."""
    paths = {"tiny": args.tiny_dir, "qwen3-8b-shaped": args.shaped_dir}
    if args.target == "cpu":
        paths = {name: f"standin-{name}" for name in paths}
    return ",".join(f"{name}:{paths[name]}:{ports[name]}:{args.share}" for name in paths)


def common_vllm_args(args: argparse.Namespace) -> list[str]:
    """The compose file's `command:` for both servers; the gate appends each one's model, port and share."""
    return [
        "--tensor-parallel-size", "1", "--enforce-eager", "--attention-backend", "TRITON_ATTN",
        "--dtype", "float16",  # AWQ needs it; the tiny model runs in it too
        "--max-num-seqs", "16", "--max-model-len", "512", "--host", "127.0.0.1",
        "--load-format", "dummy",  # random weights drawn by vLLM: the 8B shape has no weight files
        "--disable-custom-all-reduce",
    ]  # fmt: skip


def start_servers(args: argparse.Namespace, target: Target, gate_port: int, ports: dict[str, int]) -> subprocess.Popen:
    env = target.server_env(sleep_mode=True)
    env.update(target.supervised_env(gate_launcher=f"{sys.executable} -m entrypoint.gate"))
    env.update(
        {
            "VLLM_SLEEP_MODE": "1",
            "GATE_HOST": "127.0.0.1",
            "GATE_PORT": str(gate_port),
            "GATE_MODELS": model_list(args, ports),
            "GATE_START_TIMEOUT_S": str(args.timeout),
        }
    )
    if target.name == "cpu":  # per-process figures in one reading, as NVML gives on a GPU host
        env["PYTHONPATH"] = f"{REPO / 'tests' / 'fakes' / 'nvml'}:{env['PYTHONPATH']}"
        env["CUDA_TOGGLE_GPU_QUERY"] = "nvml"
    (WORK / "sv").mkdir(parents=True, exist_ok=True)
    with (WORK / "swap-server.log").open("ab") as log_file:
        return subprocess.Popen(
            [str(REPO / "docker" / "start-services.sh"), *common_vllm_args(args)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_started(gate_url: str, supervisord: subprocess.Popen, timeout_s: float) -> float:
    """Wait until the gate has started and placed both servers; progress every 15 s."""
    began = last = time.monotonic()
    while True:
        try:
            status = requests.get(f"{gate_url}/gate/status", timeout=5).json()
            if status.get("started"):
                return time.monotonic() - began
            states = {name: model["state"] for name, model in status.get("models", {}).items()}
        except (requests.RequestException, ValueError):
            states = "gate not answering yet"
        if supervisord.poll() is not None or time.monotonic() - began > timeout_s:
            print((WORK / "swap-server.log").read_text()[-6000:])
            raise SystemExit(f"the servers did not start (supervisord exit code {supervisord.poll()})")
        if time.monotonic() - last >= 15:
            last = time.monotonic()
            log(f"starting the servers in turn: {time.monotonic() - began:.0f} s, {states}")
        time.sleep(1)


def same_answer(answer: Answer, reference: Answer) -> bool:
    """The same text and, where the server gives them, the same per-token logprobs and top-5."""
    return answer.text == reference.text and answer.logprobs == reference.logprobs


def models_status(gate_url: str) -> dict:
    return requests.get(f"{gate_url}/gate/status", timeout=10).json()["models"]


def settled_status(gate_url: str, model: str, swaps_before: int, timeout_s: float = 60.0) -> dict:
    """The gate's per-model status once the swap to `model` has been counted (its `swaps` past `swaps_before`) and
    no model is suspending or resuming; the last read after timeout_s (a request that swapped nothing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = models_status(gate_url)
        moving = [name for name, entry in status.items() if entry["state"] in ("suspending", "resuming")]
        counted = status[model]["swaps"] > swaps_before
        if (counted and not moving) or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def swap_rows(args: argparse.Namespace, gate_url: str) -> tuple[list[dict], dict[str, Answer]]:
    """Alternating requests, the non-default model first: each one swaps. Returns a row per request.

    An answer may come before its swap ended (the model swapped out may still be checkpointed), so each row reads
    the status once both models settled (no suspend or resume in flight): its swap is then the one just made, and
    the next request starts from a settled state."""
    models = ["qwen3-8b-shaped", "tiny"]
    references: dict[str, Answer] = {}
    rows = []
    for number in range(args.swaps + 1):
        model = models[number % 2]
        swaps_before = models_status(gate_url)[model]["swaps"]
        answer = ask(gate_url, chat_request(model, PROMPT, args.tokens, stream=True, logprobs=True), timeout=600)
        answered_at = time.monotonic()
        status = settled_status(gate_url, model, swaps_before)
        settled_after_s = time.monotonic() - answered_at
        reference = references.setdefault(model, answer)
        row = {
            "request": number + 1,
            "model": model,
            "verdict": answer.verdict(args.tokens),
            "same_answer": same_answer(answer, reference),
            "logprobs": len(answer.logprobs or []),
            "first_token_s": None if answer.first_token_s is None else round(answer.first_token_s, 3),
            "total_s": round(answer.total_s, 3),
            "gate_swap_s": None if status[model]["last_swap_s"] is None else round(status[model]["last_swap_s"], 3),
            "steps": status[model]["last_swap_steps"],
            "path": status[model].get("last_swap_path"),  # overlapped (woken before the checkpoint ended?) or serial
            "states": {name: entry["state"] for name, entry in status.items()},
            "settled_after_answer_s": round(settled_after_s, 3),
            "gpu_used_mib": gpu_used_mib(),
        }
        if answer.error:
            row["error"] = answer.error[:300]
        rows.append(row)
        log(
            f"request {number + 1} ({model}): {row['verdict']}, first token {row['first_token_s']} s, swap "
            f"{row['gate_swap_s']} s, same answer {row['same_answer']}, GPU {row['gpu_used_mib']} MiB"
        )
    return rows, references


def client_load(args: argparse.Namespace, gate_url: str, references: dict[str, Answer]) -> dict:
    """args.clients clients, each sending requests for a model drawn at random for args.clients_s seconds (a
    swap whenever the model differs from the resident one), while a sampler reads the GPU memory and the models'
    states: every answer whole, its text its model's; never both models resident."""
    rng = random.Random(7)
    draws = [[rng.choice(sorted(references)) for _ in range(10_000)] for _ in range(args.clients)]
    answers: list[tuple[str, Answer]] = []
    samples: list[tuple[int, list[str]]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.clients_s
    stop_sampling = threading.Event()

    def client(number: int) -> None:
        for model in draws[number]:
            if time.monotonic() >= deadline:
                return
            answer = ask(gate_url, chat_request(model, PROMPT, args.tokens, stream=True, logprobs=True), timeout=600)
            with lock:
                answers.append((model, answer))

    def sampler() -> None:
        while not stop_sampling.is_set():
            with contextlib.suppress(requests.RequestException, ValueError, KeyError):
                models = requests.get(f"{gate_url}/gate/status", timeout=10).json()["models"]
                running = [name for name, entry in models.items() if entry["state"] == "running"]
                samples.append((sum(gpu_used_mib()), running))
            stop_sampling.wait(0.2)

    watcher = threading.Thread(target=sampler)
    watcher.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(900)
    stop_sampling.set()
    watcher.join()
    status = requests.get(f"{gate_url}/gate/status", timeout=10).json()
    first_tokens = [answer.first_token_s for _, answer in answers if answer.first_token_s is not None]
    verdicts: dict[str, int] = {}
    for _, answer in answers:
        verdicts[answer.verdict(args.tokens)] = verdicts.get(answer.verdict(args.tokens), 0) + 1
    return {
        "clients": args.clients,
        "seconds": args.clients_s,
        "requests": len(answers),
        "verdicts": verdicts,
        "same_text": sum(answer.text == references[model].text for model, answer in answers),
        "same_logprobs": sum(same_answer(answer, references[model]) for model, answer in answers),
        "first_token_s": stats(first_tokens),
        "swaps": {name: entry.get("swaps") for name, entry in status["models"].items()},
        "samples": len(samples),
        "both_running_samples": sum(len(running) > 1 for _, running in samples),
        "max_gpu_used_mib": max((used for used, _ in samples), default=None),
        "gate": {
            name: {key: entry.get(key) for key in ("state", "last_swap_path", "proof")}
            for name, entry in status["models"].items()
        },
    }


def summary(rows: list[dict]) -> dict:
    swaps = rows[1:]  # the first request swaps too, but from the start-up's state: reported with the rest
    first_tokens = [row["first_token_s"] for row in rows if row["first_token_s"] is not None]
    gate_swaps = [row["gate_swap_s"] for row in rows if row["gate_swap_s"] is not None]
    step_medians: dict[str, dict[str, float]] = {}
    for model in ("tiny", "qwen3-8b-shaped"):
        other = "qwen3-8b-shaped" if model == "tiny" else "tiny"
        taken = [row["steps"] for row in swaps if row["model"] == model and row["steps"]]
        for key in (f"suspend {other}", f"resume {model}"):
            phases = {phase for steps in taken for phase in steps.get(key, {})}
            step_medians[f"to {model}: {key}"] = {
                phase: round(statistics.median(s[key][phase] for s in taken if phase in s.get(key, {})), 3)
                for phase in sorted(phases)
            }
    return {
        "requests": len(rows),  # each one swaps: the other model was resident
        "failed": sum(row["verdict"] != "ok" for row in rows),
        "different_answers": sum(not row["same_answer"] for row in rows),
        "first_token_s": stats(first_tokens),
        "gate_swap_s": stats(gate_swaps),
        "swaps_under_2s": sum(value < 2.0 for value in first_tokens),
        "step_medians_s": step_medians,
    }


def stats(values: list[float]) -> dict:
    if not values:
        return {}
    return {"min": min(values), "median": round(statistics.median(values), 3), "max": max(values)}


def stop(supervisord: subprocess.Popen) -> list[int]:
    """Kill the whole tree (a suspended server cannot be resumed while the other holds the GPU, and the driver
    frees a killed process's memory); returns the GPU memory in use once it is back to idle (or after 60 s)."""
    tree = []
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(supervisord.pid)
        tree = [root, *root.children(recursive=True)]  # programs run in sessions of their own: not in its group
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(tree, timeout=30)
    deadline = time.monotonic() + 60
    used = gpu_used_mib()
    while time.monotonic() < deadline and any(value > 1024 for value in used):
        time.sleep(1)
        used = gpu_used_mib()
    left = [proc.pid for proc in tree if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE]
    if left or any(value > 1024 for value in used):
        log(f"after the kill: processes left {left}, GPU {used} MiB")
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("gpu", "cpu"), default=os.environ.get("SUITE_TARGET", "gpu"))
    parser.add_argument("--swaps", type=int, default=20, help="requests after the first, alternating (default 20)")
    parser.add_argument("--share", type=float, default=0.55, help="each server's --gpu-memory-utilization")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for one server to load")
    parser.add_argument("--clients", type=int, default=0, help="then this many clients on random models (0: none)")
    parser.add_argument("--clients-s", type=float, default=40, help="seconds the clients send requests")
    parser.add_argument("--tiny-dir", default=os.environ.get("SUITE_TINY_DIR", "/tmp/tiny-qwen3"))
    parser.add_argument("--shaped-dir", default=os.environ.get("SUITE_SHAPED_DIR", "/tmp/qwen3-8b-awq-shape"))
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    target = Target(args.target)
    target.prepare()
    os.environ["CUDA_TOGGLE_RUN_DIR"] = str(WORK / "run")
    if args.target == "gpu":
        ensure_shaped_model(Path(args.shaped_dir))
    gate_port = free_port()
    ports = {"tiny": free_port(), "qwen3-8b-shaped": free_port()}
    gate_url = f"http://127.0.0.1:{gate_port}"
    idle = gpu_used_mib()
    supervisord = start_servers(args, target, gate_port, ports)
    result: dict = {"target": args.target, "share": args.share, "tokens": args.tokens, "idle_gpu_mib": idle}
    try:
        result["start_s"] = round(wait_started(gate_url, supervisord, 2 * args.timeout), 1)
        result["after_start_gpu_mib"] = gpu_used_mib()
        log(f"both servers started in turn in {result['start_s']} s; GPU {result['after_start_gpu_mib']} MiB")
        rows, references = swap_rows(args, gate_url)
        result["rows"] = rows
        result["summary"] = summary(rows)
        log(f"swap summary: {result['summary']}")
        if args.clients:
            result["load"] = client_load(args, gate_url, references)
            log(f"{args.clients} clients on random models: {result['load']}")
        result["gate_status"] = requests.get(f"{gate_url}/gate/status", timeout=10).json()
    finally:
        result["after_stop_gpu_mib"] = stop(supervisord)
        save_step("swap", result)
    load = result.get("load") or {}
    if result["summary"]["failed"] or result["summary"]["different_answers"]:
        raise SystemExit("swap scenario failed")
    if load and (load["verdicts"].get("ok", 0) != load["requests"] or load["both_running_samples"]):
        raise SystemExit("swap scenario under load failed")


if __name__ == "__main__":
    main()
