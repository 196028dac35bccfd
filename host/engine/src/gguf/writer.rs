//! A minimal GGUF v3 writer: enough to build small, valid files for tests and fixtures (here and in
//! other crates), not a general-purpose converter. It writes tensors as the raw bytes it is given.

use super::types::GgmlType;

enum Value {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    String(String),
    StringArray(Vec<String>),
    I32Array(Vec<i32>),
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

/// Collects metadata and tensors, then lays them out as a GGUF v3 file with [`GgufWriter::to_bytes`].
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.metadata.push((key.into(), Value::U32(v)));
        self
    }

    pub fn add_i32(&mut self, key: &str, v: i32) -> &mut Self {
        self.metadata.push((key.into(), Value::I32(v)));
        self
    }

    pub fn add_u64(&mut self, key: &str, v: u64) -> &mut Self {
        self.metadata.push((key.into(), Value::U64(v)));
        self
    }

    pub fn add_f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.metadata.push((key.into(), Value::F32(v)));
        self
    }

    pub fn add_bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.metadata.push((key.into(), Value::Bool(v)));
        self
    }

    pub fn add_string(&mut self, key: &str, v: &str) -> &mut Self {
        self.metadata.push((key.into(), Value::String(v.into())));
        self
    }

    pub fn add_string_array<S: AsRef<str>>(&mut self, key: &str, v: &[S]) -> &mut Self {
        let v = v.iter().map(|s| s.as_ref().to_string()).collect();
        self.metadata.push((key.into(), Value::StringArray(v)));
        self
    }

    pub fn add_i32_array(&mut self, key: &str, v: &[i32]) -> &mut Self {
        self.metadata.push((key.into(), Value::I32Array(v.to_vec())));
        self
    }

    /// Adds a tensor of `ggml_type` with ggml-order `dims` (`dims[0]` fastest) and its raw bytes.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ggml_type: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push(Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type,
            data,
        });
        self
    }

    /// Adds an f32 tensor with ggml-order `dims`.
    pub fn add_f32_tensor(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, dims, GgmlType::F32, data)
    }

    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .rev()
            .find_map(|(k, v)| match v {
                Value::U32(a) if k == "general.alignment" && *a > 0 && a.is_power_of_two() => Some(u64::from(*a)),
                _ => None,
            })
            .unwrap_or(super::reader::DEFAULT_ALIGNMENT)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            match value {
                Value::U32(v) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::I32(v) => {
                    out.extend_from_slice(&5u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::F32(v) => {
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::Bool(v) => {
                    out.extend_from_slice(&7u32.to_le_bytes());
                    out.push(u8::from(*v));
                }
                Value::String(v) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    put_str(&mut out, v);
                }
                Value::U64(v) => {
                    out.extend_from_slice(&10u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::StringArray(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for s in items {
                        put_str(&mut out, s);
                    }
                }
                Value::I32Array(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&5u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for v in items {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = round_up(offset + t.data.len() as u64, alignment);
        }
        let data_start = round_up(out.len() as u64, alignment);
        out.resize(data_start as usize, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Small, complete GGUF files for tests, here and in other crates.
#[doc(hidden)]
pub mod tests_support {
    use super::*;

    /// Geometry of [`tiny_llama_gguf`].
    pub const TINY_LAYERS: usize = 2;
    pub const TINY_HIDDEN: usize = 32;
    pub const TINY_HEADS: usize = 4;
    pub const TINY_KV_HEADS: usize = 2;
    pub const TINY_HEAD_DIM: usize = TINY_HIDDEN / TINY_HEADS;
    pub const TINY_FFN: usize = 64;

    /// The tiny model's vocabulary: three control tokens, the 256 byte-level characters, and a few
    /// merges' results. Returns (tokens, token types, merges).
    pub fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
        let mut types = vec![3, 3, 3];
        for c in byte_level_alphabet() {
            tokens.push(c.to_string());
            types.push(1);
        }
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
        ];
        for m in merges {
            tokens.push(m.replace(' ', ""));
            types.push(1);
        }
        (tokens, types, merges.iter().map(|s| s.to_string()).collect())
    }

    /// GPT-2's byte-to-character table, in byte order (`Ġ` is the space).
    pub fn byte_level_alphabet() -> Vec<char> {
        let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
        printable.extend(0xA1..=0xAC);
        printable.extend(0xAE..=0xFF);
        let mut extra = 0;
        (0u32..256)
            .map(|b| {
                if printable.contains(&b) {
                    char::from_u32(b).expect("byte values are valid chars")
                } else {
                    extra += 1;
                    char::from_u32(255 + extra).expect("256..512 are valid chars")
                }
            })
            .collect()
    }

    /// A deterministic pseudo-random sequence in [-1, 1).
    pub fn pseudo_random(seed: u64, n: usize) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A complete two-layer llama GGUF in f32 with a byte-level BPE tokenizer (SmolLM-style
    /// pre-tokenizer, ChatML template), small enough for exhaustive truncation tests.
    pub fn tiny_llama_gguf() -> Vec<u8> {
        let (tokens, types, merges) = tiny_vocab();
        let vocab = tokens.len();
        let mut w = GgufWriter::new();
        w.add_string("general.architecture", "llama")
            .add_string("general.name", "tiny")
            .add_u32("llama.block_count", TINY_LAYERS as u32)
            .add_u32("llama.context_length", 256)
            .add_u32("llama.embedding_length", TINY_HIDDEN as u32)
            .add_u32("llama.feed_forward_length", TINY_FFN as u32)
            .add_u32("llama.attention.head_count", TINY_HEADS as u32)
            .add_u32("llama.attention.head_count_kv", TINY_KV_HEADS as u32)
            .add_f32("llama.rope.freq_base", 100000.0)
            .add_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
            .add_u32("llama.vocab_size", vocab as u32)
            .add_u32("llama.rope.dimension_count", TINY_HEAD_DIM as u32)
            .add_string("tokenizer.ggml.model", "gpt2")
            .add_string("tokenizer.ggml.pre", "smollm")
            .add_string_array("tokenizer.ggml.tokens", &tokens)
            .add_i32_array("tokenizer.ggml.token_type", &types)
            .add_string_array("tokenizer.ggml.merges", &merges)
            .add_u32("tokenizer.ggml.bos_token_id", 1)
            .add_u32("tokenizer.ggml.eos_token_id", 2)
            .add_u32("tokenizer.ggml.unknown_token_id", 0)
            .add_u32("tokenizer.ggml.padding_token_id", 2)
            .add_bool("tokenizer.ggml.add_bos_token", false);
        let h = TINY_HIDDEN as u64;
        let f = TINY_FFN as u64;
        let q = (TINY_HEADS * TINY_HEAD_DIM) as u64;
        let kv = (TINY_KV_HEADS * TINY_HEAD_DIM) as u64;
        let mut seed = 1;
        let mut add = |w: &mut GgufWriter, name: &str, dims: &[u64]| {
            let n = dims.iter().product::<u64>() as usize;
            seed += 1;
            w.add_f32_tensor(name, dims, &pseudo_random(seed, n));
        };
        add(&mut w, "token_embd.weight", &[h, vocab as u64]);
        for i in 0..TINY_LAYERS {
            add(&mut w, &format!("blk.{i}.attn_norm.weight"), &[h]);
            add(&mut w, &format!("blk.{i}.attn_q.weight"), &[h, q]);
            add(&mut w, &format!("blk.{i}.attn_k.weight"), &[h, kv]);
            add(&mut w, &format!("blk.{i}.attn_v.weight"), &[h, kv]);
            add(&mut w, &format!("blk.{i}.attn_output.weight"), &[q, h]);
            add(&mut w, &format!("blk.{i}.ffn_norm.weight"), &[h]);
            add(&mut w, &format!("blk.{i}.ffn_gate.weight"), &[h, f]);
            add(&mut w, &format!("blk.{i}.ffn_up.weight"), &[h, f]);
            add(&mut w, &format!("blk.{i}.ffn_down.weight"), &[f, h]);
        }
        add(&mut w, "output_norm.weight", &[h]);
        w.to_bytes()
    }
}
