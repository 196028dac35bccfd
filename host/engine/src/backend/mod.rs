//! Compute backends. The CPU backend is always built. The CUDA backend (`cuda/`) is behind the `cuda`
//! feature and loads every CUDA library at run time, so it builds on machines without CUDA; without the
//! feature, `cuda_disabled.rs` stands in with the same names and a clear error.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_disabled.rs"]
pub mod cuda;
