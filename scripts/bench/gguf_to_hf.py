#!/usr/bin/env python3
"""Test-only fallback: write an HF-layout directory (config.json + model.safetensors) from a llama GGUF.

Used by the anchors only when our importer's models/smollm2-135m-instruct/ is not there. Weights are
the dequantized GGUF values; Q/K rows are un-permuted back to HF order (llama.cpp's converter applied
w.reshape(n_head, 2, hd/2, *rest).swapaxes(1, 2)); the tied embedding is not duplicated.

    gguf_to_hf.py --src model.Q4_1.gguf --dst DIR --dtype f32|bf16
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
import gguf


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_bf16_bytes(x: np.ndarray) -> bytes:
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), gguf.GGMLQuantizationType.BF16).tobytes()


def write_safetensors(path: str, tensors: dict, dtype: str) -> None:
    header, blobs, off = {}, [], 0
    for name, x in tensors.items():
        b = to_bf16_bytes(x) if dtype == "bf16" else np.ascontiguousarray(x, dtype="<f4").tobytes()
        header[name] = {"dtype": "BF16" if dtype == "bf16" else "F32", "shape": list(x.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(path + ".tmp", path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()

    r = gguf.GGUFReader(a.src)
    kv = lambda k: r.get_field(k).contents()
    arch = kv("general.architecture")
    assert arch == "llama", arch
    n_head, n_kv = kv("llama.attention.head_count"), kv("llama.attention.head_count_kv")
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    out, tied = {}, True
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        x = x.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        if t.name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            hf = "model.norm.weight"
        elif t.name == "output.weight":
            hf, tied = "lm_head.weight", False
        else:
            _, i, kind, _ = t.name.split(".")
            hf = f"model.layers.{i}.{names[kind]}.weight"
            if kind == "attn_q":
                x = unpermute(x, n_head)
            elif kind == "attn_k":
                x = unpermute(x, n_kv)
        out[hf] = x
    vocab = len(r.get_field("tokenizer.ggml.tokens").contents())
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": kv("llama.embedding_length"), "intermediate_size": kv("llama.feed_forward_length"),
        "max_position_embeddings": kv("llama.context_length"),
        "num_attention_heads": n_head, "num_hidden_layers": kv("llama.block_count"),
        "num_key_value_heads": n_kv, "rms_norm_eps": float(np.float32(kv("llama.attention.layer_norm_rms_epsilon")).round(8)),
        "rope_theta": float(kv("llama.rope.freq_base")), "rope_scaling": None,
        "tie_word_embeddings": tied, "torch_dtype": "bfloat16" if a.dtype == "bf16" else "float32",
        "vocab_size": vocab,
    }
    os.makedirs(a.dst, exist_ok=True)
    with open(os.path.join(a.dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(os.path.join(a.dst, "model.safetensors"), out, a.dtype)
    print(f"{a.dst}: {len(out)} tensors ({a.dtype}), tied={tied}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
