"""Records reference dequantizations of Q4_K, Q6_K and Q5_0 blocks (dequant.rs: k_quant_blocks_match_gguf_py).

Independent of the Rust code: seeded random block bytes (every bit pattern of values, packed 6-bit scales
and mins, high bits and signed scales is a valid block; only the f16 scales are set to finite values) are
dequantized by the `gguf` Python package's numpy dequantizers (gguf-py mirrors ggml-quants.c's reference
`dequantize_row_*`, in f32). Values are recorded as f32 bit patterns so the test compares bit for bit.

    .venv/bin/python host/engine/src/gguf/testdata/make_kquant_dequant_fixture.py \
        > host/engine/src/gguf/testdata/kquant_dequant.json
"""

import json
from importlib.metadata import version

import gguf
import numpy as np

T = gguf.GGMLQuantizationType
# (type, blocks, byte offsets of f16 scales to make finite)
KINDS = [(T.Q4_K, 6, [0, 2]), (T.Q6_K, 6, [208]), (T.Q5_0, 16, [0])]

rng = np.random.default_rng(20261126)
out = {"gguf_py_version": version("gguf"), "numpy_version": np.__version__, "cases": []}
for ty, n_blocks, f16_at in KINDS:
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[ty]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for b in range(n_blocks):
        for at in f16_at:
            # Scales across magnitudes and signs, including a subnormal and zero.
            scale = [0.00123, -0.0371, 1.5, 6.0e-8, 0.0, 0.25][b % 6] * (1 + at / 1000)
            raw[b, at : at + 2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    values = gguf.quants.dequantize(raw.reshape(-1), ty).astype(np.float32).reshape(-1)
    assert values.size == n_blocks * block_values
    out["cases"].append(
        {
            "type": ty.name,
            "blocks_hex": raw.tobytes().hex(),
            "f32_bits": [int(v) for v in values.view(np.uint32)],
        }
    )
print(json.dumps(out, separators=(",", ":")))
