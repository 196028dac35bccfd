//! The CUDA backend: the same layer-range shards as the CPU backend, on one NVIDIA GPU.
//!
//! Kernels are CUDA C in `kernels/*.cu`, compiled at run time by NVRTC for the device's architecture
//! ([`kernels`]); cuBLAS runs the prefill GEMMs (bf16 × bf16, f32 accumulation); weights, activations
//! and the KV cache stay on the device, and a decode step is replayed from a CUDA graph. Every library
//! is loaded at run time and probed first ([`probe`]), so a machine without CUDA builds this module and
//! gets [`EngineError::CudaUnavailable`] from it, never a panic.
//!
//! Shards exchange hidden states as host f32 rows ([`crate::model::StepInput`] /
//! [`crate::model::StepOutput`]), exactly as CPU shards do, so one pipeline may mix CPU and CUDA shards.

pub mod kernels;
mod shard;

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};

use crate::error::{EngineError, Result};

pub use shard::{CudaKvCache, CudaShard, CudaStepItem};

pub(crate) fn driver_err(context: &str) -> impl Fn(DriverError) -> EngineError + '_ {
    move |e| EngineError::Cuda(format!("{context}: {e:?}"))
}

/// Checks that the CUDA driver, NVRTC and cuBLAS libraries load and that a device exists, without
/// creating a context. The error says which piece is missing.
pub fn probe() -> Result<()> {
    // SAFETY: `is_culib_present` only tries to dlopen each library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(EngineError::CudaUnavailable(
            "the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this machine".into(),
        ));
    }
    kernels::probe_nvrtc()?;
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(EngineError::CudaUnavailable(
            "the cuBLAS library (libcublas.so) was not found; put CUDA's lib directory on LD_LIBRARY_PATH".into(),
        ));
    }
    cudarc::driver::result::init().map_err(|e| EngineError::CudaUnavailable(format!("cuInit failed: {e:?}")))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| EngineError::CudaUnavailable(format!("cannot count devices: {e:?}")))?;
    if count < 1 {
        return Err(EngineError::CudaUnavailable("the driver reports no CUDA device".into()));
    }
    Ok(())
}

/// The launchable kernels, one handle each.
pub(crate) struct Kernels {
    pub embedding: CudaFunction,
    pub rms_norm: CudaFunction,
    pub rope_kv_append: CudaFunction,
    pub attention: CudaFunction,
    pub matvec: CudaFunction,
    pub matvec_swiglu: CudaFunction,
    pub silu_mul: CudaFunction,
    pub add_bias: CudaFunction,
    pub to_bf16: CudaFunction,
    pub argmax: CudaFunction,
    pub topk: CudaFunction,
    /// Per quantized kind (indexed by [`quant_index`]): the decode mat-vec and the prefill widening.
    pub matvec_quant: [CudaFunction; 6],
    pub dequantize_quant: [CudaFunction; 6],
}

/// The kernels' name suffix of each quantized kind, in [`Kernels::matvec_quant`] order.
const QUANT_NAMES: [&str; 6] = ["q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q6_k"];

/// A quantized kind's slot in [`Kernels::matvec_quant`] and [`Kernels::dequantize_quant`].
pub(crate) fn quant_index(kind: crate::tensor::QuantKind) -> usize {
    use crate::tensor::QuantKind;
    match kind {
        QuantKind::Q4_0 => 0,
        QuantKind::Q4_1 => 1,
        QuantKind::Q5_0 => 2,
        QuantKind::Q8_0 => 3,
        QuantKind::Q4K => 4,
        QuantKind::Q6K => 5,
    }
}

/// One GPU: its context, the stream every operation of this backend runs on, cuBLAS, and the kernels
/// compiled for its architecture.
pub struct CudaDevice {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    pub(crate) k: Kernels,
    name: String,
    arch: (i32, i32),
    total_memory: usize,
    peak_bandwidth: Option<f64>,
    _modules: Vec<Arc<CudaModule>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("name", &self.name).field("arch", &self.arch).finish_non_exhaustive()
    }
}

impl CudaDevice {
    /// Opens device `ordinal`, compiles (or loads from the PTX cache) every kernel for it.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        probe()?;
        let ctx = CudaContext::new(ordinal).map_err(driver_err("creating the CUDA context"))?;
        // One stream carries every operation of this backend, so cudarc's cross-stream event tracking is
        // not needed, and its event records would not belong in a captured graph.
        // SAFETY: no other stream of this context touches our buffers.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver_err("creating a stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| EngineError::Cuda(format!("cuBLAS init: {e:?}")))?;
        let arch = ctx.compute_capability().map_err(driver_err("reading the compute capability"))?;
        let name = ctx.name().map_err(driver_err("reading the device name"))?;
        let total_memory = ctx.total_mem().map_err(driver_err("reading the device memory"))?;
        let peak_bandwidth = {
            use cudarc::driver::sys::CUdevice_attribute as A;
            let clock_khz = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE).ok();
            let bus_bits = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH).ok();
            match (clock_khz, bus_bits) {
                // Double data rate: two transfers per clock over the whole bus.
                (Some(c), Some(b)) if c > 0 && b > 0 => Some(2.0 * c as f64 * 1e3 * b as f64 / 8.0),
                _ => None,
            }
        };

        let mut modules = Vec::new();
        let mut functions = std::collections::HashMap::new();
        for (file, ptx) in kernels::compile_all_cached(arch)? {
            let module = ctx
                .load_module(ptx)
                .map_err(|e| EngineError::Cuda(format!("loading kernels/{} on {name}: {e:?}", file.name)))?;
            for f in file.functions {
                let func = module
                    .load_function(f)
                    .map_err(|e| EngineError::Cuda(format!("kernel {f} in kernels/{}: {e:?}", file.name)))?;
                functions.insert(*f, func);
            }
            modules.push(module);
        }
        let mut take = |n: &str| functions.remove(n).ok_or_else(|| EngineError::Cuda(format!("kernel {n} is not compiled")));
        let mut per_kind = |prefix: &str, suffix: &str| -> Result<[CudaFunction; 6]> {
            let v: Vec<CudaFunction> =
                QUANT_NAMES.iter().map(|q| take(&format!("{prefix}{q}{suffix}"))).collect::<Result<_>>()?;
            Ok(v.try_into().unwrap_or_else(|_| unreachable!("six names, six functions")))
        };
        let matvec_quant = per_kind("matvec_", "")?;
        let dequantize_quant = per_kind("dequantize_", "_bf16")?;
        let k = Kernels {
            matvec_quant,
            dequantize_quant,
            embedding: take("embedding_bf16")?,
            rms_norm: take("rms_norm_f32")?,
            rope_kv_append: take("rope_kv_append_f32")?,
            attention: take("attention_f32")?,
            matvec: take("matvec_bf16")?,
            matvec_swiglu: take("matvec_swiglu_bf16")?,
            silu_mul: take("silu_mul_f32")?,
            add_bias: take("add_bias_f32")?,
            to_bf16: take("f32_to_bf16")?,
            argmax: take("argmax_f32")?,
            topk: take("topk_f32")?,
        };
        Ok(Arc::new(Self { ctx, stream, blas, k, name, arch, total_memory, peak_bandwidth, _modules: modules }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability `(major, minor)`.
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }

    pub fn total_memory(&self) -> usize {
        self.total_memory
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(driver_err("reading free memory"))
    }

    /// The memory bandwidth the device reports (clock × bus width × 2), bytes per second.
    pub fn peak_bandwidth(&self) -> Option<f64> {
        self.peak_bandwidth
    }

    /// Waits for every queued operation.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronizing"))
    }
}
