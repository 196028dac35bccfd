//! Safetensors weights, memory-mapped. A shard asks for tensors by their HF names and gets them in the
//! dtype it runs in; nothing outside its layer range is ever read from disk.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{EngineError, Result};
use crate::tensor::{DType, Weight, WeightData};

/// Where a shard's tensors come from, by HF name: safetensors files ([`WeightFiles`]) or a GGUF file
/// read natively ([`crate::gguf::GgufWeights`]).
pub trait WeightSource {
    fn contains(&self, name: &str) -> bool;
    /// A 2-D tensor; `expect` is the `[rows, cols]` shape the config implies. Floating-point tensors come
    /// in `dtype`; a source may keep quantized tensors quantized.
    fn matrix(&self, name: &str, expect: [usize; 2], dtype: DType) -> Result<Weight>;
    /// A 1-D tensor (norm weights, biases) in f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>>;
}

impl WeightSource for WeightFiles {
    fn contains(&self, name: &str) -> bool {
        WeightFiles::contains(self, name)
    }
    fn matrix(&self, name: &str, expect: [usize; 2], dtype: DType) -> Result<Weight> {
        WeightFiles::matrix(self, name, expect, dtype)
    }
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        WeightFiles::vector(self, name, len)
    }
}

/// The safetensors files of one model directory (`model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`), each memory-mapped and its header validated.
pub struct WeightFiles {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for WeightFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFiles").field("files", &self.files.len()).field("tensors", &self.index.len()).finish()
    }
}

impl WeightFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| EngineError::io(&index_path, e))?;
            let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::Safetensors {
                path: index_path.clone(),
                message: e.to_string(),
            })?;
            let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| EngineError::Safetensors {
                path: index_path.clone(),
                message: "no weight_map object".into(),
            })?;
            let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            return Err(EngineError::ModelDir {
                path: dir.to_path_buf(),
                message: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };
        let mut files = Vec::with_capacity(names.len());
        let mut index = HashMap::new();
        for path in names {
            let file = File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            // SAFETY: the file is opened read-only and model files are not modified while a model is loaded;
            // a concurrent truncation would be a misuse outside this process's control.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(&path, e))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| EngineError::Safetensors { path: path.clone(), message: e.to_string() })?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(Self { files, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn view(&self, name: &str) -> Result<(StDtype, Vec<usize>, &[u8])> {
        let &i = self.index.get(name).ok_or_else(|| EngineError::MissingTensor {
            name: name.to_string(),
            path: self.files.first().map(|f| f.0.clone()).unwrap_or_default(),
        })?;
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| EngineError::Safetensors { path: path.clone(), message: e.to_string() })?;
        let view = st
            .tensor(name)
            .map_err(|e| EngineError::Safetensors { path: path.clone(), message: e.to_string() })?;
        Ok((view.dtype(), view.shape().to_vec(), view.data()))
    }

    /// A 2-D tensor as a [`Weight`] in `dtype`. `expect` is the `[rows, cols]` shape the config implies.
    pub fn matrix(&self, name: &str, expect: [usize; 2], dtype: DType) -> Result<Weight> {
        let (st_dtype, shape, bytes) = self.view(name)?;
        if shape != expect {
            return Err(EngineError::Tensor {
                name: name.into(),
                message: format!("shape {shape:?}, but the config implies {expect:?}"),
            });
        }
        let data = match dtype {
            DType::F32 => WeightData::F32(convert(name, st_dtype, bytes, |x| x)?.into()),
            DType::Bf16 => WeightData::Bf16(convert(name, st_dtype, bytes, bf16::from_f32)?.into()),
        };
        Ok(Weight { rows: expect[0], cols: expect[1], data })
    }

    /// A 1-D tensor (norm weights, biases) in f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (st_dtype, shape, bytes) = self.view(name)?;
        if shape != [len] {
            return Err(EngineError::Tensor {
                name: name.into(),
                message: format!("shape {shape:?}, but the config implies [{len}]"),
            });
        }
        convert(name, st_dtype, bytes, |x| x)
    }
}

/// Converts raw little-endian bytes to `T`, going through f32 (exact for f16/bf16 sources; a bf16 target
/// rounds f32 to nearest even, as PyTorch does).
fn convert<T: Copy>(name: &str, dtype: StDtype, bytes: &[u8], from_f32: impl Fn(f32) -> T + Copy) -> Result<Vec<T>> {
    let bad = |m: String| EngineError::Tensor { name: name.into(), message: m };
    match dtype {
        StDtype::F32 => Ok(bytes.chunks_exact(4).map(|c| from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()),
        StDtype::F16 => Ok(bytes.chunks_exact(2).map(|c| from_f32(f16::from_le_bytes([c[0], c[1]]).to_f32())).collect()),
        StDtype::BF16 => Ok(bytes.chunks_exact(2).map(|c| from_f32(bf16::from_le_bytes([c[0], c[1]]).to_f32())).collect()),
        other => Err(bad(format!("dtype {other:?} is not supported (f32, f16 or bf16)"))),
    }
}
