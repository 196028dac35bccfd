//! Hot reload: a plugin file replaced while the host runs is picked up by `rescan`; new requests get the
//! new plugin, a request already holding the old one is unharmed, a bad replacement leaves the old one
//! serving, and a removed folder unloads.

mod support;

use computepool_plugin_host::{LoadError, RequestRandom, SampleInput, SamplingParams};
use support::{copy_plugin, edit_manifest, host, plugin};

const LOGITS: [f32; 3] = [0.0, 5.0, 1.0];

fn input() -> SampleInput<'static> {
    SampleInput { logits: &LOGITS, history: &[], generated: 0, params: SamplingParams::default() }
}

fn replace_folder(dir: &std::path::Path, with: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    copy_plugin(with, dir);
}

#[test]
fn a_replaced_plugin_serves_new_requests_and_the_running_one_is_unharmed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("plugins");
    let dir = copy_plugin("samplers/greedy", &root.join("default-sampler"));
    let host = host();
    let first = host.rescan(&root);
    assert_eq!(first.loaded, vec!["greedy".to_string()]);

    // A stream in progress holds the plugin it started with.
    let running = host.sampler("greedy").unwrap();
    let mut stream = RequestRandom::new(0);
    assert_eq!(running.sample(&mut stream, &input()).unwrap(), 1);

    // Nothing changed: nothing reloads.
    let again = host.rescan(&root);
    assert!(again.loaded.is_empty() && again.refused.is_empty() && again.unchanged == 1, "{again:?}");

    // The operator drops in a different sampler under the same id (the call counter: it answers 0, 1, …).
    replace_folder(&dir, "bad/trap-on-nan");
    edit_manifest(&dir, "id = \"test-trap-on-nan\"", "id = \"greedy\"");
    let swapped = host.rescan(&root);
    assert_eq!(swapped.loaded, vec!["greedy".to_string()], "{swapped:?}");
    let new = host.sampler("greedy").unwrap();
    assert_eq!(new.sample(&mut RequestRandom::new(0), &input()).unwrap(), 0);
    assert_eq!(new.sample(&mut RequestRandom::new(0), &input()).unwrap(), 1);
    // The running stream still gets greedy answers.
    for _ in 0..3 {
        assert_eq!(running.sample(&mut stream, &input()).unwrap(), 1);
    }

    // A broken replacement (a wasm that does not match its manifest) is refused once; the last good one serves.
    let wasm = dir.join("plugin.wasm");
    let bytes = std::fs::read(&wasm).unwrap();
    std::fs::write(&wasm, &bytes[..bytes.len() / 2]).unwrap();
    let broken = host.rescan(&root);
    assert!(broken.loaded.is_empty(), "{broken:?}");
    assert!(matches!(broken.refused.as_slice(), [r] if matches!(r.error, LoadError::Sha256Mismatch { .. })), "{broken:?}");
    assert_eq!(host.sampler("greedy").unwrap().sample(&mut RequestRandom::new(0), &input()).unwrap(), 2);
    let quiet = host.rescan(&root);
    assert!(quiet.refused.is_empty() && quiet.unchanged == 1, "a refused folder is not retried until it changes: {quiet:?}");

    // Removing the folder unloads the plugin.
    std::fs::remove_dir_all(&dir).unwrap();
    let removed = host.rescan(&root);
    assert_eq!(removed.removed, vec!["greedy".to_string()]);
    assert!(host.sampler("greedy").is_none());
    let _ = plugin("samplers/greedy"); // the repository's own copy is untouched
}

#[test]
fn a_folder_refused_at_start_is_not_refused_again_until_it_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("plugins");
    let dir = copy_plugin("samplers/greedy", &root.join("greedy"));
    let wasm = dir.join("greedy.wasm");
    let bytes = std::fs::read(&wasm).unwrap();
    std::fs::write(&wasm, &bytes[..bytes.len() / 2]).unwrap();
    let host = host();

    let start = host.load_dir(&root);
    assert!(matches!(start.refused.as_slice(), [r] if matches!(r.error, LoadError::Sha256Mismatch { .. })), "{start:?}");
    let quiet = host.rescan(&root);
    assert!(quiet.refused.is_empty() && quiet.loaded.is_empty() && quiet.unchanged == 1, "{quiet:?}");

    // Mended, it loads on the next rescan.
    std::fs::write(&wasm, &bytes).unwrap();
    let mended = host.rescan(&root);
    assert_eq!(mended.loaded, vec!["greedy".to_string()], "{mended:?}");
}
