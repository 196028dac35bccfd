//! Per-call limits: fuel, linear memory, and what happens when a plugin fails. The plugin asks for its
//! limits in plugin.toml; the operator's [`LimitCeilings`] cap them (a plugin asking for more is refused).
//! [`MemoryLimiter`] is the wasmtime `ResourceLimiter` every store gets, next to its defaults.

use serde::Deserialize;
use wasmtime::ResourceLimiter;

/// What the host does when a call into a plugin fails (trap, fuel or memory exhausted, contract breach).
/// In every case the failed instance is dropped and the next call gets a fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// The failing request gets the error; the plugin keeps serving other calls. Default.
    #[default]
    FailRequest,
    /// As `fail-request`, and after [`PluginLimits::disable_after`] consecutive failures the plugin is
    /// disabled: every call is refused until it is reloaded.
    Disable,
}

/// Limits of one plugin, from the `[limits]` table of its plugin.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginLimits {
    /// Fuel (roughly one unit per WebAssembly instruction) one call may burn before it traps. Default
    /// 1,000,000,000 (about a second of pure compute). Enabling fuel costs a few percent of guest speed;
    /// the top-p sampler burns about 36 million on a 128,256-entry row of flat random logits, its worst case
    /// (a wide nucleus to sort; tests/samplers.rs), and far less on a model's peaked rows.
    pub fuel_per_call: u64,
    /// Most bytes of linear memory an instance may hold (its initial memory included). Default 64 MiB.
    /// Memory stays allocated while the instance is pooled between calls.
    pub memory_bytes: u64,
    /// What a failure does. Default `fail-request`.
    pub failure_policy: FailurePolicy,
    /// Consecutive failed calls after which a `disable` plugin is disabled. Default 3. Ignored with
    /// `fail-request`.
    pub disable_after: u32,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            fuel_per_call: 1_000_000_000,
            memory_bytes: 64 << 20,
            failure_policy: FailurePolicy::FailRequest,
            disable_after: 3,
        }
    }
}

/// The operator's ceilings on what any plugin may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitCeilings {
    /// Largest `fuel-per-call` a plugin may ask for. Default 20,000,000,000.
    pub max_fuel_per_call: u64,
    /// Largest `memory-bytes` a plugin may ask for. Default 1 GiB. Each pooled instance can hold this much.
    pub max_memory_bytes: u64,
}

impl Default for LimitCeilings {
    fn default() -> Self {
        Self { max_fuel_per_call: 20_000_000_000, max_memory_bytes: 1 << 30 }
    }
}

/// Bounds one store's linear memory and counts of instances, tables and memories, and remembers
/// whether the memory limit was what stopped the guest (so the error says so instead of "trap").
#[derive(Debug, Clone)]
pub struct MemoryLimiter {
    memory_bytes: usize,
    /// The size the guest asked to grow to, when that passed the limit.
    exceeded: Option<usize>,
}

/// Table elements an instance may hold: enough for any plugin's function table.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Instances, tables and memories per store: a component instantiates a handful of core instances.
const MAX_INSTANCES: usize = 100;

impl MemoryLimiter {
    pub fn new(memory_bytes: u64) -> Self {
        Self { memory_bytes: usize::try_from(memory_bytes).unwrap_or(usize::MAX), exceeded: None }
    }

    /// The size the guest tried to grow to past the limit, if it did.
    pub fn exceeded(&self) -> Option<usize> {
        self.exceeded
    }

    pub fn limit(&self) -> usize {
        self.memory_bytes
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.exceeded = Some(desired);
            // A trap rather than `memory.grow` returning -1: guests abort on a failed allocation anyway, and
            // a trap stops the call at the spot, with the limit in the error.
            return Err(wasmtime::format_err!(
                "memory limit: the plugin tried to grow its memory to {desired} bytes; its limit is {} bytes",
                self.memory_bytes
            ));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_INSTANCES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_refuses_growth_past_the_limit_and_remembers_it() {
        let mut limiter = MemoryLimiter::new(1 << 20);
        assert!(limiter.memory_growing(0, 1 << 20, None).unwrap());
        assert_eq!(limiter.exceeded(), None);
        let err = limiter.memory_growing(1 << 20, 2 << 20, None).unwrap_err();
        assert!(err.to_string().contains("2097152"), "{err}");
        assert_eq!(limiter.exceeded(), Some(2 << 20));
    }

    #[test]
    fn limits_parse_in_kebab_case_with_defaults() {
        let limits: PluginLimits = toml::from_str("fuel-per-call = 5\nfailure-policy = \"disable\"").unwrap();
        assert_eq!(limits.fuel_per_call, 5);
        assert_eq!(limits.failure_policy, FailurePolicy::Disable);
        assert_eq!(limits.memory_bytes, PluginLimits::default().memory_bytes);
        assert!(toml::from_str::<PluginLimits>("fuel = 5").is_err());
    }
}
