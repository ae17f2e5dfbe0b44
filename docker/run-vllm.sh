#!/usr/bin/env bash
# supervisord's [program:vllm] command: starts the vLLM server with the arguments entrypoint.sh saved.
# `exec`, so that the PID supervisord reports for `vllm` is the API server itself (cuda-toggle-all walks
# the process tree down from it) and supervisord's signals reach the server directly.
#
# VLLM_SERVER_CMD is the server program, split on blanks: python3 -m vllm.entrypoints.openai.api_server
# (the ENTRYPOINT of the v0.11.0 image) by default; `vllm serve` for newer images; the tests point it
# at a stand-in.
set -euo pipefail

: "${VLLM_ARGS_FILE:=/run/vllm/args}"
: "${VLLM_SERVER_CMD:=python3 -m vllm.entrypoints.openai.api_server}"

if [[ ! -r $VLLM_ARGS_FILE ]]; then
  printf 'run-vllm: %s is missing: start the container through docker/entrypoint.sh, which saves the vLLM arguments there\n' \
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

{
  printf 'run-vllm: exec'
  printf ' %q' "${server[@]}" "${args[@]}"
  printf '\n'
} >&2
exec "${server[@]}" "${args[@]}"
