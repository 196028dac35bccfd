//! The CUDA backend's interface in a build without the `cuda` feature: the same names, no way to make a
//! value. [`CudaDevice::new`] says how to get the real one; the shard and cache types are uninhabited,
//! so code written against them (a worker's `--device cuda`) compiles unchanged and never runs.

use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::{Shard, StepInput, StepOutput};
use crate::shard::LayerRange;

/// No device can be opened in this build.
#[derive(Debug)]
pub enum CudaDevice {}

impl CudaDevice {
    pub fn new(_ordinal: usize) -> Result<Arc<Self>> {
        Err(EngineError::CudaUnavailable(
            "this build has no CUDA backend; rebuild with the cargo feature `cuda` (computepool-engine/cuda)".into(),
        ))
    }

    pub fn name(&self) -> &str {
        match *self {}
    }
}

#[derive(Debug)]
pub enum CudaShard {}

#[derive(Debug)]
pub enum CudaKvCache {}

#[derive(Debug)]
pub struct CudaStepItem<'a> {
    pub input: StepInput<'a>,
    pub cache: &'a mut CudaKvCache,
}

impl CudaShard {
    pub fn from_shard(_host: &Shard, dev: Arc<CudaDevice>) -> Result<Self> {
        match *dev {}
    }
    pub fn config(&self) -> &ModelConfig {
        match *self {}
    }
    pub fn range(&self) -> LayerRange {
        match *self {}
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        match *self {}
    }
    pub fn weight_bytes(&self) -> usize {
        match *self {}
    }
    pub fn bytes_read_per_token(&self) -> usize {
        match *self {}
    }
    pub fn new_cache(&self) -> CudaKvCache {
        match *self {}
    }
    pub fn forward_batch(&self, _items: &mut [CudaStepItem<'_>]) -> Result<Vec<StepOutput>> {
        match *self {}
    }
}

impl CudaKvCache {
    pub fn len(&self) -> usize {
        match *self {}
    }
    pub fn is_empty(&self) -> bool {
        match *self {}
    }
    pub fn size_in_bytes(&self) -> usize {
        match *self {}
    }
}
