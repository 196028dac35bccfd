#!/usr/bin/env python3
"""Write an F32 or BF16 GGUF holding the dequantized weights of a (quantized) GGUF.

Same metadata and tokenizer as the source (general.file_type is updated, general.quantization_version
dropped), same tensor names, order and layout (Q/K rows stay in llama.cpp's permuted order). Like
llama.cpp's convert_hf_to_gguf.py with --outtype bf16, 1-D tensors (norms) stay F32 in the BF16 file.

    gguf_requant.py --src model.Q4_1.gguf --dst model.BF16.gguf --type bf16
"""
import argparse
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT

FILE_TYPE = {"f32": 0, "bf16": 32}  # LlamaFileType.ALL_F32, MOSTLY_BF16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--type", choices=sorted(FILE_TYPE), required=True)
    a = ap.parse_args()

    r = gguf.GGUFReader(a.src)
    arch = r.get_field("general.architecture").contents()
    tmp = a.dst + ".tmp"
    w = gguf.GGUFWriter(tmp, arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue  # written by GGUFWriter itself
        if f.name == "general.quantization_version":
            continue
        if f.name == "general.file_type":
            w.add_key_value(f.name, FILE_TYPE[a.type], VT.UINT32)
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == VT.ARRAY else None
        w.add_key_value(f.name, f.contents(), vt, sub_type=sub)

    total = 0
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # numpy shape is ggml's ne reversed: (rows, cols) for a matrix
        x = x.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        if a.type == "bf16" and x.ndim >= 2:
            q = gguf.quants.quantize(np.ascontiguousarray(x), QT.BF16)
            w.add_tensor(t.name, q, raw_dtype=QT.BF16)
            total += q.nbytes
        else:
            x = np.ascontiguousarray(x, dtype=np.float32)
            w.add_tensor(t.name, x)
            total += x.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, a.dst)
    print(f"{a.dst}: {len(r.tensors)} tensors, {total} bytes of tensor data", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
