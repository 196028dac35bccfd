#!/usr/bin/env bash
# The CUDA backend on a GPU, in one command: builds it, runs its GPU tests (CUDA against CPU on the tiny
# checkpoints of every family and on SmolLM2, sharded and mixed pipelines, batched decode, device
# argmax/top-k), then `cuda-check`, which prints a short table last: logits error and greedy agreement,
# tg128 / pp512 for SmolLM2 and a seeded random Llama-3-8B-shaped checkpoint, and decode bandwidth
# against the card's peak. Finishes in a few minutes on an H100.
#
#   scripts/gpu-check.sh [--model-dir DIR] [--gguf FILE] [--q4km FILE] [--bin-dir DIR] [--no-8b] [--no-smollm2]
#
# --model-dir  SmolLM2 in HF layout (default: models/smollm2-135m-instruct, as `make model` writes it)
# --gguf       the SmolLM2 Q4_1 GGUF (default: $COMPUTEPOOL_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf, if
#              there): imported into --model-dir if that has no model, and run natively with its weights
#              kept quantized on the device (the GPU tests and a cuda-check row against the CPU's f32 path)
# --q4km       SmolLM2 Q4_K_M (scripts/quantize-gguf.sh makes it; default: its cache path, if there): the
#              same native checks for Q4_K, Q6_K, Q5_0 and Q8_0 matrices
# --bin-dir    prebuilt `cuda-check`, `cuda-tests` and `computepool` (for GPU machines without a Rust toolchain);
#              otherwise both are built here with cargo
# --no-8b      skip the Llama-3-8B-shaped checkpoint (it needs ~17 GB of GPU and ~33 GB of host memory)
# --no-smollm2 skip SmolLM2 (for a machine that cannot hold the model yet; its tests then skip it too)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL_DIR="$ROOT/models/smollm2-135m-instruct"
GGUF=""
Q4KM=""
BIN_DIR=""
EIGHT_B=(--llama8b)
SMOLLM2=yes
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model-dir) MODEL_DIR="$2"; shift 2 ;;
        --gguf) GGUF="$2"; shift 2 ;;
        --bin-dir) BIN_DIR="$(cd "$2" && pwd)"; shift 2 ;;
        --no-8b) EIGHT_B=(); shift ;;
        --no-smollm2) SMOLLM2=no; shift ;;
        --q4km) Q4KM="$2"; shift 2 ;;
        -h|--help) sed -n 2,22p "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
    esac
done

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv,noheader || true

# cudarc loads libcuda, libnvrtc and libcublas by name at run time (libnvrtc.so, libnvrtc.so.12, ...).
# Put every CUDA library directory on the search path, and give a CUDA 13 (or later) install the plain
# names too, through a directory of links.
SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
dirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 \
         /usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64 \
         $(python3 -c 'import site,glob; print(" ".join(d for p in site.getsitepackages() for d in glob.glob(p + "/nvidia/*/lib")))' 2>/dev/null || true); do
    [[ -d "$d" ]] && dirs+=("$d")
done
for lib in nvrtc cublas cublasLt; do
    plain=no
    for d in "${dirs[@]}"; do [[ -e "$d/lib$lib.so" ]] && plain=yes; done
    if [[ $plain == no ]]; then
        for d in "${dirs[@]}"; do
            found="$(ls "$d"/lib$lib.so.[0-9]* 2>/dev/null | grep -v alt | sort -V | tail -1 || true)"
            if [[ -n "$found" ]]; then ln -sf "$found" "$SHIM/lib$lib.so"; break; fi
        done
    fi
done
LIBPATH="$SHIM"
for d in "${dirs[@]}"; do LIBPATH="$LIBPATH:$d"; done
export LD_LIBRARY_PATH="$LIBPATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "libraries: $(ls "$SHIM" | tr '\n' ' ')(links) on LD_LIBRARY_PATH"

if [[ -z "$BIN_DIR" ]]; then
    echo "== build"
    cd "$ROOT"
    cargo build --release --locked -p computepool-engine --features cuda --bin cuda-check
    BIN_DIR="$(mktemp -d)"
    target="${CARGO_TARGET_DIR:-$ROOT/target}"
    cp "$target/release/cuda-check" "$BIN_DIR/"
    cargo build --release --locked -p computepool-node
    cp "$target/release/computepool" "$BIN_DIR/"
    test_bin="$(cargo test --release --locked -p computepool-engine --features cuda --test cuda --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import sys,json; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')"
    cp "$test_bin" "$BIN_DIR/cuda-tests"
fi

SMOL_ARGS=()
QUANT_ARGS=()
MODEL_ENV=(COMPUTEPOOL_REQUIRE_MODEL=0 COMPUTEPOOL_MODEL_DIR=/nonexistent)
CACHE="${COMPUTEPOOL_CACHE:-$HOME/.cache/computepool}"
if [[ $SMOLLM2 == yes ]]; then
    [[ -n "$GGUF" || ! -f "$CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" ]] || GGUF="$CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
    [[ -n "$Q4KM" || ! -f "$CACHE/gguf/SmolLM2-135M-Instruct.Q4_K_M.gguf" ]] || Q4KM="$CACHE/gguf/SmolLM2-135M-Instruct.Q4_K_M.gguf"
    if [[ -n "$GGUF" && ! -f "$MODEL_DIR/model.safetensors" ]]; then
        "$BIN_DIR/cuda-check" --gguf "$GGUF" --model-dir "$MODEL_DIR" --import-only
    fi
    if [[ -n "$GGUF" ]]; then QUANT_ARGS+=(--quantized "$GGUF"); MODEL_ENV+=(COMPUTEPOOL_GGUF="$GGUF"); fi
    if [[ -n "$Q4KM" ]]; then QUANT_ARGS+=(--quantized "$Q4KM"); MODEL_ENV+=(COMPUTEPOOL_Q4_K_M_GGUF="$Q4KM"); fi
    [[ -f "$MODEL_DIR/model.safetensors" ]] || { echo "gpu-check: no SmolLM2 in $MODEL_DIR (run make model, or pass --gguf)" >&2; exit 1; }
    SMOL_ARGS=(--smollm2 "$MODEL_DIR")
    MODEL_ENV+=(COMPUTEPOOL_REQUIRE_MODEL=1 COMPUTEPOOL_MODEL_DIR="$MODEL_DIR")
fi

# A failing test does not stop the measurements; the script's status reports both.
if [[ -z "${COMPUTEPOOL_BIN:-}" ]]; then
    COMPUTEPOOL_BIN="$BIN_DIR/computepool"
fi
cd "$ROOT"
status=0
echo "== GPU tests (CUDA against CPU)"
env COMPUTEPOOL_REQUIRE_GPU=1 COMPUTEPOOL_REQUIRE_NVRTC=1 "${MODEL_ENV[@]}" "$BIN_DIR/cuda-tests" --test-threads=1 || status=1

if [[ $SMOLLM2 == yes && -x "$COMPUTEPOOL_BIN" ]]; then
    # A mixed pool through real worker processes over QUIC on loopback: the entry's layers on the GPU,
    # the exit's on the CPU, against one CPU process running the whole model.
    echo "== mixed pipeline: CUDA entry worker + CPU exit worker vs the whole model on the CPU"
    tokens() { "$COMPUTEPOOL_BIN" generate --model "$MODEL_DIR" --chat --prompt "Name three rivers in Europe." \
        --max-tokens 32 --ignore-eos --json "$@" 2>&1 >/dev/null | tail -1 \
        | python3 -c 'import sys, json; print(json.load(sys.stdin)["tokens"])'; }
    want="$(tokens)" || status=1
    got="$(tokens --shards 2 --devices cuda,cpu)" || status=1
    echo "cpu, one process:      $want"
    echo "cuda entry + cpu exit: $got"
    if [[ -n "$want" && "$want" == "$got" ]]; then echo "mixed pipeline: 32 greedy tokens equal"; else echo "mixed pipeline: tokens DIFFER"; status=1; fi
fi

echo "== cuda-check"
"$BIN_DIR/cuda-check" "${SMOL_ARGS[@]}" "${QUANT_ARGS[@]}" "${EIGHT_B[@]}" || status=1
exit $status
