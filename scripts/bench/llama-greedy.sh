#!/usr/bin/env bash
# Records llama.cpp's greedy completions of the SmolLM2 Q4_1 GGUF into
# host/engine/tests/data/llama_cpp_greedy_smollm2_q4_1.json, the reference that
# host/engine/tests/quantized.rs holds the native quantized path to. Uses the llama.cpp that
# scripts/bench/build-anchors.sh builds (llama-cpp-python's vendored copy), adding its llama-simple
# example (greedy sampling, no BOS for this file: it sets add_bos_token false).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${COMPUTEPOOL_CACHE:-$HOME/.cache/computepool}"
ANCHORS="$CACHE/anchors"
GGUF="${GGUF:-$CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf}"
[[ -d "$ANCHORS/llama.cpp-build" ]] || bash "$REPO_ROOT/scripts/bench/build-anchors.sh"
CMAKE="$(command -v cmake || echo "$REPO_ROOT/.venv/bin/cmake")"
"$CMAKE" --build "$ANCHORS/llama.cpp-build" --target llama-simple -j "$(nproc)" >/dev/null
COMMIT="$(git -C "$ANCHORS"/src/llama_cpp_python-*/vendor/llama.cpp log -1 --format=%H 2>/dev/null || echo unknown)"
python3 - "$ANCHORS/llama.cpp-build/bin/llama-simple" "$GGUF" "$COMMIT" \
    "$REPO_ROOT/host/engine/tests/data/llama_cpp_greedy_smollm2_q4_1.json" <<'PY'
import hashlib, json, subprocess, sys
exe, gguf, commit, out = sys.argv[1:]
prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time",
           "The three primary colors are"]
cases = []
for p in prompts:
    text = subprocess.run([exe, "-m", gguf, "-n", "16", p], capture_output=True, text=True, check=True).stdout
    assert text.startswith(p) and text.endswith("\n"), text
    cases.append({"prompt": p, "completion": text[len(p):-1]})
doc = {
    "_about": "Greedy completions of llama.cpp's llama-simple (16 tokens, no BOS: the file sets add_bos_token false) "
              "on SmolLM2-135M-Instruct.Q4_1.gguf. Regenerate with scripts/bench/llama-greedy.sh.",
    "gguf_sha256": hashlib.sha256(open(gguf, "rb").read()).hexdigest(),
    "llama_cpp": f"llama-cpp-python's vendor/llama.cpp {commit}, llama-simple -m FILE -n 16 PROMPT",
    "tokens": 16,
    "cases": cases,
}
open(out, "w").write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
print(f"wrote {out}")
PY
