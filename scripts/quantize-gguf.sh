#!/usr/bin/env bash
# Makes the SmolLM2 Q4_K_M GGUF that host/engine/tests/quantized.rs checks, with llama.cpp's own
# llama-quantize from the F32 GGUF: $COMPUTEPOOL_CACHE/gguf/SmolLM2-135M-Instruct.Q4_K_M.gguf. With
# --record, also records llama.cpp's greedy completions on it (llama-simple, 16 tokens, the five prompts
# of scripts/bench/llama-greedy.sh) into host/engine/tests/data/llama_cpp_greedy_smollm2_q4_k_m.json.
#
# Uses the llama.cpp that scripts/bench/build-anchors.sh builds (llama-cpp-python's vendored copy),
# adding its llama-quantize tool, and the anchors' F32 GGUF (or F32_GGUF=...). QTYPE=Q4_K_M by default;
# the output name follows it.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${COMPUTEPOOL_CACHE:-$HOME/.cache/computepool}"
ANCHORS="$CACHE/anchors"
QTYPE="${QTYPE:-Q4_K_M}"
RECORD=no
[[ "${1:-}" == "--record" ]] && RECORD=yes
F32_GGUF="${F32_GGUF:-$ANCHORS/models/SmolLM2-135M-Instruct.F32.gguf}"
OUT="${OUT:-$CACHE/gguf/SmolLM2-135M-Instruct.$QTYPE.gguf}"
[[ -d "$ANCHORS/llama.cpp-build" ]] || bash "$REPO_ROOT/scripts/bench/build-anchors.sh"
[[ -f "$F32_GGUF" ]] || { echo "no F32 GGUF at $F32_GGUF (set F32_GGUF)" >&2; exit 1; }
CMAKE="$(command -v cmake || echo "$REPO_ROOT/.venv/bin/cmake")"
"$CMAKE" --build "$ANCHORS/llama.cpp-build" --target llama-quantize llama-simple -j "$(nproc)" >/dev/null
mkdir -p "$(dirname "$OUT")"
"$ANCHORS/llama.cpp-build/bin/llama-quantize" "$F32_GGUF" "$OUT" "$QTYPE" "$(nproc)" >/dev/null 2>&1
echo "$OUT"
[[ $RECORD == yes ]] || exit 0
COMMIT="$(git -C "$ANCHORS"/src/llama_cpp_python-*/vendor/llama.cpp log -1 --format=%H 2>/dev/null || echo unknown)"
python3 "$REPO_ROOT/scripts/record-llama-greedy.py" "$ANCHORS/llama.cpp-build/bin/llama-simple" "$OUT" "$COMMIT" \
    "$REPO_ROOT/host/engine/tests/data/llama_cpp_greedy_smollm2_$(echo "$QTYPE" | tr 'A-Z' 'a-z').json"
