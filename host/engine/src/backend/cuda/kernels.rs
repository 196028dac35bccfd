//! The kernel sources (kernels/*.cu), compiled at run time by NVRTC into PTX: once per device
//! architecture, cached in memory for the process and on disk across processes.
//!
//! Each file is compiled on its own with `kernels/prelude.cuh` prepended, so no include paths or CUDA
//! headers are needed and a compile error names the file it is in.

use std::path::PathBuf;

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// Text every kernel file is compiled with (types, bf16 conversions, reductions, the row descriptor).
pub const PRELUDE: &str = include_str!("../../../../../kernels/prelude.cuh");

/// One kernel file and the functions it defines, named `<op>_<dtype>`.
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

macro_rules! kernel_file {
    ($name:literal, [$($f:literal),+ $(,)?]) => {
        KernelFile {
            name: $name,
            source: include_str!(concat!("../../../../../kernels/", $name)),
            functions: &[$($f),+],
        }
    };
}

/// Every kernel the backend launches.
pub const KERNEL_FILES: &[KernelFile] = &[
    kernel_file!("embedding.cu", ["embedding_bf16"]),
    kernel_file!("rms_norm.cu", ["rms_norm_f32"]),
    kernel_file!("rope.cu", ["rope_kv_append_f32"]),
    kernel_file!("attention.cu", ["attention_f32"]),
    kernel_file!("matvec.cu", ["matvec_bf16", "matvec_swiglu_bf16"]),
    kernel_file!(
        "matvec_quant.cu",
        [
            "matvec_q4_0", "matvec_q4_1", "matvec_q5_0", "matvec_q8_0", "matvec_q4_k", "matvec_q6_k",
            "dequantize_q4_0_bf16", "dequantize_q4_1_bf16", "dequantize_q5_0_bf16", "dequantize_q8_0_bf16",
            "dequantize_q4_k_bf16", "dequantize_q6_k_bf16",
        ]
    ),
    kernel_file!("mlp.cu", ["silu_mul_f32"]),
    kernel_file!("elementwise.cu", ["add_bias_f32", "f32_to_bf16"]),
    kernel_file!("sampling.cu", ["argmax_f32", "topk_f32"]),
];

impl KernelFile {
    /// The text NVRTC compiles: the prelude, then the file, with line numbers that point into the file.
    pub fn full_source(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}\"\n{}", self.name, self.source)
    }
}

/// Fails with [`EngineError::CudaUnavailable`] unless the NVRTC library can be loaded.
pub fn probe_nvrtc() -> Result<()> {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(EngineError::CudaUnavailable(
            "the NVRTC library (libnvrtc.so) was not found; install CUDA's NVRTC (for example the PyPI \
             package nvidia-cuda-nvrtc-cu12) and put its lib directory on LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    probe_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (probed above); the function writes two ints.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(EngineError::Cuda(format!("nvrtcVersion failed: {status:?}")));
    }
    Ok((major, minor))
}

/// Compiles one kernel file to PTX for `compute_{major}{minor}`.
pub fn compile(file: &KernelFile, arch: (i32, i32)) -> Result<String> {
    probe_nvrtc()?;
    let options = CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{}{}", arch.0, arch.1), "--std=c++17".into()],
        name: Some(file.name.to_string()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(file.full_source(), options) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, .. }) => Err(EngineError::Cuda(format!(
            "NVRTC could not compile kernels/{} for compute_{}{}:\n{}",
            file.name,
            arch.0,
            arch.1,
            log.to_string_lossy()
        ))),
        Err(e) => Err(EngineError::Cuda(format!("NVRTC failed on kernels/{}: {e:?}", file.name))),
    }
}

/// PTX for every kernel file, from the disk cache when this exact source, architecture and NVRTC
/// version were compiled before. The cache lives in `$COMPUTEPOOL_CACHE/ptx` (default
/// `~/.cache/computepool/ptx`); a cache that cannot be written only costs a recompile next time.
pub fn compile_all_cached(arch: (i32, i32)) -> Result<Vec<(KernelFile, Ptx)>> {
    let version = nvrtc_version()?;
    let dir = cache_dir();
    let mut out = Vec::with_capacity(KERNEL_FILES.len());
    for file in KERNEL_FILES {
        let mut key = Sha256::new();
        key.update(file.full_source().as_bytes());
        key.update(format!("\0compute_{}{}\0nvrtc {}.{}", arch.0, arch.1, version.0, version.1).as_bytes());
        let key: String = key.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.as_ref().map(|d| d.join(format!("{}-{}.ptx", file.name.trim_end_matches(".cu"), &key[..16])));
        let cached = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
        let ptx = match cached {
            Some(ptx) => ptx,
            None => {
                let ptx = compile(file, arch)?;
                if let Some(p) = &path {
                    let tmp = p.with_extension("ptx.tmp");
                    if std::fs::write(&tmp, &ptx).and_then(|_| std::fs::rename(&tmp, p)).is_err() {
                        tracing::debug!(path = %p.display(), "could not cache PTX");
                    }
                }
                ptx
            }
        };
        out.push((*file, Ptx::from_src(ptx)));
    }
    Ok(out)
}

fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("COMPUTEPOOL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/computepool")))?;
    let dir = base.join("ptx");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}
