#!/usr/bin/env python3
"""Stand-in for a vLLM OpenAI-compatible server with tensor parallelism (see README.md in this folder).

One script, three roles, the process tree of vLLM V1 (the code of each is a module of `standin/`):

    python3 -m vllm.entrypoints.openai.api_server ARGS   standin/api_server.py: aiohttp, the process started
      VLLM::EngineCore                                   standin/engine_core.py: schedules the steps
        VLLM::Worker_TP0 .. VLLM::Worker_TP{N-1}         standin/worker.py: a piece of every step (TP >= 2)

At TP=1 there are no workers: EngineCore holds the model and computes every step itself, as vLLM's
does. Whatever computes is what cuda-checkpoint suspends, so it behaves like a CUDA process of the fake
GPU: before every step it reads its state there; `locked` blocks it, `checkpointed` or `failed` kills it
with SIGSEGV (what a request reaching a suspended real vLLM process does).

Processes talk over socket pairs, one JSON message per line (standin/common.py). Standard library,
aiohttp (the API server only) and setproctitle: all three are in vLLM's image.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fakegpu and the standin package
from standin.common import parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # Each role imports only its own module: workers and EngineCore start faster without aiohttp.
    if args.standin_role == "worker":
        from standin.worker import run_worker

        return run_worker(args)
    if args.standin_role == "engine":
        from standin.engine_core import run_engine

        return run_engine(args, argv)
    from standin.api_server import run_api_server

    return run_api_server(args, argv)


if __name__ == "__main__":
    sys.exit(main())
