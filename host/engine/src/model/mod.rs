//! Model architectures. One file per architecture family; today the Llama family (Llama 2/3/3.1,
//! Mistral, Qwen2/2.5), which differ only in biases, RoPE scaling and sliding windows.

pub mod device;
pub mod llama;
pub mod source;

pub use device::{Device, DeviceCache, DeviceShard, DeviceStepItem};
pub use llama::{LoadOptions, Shard, StepInput, StepItem, StepOutput, head_split};
pub use source::ModelSource;
