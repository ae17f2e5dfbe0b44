#!/usr/bin/env bash
# The whole GPU suite in one command (`make gpu-suite`): on a machine with two GPUs and vLLM importable,
# or with SUITE_TARGET=cpu against the stand-in over the fake GPU (what `make check` runs, small).
# Each step records its figures in $SUITE_WORK/results.json; a failed step is reported and the rest run.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${SUITE_TARGET:=gpu}"              # gpu | cpu
: "${SUITE_SIZES:=12 32 64}"          # GB of GPU memory per GPU, one server each; the last one has sleep mode
: "${SUITE_CYCLES:=2}"                # selftest suspend/resume cycles per size
: "${SUITE_LOAD_CYCLES:=10}"          # cycles under client load
: "${SUITE_CLIENTS:=4}"               # clients of the load and gate scenarios
: "${SUITE_SITE:=/tmp/site}"          # where the vLLM bundle was installed (bundle's install.sh)
: "${PYTHON:=python3}"
export SUITE_TARGET PYTHONUNBUFFERED=1
export PYTHONPATH="$SUITE_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

read -r -a sizes <<<"$SUITE_SIZES"
first=${sizes[0]}
last=${sizes[${#sizes[@]} - 1]}
failed=()

step() {
  echo "=== run_suite.py $*"
  if ! "$PYTHON" tests/gpu/run_suite.py "$@"; then
    failed+=("$*")
  fi
}

step machine
if step start --gb "$first"; then
  step selftest --label "${first}gb" --cycles "$SUITE_CYCLES"
  step protocols --cycles 2
  step load --clients "$SUITE_CLIENTS" --cycles "$SUITE_LOAD_CYCLES"
  step gate --clients "$SUITE_CLIENTS" --cycles 3 --mode plain
fi
step stop
for size in "${sizes[@]:1}"; do
  [[ $size == "$last" ]] && break
  if step start --gb "$size"; then
    step selftest --label "${size}gb" --cycles "$SUITE_CYCLES"
  fi
  step stop
done
if [[ $last != "$first" ]] && step start --gb "$last" --sleep-mode; then
  step selftest --label "${last}gb" --cycles 1 --mode plain
  step hybrid --cycles 2
fi
step stop
step refusal
"$PYTHON" tests/gpu/run_suite.py report

if ((${#failed[@]})); then
  printf 'GPU suite: %d step(s) failed:\n' "${#failed[@]}"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "GPU suite: every step passed"
