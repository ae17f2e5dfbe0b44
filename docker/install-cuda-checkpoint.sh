#!/usr/bin/env bash
# Installs cuda-checkpoint at $1 during the image build (Dockerfile): the file the builder provided
# (CUDA_CHECKPOINT_FILE, a name inside docker/cuda-checkpoint/, copied next to this script under provided/)
# or else the download from CUDA_CHECKPOINT_URL; either way checked against CUDA_CHECKPOINT_SHA256. Every
# failure is one line that names what to change.
set -euo pipefail

target=$1
provided_dir="${CUDA_CHECKPOINT_PROVIDED_DIR:-$(dirname "$0")/provided}"
: "${CUDA_CHECKPOINT_SHA256:?}"

fail() {
  printf 'cuda-checkpoint: %s\n' "$*" >&2
  exit 1
}

if [[ -n ${CUDA_CHECKPOINT_FILE:-} ]]; then
  source_name="docker/cuda-checkpoint/$CUDA_CHECKPOINT_FILE"
  [[ $CUDA_CHECKPOINT_FILE != */* && -f $provided_dir/$CUDA_CHECKPOINT_FILE ]] \
    || fail "CUDA_CHECKPOINT_FILE=$CUDA_CHECKPOINT_FILE: no such file in docker/cuda-checkpoint/ (put the binary there; docker/cuda-checkpoint/README.md)"
  cp "$provided_dir/$CUDA_CHECKPOINT_FILE" "$target"
else
  source_name=$CUDA_CHECKPOINT_URL
  curl -fsSL --retry 5 -o "$target" "$CUDA_CHECKPOINT_URL" 2>/dev/null \
    || fail "cannot download $CUDA_CHECKPOINT_URL: without internet access, put the binary in docker/cuda-checkpoint/ and build with CUDA_CHECKPOINT_FILE and CUDA_CHECKPOINT_SHA256 (docker/cuda-checkpoint/README.md)"
fi

actual=$(sha256sum "$target" | cut -d' ' -f1)
if [[ $actual != "$CUDA_CHECKPOINT_SHA256" ]]; then
  rm -f "$target"
  fail "SHA-256 mismatch: $source_name is $actual, CUDA_CHECKPOINT_SHA256 is $CUDA_CHECKPOINT_SHA256"
fi
chmod 0755 "$target"
printf 'cuda-checkpoint: installed %s from %s (SHA-256 %s)\n' "$target" "$source_name" "$actual"
