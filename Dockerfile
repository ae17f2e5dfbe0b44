# vLLM over two GPUs, suspendable with NVIDIA cuda-checkpoint from inside the container.
# Built by `make build` (docker compose build); see README.md.
ARG VLLM_VERSION=v0.20.2
FROM vllm/vllm-openai:${VLLM_VERSION}

# cuda-checkpoint is a prebuilt binary in NVIDIA's repository, fetched at a pinned commit and checked
# against its SHA-256, so a moved branch cannot change what the image runs. The binary only forwards to
# the driver (the lock/checkpoint protocol needs driver >= 570). An empty CUDA_CHECKPOINT_SHA256 skips
# the check when you pin another commit.
ARG CUDA_CHECKPOINT_COMMIT=6ec728aff032c18c9fb0794a272d94c6adcce508
ARG CUDA_CHECKPOINT_SHA256=707fa7f54136824d6c1d6dd724b9b1717610f831033c00d06da474de363a06db

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

# curl: the download below and the HEALTHCHECK.
# DL3008 (apt versions not pinned): Ubuntu's archive drops superseded versions, so a pin would break the
# build at the next security update; what is installed is fixed by the pinned base image instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

RUN curl -fsSL --retry 5 -o /usr/local/bin/cuda-checkpoint \
        "https://raw.githubusercontent.com/NVIDIA/cuda-checkpoint/${CUDA_CHECKPOINT_COMMIT}/bin/x86_64_Linux/cuda-checkpoint" \
    && if [ -n "${CUDA_CHECKPOINT_SHA256}" ]; then \
        echo "${CUDA_CHECKPOINT_SHA256}  /usr/local/bin/cuda-checkpoint" | sha256sum -c -; \
    fi \
    && chmod 0755 /usr/local/bin/cuda-checkpoint

# This package: cuda-toggle-all, selftest, vllm-gate (the [gate] extra: aiohttp, which vLLM has already)
# and supervisor (a dependency). Only what pip needs is copied; installed into the image's Python (the
# one vLLM runs on), not editable.
COPY pyproject.toml README.md /tmp/vllm-cuda-suspend/
COPY entrypoint/ /tmp/vllm-cuda-suspend/entrypoint/
# PIP_BREAK_SYSTEM_PACKAGES: harmless where the interpreter is not marked externally managed, needed
# where it is; the image's Python is the container's only Python.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore \
        python3 -m pip install --no-cache-dir "/tmp/vllm-cuda-suspend[gate]" \
    && rm -rf /tmp/vllm-cuda-suspend

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
