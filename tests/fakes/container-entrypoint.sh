#!/usr/bin/env bash
# The CPU stand-in container's entrypoint (docker-compose.cpu.yml): a fake GPU of two 80 GB cards in
# FAKE_CUDA_STATE_DIR, empty at every start (a restarted container's processes get the PIDs of the last
# start again, and a real GPU keeps nothing of them), then the image's own entrypoint with the arguments.
set -euo pipefail
: "${FAKE_CUDA_STATE_DIR:?}"
rm -rf "$FAKE_CUDA_STATE_DIR"
mkdir -p "$FAKE_CUDA_STATE_DIR"
printf '%s\n' '0 GPU-standin-0 81559 4' '1 GPU-standin-1 81559 4' >"$FAKE_CUDA_STATE_DIR/gpus"
exec /usr/local/bin/start-services "$@"
