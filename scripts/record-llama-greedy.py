"""Records llama.cpp's greedy completions of a GGUF (llama-simple, 16 tokens, no BOS: SmolLM2's files set
add_bos_token false) for five prompts, with the file's sha256: the fixture host/engine/tests/quantized.rs
replays. scripts/quantize-gguf.sh --record calls it; scripts/bench/llama-greedy.sh does the same for Q4_1.

    python3 scripts/record-llama-greedy.py LLAMA_SIMPLE FILE.gguf LLAMA_CPP_COMMIT OUT.json
"""
import hashlib
import json
import os
import subprocess
import sys

exe, gguf, commit, out = sys.argv[1:]
prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time",
           "The three primary colors are"]
cases = []
for p in prompts:
    text = subprocess.run([exe, "-m", gguf, "-n", "16", p], capture_output=True, text=True, check=True).stdout
    assert text.startswith(p) and text.endswith("\n"), text
    cases.append({"prompt": p, "completion": text[len(p):-1]})
doc = {
    "_about": f"Greedy completions of llama.cpp's llama-simple (16 tokens, no BOS) on {os.path.basename(gguf)}. "
              "Regenerate with scripts/quantize-gguf.sh --record.",
    "gguf_sha256": hashlib.sha256(open(gguf, "rb").read()).hexdigest(),
    "llama_cpp": f"llama-cpp-python's vendor/llama.cpp {commit}, llama-simple -m FILE -n 16 PROMPT",
    "tokens": 16,
    "cases": cases,
}
open(out, "w").write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
print(f"wrote {out}")
