//! Capability grants: what the operator's config allows each plugin to import. Pure and small, so it can be
//! read in one sitting and tested exhaustively.
//!
//! ```toml
//! # the operator's plugins config
//! [grants]
//! default = ["log", "clock", "random"]     # every plugin
//! [grants.plugins]
//! top-p = ["kv-store"]                     # added for one plugin id
//! x402-exact = ["http", "kv-store"]
//! superfluid-gda = ["chain"]
//! [grants.http]                            # the hosts (host or host:port) each plugin may reach
//! x402-exact = ["127.0.0.1:4021", "facilitator.example.com"]
//! [grants.chain]                           # the contracts each plugin may call and send to
//! superfluid-gda = ["0xBcC58fb72409BA1CdEc5dBcDD3Cd6c42E3e04242"]
//! ```
//!
//! `http` and `chain` are granted like any capability, and also need their scope: a plugin granted `http`
//! with no hosts listed (or `chain` with no contracts) is refused at load, naming what is missing.

use std::collections::{BTreeMap, BTreeSet};

use computepool_chain::alloy::primitives::Address;
use serde::Deserialize;

use crate::capability::Capability;
use crate::http_capability::HostGrant;

/// The operator's grants.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrantPolicy {
    /// Granted to every plugin. Default: `log`, `clock`, `random` (none of them reaches outside the host).
    pub default: BTreeSet<Capability>,
    /// Granted to one plugin id on top of `default`. Default: none.
    pub plugins: BTreeMap<String, BTreeSet<Capability>>,
    /// The hosts each plugin id may reach through `http`. Default: none.
    pub http: BTreeMap<String, BTreeSet<HostGrant>>,
    /// The contracts each plugin id may call and send transactions to through `chain`. Default: none.
    pub chain: BTreeMap<String, BTreeSet<Address>>,
}

impl Default for GrantPolicy {
    fn default() -> Self {
        Self {
            default: BTreeSet::from([Capability::Log, Capability::Clock, Capability::Random]),
            plugins: BTreeMap::new(),
            http: BTreeMap::new(),
            chain: BTreeMap::new(),
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
    /// Requested and granted, but with no scope: `http` without hosts, `chain` without contracts.
    pub unscoped: Vec<Capability>,
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
        for c in &self.unscoped {
            let (table, what) = if *c == Capability::Http { ("http", "\"host:port\"") } else { ("chain", "\"0x…contract\"") };
            parts.push(format!(
                "`{c}` is granted but with nothing to reach (add [grants.{table}] {} = [{what}])",
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
        let unscoped: Vec<Capability> = requested
            .iter()
            .copied()
            .filter(|c| granted.contains(c))
            .filter(|c| match c {
                Capability::Http => self.http_hosts(plugin).is_empty(),
                Capability::Chain => self.chain_contracts(plugin).is_empty(),
                _ => false,
            })
            .collect();
        if not_granted.is_empty() && not_implemented.is_empty() && unscoped.is_empty() {
            Ok(requested.clone())
        } else {
            Err(CapabilityDenied { plugin: plugin.to_string(), not_granted, not_implemented, unscoped })
        }
    }

    /// The hosts `plugin` may reach through `http`.
    pub fn http_hosts(&self, plugin: &str) -> Vec<HostGrant> {
        self.http.get(plugin).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// The contracts `plugin` may reach through `chain`.
    pub fn chain_contracts(&self, plugin: &str) -> BTreeSet<Address> {
        self.chain.get(plugin).cloned().unwrap_or_default()
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
    fn http_and_chain_need_their_scope() {
        let mut policy = GrantPolicy { default: set(&[Http, Chain, Log]), ..GrantPolicy::default() };
        let denied = policy.grant("rail", &set(&[Http, Chain, Log])).unwrap_err();
        assert_eq!(denied.not_granted, vec![]);
        assert_eq!(denied.unscoped, vec![Http, Chain]);
        let message = denied.to_string();
        assert!(message.contains("[grants.http] rail") && message.contains("[grants.chain] rail"), "{message}");
        policy.http.insert("rail".into(), BTreeSet::from(["127.0.0.1:4021".parse().unwrap()]));
        policy.chain.insert("rail".into(), BTreeSet::from([Address::repeat_byte(1)]));
        assert!(policy.grant("rail", &set(&[Http, Chain, Log])).is_ok());
        // Another plugin's scope is not this one's.
        assert_eq!(policy.grant("other", &set(&[Http])).unwrap_err().unscoped, vec![Http]);
    }

    #[test]
    fn scopes_parse_from_the_operator_config() {
        let policy: GrantPolicy = toml::from_str(
            "[plugins]\nx = [\"http\", \"chain\"]\n[http]\nx = [\"127.0.0.1:4021\", \"f.example.com\"]\n\
             [chain]\nx = [\"0xBcC58fb72409BA1CdEc5dBcDD3Cd6c42E3e04242\"]",
        )
        .unwrap();
        assert_eq!(policy.http_hosts("x").len(), 2);
        assert_eq!(policy.chain_contracts("x").len(), 1);
        assert!(policy.grant("x", &set(&[Http, Chain])).is_ok());
        assert!(toml::from_str::<GrantPolicy>("[http]\nx = [\"https://f.example.com\"]").is_err());
        assert!(toml::from_str::<GrantPolicy>("[chain]\nx = [\"0x12\"]").is_err());
    }

    #[test]
    fn grants_parse_from_the_operator_config() {
        let policy: GrantPolicy = toml::from_str("default = [\"log\"]\n[plugins]\nx = [\"kv-store\"]").unwrap();
        assert_eq!(policy.granted("x"), set(&[Log, KvStore]));
        assert!(toml::from_str::<GrantPolicy>("default = [\"sockets\"]").is_err());
    }
}
