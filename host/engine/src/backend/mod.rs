//! Compute backends. The CPU backend is always built; the CUDA backend (`cuda/`) is behind the `cuda`
//! feature and loads every CUDA library at run time, so it builds on machines without CUDA.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
