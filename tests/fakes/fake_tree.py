#!/usr/bin/env python3
"""A purpose-built fake vLLM process tree for cuda-toggle-all's tests (no HTTP; see standin_vllm.py for that).

    root (command line holds --root-title and --args)  -> VLLM::EngineCore -> VLLM::Worker_TP0..N-1 (CUDA, hold memory)
                                                              -> a non-CUDA helper (and its own child)
                                          -> a non-CUDA resource tracker

Every process registers in the fake GPU (FAKE_CUDA_STATE_DIR) as vLLM's do: root and EngineCore with
0 MiB, workers with --mib each on GPU <rank>. When all are up, the root prints one JSON line with the
PIDs. Children die with their parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fakegpu  # noqa: E402

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def set_title(title: str) -> None:
    import setproctitle

    setproctitle.setproctitle(title)


def spawn(role: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--role", role, *extra], stdout=subprocess.PIPE, text=True)


def wait_line(child: subprocess.Popen) -> str:
    line = child.stdout.readline()
    if not line:
        raise SystemExit(f"child {child.pid} exited before it was ready")
    return line.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", default="root", choices=["root", "engine", "worker", "helper", "plain"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mib", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--root-title", default="python3 -m vllm.entrypoints.openai.api_server")
    parser.add_argument("--args", default="--tensor-parallel-size 2 --disable-custom-all-reduce")
    parser.add_argument("--no-engine", action="store_true", help="workers are children of the root")
    args = parser.parse_args()

    if args.role != "root":
        die_with_parent()
    if args.role == "worker":
        set_title(f"VLLM::Worker_TP{args.rank}")
        fakegpu.register(os.getpid(), gpu=args.rank, mib=args.mib)
        print(os.getpid(), flush=True)
    elif args.role == "plain":
        print(os.getpid(), flush=True)
    elif args.role == "helper":
        grandchild = spawn("plain")
        print(os.getpid(), wait_line(grandchild), flush=True)
    else:
        pids: dict = {}
        if args.role == "root":
            # Like vLLM's API server, the root keeps its command line (which holds --root-title and
            # --args) and so an intact /proc/PID/environ; setproctitle would clobber it.
            fakegpu.register(os.getpid(), gpu=None, mib=0)
            tracker = spawn("plain")
            pids["others"] = [int(wait_line(tracker))]
            if not args.no_engine:
                engine = spawn("engine", "--workers", str(args.workers), "--mib", str(args.mib))
                pids.update(json.loads(wait_line(engine)))
                pids["root"] = os.getpid()
                pids["others"] += pids.pop("engine_others")
                print(json.dumps(pids), flush=True)
                hold()
        else:
            set_title("VLLM::EngineCore")
            fakegpu.register(os.getpid(), gpu=None, mib=0)
            pids["dispatcher"] = os.getpid()
        workers = [spawn("worker", "--rank", str(rank), "--mib", str(args.mib)) for rank in range(args.workers)]
        helper = spawn("helper")
        pids["workers"] = [int(wait_line(w)) for w in workers]
        others = [int(p) for p in wait_line(helper).split()]
        if args.role == "root":
            pids["root"] = os.getpid()
            pids["others"] += others
        else:
            pids["engine_others"] = others
        print(json.dumps(pids), flush=True)
    hold()


def hold() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
