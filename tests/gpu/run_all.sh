#!/usr/bin/env bash
# The GPU suite (`make gpu-suite`): on a machine with GPUs and vLLM importable, or with SUITE_TARGET=cpu
# against the stand-in over the fake GPU (what `make check` runs, small).
# SUITE_STEPS lists the steps to run, in order; the server stays up between steps and between runs (its
# settings are in $SUITE_WORK/server.json), so one run can be split over several commands, e.g.
#   SUITE_MODEL=8b-shaped SUITE_TP=1 SUITE_GB=64 SUITE_STEPS="machine start cycles" bash tests/gpu/run_all.sh
#   SUITE_STEPS="acceptance stop report" bash tests/gpu/run_all.sh
# Each step records its figures in $SUITE_WORK/results.json; a failed step is reported and the rest run
# (except the steps that need the server, when its start failed).
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${SUITE_TARGET:=gpu}"                          # gpu | cpu
: "${SUITE_STEPS:=machine sizes refusal report}"  # see `run_step` below
# The server (read by run_suite.py itself): SUITE_MODEL (tiny | 8b-shaped | a path), SUITE_TP (1 2 4 8),
# SUITE_DTYPE, SUITE_QUANTIZATION, SUITE_TINY_DIR, SUITE_SHAPED_DIR, SUITE_WARMUP (1: a sleep/wake before the
# first suspend).
: "${SUITE_GB:=64}"                       # `start`: GB of GPU memory per GPU (64 = 0.80 of an 80 GB card)
: "${SUITE_SLEEP_MODE:=1}"                # `start`: vLLM with sleep mode (needed by hybrid)
: "${SUITE_SIZES:=12 32 64}"              # `sizes`: one TP server per size; the last one with sleep mode
: "${SUITE_CYCLES:=3}"                    # suspend/resume cycles (selftest, cycles, acceptance)
: "${SUITE_MODES:=plain,hybrid}"          # `cycles`: the modes measured
: "${SUITE_WAKE_CYCLES:=1}"               # `cycles`: suspends per mode woken by a request through the gate
: "${SUITE_PARTS:=plain,hybrid,load}"     # `acceptance`: its parts (a long run can be split)
: "${SUITE_INFLIGHT_TOKENS:=400}"         # `acceptance`: the request in flight at each suspend
: "${SUITE_LOAD_CYCLES:=10}"              # cycles under client load
: "${SUITE_CLIENTS:=4}"                   # clients of the load and gate scenarios
: "${SUITE_SITE:=/tmp/site}"              # where vLLM is installed, if not on the default path
: "${PYTHON:=python3}"
export SUITE_TARGET SUITE_SITE PYTHONUNBUFFERED=1
export PYTHONPATH="$SUITE_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

failed=()
server_up=1 # 0 after a failed start: the steps that need the server are skipped until the next start

step() {
  echo "=== run_suite.py $*"
  if ! "$PYTHON" tests/gpu/run_suite.py "$@"; then
    failed+=("$*")
    return 1
  fi
}

needs_server() {
  if ((server_up)); then
    step "$@" || true
  else
    echo "=== skipped (no server): run_suite.py $*"
    failed+=("$* (skipped: no server)")
  fi
}

start_server() {
  if step start "$@"; then server_up=1; else server_up=0; fi
}

sleep_flag=()
[[ $SUITE_SLEEP_MODE == 1 ]] && sleep_flag=(--sleep-mode)

# The earlier whole run: one server per size in SUITE_SIZES, every scenario at the first size.
sizes() {
  local sizes first last size
  read -r -a sizes <<<"$SUITE_SIZES"
  first=${sizes[0]}
  last=${sizes[${#sizes[@]} - 1]}
  start_server --gb "$first"
  needs_server selftest --label "${first}gb" --cycles "$SUITE_CYCLES"
  needs_server protocols --cycles 2
  needs_server load --clients "$SUITE_CLIENTS" --cycles "$SUITE_LOAD_CYCLES"
  needs_server gate --clients "$SUITE_CLIENTS" --cycles 3 --mode plain
  step stop || true
  for size in "${sizes[@]:1}"; do
    [[ $size == "$last" ]] && break
    start_server --gb "$size"
    needs_server selftest --label "${size}gb" --cycles "$SUITE_CYCLES"
    step stop || true
  done
  if [[ $last != "$first" ]]; then
    start_server --gb "$last" --sleep-mode
    needs_server selftest --label "${last}gb" --cycles 1 --mode plain
    needs_server hybrid --cycles 2
  fi
  step stop || true
}

run_step() {
  case $1 in
    machine | build-model | refusal) step "$1" || true ;;
    stop) step stop || true ;;
    report) "$PYTHON" tests/gpu/run_suite.py report ;;
    sizes) sizes ;;
    start) start_server --gb "$SUITE_GB" "${sleep_flag[@]}" ;;
    cycles) needs_server cycles --modes "$SUITE_MODES" --cycles "$SUITE_CYCLES" --wake-cycles "$SUITE_WAKE_CYCLES" ;;
    acceptance)
      needs_server acceptance --parts "$SUITE_PARTS" --cycles "$SUITE_CYCLES" --load-cycles "$SUITE_LOAD_CYCLES" \
        --clients "$SUITE_CLIENTS" --inflight-tokens "$SUITE_INFLIGHT_TOKENS"
      ;;
    selftest) needs_server selftest --label "${SUITE_GB}gb" --cycles "$SUITE_CYCLES" ;;
    protocols) needs_server protocols --cycles 2 ;;
    load) needs_server load --clients "$SUITE_CLIENTS" --cycles "$SUITE_LOAD_CYCLES" ;;
    gate) needs_server gate --clients "$SUITE_CLIENTS" --cycles 3 --mode plain ;;
    hybrid) needs_server hybrid --cycles 2 ;;
    idle) needs_server idle --cycles "$SUITE_CYCLES" --clients "$SUITE_CLIENTS" ;;
  esac
}

known=" machine build-model start cycles acceptance selftest protocols load gate hybrid idle refusal sizes stop report "
read -r -a steps <<<"$SUITE_STEPS"
for name in "${steps[@]}"; do
  if [[ $known != *" $name "* ]]; then
    echo "unknown step in SUITE_STEPS: $name (one of:$known)" >&2
    exit 2
  fi
done
for name in "${steps[@]}"; do
  run_step "$name"
done

if ((${#failed[@]})); then
  printf 'GPU suite: %d step(s) failed:\n' "${#failed[@]}"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "GPU suite: every step passed"
