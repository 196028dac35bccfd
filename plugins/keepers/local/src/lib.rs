//! The local keeper: ComputePool's default keeper-adapter plugin. It runs the same five workflow files
//! KeeperHub users import (keeperhub/workflows/*.workflow.json, compiled in) on this host: each
//! `web3/write-contract` node is resolved against the trigger body, ABI-encoded from the node's own ABI and
//! sent through the host's `chain` capability with the host's key and an idempotency key per call. Run
//! state lives in the host's kv store, so `status` and `lookup` answer after a restart. It holds no key,
//! opens no socket and touches nothing but the contracts the operator granted it.
//!
//! - `abi`: Solidity ABI encoding from a JSON ABI entry and JSON values.
//! - `workflow`: the export format, node order, For Each, `{{@node:Label.path}}` templates.
//! - `run`: planning, the run record, sending, resuming (host-independent, tested natively).
//! - `guest`: the WIT bindings over `run` (wasm32 only).
// `no_std` in the component (module docs of plugins/guest); std on the host, where only the tests build it.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

pub mod abi;
pub mod run;
pub mod workflow;

#[cfg(target_arch = "wasm32")]
mod guest;
