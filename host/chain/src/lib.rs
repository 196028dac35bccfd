//! The chain side of ComputePool: typed alloy bindings for contracts/ (PoolINFT, OracleVerifier,
//! Coalition, TestUSD) and the Superfluid calls the money loop makes; a signing `Chain` client; the
//! deployment of the real Superfluid protocol from its npm artifacts plus ComputePool's contracts, recorded
//! in a deployment file; the local anvil devnet; EIP-3009 and oracle signing; and the GDA's arithmetic as
//! pure functions.
//!
//! It owns keys only as signers handed to it, and never logs or prints them. It knows nothing of models,
//! activations or HTTP serving.

pub mod bindings;
pub mod client;
pub mod deploy;
pub mod devnet;
pub mod eip3009;
pub mod gda;
pub mod oracle;
pub mod pools;
pub mod superfluid;

/// The alloy this crate is built with, for callers that name its types (addresses, signers).
pub use alloy;
pub use client::{Chain, ChainError, KeySource};
pub use deploy::{DeployOptions, Deployment, deploy_all, deploy_coalition};
pub use devnet::{Anvil, ChainTools, DEVNET_CHAIN_ID};
pub use gda::{GdaModel, PoolFlow, SolvencyRules};
pub use pools::Gda;
pub use superfluid::{SuperfluidAddresses, SuperfluidArtifacts};
