//! plugin.toml: what a plugin is, which contract it implements, which file holds it, what it needs.
//!
//! ```toml
//! id = "top-p"
//! version = "0.1.0"
//! kind = "sampler"
//! description = "Temperature + top-k + top-p, exactly the engine's native sampling."
//! capabilities = ["random"]
//!
//! [wit]
//! world = "computepool:sampler/sampler"
//! version = "0.1.0"
//!
//! [wasm]
//! file = "top_p.wasm"
//! sha256 = "…64 hex digits…"
//!
//! [limits]
//! fuel-per-call = 1_000_000_000
//! memory-bytes = 67_108_864
//! failure-policy = "fail-request"
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Component, Path};

use serde::Deserialize;

use crate::capability::Capability;
use crate::error::LoadError;
use crate::limits::PluginLimits;
use crate::world::{WitVersion, world_name};

/// The file name the host looks for in each plugin folder.
pub const MANIFEST_FILE: &str = "plugin.toml";

/// The kinds of plugin, one WIT package each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    Sampler,
    PaymentRail,
    KeeperAdapter,
    CoalitionVoter,
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PluginKind::Sampler => "sampler",
            PluginKind::PaymentRail => "payment-rail",
            PluginKind::KeeperAdapter => "keeper-adapter",
            PluginKind::CoalitionVoter => "coalition-voter",
        })
    }
}

/// The `[wit]` table: the world the component implements.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitWorld {
    /// `package/world` without the version, e.g. `computepool:sampler/sampler`.
    pub world: String,
    pub version: WitVersion,
}

/// The `[wasm]` table: the component file and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmFile {
    /// Path of the component, relative to the plugin folder (no `..`).
    pub file: String,
    /// Lowercase hex SHA-256 of the file; the host refuses a file that does not match.
    pub sha256: String,
}

/// A parsed and checked plugin.toml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginManifest {
    /// Unique among loaded plugins: lowercase letters, digits, `-`, `_`, `.`; at most 64 characters.
    pub id: String,
    /// The plugin's own version (free-form, shown in listings).
    pub version: String,
    pub kind: PluginKind,
    #[serde(default)]
    pub description: String,
    /// Host capabilities the plugin imports. The component may import nothing else.
    #[serde(default)]
    pub capabilities: BTreeSet<Capability>,
    pub wit: WitWorld,
    pub wasm: WasmFile,
    #[serde(default)]
    pub limits: PluginLimits,
}

impl PluginManifest {
    /// Parses and checks the text of a plugin.toml; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, LoadError> {
        let invalid = |message: String| LoadError::InvalidManifest { path: path.to_path_buf(), message };
        let manifest: PluginManifest = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        manifest.check().map_err(invalid)?;
        Ok(manifest)
    }

    /// Reads and checks `dir/plugin.toml`.
    pub fn read(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io { path: path.clone(), source })?;
        Self::parse(&text, &path)
    }

    fn check(&self) -> Result<(), String> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self.id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
        if !id_ok {
            return Err(format!(
                "id `{}` must be 1-64 characters of lowercase letters, digits, `-`, `_` or `.`",
                self.id
            ));
        }
        if self.version.trim().is_empty() {
            return Err("version must not be empty".to_string());
        }
        let expected_world = world_name(self.kind);
        if self.wit.world != expected_world {
            return Err(format!(
                "a {} plugin implements the world `{expected_world}`, not `{}`",
                self.kind, self.wit.world
            ));
        }
        let file = Path::new(&self.wasm.file);
        if self.wasm.file.is_empty() || !file.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!("wasm.file `{}` must be a relative path inside the plugin folder", self.wasm.file));
        }
        let digest_ok = self.wasm.sha256.len() == 64
            && self.wasm.sha256.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
        if !digest_ok {
            return Err(format!("wasm.sha256 `{}` must be 64 lowercase hex digits", self.wasm.sha256));
        }
        if let Some(c) = self.capabilities.iter().find(|c| !c.available_to(self.kind)) {
            return Err(format!("capability `{c}` is not available to {} plugins", self.kind));
        }
        if self.limits.fuel_per_call == 0 || self.limits.memory_bytes == 0 {
            return Err("limits.fuel-per-call and limits.memory-bytes must be positive".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = "top-p"
version = "0.1.0"
kind = "sampler"
capabilities = ["random", "log"]

[wit]
world = "computepool:sampler/sampler"
version = "0.1.0"

[wasm]
file = "top_p.wasm"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"

[limits]
fuel-per-call = 123
"#;

    fn parse(text: &str) -> Result<PluginManifest, String> {
        PluginManifest::parse(text, Path::new("plugin.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_good_manifest_parses() {
        let m = parse(GOOD).unwrap();
        assert_eq!(m.id, "top-p");
        assert_eq!(m.kind, PluginKind::Sampler);
        assert_eq!(m.wit.version, WitVersion::V0_1_0);
        assert_eq!(m.capabilities, BTreeSet::from([Capability::Log, Capability::Random]));
        assert_eq!(m.limits.fuel_per_call, 123);
        assert_eq!(m.limits.memory_bytes, PluginLimits::default().memory_bytes);
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        let cases = [
            (GOOD.replace("id = \"top-p\"", "id = \"Top P\""), "id `Top P`"),
            (GOOD.replace("sampler/sampler", "sampler/other"), "implements the world"),
            (GOOD.replace("top_p.wasm", "../top_p.wasm"), "relative path"),
            (GOOD.replace("sha256 = \"0000", "sha256 = \"zz00"), "64 lowercase hex"),
            (GOOD.replace("\"random\", \"log\"", "\"http\""), "not available to sampler"),
            (GOOD.replace("\"random\", \"log\"", "\"sockets\""), "unknown capability `sockets`"),
            (GOOD.replace("version = \"0.1.0\"\n\n[wasm]", "version = \"0.1\"\n\n[wasm]"), "0.1"),
            (GOOD.replace("fuel-per-call", "fuel"), "unknown field"),
            (GOOD.replace("kind = \"sampler\"", "kind = \"tokenizer\""), "tokenizer"),
        ];
        for (text, needle) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(needle), "expected `{needle}` in: {err}");
        }
    }
}
