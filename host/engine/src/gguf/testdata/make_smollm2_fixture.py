"""Records reference weight values for the SmolLM2 import test (import.rs: real_smollm2_import_matches_reference).

Independent of the Rust importer: reads the GGUF with the `gguf` Python package (its own parser and numpy
dequantizers), undoes llama.cpp's Q/K permutation in numpy, and writes HF-named samples.

    python -m venv .venv && .venv/bin/pip install gguf numpy
    .venv/bin/python host/engine/src/gguf/testdata/make_smollm2_fixture.py SmolLM2-135M-Instruct.Q4_1.gguf \
        > host/engine/src/gguf/testdata/smollm2_weights.json
"""

import json
import sys

import gguf
import numpy as np

N_COLS = 8  # values recorded per sampled row


def hf_rows(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    # gguf-py gives quantized tensors as raw blocks; dequantize returns shape reversed from ggml dims.
    values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    shape = [int(d) for d in reversed(t.shape)]
    return values.reshape(shape), str(t.tensor_type.name)


def unpermute(w, n_head):
    # convert_hf_to_gguf: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2) — invert it.
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def main(path):
    r = gguf.GGUFReader(path)
    field = lambda k: r.fields[k].contents()
    n_head = field("llama.attention.head_count")
    n_kv = field("llama.attention.head_count_kv")
    picks = {
        "model.embed_tokens.weight": ("token_embd.weight", None, [0, 1, 2, 12345, 49151]),
        "model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", n_head, [0, 1, 31, 32, 33, 63, 64, 575]),
        "model.layers.0.self_attn.k_proj.weight": ("blk.0.attn_k.weight", n_kv, [0, 1, 32, 63, 64, 191]),
        "model.layers.29.self_attn.q_proj.weight": ("blk.29.attn_q.weight", n_head, [5, 40, 100, 500]),
        "model.layers.29.self_attn.k_proj.weight": ("blk.29.attn_k.weight", n_kv, [5, 40, 100, 150]),
        "model.layers.0.self_attn.v_proj.weight": ("blk.0.attn_v.weight", None, [0, 191]),
        "model.layers.0.self_attn.o_proj.weight": ("blk.0.attn_output.weight", None, [0, 575]),
        "model.layers.7.mlp.gate_proj.weight": ("blk.7.ffn_gate.weight", None, [0, 1535]),
        "model.layers.7.mlp.up_proj.weight": ("blk.7.ffn_up.weight", None, [3, 1000]),
        "model.layers.7.mlp.down_proj.weight": ("blk.7.ffn_down.weight", None, [0, 575]),
        "model.layers.0.input_layernorm.weight": ("blk.0.attn_norm.weight", None, [0]),
        "model.layers.0.post_attention_layernorm.weight": ("blk.0.ffn_norm.weight", None, [0]),
        "model.norm.weight": ("output_norm.weight", None, [0]),
    }
    out = {"source": path.rsplit("/", 1)[-1], "tensors": {}}
    for hf_name, (gguf_name, heads, rows) in picks.items():
        w, ty = hf_rows(r, gguf_name)
        if heads is not None:
            w = unpermute(w, heads)
        w2 = w.reshape(1, -1) if w.ndim == 1 else w
        out["tensors"][hf_name] = {
            "gguf": gguf_name,
            "ggml_type": ty,
            "shape": list(w.shape),
            "samples": [{"row": row, "values": [float(v) for v in w2[row, :N_COLS]]} for row in rows],
        }
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
