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

use since_v0_1_0::computepool::host::{chain, clock, http, kv_store, log, random};

use crate::chain_capability::{ChainCallError, TxReceipt};
use crate::http_capability::{HttpError, HttpRequest};

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
        KvError::Unavailable(message) => kv_store::KvError::Unavailable(message),
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

fn http_error(e: HttpError) -> http::HttpError {
    match e {
        HttpError::HostNotGranted(h) => http::HttpError::HostNotGranted(h),
        HttpError::InvalidRequest(m) => http::HttpError::InvalidRequest(m),
        HttpError::TooLarge(n) => http::HttpError::TooLarge(n),
        HttpError::Timeout => http::HttpError::Timeout,
        HttpError::Transport(m) => http::HttpError::Transport(m),
    }
}

impl http::Host for HostState {
    fn send(&mut self, request: http::Request) -> wasmtime::Result<Result<http::Response, http::HttpError>> {
        // Linked only for plugins granted `http`, and then `http` is always set: missing is a host bug.
        let access = self.http.clone().ok_or_else(|| wasmtime::format_err!("computepool:host/http linked without a grant"))?;
        let request = HttpRequest {
            method: request.method,
            url: request.url,
            headers: request.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            body: request.body,
        };
        let (method, url) = (request.method.clone(), request.url.clone());
        let result = access.service.send(&access.grants, request);
        match &result {
            Ok(r) => tracing::debug!(plugin = %self.plugin_id, %method, %url, status = r.status, "plugin http"),
            Err(e) => tracing::info!(plugin = %self.plugin_id, %method, %url, error = %e, "plugin http refused or failed"),
        }
        Ok(result
            .map(|r| http::Response {
                status: r.status,
                headers: r.headers.into_iter().map(|(name, value)| http::Header { name, value }).collect(),
                body: r.body,
            })
            .map_err(http_error))
    }
}

fn chain_error(e: ChainCallError) -> chain::ChainError {
    match e {
        ChainCallError::ContractNotGranted(a) => chain::ChainError::ContractNotGranted(a),
        ChainCallError::Reverted(m) => chain::ChainError::Reverted(m),
        ChainCallError::InvalidCall(m) => chain::ChainError::InvalidCall(m),
        ChainCallError::Unavailable(m) => chain::ChainError::Unavailable(m),
        ChainCallError::InDoubt(m) => chain::ChainError::InDoubt(m),
    }
}

impl HostState {
    fn chain_access(&self) -> wasmtime::Result<crate::chain_capability::ChainAccess> {
        self.chain.clone().ok_or_else(|| wasmtime::format_err!("computepool:host/chain linked without a grant"))
    }
}

impl chain::Host for HostState {
    fn chain_id(&mut self) -> wasmtime::Result<Result<u64, chain::ChainError>> {
        Ok(Ok(self.chain_access()?.service.chain_id()))
    }

    fn sender(&mut self) -> wasmtime::Result<Result<String, chain::ChainError>> {
        Ok(Ok(format!("{:#x}", self.chain_access()?.service.sender())))
    }

    fn call(&mut self, to: String, data: Vec<u8>) -> wasmtime::Result<Result<Vec<u8>, chain::ChainError>> {
        let access = self.chain_access()?;
        Ok(access.service.call(&access.contracts, &to, data).map_err(chain_error))
    }

    fn send_transaction(&mut self, tx: chain::Transaction) -> wasmtime::Result<Result<chain::TxReceipt, chain::ChainError>> {
        let access = self.chain_access()?;
        let result =
            access.service.send_transaction(&self.plugin_id, &access.contracts, &tx.to, tx.data, &tx.value_wei, &tx.idempotency_key);
        match &result {
            Ok(r) => tracing::info!(plugin = %self.plugin_id, to = %tx.to, key = %tx.idempotency_key, hash = %r.hash, block = r.block_number, success = r.success, "plugin transaction"),
            Err(e) => tracing::warn!(plugin = %self.plugin_id, to = %tx.to, key = %tx.idempotency_key, error = %e, "plugin transaction refused or failed"),
        }
        Ok(result
            .map(|TxReceipt { hash, block_number, block_timestamp, success }| chain::TxReceipt { hash, block_number, block_timestamp, success })
            .map_err(chain_error))
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
            Capability::Http => http::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?,
            Capability::Chain => chain::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?,
        }
    }
    Ok(())
}
