//! The vocabulary loops as compiled for the build's target: WebAssembly guests (simd128, set in
//! plugins/.cargo/config.toml), and native builds without the `std` feature's run-time CPU detection.

pub use crate::kernels::argmax;
pub(crate) use crate::kernels::{block_maxima, weigh_blocks};
