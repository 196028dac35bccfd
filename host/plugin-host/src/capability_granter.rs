//! Capability grants: what the operator's config allows each plugin to import. Pure and small, so it can be
//! read in one sitting and tested exhaustively.
//!
//! ```toml
//! # the operator's plugins config
//! [grants]
//! default = ["log", "clock", "random"]     # every plugin
//! [grants.plugins]
//! top-p = ["kv-store"]                     # added for one plugin id
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::capability::Capability;

/// The operator's grants.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrantPolicy {
    /// Granted to every plugin. Default: `log`, `clock`, `random` (none of them reaches outside the host).
    pub default: BTreeSet<Capability>,
    /// Granted to one plugin id on top of `default`. Default: none.
    pub plugins: BTreeMap<String, BTreeSet<Capability>>,
}

impl Default for GrantPolicy {
    fn default() -> Self {
        Self {
            default: BTreeSet::from([Capability::Log, Capability::Clock, Capability::Random]),
            plugins: BTreeMap::new(),
        }
    }
}

/// A plugin asked for capabilities the operator did not grant, or that this host does not implement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct CapabilityDenied {
    pub plugin: String,
    /// Requested, not granted by the operator's config.
    pub not_granted: Vec<Capability>,
    /// Requested and granted, but this host does not implement them yet.
    pub not_implemented: Vec<Capability>,
}

impl CapabilityDenied {
    fn message(&self) -> String {
        let list = |caps: &[Capability]| caps.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ");
        let mut parts = Vec::new();
        if !self.not_granted.is_empty() {
            parts.push(format!(
                "the operator's config does not grant {} (add to [grants] default or [grants.plugins] {})",
                list(&self.not_granted),
                self.plugin
            ));
        }
        if !self.not_implemented.is_empty() {
            parts.push(format!("this host does not implement {} yet", list(&self.not_implemented)));
        }
        format!("plugin `{}` is denied capabilities: {}", self.plugin, parts.join("; "))
    }
}

impl GrantPolicy {
    /// Everything `plugin` is granted.
    pub fn granted(&self, plugin: &str) -> BTreeSet<Capability> {
        let mut granted = self.default.clone();
        if let Some(extra) = self.plugins.get(plugin) {
            granted.extend(extra.iter().copied());
        }
        granted
    }

    /// Grants `requested` to `plugin`, or says everything that is missing.
    pub fn grant(&self, plugin: &str, requested: &BTreeSet<Capability>) -> Result<BTreeSet<Capability>, CapabilityDenied> {
        let granted = self.granted(plugin);
        let not_granted: Vec<Capability> = requested.difference(&granted).copied().collect();
        let not_implemented: Vec<Capability> =
            requested.iter().copied().filter(|c| granted.contains(c) && !c.implemented()).collect();
        if not_granted.is_empty() && not_implemented.is_empty() {
            Ok(requested.clone())
        } else {
            Err(CapabilityDenied { plugin: plugin.to_string(), not_granted, not_implemented })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Capability::*;

    fn set(caps: &[Capability]) -> BTreeSet<Capability> {
        caps.iter().copied().collect()
    }

    #[test]
    fn default_grants_cover_samplers() {
        let policy = GrantPolicy::default();
        assert_eq!(policy.grant("top-p", &set(&[Random, Log])), Ok(set(&[Random, Log])));
        assert_eq!(policy.grant("greedy", &set(&[])), Ok(set(&[])));
    }

    #[test]
    fn a_denial_names_every_missing_capability() {
        let policy = GrantPolicy::default();
        let denied = policy.grant("voter", &set(&[Log, KvStore, Http])).unwrap_err();
        assert_eq!(denied.not_granted, vec![KvStore, Http]);
        let message = denied.to_string();
        assert!(message.contains("`kv-store`") && message.contains("`http`") && message.contains("voter"), "{message}");
        assert!(!message.contains("`log`"), "{message}");
    }

    #[test]
    fn per_plugin_grants_add_to_the_default_and_only_for_that_plugin() {
        let mut policy = GrantPolicy::default();
        policy.plugins.insert("cache-sampler".into(), set(&[KvStore]));
        assert!(policy.grant("cache-sampler", &set(&[KvStore, Random])).is_ok());
        assert!(policy.grant("other", &set(&[KvStore])).is_err());
    }

    #[test]
    fn granted_but_unimplemented_capabilities_are_denied_by_name() {
        let policy = GrantPolicy { default: set(&[Http, Chain, Log]), plugins: BTreeMap::new() };
        let denied = policy.grant("rail", &set(&[Http, Log])).unwrap_err();
        assert_eq!(denied.not_granted, vec![]);
        assert_eq!(denied.not_implemented, vec![Http]);
        assert!(denied.to_string().contains("does not implement `http`"), "{denied}");
    }

    #[test]
    fn grants_parse_from_the_operator_config() {
        let policy: GrantPolicy = toml::from_str("default = [\"log\"]\n[plugins]\nx = [\"kv-store\"]").unwrap();
        assert_eq!(policy.granted("x"), set(&[Log, KvStore]));
        assert!(toml::from_str::<GrantPolicy>("default = [\"sockets\"]").is_err());
    }
}
