#!/usr/bin/env bash
# The container's ENTRYPOINT. It keeps the vLLM arguments (the compose file's `command:`) in a file, then
# replaces itself with supervisord in the foreground (PID 1), which starts vLLM through run-vllm.sh.
# vLLM runs under supervisord, not as PID 1, so that `cuda-toggle-all` can ask supervisord for its PID
# and an operator can stop and start it without losing the container.
set -euo pipefail

: "${SUPERVISOR_RUN_DIR:=/run/supervisor}"
: "${SUPERVISOR_CONF:=/etc/supervisor/supervisord.conf}"
: "${SUPERVISORD_BIN:=supervisord}"
: "${VLLM_ARGS_FILE:=/run/vllm/args}"
export SUPERVISOR_RUN_DIR VLLM_ARGS_FILE

# As the container's PID 1 this is a container start, so no process of an earlier start is alive: a
# suspend record left in the container's file system (`docker stop` while suspended, then `docker start`)
# describes processes that are gone, and would make the tools and the gate take the new server for a
# suspended one. (Outside a container, as in the tests, nothing is removed.)
if (($$ == 1)); then
  rm -rf "${CUDA_TOGGLE_RUN_DIR:-/run/cuda-toggle-all}"
fi

mkdir -p "$SUPERVISOR_RUN_DIR" "$(dirname "$VLLM_ARGS_FILE")"

# NUL-separated, because NUL is the one byte no argument can contain: spaces, quotes and newlines
# inside an argument arrive unchanged. Written to a temporary file and renamed, so that run-vllm.sh
# never reads half a list.
tmp="$VLLM_ARGS_FILE.$$"
: >"$tmp"
if (($# > 0)); then
  printf '%s\0' "$@" >"$tmp"
fi
mv -f "$tmp" "$VLLM_ARGS_FILE"

# Several models (GATE_MODELS): the gate writes one supervisord program per model, and each model's
# arguments (these, then its own --model, --port...), read by supervisord.conf's [include]. Without it, an
# earlier container start's programs are removed: one server, as configured above.
programs_dir="$SUPERVISOR_RUN_DIR/programs"
if [[ -n ${GATE_MODELS:-} ]]; then
  read -r -a gate <<<"${GATE_LAUNCHER:-vllm-gate}"
  "${gate[@]}" --write-programs "$programs_dir"
else
  rm -f "$programs_dir/models.conf"
fi

printf 'start-services: %d vLLM argument(s) saved to %s; starting supervisord (%s)\n' \
  "$#" "$VLLM_ARGS_FILE" "$SUPERVISOR_CONF" >&2
exec "$SUPERVISORD_BIN" -n -c "$SUPERVISOR_CONF"
