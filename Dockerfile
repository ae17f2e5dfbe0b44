# vLLM over two GPUs, suspendable with NVIDIA cuda-checkpoint from inside the container.
# Built by `make build` (docker compose build); see README.md and docs/container.md.
# What this file assumes about vLLM's image (Python, pip, user, entrypoint, packages) was checked against
# vLLM's own docker/Dockerfile at the pinned release: docs/container.md.
ARG VLLM_VERSION=v0.20.2
# The image to build on: vLLM's, at the release the project measured. The CPU stand-in
# (docker-compose.cpu.yml) builds this same file on a local image that plays it.
ARG BASE_IMAGE=vllm/vllm-openai:${VLLM_VERSION}
FROM ${BASE_IMAGE}

# cuda-checkpoint is a prebuilt binary in NVIDIA's repository, fetched at a pinned commit, or a file the
# builder provides (where the build has no internet access): CUDA_CHECKPOINT_FILE names it inside
# docker/cuda-checkpoint/ (docker/cuda-checkpoint/README.md). Either way it must match
# CUDA_CHECKPOINT_SHA256 (the pinned commit's by default; pass the sum of another file with it), so that a
# moved branch or a wrong file cannot change what the image runs. The binary only forwards to the driver
# (the lock/checkpoint protocol needs driver >= 570).
ARG CUDA_CHECKPOINT_COMMIT=6ec728aff032c18c9fb0794a272d94c6adcce508
ARG CUDA_CHECKPOINT_SHA256=707fa7f54136824d6c1d6dd724b9b1717610f831033c00d06da474de363a06db
ARG CUDA_CHECKPOINT_FILE=
# pip's constraints for our dependencies, a file of constraints/ (empty: none; the CPU stand-in uses the
# versions vLLM's image has). The install below fails if it changes any package the base image has.
ARG CONSTRAINTS_FILE=

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    SUPERVISOR_CONF=/etc/supervisor/supervisord.conf \
    SUPERVISOR_RUN_DIR=/run/supervisor \
    VLLM_LAUNCHER=/usr/local/bin/run-vllm \
    VLLM_REAPER=/usr/local/bin/vllm-reaper \
    VLLM_ARGS_FILE=/run/vllm/args \
    GATE_LAUNCHER=vllm-gate \
    VLLM_HEALTH_URL=http://127.0.0.1:8000/health

# cuda-checkpoint's binary exists for x86_64 only; vLLM's image is also published for aarch64, where
# every step below would pass and the first suspend would fail with "exec format error".
RUN arch="$(uname -m)"; [ "$arch" = x86_64 ] \
    || { echo "This image needs an x86_64 host: NVIDIA's cuda-checkpoint is built for x86_64 only, and this build runs on $arch"; exit 1; }

# curl: the download below and the HEALTHCHECK. vLLM's image has it (and its CA certificates), so this step
# installs nothing there and needs no network.
# DL3008 (apt versions not pinned): Ubuntu's archive drops superseded versions, so a pin would break the
# build at the next security update; what is installed is fixed by the pinned base image instead.
# hadolint ignore=DL3008
RUN command -v curl >/dev/null || { apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*; }

COPY docker/install-cuda-checkpoint.sh /tmp/cuda-checkpoint/install.sh
COPY docker/cuda-checkpoint/ /tmp/cuda-checkpoint/provided/
RUN CUDA_CHECKPOINT_URL="https://raw.githubusercontent.com/NVIDIA/cuda-checkpoint/${CUDA_CHECKPOINT_COMMIT}/bin/x86_64_Linux/cuda-checkpoint" \
        bash /tmp/cuda-checkpoint/install.sh /usr/local/bin/cuda-checkpoint \
    && rm -rf /tmp/cuda-checkpoint

# This package: cuda-toggle-all, selftest, vllm-gate and their dependencies, most of which vLLM's image
# already has (docs/container.md says which; pip adds the others from the index). Installed into the image's Python (the one vLLM runs on), not editable, without
# build isolation: the image's setuptools builds it, so no index is needed when everything is there. The
# pip freeze before and after fails the build if the install upgraded or removed anything the base image
# had (vLLM's own pins). PIP_BREAK_SYSTEM_PACKAGES: harmless where the interpreter is not marked externally
# managed (vLLM's), needed where it is.
COPY pyproject.toml README.md /tmp/vllm-cuda-suspend/
COPY entrypoint/ /tmp/vllm-cuda-suspend/entrypoint/
COPY constraints/ /tmp/vllm-cuda-suspend/constraints/
RUN python3 -m pip freeze --all | sort >/tmp/before.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install --no-cache-dir \
        --no-build-isolation ${CONSTRAINTS_FILE:+-c "/tmp/vllm-cuda-suspend/$CONSTRAINTS_FILE"} "/tmp/vllm-cuda-suspend[gate]" \
    && python3 -m pip freeze --all | sort >/tmp/after.txt \
    && changed="$(comm -23 /tmp/before.txt /tmp/after.txt | tr '\n' ' ')" \
    && if [ -n "$changed" ]; then \
        echo "Installing vllm-cuda-suspend changed packages the base image has (was: $changed): pin them with CONSTRAINTS_FILE"; \
        exit 1; \
    fi \
    && rm -rf /tmp/vllm-cuda-suspend /tmp/before.txt /tmp/after.txt

# Fail the build here, not at the first suspend, if the tools cannot start.
RUN cuda-toggle-all --help >/dev/null && selftest --help >/dev/null && vllm-gate --help >/dev/null

COPY supervisord.conf /etc/supervisor/supervisord.conf
COPY docker/start-services.sh /usr/local/bin/start-services
COPY docker/run-vllm.sh /usr/local/bin/run-vllm
COPY docker/vllm-reaper.sh /usr/local/bin/vllm-reaper
RUN chmod 0755 /usr/local/bin/start-services /usr/local/bin/run-vllm /usr/local/bin/vllm-reaper \
    && supervisord --version >/dev/null \
    && command -v supervisorctl >/dev/null \
    && command -v cuda-checkpoint >/dev/null

# Port 8000 is the gate, which forwards /health to vLLM without waking it: vLLM answers /health while
# suspended too. Loading (and the first download) takes minutes, during which the gate answers 502.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null \"$VLLM_HEALTH_URL\" || exit 1"]

# The gate only: vLLM listens on 127.0.0.1:8001, inside the container.
EXPOSE 8000

# supervisord as PID 1 (it reaps orphans); the compose `command:` is the list of vLLM arguments.
ENTRYPOINT ["/usr/local/bin/start-services"]
