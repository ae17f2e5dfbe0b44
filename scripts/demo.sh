#!/usr/bin/env bash
# `make demo`: the whole suspend/resume cycle for anyone without GPUs, on the CPU STAND-IN of the
# tests: a fake GPU (tests/fakes: cuda-checkpoint, nvidia-smi, all sharing one state directory) and a
# stand-in vLLM (tests/fakes/standin_vllm.py) with vLLM's process tree. No GPU, no real vLLM: the
# figures it prints are the fake's. Usage: scripts/demo.sh [VENV] (default .venv, made by `make venv`).
set -euo pipefail
cd "$(dirname "$0")/.."
venv_bin="$PWD/${1:-.venv}/bin"
[ -x "$venv_bin/cuda-toggle-all" ] || { echo "demo: run 'make venv' first" >&2; exit 2; }

work=$(mktemp -d)
standin_pid=
stop_standin() {
  if [ -n "$standin_pid" ] && kill -0 "$standin_pid" 2>/dev/null; then
    kill -TERM "$standin_pid" && wait "$standin_pid" || true
  fi
  rm -rf "$work"
}
trap stop_standin EXIT

# The fake GPU: two 80 GB cards, and the fakes first on PATH (as the tests run them).
export FAKE_CUDA_STATE_DIR="$work/fake-gpu"
export PATH="$PWD/tests/fakes:$venv_bin:$PATH"
export CUDA_TOGGLE_RUN_DIR="$work/run"
export CUDA_TOGGLE_GPU_QUERY=nvidia-smi
"$venv_bin/python" - "$FAKE_CUDA_STATE_DIR" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests/fakes")
import fakegpu
fakegpu.write_gpus(Path(sys.argv[1]), [(i, f"GPU-demo-{i}", 81559, 4) for i in range(2)])
PY
port=$("$venv_bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# The server as the image runs it: TP=2, sleep mode and vLLM's dev endpoints on loopback, and the
# NCCL and all-reduce settings without which cuda-toggle-all refuses a TP=2 server.
echo "=== make demo: the CPU STAND-IN (a fake GPU and a stand-in vLLM), not a GPU ==="
NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NVLS_ENABLE=0 VLLM_ALLREDUCE_USE_SYMM_MEM=0 VLLM_SERVER_DEV_MODE=1 \
  "$venv_bin/python" tests/fakes/standin_vllm.py --model qwen3-8b-awq --tensor-parallel-size 2 \
  --gpu-memory-utilization 0.1 --disable-custom-all-reduce --enable-sleep-mode \
  --host 127.0.0.1 --port "$port" >"$work/standin.log" 2>&1 &
standin_pid=$!
scripts/wait-for-model.sh "http://127.0.0.1:$port/v1/models" qwen3-8b-awq 60 0.2 >/dev/null \
  || { cat "$work/standin.log"; exit 1; }

run() {
  echo "\$ $*"
  "$@"
}
run cuda-toggle-all status --pid "$standin_pid"
run cuda-toggle-all checkpointed --pid "$standin_pid"
run cuda-toggle-all status --pid "$standin_pid"
run cuda-toggle-all running --pid "$standin_pid"
run selftest --url "http://127.0.0.1:$port" --pid "$standin_pid" --max-tokens 8 --inflight-tokens 1000 --timeout 60
echo "=== make demo: done (the CPU stand-in; on a GPU host: make test) ==="
