//! The compiled-component cache: a second host with the same cache folder loads without compiling, a
//! different engine setting misses, and a corrupt cache file is recompiled rather than trusted.

mod support;

use computepool_plugin_host::cache::CacheOutcome;
use computepool_plugin_host::{EngineSettings, HostConfig, PluginHost, RequestRandom, SampleInput, SamplingParams};
use support::plugin;

fn host(cache: &std::path::Path, optimize: bool) -> PluginHost {
    let config = HostConfig {
        cache_dir: Some(cache.to_path_buf()),
        engine: EngineSettings { optimize, ..EngineSettings::default() },
        ..HostConfig::default()
    };
    PluginHost::new(config).unwrap()
}

fn greedy_token(host: &PluginHost) -> u32 {
    let input = SampleInput { logits: &[0.0, 1.0, 5.0, 2.0], history: &[], generated: 0, params: SamplingParams::default() };
    host.sampler("greedy").unwrap().sample(&mut RequestRandom::new(0), &input).unwrap()
}

#[test]
fn compiled_components_are_reused_by_hash_version_and_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let first = host(tmp.path(), true);
    assert_eq!(first.load_plugin(&plugin("samplers/greedy")).unwrap().cache, CacheOutcome::Compiled);
    let second = host(tmp.path(), true);
    assert_eq!(second.load_plugin(&plugin("samplers/greedy")).unwrap().cache, CacheOutcome::Hit);
    assert_eq!(greedy_token(&second), 2);

    let unoptimized = host(tmp.path(), false);
    assert_eq!(unoptimized.load_plugin(&plugin("samplers/greedy")).unwrap().cache, CacheOutcome::Compiled);

    // Corrupt the cached file: the next host recompiles and rewrites it.
    let (cache, fingerprint) = first.cache();
    let sha = first.get("greedy").unwrap().manifest.wasm.sha256.clone();
    let path = cache.path(fingerprint, &sha).unwrap();
    std::fs::write(&path, b"not a compiled component").unwrap();
    let third = host(tmp.path(), true);
    assert_eq!(third.load_plugin(&plugin("samplers/greedy")).unwrap().cache, CacheOutcome::Compiled);
    assert_eq!(greedy_token(&third), 2);
    assert_eq!(host(tmp.path(), true).load_plugin(&plugin("samplers/greedy")).unwrap().cache, CacheOutcome::Hit);
}
