//! The bad-plugin corpus (plugins/bad/): each one is refused at load or stopped at call time with a clear,
//! typed error, and the host keeps serving the good plugins throughout.

mod support;

use std::collections::BTreeSet;

use computepool_plugin_host::{
    Capability, CallError, GrantPolicy, HostConfig, LoadError, PluginHost, RequestRandom, SampleInput, SamplingParams,
};
use support::{copy_plugin, edit_manifest, host, plugin, plugins_dir};

fn input(logits: &[f32]) -> SampleInput<'_> {
    SampleInput { logits, history: &[], generated: 0, params: SamplingParams::default() }
}

/// The greedy plugin still answers correctly.
fn assert_still_serving(host: &PluginHost) {
    let greedy = host.sampler("greedy").expect("greedy stays loaded");
    let token = greedy.sample(&mut RequestRandom::new(0), &input(&[0.5, 3.0, -1.0, 2.0])).expect("greedy serves");
    assert_eq!(token, 1);
}

fn host_with_greedy() -> PluginHost {
    let host = host();
    host.load_plugin(&plugin("samplers/greedy")).expect("greedy loads");
    host
}

#[test]
fn infinite_loop_is_stopped_by_fuel() {
    let host = host_with_greedy();
    host.load_plugin(&plugin("bad/infinite-loop")).expect("it loads: it only misbehaves when called");
    let bad = host.sampler("bad-infinite-loop").unwrap();
    for _ in 0..2 {
        let err = bad.sample(&mut RequestRandom::new(0), &input(&[1.0, 2.0])).unwrap_err();
        assert!(matches!(err, CallError::OutOfFuel { fuel: 10_000_000, .. }), "{err:?}");
        assert!(err.to_string().contains("ran out of fuel (10000000 per call)"), "{err}");
        assert_still_serving(&host);
    }
    assert_eq!(bad.idle_instances(), 0, "a trapped instance is not put back");
}

#[test]
fn memory_bomb_is_stopped_by_the_memory_limit() {
    let host = host_with_greedy();
    host.load_plugin(&plugin("bad/memory-bomb")).unwrap();
    let bad = host.sampler("bad-memory-bomb").unwrap();
    let err = bad.sample(&mut RequestRandom::new(0), &input(&[1.0])).unwrap_err();
    match &err {
        CallError::MemoryLimit { requested, limit, .. } => {
            assert_eq!(*limit, 16 << 20);
            assert!(*requested > *limit);
        }
        other => panic!("expected the memory limit, got {other:?}"),
    }
    assert!(err.to_string().contains("past its limit of 16777216"), "{err}");
    assert_still_serving(&host);
}

#[test]
fn out_of_range_token_is_refused_and_the_instance_replaced() {
    let host = host_with_greedy();
    host.load_plugin(&plugin("bad/out-of-range-token")).unwrap();
    let bad = host.sampler("bad-out-of-range-token").unwrap();
    let err = bad.sample(&mut RequestRandom::new(0), &input(&[1.0, 2.0, 3.0])).unwrap_err();
    assert!(matches!(err, CallError::TokenOutOfRange { token: 3, vocab: 3, .. }), "{err:?}");
    assert!(err.to_string().contains("returned token 3, outside the vocabulary of 3"), "{err}");
    assert_eq!(bad.idle_instances(), 0);
    assert_still_serving(&host);
}

#[test]
fn a_trapped_instance_is_replaced_never_reused() {
    let host = host_with_greedy();
    host.load_plugin(&plugin("bad/trap-on-nan")).unwrap();
    let counter = host.sampler("test-trap-on-nan").unwrap();
    let logits = [0.0f32; 100];
    let mut random = RequestRandom::new(0);
    // The plugin returns how many calls its instance served before.
    assert_eq!(counter.sample(&mut random, &input(&logits)).unwrap(), 0);
    assert_eq!(counter.sample(&mut random, &input(&logits)).unwrap(), 1);
    let err = counter.sample(&mut random, &input(&[f32::NAN, 0.0])).unwrap_err();
    assert!(matches!(err, CallError::Trap { .. }), "{err:?}");
    assert!(err.to_string().contains("trapped") && err.to_string().contains("unreachable"), "{err}");
    // A reused instance would answer 3; a fresh one starts again at 0.
    assert_eq!(counter.sample(&mut random, &input(&logits)).unwrap(), 0);
    assert_eq!(counter.sample(&mut random, &input(&logits)).unwrap(), 1);
    assert_still_serving(&host);
}

#[test]
fn failure_policy_disable_stops_calling_a_failing_plugin() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_plugin("bad/infinite-loop", &tmp.path().join("loop"));
    edit_manifest(&dir, "[limits]\n", "[limits]\nfailure-policy = \"disable\"\ndisable-after = 2\n");
    let host = host_with_greedy();
    host.load_plugin(&dir).unwrap();
    let bad = host.sampler("bad-infinite-loop").unwrap();
    let mut random = RequestRandom::new(0);
    for _ in 0..2 {
        assert!(matches!(bad.sample(&mut random, &input(&[1.0])).unwrap_err(), CallError::OutOfFuel { .. }));
    }
    let err = bad.sample(&mut random, &input(&[1.0])).unwrap_err();
    assert!(matches!(err, CallError::Disabled { failures: 2, .. }), "{err:?}");
    assert!(bad.is_disabled());
    // Reloading the folder brings a fresh, enabled plugin.
    host.load_plugin(&dir).unwrap();
    assert!(!host.sampler("bad-infinite-loop").unwrap().is_disabled());
    assert_still_serving(&host);
}

fn refused(relative: &str) -> LoadError {
    let host = host_with_greedy();
    let err = host.load_plugin(&plugin(relative)).expect_err("the plugin must be refused");
    assert!(host.get(&err_id(relative)).is_none(), "a refused plugin is not registered");
    assert_still_serving(&host);
    err
}

fn err_id(relative: &str) -> String {
    format!("bad-{}", relative.trim_start_matches("bad/"))
}

#[test]
fn unknown_wit_version_is_refused_naming_the_supported_versions() {
    let err = refused("bad/unknown-wit-version");
    assert!(matches!(&err, LoadError::UnsupportedWitVersion { requested, .. } if requested == "0.9.0"), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("computepool:sampler/sampler@0.9.0") && message.contains("sampler versions: 0.1.0"), "{message}");
}

#[test]
fn a_component_of_another_version_than_its_manifest_says_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_plugin("bad/unknown-wit-version", &tmp.path().join("liar"));
    edit_manifest(&dir, "version = \"0.9.0\"", "version = \"0.1.0\"");
    let host = host_with_greedy();
    let err = host.load_plugin(&dir).unwrap_err();
    assert!(matches!(err, LoadError::WorldMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("does not implement computepool:sampler/sampler@0.1.0: it does not export `computepool:sampler/sample@0.1.0` (it exports: computepool:sampler/sample@0.9.0)"), "{err}");
    assert_still_serving(&host);
}

#[test]
fn truncated_wasm_is_refused_at_compile() {
    let err = refused("bad/truncated");
    assert!(matches!(err, LoadError::Compile { .. }), "{err:?}");
    assert!(err.to_string().contains("is not a valid WebAssembly component"), "{err}");
}

#[test]
fn wrong_sha256_is_refused_before_compiling() {
    let err = refused("bad/wrong-sha256");
    match &err {
        LoadError::Sha256Mismatch { expected, actual, .. } => {
            assert_eq!(expected, "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e");
            assert_ne!(expected, actual);
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
}

#[test]
fn undeclared_capability_use_is_refused() {
    let err = refused("bad/undeclared-capability");
    assert!(
        matches!(&err, LoadError::UndeclaredCapability { capability: Capability::KvStore, import, .. }
            if import == "computepool:host/kv-store@0.1.0"),
        "{err:?}"
    );
    assert!(err.to_string().contains("does not request the `kv-store` capability"), "{err}");
}

#[test]
fn extra_imports_are_refused() {
    let err = refused("bad/extra-import");
    assert!(matches!(&err, LoadError::ExtraImport { import, .. } if import == "evil:sampler/socket"), "{err:?}");
    assert!(err.to_string().contains("`evil:sampler/socket`, which is not a host capability"), "{err}");
}

#[test]
fn a_capability_the_operator_did_not_grant_is_denied_by_name() {
    let config = HostConfig { grants: GrantPolicy { default: BTreeSet::from([Capability::Log]), ..GrantPolicy::default() }, ..HostConfig::default() };
    let host = PluginHost::new(config).unwrap();
    let err = host.load_plugin(&plugin("samplers/top-p")).unwrap_err();
    assert!(matches!(&err, LoadError::CapabilityDenied(d) if d.not_granted == vec![Capability::Random]), "{err:?}");
    assert!(err.to_string().contains("does not grant `random`"), "{err}");
}

#[test]
fn limits_above_the_operators_ceiling_are_refused() {
    let mut config = HostConfig::default();
    config.ceilings.max_memory_bytes = 1 << 20;
    let host = PluginHost::new(config).unwrap();
    let err = host.load_plugin(&plugin("samplers/greedy")).unwrap_err();
    assert!(matches!(err, LoadError::LimitAboveCeiling { limit: "memory-bytes", .. }), "{err:?}");
}

/// Loading the whole plugins/ folder: the good ones load, each load-time bad one is refused with its own
/// error, and the call-time bad ones load (they are stopped when called, above).
#[test]
fn loading_the_plugins_folder_refuses_exactly_the_bad_ones() {
    // The operator grants the key-value store to the plugins that keep state in it, and the rails their
    // network; this host has no chain connection, so the chain rail and the local keeper are refused for that.
    let config = HostConfig::from_toml(
        "[grants]\ndefault = [\"log\", \"clock\", \"random\"]\n[grants.plugins]\nmirostat = [\"kv-store\"]\ntest-distribution-probe = [\"kv-store\"]\ntest-keeper-memory = [\"kv-store\"]\n\
         ledger = [\"kv-store\"]\nx402-exact = [\"kv-store\", \"http\"]\nsuperfluid-gda = [\"chain\"]\nkeeperhub = [\"kv-store\", \"http\"]\nlocal = [\"kv-store\", \"chain\"]\n\
         [grants.http]\nx402-exact = [\"127.0.0.1:4021\"]\nkeeperhub = [\"app.keeperhub.com\"]\n[grants.chain]\nsuperfluid-gda = [\"0xBcC58fb72409BA1CdEc5dBcDD3Cd6c42E3e04242\"]\nlocal = [\"0xBcC58fb72409BA1CdEc5dBcDD3Cd6c42E3e04242\"]\n",
    )
    .unwrap();
    let host = PluginHost::new(config).unwrap();
    let report = host.load_dir(&plugins_dir());
    let loaded: BTreeSet<&str> = report.loaded.iter().map(String::as_str).collect();
    for id in ["greedy", "top-p", "mirostat", "test-distribution-probe", "bad-infinite-loop", "bad-memory-bomb", "bad-out-of-range-token", "test-trap-on-nan", "ledger", "x402-exact", "test-keeper-memory", "keeperhub", "audit-majority", "audit-unanimous", "liveness", "test-voter-dissent", "test-voter-trap"] {
        assert!(loaded.contains(id), "{id} should load; report: {report:?}");
    }
    let mut refused: Vec<(String, &'static str)> = report
        .refused
        .iter()
        .map(|r| {
            let name = r.dir.file_name().unwrap().to_string_lossy().into_owned();
            let kind = match r.error {
                LoadError::ExtraImport { .. } => "extra-import",
                LoadError::UndeclaredCapability { .. } => "undeclared-capability",
                LoadError::UnsupportedWitVersion { .. } => "unknown-wit-version",
                LoadError::Compile { .. } => "truncated",
                LoadError::Sha256Mismatch { .. } => "wrong-sha256",
                LoadError::CapabilityUnavailable { .. } => "chain-unavailable",
                _ => "other",
            };
            (name, kind)
        })
        .collect();
    refused.sort();
    let mut expected: Vec<(String, &str)> = ["extra-import", "truncated", "undeclared-capability", "unknown-wit-version", "wrong-sha256"]
        .into_iter()
        .map(|n| (n.to_string(), n))
        .collect();
    // Both send transactions; this host has no chain connection.
    expected.push(("superfluid-gda".to_string(), "chain-unavailable"));
    expected.push(("local".to_string(), "chain-unavailable"));
    expected.sort();
    assert_eq!(refused, expected);
    assert_still_serving(&host);
}
