"""Records reference token ids for the SmolLM2 tokenizer test (tokenizer.rs: real_smollm2_tokenizer_matches_llama_cpp).

The reference is llama.cpp's own tokenizer (via llama-cpp-python, vocab only) on the GGUF — independent of
our tokenizer.json. As a second, independent path the script also builds a HF tokenizer from the GGUF's
vocab and merges with the `tokenizers` Python API (not from our JSON) and requires both to agree.

    .venv/bin/pip install llama-cpp-python gguf tokenizers
    .venv/bin/python host/engine/src/gguf/testdata/make_smollm2_tokens.py SmolLM2-135M-Instruct.Q4_1.gguf \
        > host/engine/src/gguf/testdata/smollm2_tokens.json
"""

import json
import sys

import gguf
import llama_cpp
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 2024; we've got 3.14159 reasons.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand   runs    of spaces",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Emoji: 🦀🚀 ❤️ 👩‍👩‍👧‍👦 🇫🇷",
    "中文：你好，世界！今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "Ünïcödé àccents — “quotes” … and ß, Ω, π≈3.14",
    "<|im_start|>user\nWhat is 12345 + 67890?<|im_end|>\n<|im_start|>assistant\n",
    "Numbers: 1234567890, 1,000,000 and ٣٤٥ (Arabic-Indic) ²³",
    "don't can't won't I'm you're he'll she'd",
    "http://example.com/path?query=1&x=y#frag",
]


def main(path):
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)

    r = gguf.GGUFReader(path)
    f = r.fields
    strs = lambda k: [bytes(f[k].parts[i]).decode("utf-8") for i in f[k].data]
    tokens = strs("tokenizer.ggml.tokens")
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    merges = [tuple(m.split(" ", 1)) for m in strs("tokenizer.ggml.merges")]
    hf = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])

    cases = []
    for text in TEXTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        alt = hf.encode(text, add_special_tokens=False).ids
        if ids != alt:
            sys.exit(f"llama.cpp and the tokenizers-API build disagree on {text!r}:\n  {ids}\n  {alt}")
        detok = llm.detokenize(ids, special=True).decode("utf-8")
        if detok != text:
            sys.exit(f"llama.cpp does not round-trip {text!r}: {detok!r}")
        cases.append({"text": text, "ids": ids})
    head = {"source": path.rsplit("/", 1)[-1], "reference": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}"}
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]
    print(json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n  ' + ",\n  ".join(lines) + "\n]}")


if __name__ == "__main__":
    main(sys.argv[1])
