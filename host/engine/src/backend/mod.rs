//! Compute backends. The CPU backend is always built; CUDA lands in `cuda/` behind a feature.

pub mod cpu;
