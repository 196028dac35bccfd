//! Engine and compile settings, in one place. Everything here changes the machine code wasmtime produces,
//! so all of it goes into [`EngineSettings::fingerprint`], the compiled-component cache's key.

use std::hash::{Hash, Hasher};

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, OptLevel};

/// The wasmtime release the host is built against (Cargo.toml pins it exactly). Part of the cache key.
pub const WASMTIME_VERSION: &str = "48.0.8";

/// How plugins are compiled and run. Compilation is single-threaded (wasmtime's `parallel-compilation`
/// feature, and its rayon dependency, are left out): plugins are small and compiled once, then cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSettings {
    /// Cranelift optimisation. Default `true` (speed): compiling takes longer (tens of ms per plugin, once,
    /// then cached on disk), calls run faster. `false` compiles without optimisation.
    pub optimize: bool,
    /// Most bytes of native stack a call may use before it traps (deep recursion). Default 512 KiB.
    pub max_wasm_stack: usize,
    /// Fuel metering, the bound on every call. Default `true`. `false` exists only to measure what
    /// metering costs (`computepool plugin bench`): without it a call's running time has no bound, so a
    /// host serving requests must never turn it off. Not in the operator's config.
    pub fuel: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self { optimize: true, max_wasm_stack: 512 << 10, fuel: true }
    }
}

/// Feeds `Hash` output into SHA-256, so wasmtime's compatibility hash can go into a stable file name.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        // Only the SHA-256 digest is used; `Hasher` requires this method.
        0
    }
}

impl EngineSettings {
    /// The wasmtime `Engine` for these settings. Fuel is how every call is bounded (see [`Self::fuel`]).
    pub fn build(&self) -> wasmtime::Result<Engine> {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .consume_fuel(self.fuel)
            .max_wasm_stack(self.max_wasm_stack)
            .cranelift_opt_level(if self.optimize { OptLevel::Speed } else { OptLevel::None });
        Engine::new(&config)
    }

    /// A hex digest of everything that makes compiled code reusable: the wasmtime version, wasmtime's own
    /// compatibility hash of `engine` (its target and settings) and these settings.
    pub fn fingerprint(&self, engine: &Engine) -> String {
        let mut hasher = Sha256Hasher(Sha256::new());
        hasher.write(WASMTIME_VERSION.as_bytes());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        hasher.write(format!("{self:?}").as_bytes());
        hex::encode(hasher.0.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_follows_the_settings() {
        let a = EngineSettings::default();
        let b = EngineSettings { optimize: false, ..EngineSettings::default() };
        let (ea, eb) = (a.build().unwrap(), b.build().unwrap());
        assert_eq!(a.fingerprint(&ea), a.fingerprint(&a.build().unwrap()));
        assert_ne!(a.fingerprint(&ea), b.fingerprint(&eb));
        assert_eq!(a.fingerprint(&ea).len(), 64);
    }
}
