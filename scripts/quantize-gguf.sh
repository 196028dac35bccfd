#!/usr/bin/env bash
# Makes the SmolLM2 Q4_K_M GGUF that host/engine/tests/quantized.rs
# (smollm2_q4_k_m_native_tracks_its_dequantized_f32_weights) checks, with llama.cpp's own llama-quantize
# from the F32 GGUF: $COMPUTEPOOL_CACHE/gguf/SmolLM2-135M-Instruct.Q4_K_M.gguf.
#
# Uses the llama.cpp that scripts/bench/build-anchors.sh builds (llama-cpp-python's vendored copy),
# adding its llama-quantize tool, and the anchors' F32 GGUF (or F32_GGUF=...). QTYPE=Q4_K_M by default;
# the output name follows it.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${COMPUTEPOOL_CACHE:-$HOME/.cache/computepool}"
ANCHORS="$CACHE/anchors"
QTYPE="${QTYPE:-Q4_K_M}"
F32_GGUF="${F32_GGUF:-$ANCHORS/models/SmolLM2-135M-Instruct.F32.gguf}"
OUT="${OUT:-$CACHE/gguf/SmolLM2-135M-Instruct.$QTYPE.gguf}"
[[ -d "$ANCHORS/llama.cpp-build" ]] || bash "$REPO_ROOT/scripts/bench/build-anchors.sh"
[[ -f "$F32_GGUF" ]] || { echo "no F32 GGUF at $F32_GGUF (set F32_GGUF)" >&2; exit 1; }
CMAKE="$(command -v cmake || echo "$REPO_ROOT/.venv/bin/cmake")"
"$CMAKE" --build "$ANCHORS/llama.cpp-build" --target llama-quantize -j "$(nproc)" >/dev/null
mkdir -p "$(dirname "$OUT")"
"$ANCHORS/llama.cpp-build/bin/llama-quantize" "$F32_GGUF" "$OUT" "$QTYPE" "$(nproc)" >/dev/null 2>&1
echo "$OUT"
