#!/usr/bin/env bash
# One device-machine call of docs/gpu-results.md sections 16 to 19: install the offline vLLM 0.20.2 bundle (its
# pieces in BUNDLE_DIR, a folder the call carries; the first piece copied to /tmp/pieces by an earlier call),
# then the `idle` step (the light sleep, the deep suspend, 4 clients, the operator's hold) on the 8B shape at
# TP=1, then the swap suite (two servers, early wake) in a PID namespace of its own, as `docker run` gives.
# IDLE_STEPS: the run_all.sh steps before `stop` (idle; e.g. "selftest idle"); IDLE_CYCLES: requests woken
# from the light sleep and from the deep suspend, each (3); SWAP_CLIENTS, SWAP_CLIENTS_S: clients on random models
# after the alternating swaps, and for how long (0, 40); RUN_IDLE=0 leaves the 8B server's part out, RUN_SWAP=0 the
# swap suite. Files go to $OUT.
set -euo pipefail
# Each part goes on when the one before failed (`|| true`): its log in $OUT says what happened.
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
: "${BUNDLE_DIR:?the folder holding bundle.tar.xz.part-01, install.sh and SHA256SUMS}"
cp "$BUNDLE_DIR"/bundle.tar.xz.part-01 "$BUNDLE_DIR"/install.sh "$BUNDLE_DIR"/SHA256SUMS /tmp/pieces/
(cd /tmp/pieces && bash install.sh) >"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
el "installed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SUITE_SITE=/tmp/site
export SUITE_MODEL=8b-shaped SUITE_TP=1 SUITE_GB=64 SUITE_WARMUP=0 SUITE_WORK=/tmp/gs SUITE_QUANTIZATION=
if [ "${RUN_IDLE:-1}" = 1 ]; then
( SUITE_STEPS="machine start" timeout 240 bash tests/gpu/run_all.sh || true
  el "started"
  CUDA_TOGGLE_BACKEND=driver CUDA_TOGGLE_RUN_DIR=/tmp/gs/run CUDA_TOGGLE_HOST_RAM_MIB=245760 \
    CUDA_TOGGLE_SUPERVISOR_URL=unix:///tmp/gs/sv/supervisord.sock timeout 120 python3 -m entrypoint.cuda_toggle_all warm-up --json || true
  el "warmed up"
  SUITE_STEPS="${IDLE_STEPS:-idle} stop report" SUITE_CYCLES="${IDLE_CYCLES:-3}" timeout 300 bash tests/gpu/run_all.sh || true
  el "idle done"
) 2>&1 | grep -v DEBUG > "$OUT/idle.log" || true
cp /tmp/gs/results.json "$OUT/idle-results.json" 2>/dev/null || true
grep -E "^\[|ok|FAIL|fail|first token|hold|summary" "$OUT/idle.log" | tail -40 || true
pkill -f supervisord || true
sleep 3
pkill -9 -f vllm || true
sleep 2
fi
nvidia-smi --query-gpu=memory.used --format=csv,noheader
left=$(( 575 - ($(date +%s) - T0) ))
el "swap suite with ${left} s left"
if [ "${RUN_SWAP:-1}" = 1 ] && (( left > 200 )); then
  SUITE_WORK=/tmp/sw timeout "$left" unshare -p -f --mount-proc python3 tests/gpu/swap_suite.py --swaps 12 \
    --clients "${SWAP_CLIENTS:-0}" --clients-s "${SWAP_CLIENTS_S:-40}" 2>&1 \
    | grep -v DEBUG > "$OUT/swap.log" || true
  cp /tmp/sw/results.json "$OUT/swap-results.json" 2>/dev/null || true
  tail -25 "$OUT/swap.log"
fi
el "end"
