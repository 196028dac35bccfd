//! What a plugin's store holds: who the plugin is, its memory limiter, and the per-request state its
//! capabilities act on. One per instance; the request parts are swapped in for each call.

use crate::chain_capability::ChainAccess;
use crate::http_capability::HttpAccess;
use crate::kv_store::KvScope;
use crate::limits::MemoryLimiter;
use crate::random::RequestRandom;

/// Longest log message kept, in bytes; longer ones are cut (at a character boundary) and marked.
pub const MAX_LOG_MESSAGE_BYTES: usize = 4096;

/// Log lines one call may write; past this they are counted and dropped.
pub const MAX_LOG_LINES_PER_CALL: u32 = 64;

#[derive(Debug)]
pub struct HostState {
    pub(crate) plugin_id: String,
    pub(crate) limiter: MemoryLimiter,
    /// The current request's stream, present only during a call that has one.
    pub(crate) random: Option<RequestRandom>,
    pub(crate) kv: KvScope,
    pub(crate) log_lines: u32,
    pub(crate) log_dropped: u32,
    /// The `http` grant, when the plugin has one.
    pub(crate) http: Option<HttpAccess>,
    /// The `chain` grant, when the plugin has one.
    pub(crate) chain: Option<ChainAccess>,
}

impl HostState {
    pub(crate) fn new(plugin_id: &str, memory_bytes: u64, kv: KvScope) -> Self {
        Self {
            plugin_id: plugin_id.to_string(),
            limiter: MemoryLimiter::new(memory_bytes),
            random: None,
            kv,
            log_lines: 0,
            log_dropped: 0,
            http: None,
            chain: None,
        }
    }

    /// Adds the network capabilities the plugin was granted.
    pub(crate) fn with_network(mut self, http: Option<HttpAccess>, chain: Option<ChainAccess>) -> Self {
        self.http = http;
        self.chain = chain;
        self
    }

    /// Clears the per-call counters before a call.
    pub(crate) fn begin_call(&mut self) {
        self.log_lines = 0;
        self.log_dropped = 0;
    }

    /// Reports what the call's log budget dropped, after a call.
    pub(crate) fn end_call(&mut self) {
        if self.log_dropped > 0 {
            tracing::warn!(plugin = %self.plugin_id, dropped = self.log_dropped, "plugin log lines dropped (per-call limit)");
        }
    }
}
