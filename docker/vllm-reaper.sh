#!/usr/bin/env bash
# supervisord event listener ([eventlistener:vllm-reaper]) that makes stopping a suspended server work.
#
# supervisord puts [program:vllm] in its own process group (pgid = its PID) and, with stopasgroup,
# sends SIGTERM to the whole group. But while the server is suspended, cuda-toggle-all keeps
# VLLM::EngineCore stopped (SIGSTOP), and a signal sent to a stopped process stays pending: EngineCore
# would not shut down, nor its workers with it. So:
#   PROCESS_STATE_STOPPING -> SIGCONT to the group: the pending SIGTERM is delivered, all shut down.
#   PROCESS_STATE_STOPPED / EXITED -> SIGKILL to whatever is left of the group (the API server can
#     exit before its children; killasgroup only helps while the API server itself is still alive).
# It acts on program VLLM_PROGRAM (`vllm`) and, with GATE_MODELS, on each other model's `vllm-NAME`.
# stdout is supervisord's protocol channel; messages go to stderr.
set -euo pipefail
export LC_ALL=C

program="${VLLM_PROGRAM:-vllm}"

log() { printf 'vllm-reaper: %s\n' "$*" >&2; }

# The value of key $1 in a "key:value key:value ..." line $2 (empty if absent).
field() {
  local token
  local -a tokens=()
  read -r -a tokens <<<"$2" || true
  for token in "${tokens[@]}"; do
    if [[ ${token%%:*} == "$1" ]]; then
      printf '%s' "${token#*:}"
      return 0
    fi
  done
}

handle() {
  local event=$1 pid=$2 program=$3
  case $event in
    PROCESS_STATE_STOPPING)
      if kill -CONT -- "-$pid" 2>/dev/null; then
        log "$program (pid $pid) is stopping: sent SIGCONT to its process group, so stopped members get their SIGTERM"
      fi
      ;;
    PROCESS_STATE_STOPPED | PROCESS_STATE_EXITED)
      if kill -0 -- "-$pid" 2>/dev/null; then
        log "$program (pid $pid) is gone but members of its process group remain: sending SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || true
      fi
      ;;
  esac
}

while true; do
  printf 'READY\n'
  header=''
  IFS= read -r header || exit 0
  len=$(field len "$header")
  payload=''
  if [[ $len =~ ^[0-9]+$ ]] && ((len > 0)); then
    IFS= read -r -N "$len" payload || true
  fi
  pid=$(field pid "$payload")
  name=$(field processname "$payload")
  if [[ ($name == "$program" || $name == "$program"-*) && $pid =~ ^[0-9]+$ ]]; then
    handle "$(field eventname "$header")" "$pid" "$name"
  fi
  printf 'RESULT 2\nOK'
done
