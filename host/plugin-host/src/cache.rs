//! Compiled components on disk, keyed by the wasm's SHA-256 and the engine fingerprint (wasmtime version,
//! target, settings): `<dir>/<fingerprint>/<wasm sha256>.cwasm`. A hit skips Cranelift entirely.
//!
//! Trust: a `.cwasm` file is native code the host maps and runs. The cache folder must be writable only
//! by the host's user, as its binary is. A file wasmtime cannot load (other version, corrupt) is
//! recompiled and replaced; a cache that cannot be written only costs the compile next time.

use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from the cache.
    Hit,
    /// Compiled, and written to the cache.
    Compiled,
    /// Compiled; there is no cache, or writing it failed (logged).
    CompiledUncached,
}

/// The on-disk cache; `None` compiles every time.
#[derive(Debug, Clone)]
pub struct CompiledCache {
    dir: Option<PathBuf>,
}

impl CompiledCache {
    /// A cache under `dir` (created on first write). Default: none.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: Some(dir.into()) }
    }

    pub fn disabled() -> Self {
        Self { dir: None }
    }

    /// The file a component with `wasm_sha256` compiled under `fingerprint` is cached in.
    pub fn path(&self, fingerprint: &str, wasm_sha256: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(fingerprint).join(format!("{wasm_sha256}.cwasm")))
    }

    /// The component for `wasm` (whose digest the caller checked), from the cache or compiled.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        fingerprint: &str,
        wasm_sha256: &str,
        wasm: &[u8],
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let Some(path) = self.path(fingerprint, wasm_sha256) else {
            return Ok((Component::new(engine, wasm)?, CacheOutcome::CompiledUncached));
        };
        // Read into memory rather than mapped: a mapped file truncated under the host (by an operator
        // cleaning the cache) would crash it with SIGBUS; a compiled plugin is small.
        if let Ok(bytes) = std::fs::read(&path) {
            // SAFETY: the file is one this cache wrote (see the module's trust note), for this engine's
            // fingerprint; wasmtime still checks its header and version and refuses a mismatch.
            match unsafe { Component::deserialize(engine, &bytes) } {
                Ok(component) => return Ok((component, CacheOutcome::Hit)),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "unusable cached component; recompiling"),
            }
        }
        let component = Component::new(engine, wasm)?;
        let outcome = match component.serialize().map_err(|e| e.to_string()).and_then(|bytes| write_atomically(&path, &bytes)) {
            Ok(()) => CacheOutcome::Compiled,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not cache the compiled component");
                CacheOutcome::CompiledUncached
            }
        };
        Ok((component, outcome))
    }
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().ok_or_else(|| format!("{} has no parent folder", path.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })
}
