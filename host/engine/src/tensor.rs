//! Weight matrices as the engine holds them: row-major `[rows, cols]`, used as `y = W·x`.

use half::bf16;

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

/// The quantized block formats the engine computes with directly (ggml's layouts, 32 values a block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    /// f16 scale, 16 bytes of 4-bit values offset by 8: 18 bytes per block (4.5 bits per weight).
    Q4_0,
    /// f16 scale and f16 minimum, 16 bytes of 4-bit values: 20 bytes per block (5 bits per weight).
    Q4_1,
    /// f16 scale, 32 signed bytes: 34 bytes per block (8.5 bits per weight).
    Q8_0,
}

impl QuantKind {
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q8_0 => 34,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q4_0 => "q4_0",
            QuantKind::Q4_1 => "q4_1",
            QuantKind::Q8_0 => "q8_0",
        }
    }

    pub fn ggml_type(self) -> crate::gguf::GgmlType {
        match self {
            QuantKind::Q4_0 => crate::gguf::GgmlType::Q4_0,
            QuantKind::Q4_1 => crate::gguf::GgmlType::Q4_1,
            QuantKind::Q8_0 => crate::gguf::GgmlType::Q8_0,
        }
    }

    /// The kind a ggml type is computed as natively, if any.
    pub fn from_ggml(t: crate::gguf::GgmlType) -> Option<Self> {
        match t {
            crate::gguf::GgmlType::Q4_0 => Some(QuantKind::Q4_0),
            crate::gguf::GgmlType::Q4_1 => Some(QuantKind::Q4_1),
            crate::gguf::GgmlType::Q8_0 => Some(QuantKind::Q8_0),
            _ => None,
        }
    }
}

/// The storage behind a [`Weight`].
#[derive(Debug, Clone)]
pub enum WeightData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    /// Rows of quantized blocks, row-major: each row is `cols / 32` blocks of `kind`.
    Quant { kind: QuantKind, blocks: Vec<u8> },
}

/// A row-major `[rows, cols]` weight matrix (`nn.Linear` layout: `rows` = out features).
#[derive(Debug, Clone)]
pub struct Weight {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

impl Weight {
    /// How the values are stored: `f32`, `bf16`, `q4_0`, `q4_1` or `q8_0`.
    pub fn storage_name(&self) -> &'static str {
        match &self.data {
            WeightData::F32(_) => "f32",
            WeightData::Bf16(_) => "bf16",
            WeightData::Quant { kind, .. } => kind.name(),
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(d) => d.len() * 4,
            WeightData::Bf16(d) => d.len() * 2,
            WeightData::Quant { blocks, .. } => blocks.len(),
        }
    }

    /// Every value widened to f32 (quantized blocks dequantized exactly as ggml does).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            WeightData::F32(d) => d.clone(),
            WeightData::Bf16(d) => d.iter().map(|v| v.to_f32()).collect(),
            WeightData::Quant { kind, blocks } => {
                crate::gguf::dequantize(kind.ggml_type(), blocks, (self.rows * self.cols) as u64)
                    .expect("quantized weights hold whole blocks of their kind (checked at load)")
            }
        }
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
                let row_bytes = self.cols / 32 * kind.block_bytes();
                crate::gguf::dequantize_into(kind.ggml_type(), &blocks[r * row_bytes..(r + 1) * row_bytes], out)
                    .expect("quantized weights hold whole blocks of their kind (checked at load)");
            }
        }
    }
}
