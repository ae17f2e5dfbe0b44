#!/usr/bin/env bash
# supervisord's [program:vllm] command: starts the vLLM server with the arguments start-services.sh saved.
# `exec`, so that the PID supervisord reports for `vllm` is the API server itself (cuda-toggle-all walks
# the process tree down from it) and supervisord's signals reach the server directly.
#
# VLLM_SERVER_CMD is the server program, split on blanks: python3 -m vllm.entrypoints.openai.api_server
# (the v0.11.0 image's ENTRYPOINT, still served by later releases) by default, or `vllm serve`; the tests point it
# at a stand-in.
#
# VLLM_SLEEP_MODE=1 (the compose file's default) turns on vLLM's sleep mode: --enable-sleep-mode is
# appended to the arguments and VLLM_SERVER_DEV_MODE=1 exported, which cuda-toggle-all's hybrid suspend
# needs (sleep level 1 before the checkpoint: seconds instead of half a minute). It is switched here, not
# in the compose file's `command:`, because compose cannot leave a list item out on a condition.
# VLLM_SERVER_DEV_MODE=1 also serves vLLM's internals (/collective_rpc, ...), so sleep mode is refused
# unless vLLM listens on loopback only, behind the gate (which answers 404 for those paths).
set -euo pipefail

: "${VLLM_ARGS_FILE:=/run/vllm/args}"
: "${VLLM_SERVER_CMD:=python3 -m vllm.entrypoints.openai.api_server}"
: "${VLLM_SLEEP_MODE:=0}"

if [[ ! -r $VLLM_ARGS_FILE ]]; then
  printf 'run-vllm: %s is missing: start the container through docker/start-services.sh, which saves the vLLM arguments there\n' \
    "$VLLM_ARGS_FILE" >&2
  exit 2
fi

args=()
mapfile -d '' -t args <"$VLLM_ARGS_FILE"
read -r -a server <<<"$VLLM_SERVER_CMD"
if ((${#server[@]} == 0)); then
  echo 'run-vllm: VLLM_SERVER_CMD is empty' >&2
  exit 2
fi

# The address vLLM listens on: the last --host of the arguments (vLLM's own default is every interface).
listen_host() {
  local host='' i
  for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ ${args[i]} == --host ]] && ((i + 1 < ${#args[@]})); then
      host=${args[i + 1]}
    elif [[ ${args[i]} == --host=* ]]; then
      host=${args[i]#--host=}
    fi
  done
  printf '%s' "$host"
}

has_arg() {
  local arg
  for arg in "${args[@]}"; do
    [[ $arg == "$1" ]] && return 0
  done
  return 1
}

case $VLLM_SLEEP_MODE in
  0) ;;
  1)
    host=$(listen_host)
    if ! [[ $host =~ ^127\.[0-9.]+$ || $host == localhost || $host == ::1 ]]; then
      printf 'run-vllm: VLLM_SLEEP_MODE=1 needs vLLM on loopback (--host 127.0.0.1), not %s: its dev endpoints must stay behind the gate\n' \
        "${host:-every interface (no --host)}" >&2
      exit 2
    fi
    has_arg --enable-sleep-mode || args+=(--enable-sleep-mode)
    export VLLM_SERVER_DEV_MODE=1
    echo 'run-vllm: VLLM_SLEEP_MODE=1: sleep mode on (--enable-sleep-mode, VLLM_SERVER_DEV_MODE=1)' >&2
    ;;
  *)
    printf 'run-vllm: VLLM_SLEEP_MODE=%q: use 1 (sleep mode, the default in docker-compose.yml) or 0 (off)\n' \
      "$VLLM_SLEEP_MODE" >&2
    exit 2
    ;;
esac

{
  printf 'run-vllm: exec'
  printf ' %q' "${server[@]}" "${args[@]}"
  printf '\n'
} >&2
exec "${server[@]}" "${args[@]}"
