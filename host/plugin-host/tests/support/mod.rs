//! Shared by the plugin host's integration tests: where the built plugins are, a host, random logits.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use computepool_engine::sampling::Rng;
use computepool_plugin_host::{HostConfig, PluginHost};

/// plugins/ at the repository root. Its components are built by scripts/build-plugins.sh (`make test`).
pub fn plugins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins")
}

/// The folder of one plugin, checked to be built.
pub fn plugin(relative: &str) -> PathBuf {
    let dir = plugins_dir().join(relative);
    let manifest = std::fs::read_to_string(dir.join("plugin.toml")).expect("plugin.toml is in the repository");
    let file = manifest
        .lines()
        .find_map(|l| l.strip_prefix("file = \"").and_then(|r| r.strip_suffix('"')))
        .expect("plugin.toml names its wasm file");
    assert!(
        dir.join(file).is_file(),
        "{} is not built: run `bash scripts/build-plugins.sh` (make test does)",
        dir.join(file).display()
    );
    dir
}

pub fn host() -> PluginHost {
    PluginHost::new(HostConfig::default()).expect("the engine starts")
}

/// Copies a plugin folder (plugin.toml and its wasm) into `to`, so a test can change it.
pub fn copy_plugin(relative: &str, to: &Path) -> PathBuf {
    let from = plugin(relative);
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
    to.to_path_buf()
}

/// Replaces `from` by `to` in a copied plugin's plugin.toml, checking that `from` was there.
pub fn edit_manifest(dir: &Path, from: &str, to: &str) {
    let path = dir.join("plugin.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "`{from}` is not in {}", path.display());
    std::fs::write(&path, text.replace(from, to)).unwrap();
}

/// Random logits of `vocab` entries: roughly normal, spread like a language model's (a few standard
/// deviations), with some rows quantised so ties occur, and occasional -inf and NaN entries.
pub fn random_logits(rng: &mut Rng, vocab: usize, row: usize) -> Vec<f32> {
    let scale = 1.0 + (rng.next_f64() * 6.0) as f32;
    let mut logits: Vec<f32> = (0..vocab)
        .map(|_| {
            // Sum of four uniforms: a cheap bell curve.
            let s: f64 = (0..4).map(|_| rng.next_f64()).sum::<f64>() - 2.0;
            (s * scale as f64) as f32
        })
        .collect();
    if row.is_multiple_of(3) {
        for v in &mut logits {
            *v = (*v * 4.0).round() / 4.0;
        }
    }
    if row.is_multiple_of(5) {
        let i = (rng.next_u64() % vocab as u64) as usize;
        logits[i] = f32::NAN;
        let j = (rng.next_u64() % vocab as u64) as usize;
        logits[j] = f32::NEG_INFINITY;
    }
    logits
}
