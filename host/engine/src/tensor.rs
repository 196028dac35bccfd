//! Weight matrices as the engine holds them: row-major `[rows, cols]`, used as `y = W·x`.

use half::bf16;
use crate::weight_mem::WeightBuf;

/// The element type a model's weights are held in. Activations and sums are always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = crate::EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            other => Err(crate::EngineError::UnknownDType(other.to_string())),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The quantized block formats the engine computes with directly (ggml's layouts: 32-value blocks,
/// and the K-quants' 256-value super-blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// f16 scale, 16 bytes of 4-bit values offset by 8: 18 bytes per block (4.5 bits per weight).
    Q4_0,
    /// f16 scale and f16 minimum, 16 bytes of 4-bit values: 20 bytes per block (5 bits per weight).
    Q4_1,
    /// f16 scale, 32 high bits, 16 bytes of low nibbles; 5-bit values offset by 16: 22 bytes per block
    /// (5.5 bits per weight). llama-quantize's fallback for Q4_K tensors whose rows are not whole
    /// super-blocks (SmolLM2's 576 columns), so most of a small model's "Q4_K_M" file.
    Q5_0,
    /// f16 scale, 32 signed bytes: 34 bytes per block (8.5 bits per weight).
    Q8_0,
    /// 256-value super-block: f16 d and dmin, eight 6-bit scales and mins packed in 12 bytes, 128 bytes
    /// of 4-bit values: 144 bytes (4.5 bits per weight).
    Q4K,
    /// 256-value super-block: 128 bytes of low nibbles, 64 of high 2-bit pairs, sixteen signed 8-bit
    /// scales and an f16 d; 6-bit values offset by 32: 210 bytes (6.5625 bits per weight).
    Q6K,
}

impl QuantKind {
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q5_0 => 22,
            QuantKind::Q8_0 => 34,
            QuantKind::Q4K => 144,
            QuantKind::Q6K => 210,
        }
    }

    /// Values per block: 32, or 256 for the K-quants. A row of `cols` values is `cols / block_values`
    /// blocks; a tensor whose rows are not whole blocks cannot be kept in this kind.
    pub fn block_values(self) -> usize {
        if self.is_k() { 256 } else { 32 }
    }

    /// Whether this is a 256-value K-quant (its products use activations quantized per 256 values).
    pub fn is_k(self) -> bool {
        matches!(self, QuantKind::Q4K | QuantKind::Q6K)
    }

    /// Bytes of one row of `cols` values (`cols` a multiple of [`Self::block_values`]).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_values() * self.block_bytes()
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q4_0 => "q4_0",
            QuantKind::Q4_1 => "q4_1",
            QuantKind::Q5_0 => "q5_0",
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4K => "q4_K",
            QuantKind::Q6K => "q6_K",
        }
    }

    pub fn ggml_type(self) -> crate::gguf::GgmlType {
        match self {
            QuantKind::Q4_0 => crate::gguf::GgmlType::Q4_0,
            QuantKind::Q4_1 => crate::gguf::GgmlType::Q4_1,
            QuantKind::Q5_0 => crate::gguf::GgmlType::Q5_0,
            QuantKind::Q8_0 => crate::gguf::GgmlType::Q8_0,
            QuantKind::Q4K => crate::gguf::GgmlType::Q4_K,
            QuantKind::Q6K => crate::gguf::GgmlType::Q6_K,
        }
    }

    /// The kind a ggml type is computed as natively, if any.
    pub fn from_ggml(t: crate::gguf::GgmlType) -> Option<Self> {
        match t {
            crate::gguf::GgmlType::Q4_0 => Some(QuantKind::Q4_0),
            crate::gguf::GgmlType::Q4_1 => Some(QuantKind::Q4_1),
            crate::gguf::GgmlType::Q5_0 => Some(QuantKind::Q5_0),
            crate::gguf::GgmlType::Q8_0 => Some(QuantKind::Q8_0),
            crate::gguf::GgmlType::Q4_K => Some(QuantKind::Q4K),
            crate::gguf::GgmlType::Q6_K => Some(QuantKind::Q6K),
            _ => None,
        }
    }
}

/// The storage behind a [`Weight`].
#[derive(Debug, Clone)]
pub enum WeightData {
    F32(WeightBuf<f32>),
    Bf16(WeightBuf<bf16>),
    /// Rows of quantized blocks, row-major: each row is `cols / kind.block_values()` blocks of `kind`.
    Quant { kind: QuantKind, blocks: WeightBuf<u8> },
    /// The same blocks (Q4_0, Q4_1 or Q8_0) reordered for the CPU kernels: 16 rows interleaved per block
    /// column, the last group padded with zero blocks (layout: `backend/cpu/interleave.rs`). Made by
    /// [`crate::backend::cpu::CpuBackend::prepare_weight`]; [`Weight::quant_rows`] gives ggml's rows back.
    QuantInterleaved { kind: QuantKind, blocks: WeightBuf<u8> },
}

impl WeightData {
    /// The stored values as bytes, in memory order.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            WeightData::F32(d) => d.as_bytes(),
            WeightData::Bf16(d) => d.as_bytes(),
            WeightData::Quant { blocks, .. } | WeightData::QuantInterleaved { blocks, .. } => blocks.as_bytes(),
        }
    }

    /// Whether the values live in a packed region ([`crate::weight_mem`]) rather than on the heap.
    pub fn is_packed(&self) -> bool {
        match self {
            WeightData::F32(d) => d.is_packed(),
            WeightData::Bf16(d) => d.is_packed(),
            WeightData::Quant { blocks, .. } | WeightData::QuantInterleaved { blocks, .. } => blocks.is_packed(),
        }
    }
}

/// A row-major `[rows, cols]` weight matrix (`nn.Linear` layout: `rows` = out features).
#[derive(Debug, Clone)]
pub struct Weight {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

impl Weight {
    /// How the values are stored: `f32`, `bf16` or a [`QuantKind::name`].
    pub fn storage_name(&self) -> &'static str {
        match &self.data {
            WeightData::F32(_) => "f32",
            WeightData::Bf16(_) => "bf16",
            WeightData::Quant { kind, .. } | WeightData::QuantInterleaved { kind, .. } => kind.name(),
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.data.as_bytes().len()
    }

    /// A quantized weight's blocks in ggml's row-major layout (interleaved ones put back in row order,
    /// a copy); `None` for float weights.
    pub fn quant_rows(&self) -> Option<(QuantKind, std::borrow::Cow<'_, [u8]>)> {
        match &self.data {
            WeightData::Quant { kind, blocks } => Some((*kind, std::borrow::Cow::Borrowed(blocks))),
            WeightData::QuantInterleaved { kind, blocks } => Some((
                *kind,
                std::borrow::Cow::Owned(crate::backend::cpu::interleave::deinterleave(*kind, self.rows, self.cols, blocks)),
            )),
            WeightData::F32(_) | WeightData::Bf16(_) => None,
        }
    }

    /// Every value widened to f32 (quantized blocks dequantized exactly as ggml does).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            WeightData::F32(d) => d.to_vec(),
            WeightData::Bf16(d) => d.iter().map(|v| v.to_f32()).collect(),
            WeightData::Quant { .. } | WeightData::QuantInterleaved { .. } => {
                let (kind, blocks) = self.quant_rows().expect("a quantized weight");
                crate::gguf::dequantize(kind.ggml_type(), &blocks, (self.rows * self.cols) as u64)
                    .expect("quantized weights hold whole blocks of their kind (checked at load)")
            }
        }
    }

    /// A copy of rows `rows` of this matrix, in the same storage. An interleaved matrix can be cut only
    /// at whole groups of 16 rows (its end may be the matrix's own end, whose group is padded).
    pub fn slice_rows(&self, rows: std::ops::Range<usize>) -> Result<Weight, String> {
        if rows.start >= rows.end || rows.end > self.rows {
            return Err(format!("rows {rows:?} of a matrix of {} rows", self.rows));
        }
        let n = rows.end - rows.start;
        let data = match &self.data {
            WeightData::F32(d) => WeightData::F32(d[rows.start * self.cols..rows.end * self.cols].to_vec().into()),
            WeightData::Bf16(d) => WeightData::Bf16(d[rows.start * self.cols..rows.end * self.cols].to_vec().into()),
            WeightData::Quant { kind, blocks } => {
                let row_bytes = kind.row_bytes(self.cols);
                WeightData::Quant { kind: *kind, blocks: blocks[rows.start * row_bytes..rows.end * row_bytes].to_vec().into() }
            }
            WeightData::QuantInterleaved { kind, blocks } => {
                use crate::backend::cpu::interleave::{GROUP_ROWS, interleaved_bytes};
                if rows.start % GROUP_ROWS != 0 || (rows.end % GROUP_ROWS != 0 && rows.end != self.rows) {
                    return Err(format!("rows {rows:?} of an interleaved matrix: cuts must fall on groups of {GROUP_ROWS} rows"));
                }
                let group_bytes = interleaved_bytes(*kind, GROUP_ROWS, self.cols);
                let (first, last) = (rows.start / GROUP_ROWS, rows.end.div_ceil(GROUP_ROWS));
                WeightData::QuantInterleaved { kind: *kind, blocks: blocks[first * group_bytes..last * group_bytes].to_vec().into() }
            }
        };
        Ok(Weight { rows: n, cols: self.cols, data })
    }

    /// Row `r` widened to f32 (used for embedding lookups).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            WeightData::F32(d) => out.copy_from_slice(&d[range]),
            WeightData::Bf16(d) => {
                for (o, v) in out.iter_mut().zip(&d[range]) {
                    *o = v.to_f32();
                }
            }
            WeightData::Quant { kind, blocks } => {
                let row_bytes = kind.row_bytes(self.cols);
                crate::gguf::dequantize_into(kind.ggml_type(), &blocks[r * row_bytes..(r + 1) * row_bytes], out)
                    .expect("quantized weights hold whole blocks of their kind (checked at load)");
            }
            WeightData::QuantInterleaved { kind, blocks } => {
                let mut row = vec![0u8; kind.row_bytes(self.cols)];
                crate::backend::cpu::interleave::deinterleave_rows(*kind, self.cols, blocks, r, &mut row);
                crate::gguf::dequantize_into(kind.ggml_type(), &row, out)
                    .expect("quantized weights hold whole blocks of their kind (checked at load)");
            }
        }
    }
}
