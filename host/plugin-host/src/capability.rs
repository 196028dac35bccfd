//! Host capabilities: what a plugin may import from `computepool:host` (wit/host/<version>/).

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::manifest::PluginKind;
use crate::world::WitVersion;

/// One host interface a plugin can ask for in plugin.toml (`capabilities = ["log", "random"]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum Capability {
    /// `computepool:host/log`: messages into the host's tracing log, tagged with the plugin id.
    Log,
    /// `computepool:host/clock`: monotonic and wall-clock time.
    Clock,
    /// `computepool:host/random`: the request's seeded random stream.
    Random,
    /// `computepool:host/kv-store`: a key-value store scoped to the plugin id.
    KvStore,
    /// `computepool:host/http`: HTTP to granted hosts (`[grants.http]`).
    Http,
    /// `computepool:host/chain`: chain calls and transactions to granted contracts (`[grants.chain]`),
    /// signed with the host's key.
    Chain,
}

/// The package whose interfaces are capabilities.
pub const HOST_PACKAGE: &str = "computepool:host";

/// The versions of `computepool:host` this host implements.
pub const HOST_PACKAGE_VERSIONS: &[WitVersion] = &[WitVersion::V0_1_0];

impl Capability {
    pub const ALL: [Capability; 6] =
        [Capability::Log, Capability::Clock, Capability::Random, Capability::KvStore, Capability::Http, Capability::Chain];

    /// The name used in plugin.toml, the operator's config and WIT (`kv-store`).
    pub fn name(self) -> &'static str {
        match self {
            Capability::Log => "log",
            Capability::Clock => "clock",
            Capability::Random => "random",
            Capability::KvStore => "kv-store",
            Capability::Http => "http",
            Capability::Chain => "chain",
        }
    }

    /// Whether this host links an implementation (all of 0.1.0 since the payment issue). Kept so that a
    /// capability declared in a future WIT version before its implementation is refused by name.
    pub fn implemented(self) -> bool {
        true
    }

    /// Whether `kind`'s world imports this capability (the WIT files are the source of truth).
    pub fn available_to(self, kind: PluginKind) -> bool {
        match kind {
            PluginKind::Sampler => {
                matches!(self, Capability::Log | Capability::Clock | Capability::Random | Capability::KvStore)
            }
            PluginKind::PaymentRail | PluginKind::KeeperAdapter => self != Capability::Random,
            PluginKind::CoalitionVoter => !matches!(self, Capability::Random | Capability::Http),
        }
    }

    /// Maps a component import name such as `computepool:host/log@0.1.0` to its capability, if it is one
    /// of the host's interfaces at a version this host implements.
    pub fn from_import_name(import: &str) -> Option<Capability> {
        let rest = import.strip_prefix(HOST_PACKAGE)?.strip_prefix('/')?;
        let (interface, version) = rest.split_once('@')?;
        let version: WitVersion = version.parse().ok()?;
        if !HOST_PACKAGE_VERSIONS.contains(&version) {
            return None;
        }
        interface.parse().ok()
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Capability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Capability::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            let known = Capability::ALL.map(|c| c.name()).join(", ");
            format!("unknown capability `{s}` (known: {known})")
        })
    }
}

impl TryFrom<String> for Capability {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_names_map_to_capabilities() {
        assert_eq!(Capability::from_import_name("computepool:host/log@0.1.0"), Some(Capability::Log));
        assert_eq!(Capability::from_import_name("computepool:host/kv-store@0.1.0"), Some(Capability::KvStore));
        assert_eq!(Capability::from_import_name("computepool:host/log@9.0.0"), None);
        assert_eq!(Capability::from_import_name("wasi:filesystem/types@0.2.0"), None);
        assert_eq!(Capability::from_import_name("computepool:host/sockets@0.1.0"), None);
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_listed() {
        for c in Capability::ALL {
            assert_eq!(c.name().parse::<Capability>(), Ok(c));
        }
        let err = "network".parse::<Capability>().unwrap_err();
        assert!(err.contains("network") && err.contains("kv-store"), "{err}");
    }
}
