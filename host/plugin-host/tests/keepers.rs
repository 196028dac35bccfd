//! The keeper-adapter kind through the host's keeper API, with a real guest (plugins/test/keeper-memory,
//! whose runs live in its kv-store): loading and lookup by id, submit / status / lookup and their typed
//! errors, a run found again by its idempotency key (also after a host restart with a state dir), a trap
//! that replaces the instance and keeps the plugin serving, and what refuses a keeper at load.

mod support;

use std::collections::BTreeSet;

use computepool_plugin_host::capability::Capability;
use computepool_plugin_host::keeper::{KeeperError, Transition, TransitionKind, TransitionState};
use computepool_plugin_host::{CallError, GrantPolicy, HostConfig, KeeperCallError, LoadError, PluginHost, PluginKind};

const MEMORY: &str = "test/keeper-memory";
const ID: &str = "test-keeper-memory";

fn host_in(state_dir: Option<&std::path::Path>) -> PluginHost {
    let mut grants = GrantPolicy::default();
    grants.plugins.insert(ID.into(), BTreeSet::from([Capability::KvStore]));
    PluginHost::new(HostConfig { grants, state_dir: state_dir.map(Into::into), ..HostConfig::default() }).expect("the engine starts")
}

fn transition(kind: TransitionKind, key: &str, payload: &str) -> Transition {
    Transition { kind, idempotency_key: key.into(), pool_id: "pool-1".into(), payload: payload.into() }
}

fn keeper_error<T: std::fmt::Debug>(result: Result<T, KeeperCallError>) -> KeeperError {
    match result {
        Err(KeeperCallError::Keeper { error, .. }) => error,
        other => panic!("expected the keeper's own error, got {other:?}"),
    }
}

#[test]
fn a_keeper_loads_and_is_found_by_id_as_a_keeper_only() {
    let host = host_in(None);
    let loaded = host.load_plugin(&support::plugin(MEMORY)).unwrap();
    assert_eq!(loaded.manifest.kind, PluginKind::KeeperAdapter);
    assert!(loaded.as_keeper().is_some() && loaded.as_rail().is_none() && loaded.as_sampler().is_none());
    assert_eq!(host.keeper(ID).unwrap().id(), ID);
    assert!(host.rail(ID).is_none() && host.sampler(ID).is_none());
    host.load_plugin(&support::plugin("samplers/greedy")).unwrap();
    assert!(host.keeper("greedy").is_none(), "a sampler is not a keeper");
    assert!(host.keeper("missing").is_none());
}

#[test]
fn submit_status_and_lookup_round_trip_once_per_key() {
    let host = host_in(None);
    let keeper = host.load_plugin(&support::plugin(MEMORY)).unwrap().as_keeper().unwrap().clone();
    assert_eq!(keeper.lookup("pool-1/stream-start/1").unwrap(), None);

    let t = transition(TransitionKind::StreamStart, "pool-1/stream-start/1", r#"{"flowRate": "1000"}"#);
    let run = keeper.submit(&t).unwrap();
    assert_eq!(run.reference, "mem-1");
    let status = keeper.status(&run.reference).unwrap();
    assert_eq!(status.state, TransitionState::Succeeded);
    assert_eq!(status.detail, "stream-start on pool-1 (pool-1/stream-start/1)", "the kind and key crossed the boundary intact");
    // The same key again: the first run, not a second one.
    assert_eq!(keeper.submit(&t).unwrap(), run);
    assert_eq!(keeper.lookup(&t.idempotency_key).unwrap(), Some(run.clone()));

    // Another key is another run; one that asks to fail fails.
    let failing = transition(TransitionKind::HandleBreach, "pool-1/handle-breach/1", r#"{"fail": true}"#);
    let second = keeper.submit(&failing).unwrap();
    assert_eq!(second.reference, "mem-2");
    let status = keeper.status(&second.reference).unwrap();
    assert_eq!(status.state, TransitionState::Failed);
    assert!(status.detail.contains("handle-breach"), "{}", status.detail);

    // Typed refusals, and the plugin keeps serving after each.
    assert!(matches!(keeper_error(keeper.submit(&transition(TransitionKind::Propose, "k", "not json"))), KeeperError::InvalidTransition(m) if m.contains("not JSON")));
    assert!(matches!(keeper_error(keeper.submit(&transition(TransitionKind::Propose, "k", "[1]"))), KeeperError::InvalidTransition(_)));
    assert!(matches!(keeper_error(keeper.status("mem-99")), KeeperError::Rejected(m) if m.contains("mem-99")));
    let empty_key = keeper_error(keeper.submit(&transition(TransitionKind::Propose, "", "{}")));
    assert!(matches!(empty_key, KeeperError::InvalidTransition(m) if m.contains("idempotency key")));
    assert_eq!(keeper.lookup("k").unwrap(), None, "a refused transition left no run");
    assert!(!keeper.is_disabled());
}

#[test]
fn a_trapping_call_replaces_the_instance_and_the_runs_survive() {
    let host = host_in(None);
    let keeper = host.load_plugin(&support::plugin(MEMORY)).unwrap().as_keeper().unwrap().clone();
    let run = keeper.submit(&transition(TransitionKind::StreamStop, "pool-1/stream-stop/1", "{}")).unwrap();
    let err = keeper.submit(&transition(TransitionKind::StreamStop, "pool-1/stream-stop/2", r#"{"trap": true}"#)).unwrap_err();
    assert!(matches!(&err, KeeperCallError::Plugin(CallError::Trap { .. })), "{err:?}");
    assert!(err.keeper_error().is_none());
    // A fresh instance reads the same kv-store: the run is still there, and the next one gets the next number.
    assert_eq!(keeper.lookup("pool-1/stream-stop/1").unwrap(), Some(run));
    assert_eq!(keeper.submit(&transition(TransitionKind::StreamStop, "pool-1/stream-stop/3", "{}")).unwrap().reference, "mem-2");
}

#[test]
fn a_run_is_found_by_its_key_after_the_host_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let t = transition(TransitionKind::ActivateAndPool, "pool-1/activate-and-pool/1", "{}");
    let run = {
        let host = host_in(Some(dir.path()));
        let keeper = host.load_plugin(&support::plugin(MEMORY)).unwrap().as_keeper().unwrap().clone();
        keeper.submit(&t).unwrap()
    };
    let host = host_in(Some(dir.path()));
    let keeper = host.load_plugin(&support::plugin(MEMORY)).unwrap().as_keeper().unwrap().clone();
    assert_eq!(keeper.lookup(&t.idempotency_key).unwrap(), Some(run.clone()));
    assert_eq!(keeper.submit(&t).unwrap(), run, "resubmitted after a restart: the first run");
    assert_eq!(keeper.status(&run.reference).unwrap().state, TransitionState::Succeeded);
}

#[test]
fn a_keeper_is_refused_at_load_without_its_grant_or_its_export() {
    // kv-store not granted.
    let host = support::host();
    let err = host.load_plugin(&support::plugin(MEMORY)).unwrap_err();
    assert!(matches!(&err, LoadError::CapabilityDenied(d) if d.not_granted == vec![Capability::KvStore]), "{err:?}");
    assert!(host.keeper(ID).is_none());

    // A sampler's component under a keeper-adapter manifest: it does not export the keeper interface.
    let dir = tempfile::tempdir().unwrap();
    let copy = support::copy_plugin("samplers/greedy", dir.path());
    support::edit_manifest(&copy, "kind = \"sampler\"", "kind = \"keeper-adapter\"");
    support::edit_manifest(&copy, "computepool:sampler/sampler", "computepool:keeper-adapter/keeper-adapter");
    let err = host.load_plugin(&copy).unwrap_err();
    assert!(
        matches!(&err, LoadError::WorldMismatch { message, .. } if message.contains("computepool:keeper-adapter/keeper@0.1.0")),
        "{err:?}"
    );

    // A keeper-adapter version this host does not serve.
    let dir = tempfile::tempdir().unwrap();
    let copy = support::copy_plugin(MEMORY, dir.path());
    support::edit_manifest(&copy, "version = \"0.1.0\"\n\n[wasm]", "version = \"0.9.0\"\n\n[wasm]");
    let err = host_in(None).load_plugin(&copy).unwrap_err();
    assert!(matches!(&err, LoadError::UnsupportedWitVersion { supported, .. } if supported == "0.1.0"), "{err:?}");
}
