//! Coalition-voter plugins (`computepool:coalition-voter`): each judges one reported breach (an operator
//! that missed heartbeats, returned wrong output, ran too slowly or cut a stream) and answers a ballot —
//! eject, warn, dismiss or abstain, with a reason. The keeper's judge (host/keeper/src/judge.rs) asks
//! several voters, signs each ballot with that voter's host-held key and acts only on a k-of-n quorum;
//! this module only hosts the plugins. Each supported WIT version is a file (`since_v0_1_0.rs`); this
//! module is what callers see.
//!
//! Calls block: a voter may read the chain through the host's `chain` capability. Call them from a thread
//! that may block (`tokio::task::spawn_blocking`), never from an async task.
//!
//! Every call runs with the plugin's fuel and memory limits in a pooled instance; a trapped instance is
//! dropped, never reused, and the failure counts toward the plugin's failure policy. A ballot's reason
//! is kept and signed, so one longer than [`MAX_REASON_BYTES`] breaks the contract
//! ([`CallError::ContractBreach`]).
//!
//! ```no_run
//! # fn demo(host: &computepool_plugin_host::PluginHost) -> Result<(), Box<dyn std::error::Error>> {
//! use computepool_plugin_host::voter::{BreachKind, BreachReport};
//! let voter = host.voter("liveness").expect("loaded");
//! let ballot = voter.vote(&BreachReport {
//!     pool_id: "pool-7".into(),
//!     operator: "0x00000000000000000000000000000000000000aa".into(),
//!     kind: BreachKind::MissedHeartbeat,
//!     evidence: r#"{"intervalMs": 5000, "lastHeartbeatMs": 1000, "checkedAtMs": 61000}"#.into(),
//!     observed_at_ms: 61_000,
//! })?;                                                  // blocks
//! println!("{:?}: {}", ballot.decision, ballot.reason);
//! # Ok(()) }
//! ```

mod since_v0_1_0;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

use crate::chain_capability::ChainAccess;
use crate::error::{CallError, LoadError};
use crate::host_state::HostState;
use crate::kv_store::KvScope;
use crate::manifest::PluginManifest;
use crate::pool::{Failed, Grants, InstancePool, Instantiate, unsupported_version, world_mismatch};
use crate::world::WitVersion;

/// The coalition-voter versions this host serves, oldest first.
pub const SUPPORTED_VERSIONS: &[WitVersion] = &[WitVersion::V0_1_0];

/// The longest reason a ballot may carry (it is signed and stored with every ballot).
pub const MAX_REASON_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreachKind {
    /// The operator's worker stopped answering heartbeats.
    MissedHeartbeat,
    /// Its output disagreed with a re-computation.
    WrongOutput,
    /// It ran below the throughput it committed to.
    TooSlow,
    /// Its part of a stream stopped mid-request.
    StreamCut,
    Other,
}

/// What a voter judges (the WIT's `breach-report`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreachReport {
    pub pool_id: String,
    /// The accused operator's address (0x-prefixed hex).
    pub operator: String,
    pub kind: BreachKind,
    /// Evidence as JSON text; its format depends on the kind (each voter documents what it reads).
    pub evidence: String,
    /// When the reporter observed it (Unix milliseconds).
    pub observed_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Remove the operator from the pool and stop its stream.
    Eject,
    /// Keep it, record a warning.
    Warn,
    /// The evidence does not show a breach.
    Dismiss,
    /// The voter cannot judge this kind.
    Abstain,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ballot {
    pub decision: Decision,
    /// Why, for the pool's records.
    pub reason: String,
}

/// The voter's own refusal to vote (WIT's `voter-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VoterError {
    #[error("invalid report: {0}")]
    InvalidReport(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// A failed vote: the voter refused (typed), or the plugin failed (trap, fuel, memory, contract).
#[derive(Debug, thiserror::Error)]
pub enum VoterCallError {
    #[error("voter `{id}`: {error}")]
    Voter { id: String, error: VoterError },
    #[error(transparent)]
    Plugin(#[from] CallError),
}

impl VoterCallError {
    /// The voter's own error, if it was one.
    pub fn voter_error(&self) -> Option<&VoterError> {
        match self {
            VoterCallError::Voter { error, .. } => Some(error),
            VoterCallError::Plugin(_) => None,
        }
    }
}

enum VoterBindings {
    V0_1_0(since_v0_1_0::CoalitionVoter),
}

/// A loaded coalition-voter plugin. Shared between threads; each call takes an instance from the pool.
pub struct VoterPlugin {
    pool: InstancePool<VoterBindings>,
}

impl VoterPlugin {
    pub(crate) fn type_only_imports(version: WitVersion) -> &'static [&'static str] {
        match version {
            WitVersion::V0_1_0 => since_v0_1_0::TYPE_ONLY_IMPORTS,
            _ => &[],
        }
    }

    pub(crate) fn required_export(version: WitVersion) -> Option<&'static str> {
        match version {
            WitVersion::V0_1_0 => Some(since_v0_1_0::EXPORT),
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        engine: &Engine,
        linker: &Linker<HostState>,
        component: &Component,
        manifest: &PluginManifest,
        kv: KvScope,
        chain: Option<ChainAccess>,
        max_idle: usize,
        metered: bool,
    ) -> Result<Self, LoadError> {
        let instantiate: Instantiate<VoterBindings> = match manifest.wit.version {
            WitVersion::V0_1_0 => {
                let pre = since_v0_1_0::pre(linker, component).map_err(world_mismatch(manifest))?;
                Box::new(move |store| Ok(VoterBindings::V0_1_0(since_v0_1_0::instantiate(&pre, store)?)))
            }
            _ => return Err(unsupported_version(manifest, SUPPORTED_VERSIONS)),
        };
        // Voters get no `http` (the capability table refuses it for this kind): a judgement rests on the
        // evidence and the chain, not on whatever a URL answers today.
        let grants = Grants { kv, http: None, chain };
        Ok(Self { pool: InstancePool::new(engine, manifest, "voter", grants, max_idle, metered, instantiate)? })
    }

    pub fn id(&self) -> &str {
        self.pool.id()
    }

    /// Whether the failure policy disabled the plugin.
    pub fn is_disabled(&self) -> bool {
        self.pool.is_disabled()
    }

    /// Instances waiting in the pool.
    pub fn idle_instances(&self) -> usize {
        self.pool.idle_instances()
    }

    /// Asks the voter for its ballot on `report`. Blocks while the plugin runs (and while it reads the
    /// chain, if it was granted `chain`).
    pub fn vote(&self, report: &BreachReport) -> Result<Ballot, VoterCallError> {
        self.vote_metered(report).map(|(ballot, _)| ballot)
    }

    /// As [`Self::vote`], and also the fuel the call burned (the conformance kit's budget unit; 0 when
    /// the host runs without fuel).
    pub fn vote_metered(&self, report: &BreachReport) -> Result<(Ballot, u64), VoterCallError> {
        let call = |bindings: &mut VoterBindings, store: &mut Store<HostState>| {
            let outcome = match bindings {
                VoterBindings::V0_1_0(v) => since_v0_1_0::vote(v, store, report),
            };
            let fuel = self.pool.fuel_used(store);
            outcome.map(|answer| answer.map(|ballot| (ballot, fuel)))
        };
        let check = |(ballot, fuel): (Ballot, u64)| match check_ballot(&ballot) {
            Ok(()) => Ok((ballot, fuel)),
            Err(message) => Err(self.pool.breach(message)),
        };
        self.pool.call(call, check).map_err(|failed| match failed {
            Failed::Refused(error) => VoterCallError::Voter { id: self.id().to_string(), error },
            Failed::Plugin(e) => e.into(),
        })
    }
}

fn check_ballot(ballot: &Ballot) -> Result<(), String> {
    if ballot.reason.len() > MAX_REASON_BYTES {
        return Err(format!("a ballot's reason is {} bytes, more than {MAX_REASON_BYTES}", ballot.reason.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_bounded() {
        let ballot = |n: usize| Ballot { decision: Decision::Dismiss, reason: "x".repeat(n) };
        assert!(check_ballot(&ballot(MAX_REASON_BYTES)).is_ok());
        assert!(check_ballot(&ballot(MAX_REASON_BYTES + 1)).unwrap_err().contains("4097 bytes"));
    }
}
