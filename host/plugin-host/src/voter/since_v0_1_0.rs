//! `computepool:coalition-voter@0.1.0` (wit/coalition-voter/0.1.0). Frozen once released: a new version
//! is a new file next to this one and one arm in `super::VoterBindings`.

use wasmtime::Store;
use wasmtime::component::{Component, Linker};

use super::{Ballot, BreachKind, BreachReport, Decision, VoterError};
use crate::host_state::HostState;

wasmtime::component::bindgen!({
    path: ["../../wit/host/0.1.0", "../../wit/coalition-voter/0.1.0"],
    world: "computepool:coalition-voter/coalition-voter@0.1.0",
    with: { "computepool:host": crate::capability_impls::since_v0_1_0::computepool::host },
    imports: { default: trappable },
});

use computepool::coalition_voter::types as wit;

/// Interfaces of this version that hold only types; importing them needs no capability.
pub(super) const TYPE_ONLY_IMPORTS: &[&str] = &["computepool:coalition-voter/types@0.1.0"];

/// The interface a voter of this version exports.
pub(super) const EXPORT: &str = "computepool:coalition-voter/voter@0.1.0";

pub(super) fn pre(linker: &Linker<HostState>, component: &Component) -> wasmtime::Result<CoalitionVoterPre<HostState>> {
    CoalitionVoterPre::new(linker.instantiate_pre(component)?)
}

pub(super) fn instantiate(pre: &CoalitionVoterPre<HostState>, store: &mut Store<HostState>) -> wasmtime::Result<CoalitionVoter> {
    pre.instantiate(store)
}

fn kind(k: BreachKind) -> wit::BreachKind {
    match k {
        BreachKind::MissedHeartbeat => wit::BreachKind::MissedHeartbeat,
        BreachKind::WrongOutput => wit::BreachKind::WrongOutput,
        BreachKind::TooSlow => wit::BreachKind::TooSlow,
        BreachKind::StreamCut => wit::BreachKind::StreamCut,
        BreachKind::Other => wit::BreachKind::Other,
    }
}

fn decision(d: wit::Decision) -> Decision {
    match d {
        wit::Decision::Eject => Decision::Eject,
        wit::Decision::Warn => Decision::Warn,
        wit::Decision::Dismiss => Decision::Dismiss,
        wit::Decision::Abstain => Decision::Abstain,
    }
}

/// A vote's outcome: the outer error is a trap, the inner one the voter's own `voter-error`.
pub(super) fn vote(voter: &CoalitionVoter, store: &mut Store<HostState>, r: &BreachReport) -> wasmtime::Result<Result<Ballot, VoterError>> {
    let report = wit::BreachReport {
        pool_id: r.pool_id.clone(),
        operator: r.operator.clone(),
        kind: kind(r.kind),
        evidence: r.evidence.clone(),
        observed_at_ms: r.observed_at_ms,
    };
    let answer = voter.computepool_coalition_voter_voter().call_vote(store, &report)?;
    Ok(answer.map(|b| Ballot { decision: decision(b.decision), reason: b.reason }).map_err(|e| match e {
        wit::VoterError::InvalidReport(m) => VoterError::InvalidReport(m),
        wit::VoterError::Unavailable(m) => VoterError::Unavailable(m),
    }))
}
