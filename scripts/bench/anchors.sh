#!/usr/bin/env bash
# Speed anchors for docs/BENCHMARKS.md, in one run: llama.cpp (llama-bench, llama-batched-bench) on the
# Q4_1 / BF16 / F32 GGUFs, candle 0.11.1 on f32 / bf16 safetensors and the Q4_1 GGUF, and a STREAM-like
# bandwidth probe turned into a decode roofline (weight bytes per token / GB/s). Writes one JSON file.
#
#   scripts/bench/anchors.sh [--out FILE] [--hf DIR] [-p 512] [-n 128] [-r 3] [-t 2] [--batch 8]
#                            [--bw-mib 1024] [--bw-passes 7] [--skip llama|candle|bandwidth]...
#                            [--only-weights q4_1|bf16|f32]... [--greedy 16] [--wait-idle S [--idle-load 0.5]]
#                            [--no-build]
#
# Defaults: --out bench-out/anchors.json; --hf models/smollm2-135m-instruct (our importer's output)
# when it exists, else an HF layout made from the GGUF under the anchors cache (recorded as such).
# Builds whatever is missing first (scripts/bench/build-anchors.sh; ~25-40 min the first time on
# 2 cores, seconds afterwards). Exit status 1 when any anchor failed (the JSON lists it in "errors").
# Run it on an otherwise idle machine: the figures are only comparable within one run.
set -euo pipefail
source "$(dirname "$0")/common.sh"

OUT="$REPO_ROOT/bench-out/anchors.json"
HF=""
BUILD=1
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --hf) HF="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) PASS+=("$1"); [ $# -gt 1 ] && [ "${2:0:1}" != "-" ] && { PASS+=("$2"); shift; }; shift ;;
  esac
done

HF_ORIGIN="given"
if [ -z "$HF" ]; then
  if [ -f "$HF_REPO_MODEL/config.json" ] && ls "$HF_REPO_MODEL"/*.safetensors >/dev/null 2>&1; then
    HF="$HF_REPO_MODEL"; HF_ORIGIN="importer (models/smollm2-135m-instruct)"
  else
    HF="$HF_FALLBACK"; HF_ORIGIN="fallback: dequantized Q4_1 GGUF, Q/K un-permuted (scripts/bench/gguf_to_hf.py)"
    log "models/smollm2-135m-instruct not found; candle f32/bf16 use $HF"
  fi
fi

if [ "$BUILD" = 1 ]; then
  fb=(); [ "$HF" = "$HF_FALLBACK" ] && fb=(--hf-fallback)
  "$BENCH_DIR/build-anchors.sh" "${fb[@]}"
fi

export REPO_ROOT BENCH_DIR LLAMA_BIN CANDLE_ANCHOR_BIN GGUF_Q4_1 GGUF_BF16 GGUF_F32
# llama.cpp was built with shared libs; its RPATH points into the build dir, this is belt and braces
export LD_LIBRARY_PATH="$LLAMA_BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec python3 "$BENCH_DIR/anchors.py" --out "$OUT" --hf "$HF" --hf-origin "$HF_ORIGIN" "${PASS[@]}"
