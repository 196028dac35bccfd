//! A shard on whichever backend runs it — what a worker holds. CPU and CUDA shards take the same inputs
//! and give the same outputs (host f32 hidden rows, logits), so a pipeline may mix them freely.

use std::str::FromStr;
use std::sync::Arc;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaDevice, CudaKvCache, CudaShard, CudaStepItem};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::model::{LoadOptions, ModelSource, Shard, StepInput, StepItem, StepOutput};
use crate::shard::LayerRange;

/// Where a shard computes: `cpu`, or `cuda` / `cuda:N` (GPU ordinal N, default 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(EngineError::Invalid(format!("device {s:?}: expected cpu, cuda or cuda:N"))),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A loaded layer range on the CPU or a GPU.
#[derive(Debug)]
pub enum DeviceShard {
    Cpu(Shard),
    Cuda(CudaShard),
}

/// One request's KV cache, on the same backend as its shard.
#[derive(Debug)]
pub enum DeviceCache {
    Cpu(KvCache),
    Cuda(CudaKvCache),
}

/// One request's part of a batched step on a [`DeviceShard`].
#[derive(Debug)]
pub struct DeviceStepItem<'a> {
    pub input: StepInput<'a>,
    pub cache: &'a mut DeviceCache,
}

impl DeviceShard {
    /// Loads a layer range onto `device`. On the CPU the shard computes on `threads` threads; on CUDA the
    /// weights pass through host memory once and no CPU thread pool is kept.
    pub fn load(model: &ModelSource, options: &LoadOptions, device: Device, threads: usize) -> Result<Self> {
        match device {
            Device::Cpu => Ok(DeviceShard::Cpu(model.load_shard(options, Arc::new(CpuBackend::new(threads)))?)),
            Device::Cuda(_) if options.split_head => {
                Err(EngineError::Invalid("a split head runs on the CPU backend only; load this shard without it".into()))
            }
            Device::Cuda(ordinal) => {
                let dev = CudaDevice::new(ordinal)?;
                let host = model.load_shard(options, Arc::new(CpuBackend::new(1)))?;
                Ok(DeviceShard::Cuda(CudaShard::from_shard(&host, dev)?))
            }
        }
    }

    /// What the shard runs on, for logs and registration (`cpu (8 threads)`, `NVIDIA H100 …`).
    pub fn device_name(&self) -> String {
        match self {
            DeviceShard::Cpu(s) => format!("cpu ({} threads)", s.backend().threads()),
            DeviceShard::Cuda(s) => s.device().name().to_string(),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            DeviceShard::Cpu(s) => s.config(),
            DeviceShard::Cuda(s) => s.config(),
        }
    }

    pub fn range(&self) -> LayerRange {
        match self {
            DeviceShard::Cpu(s) => s.range(),
            DeviceShard::Cuda(s) => s.range(),
        }
    }

    pub fn weight_bytes(&self) -> usize {
        match self {
            DeviceShard::Cpu(s) => s.weight_bytes(),
            DeviceShard::Cuda(s) => s.weight_bytes(),
        }
    }

    pub fn bytes_read_per_token(&self) -> usize {
        match self {
            DeviceShard::Cpu(s) => s.bytes_read_per_token(),
            DeviceShard::Cuda(s) => s.bytes_read_per_token(),
        }
    }

    // Without the `cuda` feature the CUDA arm cannot be reached (CudaShard has no values).
    #[allow(unreachable_code)]
    pub fn new_cache(&self) -> DeviceCache {
        match self {
            DeviceShard::Cpu(s) => DeviceCache::Cpu(s.new_cache()),
            DeviceShard::Cuda(s) => DeviceCache::Cuda(s.new_cache()),
        }
    }

    /// Between steps: lets an idle CPU backend's threads sleep (nothing to do on a GPU).
    pub fn idle(&self) {
        if let DeviceShard::Cpu(s) = self {
            s.backend().release_idle_threads();
        }
    }

    /// The vocabulary rows of lm_head the shard holds; see [`Shard::head_rows`].
    pub fn head_rows(&self) -> Option<std::ops::Range<usize>> {
        match self {
            DeviceShard::Cpu(s) => s.head_rows(),
            DeviceShard::Cuda(s) => s.range().is_exit().then_some(0..s.config().vocab_size),
        }
    }

    /// Logits of the shard's lm_head rows for normed states; see [`Shard::head_logits`]. Only a CPU
    /// shard loads a split head, so only it is asked for a part.
    pub fn head_logits(&self, normed: &[f32]) -> Result<Vec<f32>> {
        match self {
            DeviceShard::Cpu(s) => s.head_logits(normed),
            DeviceShard::Cuda(_) => Err(EngineError::Invalid("a split head runs on the CPU backend only".into())),
        }
    }

    /// One batched step; see [`Shard::forward_batch`]. Every cache must belong to this shard's backend.
    pub fn forward_batch(&self, items: &mut [DeviceStepItem<'_>]) -> Result<Vec<StepOutput>> {
        let foreign = || EngineError::Invalid("a KV cache of another backend was passed to this shard".into());
        match self {
            DeviceShard::Cpu(s) => {
                let mut cpu_items = Vec::with_capacity(items.len());
                for it in items.iter_mut() {
                    let DeviceCache::Cpu(cache) = &mut *it.cache else { return Err(foreign()) };
                    cpu_items.push(StepItem { input: it.input, cache });
                }
                s.forward_batch(&mut cpu_items)
            }
            DeviceShard::Cuda(s) => {
                let mut cuda_items = Vec::with_capacity(items.len());
                for it in items.iter_mut() {
                    let DeviceCache::Cuda(cache) = &mut *it.cache else { return Err(foreign()) };
                    cuda_items.push(CudaStepItem { input: it.input, cache });
                }
                s.forward_batch(&mut cuda_items)
            }
        }
    }
}

impl DeviceCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        match self {
            DeviceCache::Cpu(c) => c.len(),
            DeviceCache::Cuda(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held, host or device.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            DeviceCache::Cpu(c) => c.size_in_bytes(),
            DeviceCache::Cuda(c) => c.size_in_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        for bad in ["tpu", "cuda:", "cuda:x", ""] {
            assert!(bad.parse::<Device>().is_err(), "{bad:?}");
        }
    }
}
