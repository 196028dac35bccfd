//! WIT worlds and versions: which kind a world belongs to and which versions this host serves.
//!
//! A version is a file (`sampler/since_v0_1_0.rs`), frozen once released; a new version is a new file
//! plus one arm here. The host keeps serving every version listed.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::manifest::PluginKind;

/// A WIT package version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct WitVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl WitVersion {
    pub const V0_1_0: WitVersion = WitVersion { major: 0, minor: 1, patch: 0 };
}

impl fmt::Display for WitVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FromStr for WitVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('.').collect();
        let parse = |p: &str| p.parse::<u32>().map_err(|_| format!("`{s}` is not a version like 0.1.0"));
        match parts.as_slice() {
            [major, minor, patch] => Ok(WitVersion { major: parse(major)?, minor: parse(minor)?, patch: parse(patch)? }),
            _ => Err(format!("`{s}` is not a version like 0.1.0")),
        }
    }
}

impl TryFrom<String> for WitVersion {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// The WIT world a plugin of `kind` implements, e.g. `computepool:sampler/sampler`.
pub fn world_name(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Sampler => "computepool:sampler/sampler",
        PluginKind::PaymentRail => "computepool:payment-rail/payment-rail",
        PluginKind::KeeperAdapter => "computepool:keeper-adapter/keeper-adapter",
        PluginKind::CoalitionVoter => "computepool:coalition-voter/coalition-voter",
    }
}

/// The versions of `kind`'s world this host can run, oldest first. Empty for kinds whose contract is
/// defined in wit/ but whose host side comes with a later issue.
pub fn supported_versions(kind: PluginKind) -> &'static [WitVersion] {
    match kind {
        PluginKind::Sampler => crate::sampler::SUPPORTED_VERSIONS,
        PluginKind::PaymentRail => crate::rail::SUPPORTED_VERSIONS,
        PluginKind::KeeperAdapter => crate::keeper::SUPPORTED_VERSIONS,
        PluginKind::CoalitionVoter => &[],
    }
}

/// Formats a list of versions for an error message: "0.1.0, 0.2.0", or "none yet".
pub fn list_versions(versions: &[WitVersion]) -> String {
    if versions.is_empty() {
        return "none yet".to_string();
    }
    versions.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_print() {
        assert_eq!("0.1.0".parse::<WitVersion>(), Ok(WitVersion::V0_1_0));
        assert_eq!(WitVersion { major: 1, minor: 22, patch: 3 }.to_string(), "1.22.3");
        assert!("0.1".parse::<WitVersion>().is_err());
        assert!("0.1.x".parse::<WitVersion>().is_err());
        assert_eq!(list_versions(&[]), "none yet");
    }
}
