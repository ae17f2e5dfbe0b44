#!/usr/bin/env bash
# The CPU stand-in container's entrypoint (docker-compose.cpu.yml): a fake GPU of two cards of FAKE_GPU_MIB
# (default 81559, an 80 GB card) in FAKE_CUDA_STATE_DIR, empty at every start (a restarted container's processes get the PIDs of the last
# start again, and a real GPU keeps nothing of them), then the image's own entrypoint with the arguments.
set -euo pipefail
: "${FAKE_CUDA_STATE_DIR:?}"
rm -rf "$FAKE_CUDA_STATE_DIR"
mkdir -p "$FAKE_CUDA_STATE_DIR"
mib=${FAKE_GPU_MIB:-81559}
printf '%s\n' "0 GPU-standin-0 $mib 4" "1 GPU-standin-1 $mib 4" >"$FAKE_CUDA_STATE_DIR/gpus"
exec /usr/local/bin/start-services "$@"
