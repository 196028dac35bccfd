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

/// The storage behind a [`Weight`].
#[derive(Debug, Clone)]
pub enum WeightData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// A row-major `[rows, cols]` weight matrix (`nn.Linear` layout: `rows` = out features).
#[derive(Debug, Clone)]
pub struct Weight {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

impl Weight {
    pub fn dtype(&self) -> DType {
        match self.data {
            WeightData::F32(_) => DType::F32,
            WeightData::Bf16(_) => DType::Bf16,
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.rows * self.cols * self.dtype().size_in_bytes()
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
        }
    }
}
