//! The host's implementations of `computepool:host@0.1.0` (wit/host/0.1.0), and linking only the
//! capabilities a plugin was granted. Every kind's bindings reuse these (`with:` in their `bindgen!`).

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::component::{HasSelf, Linker};

use crate::capability::Capability;
use crate::host_state::{HostState, MAX_LOG_LINES_PER_CALL, MAX_LOG_MESSAGE_BYTES};
use crate::kv_store::KvError;

pub(crate) mod since_v0_1_0 {
    wasmtime::component::bindgen!({
        path: "../../wit/host/0.1.0",
        world: "computepool:host/capabilities@0.1.0",
        imports: { default: trappable },
    });
}

use since_v0_1_0::computepool::host::{clock, kv_store, log, random};

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        if self.log_lines >= MAX_LOG_LINES_PER_CALL {
            self.log_dropped += 1;
            return Ok(());
        }
        self.log_lines += 1;
        let mut message = message;
        if message.len() > MAX_LOG_MESSAGE_BYTES {
            let mut cut = MAX_LOG_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" …(truncated)");
        }
        let plugin = self.plugin_id.as_str();
        match level {
            log::Level::Trace => tracing::trace!(plugin, "{message}"),
            log::Level::Debug => tracing::debug!(plugin, "{message}"),
            log::Level::Info => tracing::info!(plugin, "{message}"),
            log::Level::Warn => tracing::warn!(plugin, "{message}"),
            log::Level::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }
}

impl clock::Host for HostState {
    fn monotonic_now_ns(&mut self) -> wasmtime::Result<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let start = START.get_or_init(Instant::now);
        Ok(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn wall_now_ms(&mut self) -> wasmtime::Result<u64> {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Ok(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
    }
}

impl HostState {
    fn request_random(&mut self) -> wasmtime::Result<&mut crate::random::RequestRandom> {
        self.random
            .as_mut()
            .ok_or_else(|| wasmtime::format_err!("computepool:host/random was called outside a request"))
    }
}

impl random::Host for HostState {
    fn next_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(self.request_random()?.next_u64())
    }

    fn next_f64(&mut self) -> wasmtime::Result<f64> {
        Ok(self.request_random()?.next_f64())
    }
}

fn kv_error(e: KvError) -> kv_store::KvError {
    match e {
        KvError::InvalidKey(limit) => kv_store::KvError::InvalidKey(limit),
        KvError::QuotaExceeded(limit) => kv_store::KvError::QuotaExceeded(limit),
    }
}

impl kv_store::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, kv_store::KvError>> {
        Ok(self.kv.get(&key).map_err(kv_error))
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), kv_store::KvError>> {
        Ok(self.kv.set(&key, value).map_err(kv_error))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<Result<bool, kv_store::KvError>> {
        Ok(self.kv.delete(&key).map_err(kv_error))
    }
}

/// Links the implementations of `granted` (and nothing else) into `linker`. A component importing
/// anything unlinked cannot be instantiated; the loader refuses it earlier with a clear error.
pub(crate) fn add_granted_to_linker(
    linker: &mut Linker<HostState>,
    granted: &BTreeSet<Capability>,
) -> wasmtime::Result<()> {
    for capability in granted {
        match capability {
            Capability::Log => log::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?,
            Capability::Clock => clock::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?,
            Capability::Random => random::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?,
            Capability::KvStore => kv_store::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?,
            // The granter denies unimplemented capabilities before linking; reaching here is a host bug.
            Capability::Http | Capability::Chain => {
                return Err(wasmtime::format_err!("capability `{capability}` has no implementation in this host"));
            }
        }
    }
    Ok(())
}
