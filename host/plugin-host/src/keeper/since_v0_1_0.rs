//! `computepool:keeper-adapter@0.1.0` (wit/keeper-adapter/0.1.0). Frozen once released: a new version is
//! a new file next to this one and one arm in `super::KeeperBindings`.

use wasmtime::Store;
use wasmtime::component::{Component, Linker};

use super::{KeeperError, Submission, Transition, TransitionKind, TransitionState, TransitionStatus};
use crate::host_state::HostState;

wasmtime::component::bindgen!({
    path: ["../../wit/host/0.1.0", "../../wit/keeper-adapter/0.1.0"],
    world: "computepool:keeper-adapter/keeper-adapter@0.1.0",
    with: { "computepool:host": crate::capability_impls::since_v0_1_0::computepool::host },
    imports: { default: trappable },
});

use computepool::keeper_adapter::types as wit;

/// Interfaces of this version that hold only types; importing them needs no capability.
pub(super) const TYPE_ONLY_IMPORTS: &[&str] = &["computepool:keeper-adapter/types@0.1.0"];

/// The interface a keeper adapter of this version exports.
pub(super) const EXPORT: &str = "computepool:keeper-adapter/keeper@0.1.0";

pub(super) fn pre(linker: &Linker<HostState>, component: &Component) -> wasmtime::Result<KeeperAdapterPre<HostState>> {
    KeeperAdapterPre::new(linker.instantiate_pre(component)?)
}

pub(super) fn instantiate(pre: &KeeperAdapterPre<HostState>, store: &mut Store<HostState>) -> wasmtime::Result<KeeperAdapter> {
    pre.instantiate(store)
}

/// A call's outcome: the outer error is a trap, the inner one the keeper's own `keeper-error`.
pub(super) type Outcome<T> = wasmtime::Result<Result<T, KeeperError>>;

fn keeper_error(e: wit::KeeperError) -> KeeperError {
    match e {
        wit::KeeperError::InvalidTransition(m) => KeeperError::InvalidTransition(m),
        wit::KeeperError::Unavailable(m) => KeeperError::Unavailable(m),
        wit::KeeperError::Rejected(m) => KeeperError::Rejected(m),
    }
}

fn kind(k: TransitionKind) -> wit::TransitionKind {
    match k {
        TransitionKind::Propose => wit::TransitionKind::Propose,
        TransitionKind::ActivateAndPool => wit::TransitionKind::ActivateAndPool,
        TransitionKind::StreamStart => wit::TransitionKind::StreamStart,
        TransitionKind::StreamStop => wit::TransitionKind::StreamStop,
        TransitionKind::HandleBreach => wit::TransitionKind::HandleBreach,
    }
}

pub(super) fn submit(keeper: &KeeperAdapter, store: &mut Store<HostState>, t: &Transition) -> Outcome<Submission> {
    let transition = wit::Transition {
        kind: kind(t.kind),
        idempotency_key: t.idempotency_key.clone(),
        pool_id: t.pool_id.clone(),
        payload: t.payload.clone(),
    };
    let r = keeper.computepool_keeper_adapter_keeper().call_submit(store, &transition)?;
    Ok(r.map(|s| Submission { reference: s.reference }).map_err(keeper_error))
}

pub(super) fn status(keeper: &KeeperAdapter, store: &mut Store<HostState>, reference: &str) -> Outcome<TransitionStatus> {
    let r = keeper.computepool_keeper_adapter_keeper().call_status(store, reference)?;
    Ok(r.map(|s| TransitionStatus {
        state: match s.state {
            wit::TransitionState::Pending => TransitionState::Pending,
            wit::TransitionState::Succeeded => TransitionState::Succeeded,
            wit::TransitionState::Failed => TransitionState::Failed,
        },
        detail: s.detail,
    })
    .map_err(keeper_error))
}

pub(super) fn lookup(keeper: &KeeperAdapter, store: &mut Store<HostState>, idempotency_key: &str) -> Outcome<Option<Submission>> {
    let r = keeper.computepool_keeper_adapter_keeper().call_lookup(store, idempotency_key)?;
    Ok(r.map(|s| s.map(|s| Submission { reference: s.reference })).map_err(keeper_error))
}
