//! The host side of `computepool:host/chain`: `eth_call` and signed transactions to the contracts the
//! operator granted one plugin, through host/chain's [`Chain`] (its key, its nonce counter, its gas
//! headroom). The plugin never sees the key; it learns the signer's address (`sender`) because contract
//! calls such as Superfluid's `distributeFlow(token, from, …)` name it.
//!
//! Idempotency: each send carries a key, scoped to the plugin. The host records the key before it sends
//! and the receipt once mined; a retry with a recorded receipt gets that receipt and sends nothing. With a
//! state directory the record is a JSON-lines file, fsynced at each step, so it survives a restart: a key
//! whose send finished is answered from the file; a key whose send was under way when the host stopped is
//! `in-doubt` (it may be on chain; the host will not send it again — the operator or the rail's own
//! reconciliation decides). Without a state directory the record lives in memory (one process).
//!
//! One window remains where a retry can send twice: the node accepted the transaction but the transport
//! failed before saying so (`unavailable`, retry "safe"): `Chain` then asks the node for the nonce again
//! and the retry gets a new one. Waiting for the receipt, by contrast, is `in-doubt`, never retried.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use computepool_chain::alloy::network::TransactionBuilder;
use computepool_chain::alloy::primitives::{Address, B256, Bytes, U256};
use computepool_chain::alloy::providers::Provider;
use computepool_chain::alloy::rpc::types::TransactionRequest;
use computepool_chain::client::{RECEIPT_TIMEOUT, decode_revert};
use computepool_chain::{Chain, ChainError};
use serde::{Deserialize, Serialize};

use crate::blocking;

/// Deadline of an `eth_call` (and of the reads around a send).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// Largest calldata a plugin may send, in bytes.
pub const MAX_CALLDATA_BYTES: usize = 128 << 10;

/// Mirrors WIT's `chain-error` one-to-one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainCallError {
    #[error("contract {0} is not granted to this plugin")]
    ContractNotGranted(String),
    #[error("reverted: {0}")]
    Reverted(String),
    #[error("invalid call: {0}")]
    InvalidCall(String),
    #[error("chain unavailable: {0}")]
    Unavailable(String),
    #[error("in doubt: {0}")]
    InDoubt(String),
}

/// A mined transaction, as WIT's `tx-receipt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxReceipt {
    pub hash: String,
    pub block_number: u64,
    pub block_timestamp: u64,
    pub success: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
enum SendRecord {
    /// Recorded before sending.
    Intent,
    /// Mined; the receipt.
    Done { receipt: TxReceipt },
    /// Nothing was sent (refused before broadcast); the key is free again.
    Abandoned,
}

#[derive(Serialize, Deserialize)]
struct LogLine {
    plugin: String,
    key: String,
    #[serde(flatten)]
    record: SendRecord,
}

/// The idempotency record: in memory, and appended to a file when the host has a state directory.
struct SendLog {
    path: Option<PathBuf>,
    /// The last record per (plugin, key). Intents read from the file at start-up are in doubt.
    records: HashMap<(String, String), SendRecord>,
    /// Keys being sent by this process right now.
    in_flight: HashSet<(String, String)>,
}

impl SendLog {
    fn open(path: Option<PathBuf>) -> Result<Self, String> {
        let mut records = HashMap::new();
        if let Some(path) = &path {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                        match serde_json::from_str::<LogLine>(line) {
                            Ok(l) => {
                                records.insert((l.plugin, l.key), l.record);
                            }
                            // A torn last line (the host died mid-write) is the only expected damage:
                            // its send had not started, since the intent is synced before sending.
                            Err(e) => tracing::warn!(path = %path.display(), line = n + 1, error = %e, "chain send log: unreadable line skipped"),
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("reading {}: {e}", path.display())),
            }
        }
        Ok(Self { path, records, in_flight: HashSet::new() })
    }

    fn write(&mut self, plugin: &str, key: &str, record: SendRecord) -> Result<(), String> {
        if let Some(path) = &self.path {
            let line = serde_json::to_string(&LogLine { plugin: plugin.into(), key: key.into(), record: record.clone() })
                .map_err(|e| e.to_string())?;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
            writeln!(file, "{line}").and_then(|()| file.sync_data()).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        self.records.insert((plugin.into(), key.into()), record);
        Ok(())
    }
}

/// The chain connection, signing key and idempotency record the `chain` capability uses. One per host.
pub struct ChainService {
    chain: Chain,
    log: Mutex<SendLog>,
}

impl fmt::Debug for ChainService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainService").field("chain", &self.chain).finish_non_exhaustive()
    }
}

/// The file the send record is kept in, inside the host's state directory.
pub const SEND_LOG_FILE: &str = "chain-sends.jsonl";

impl ChainService {
    /// Serves the `chain` capability with `chain` (its key signs every plugin's transactions). With
    /// `state_dir`, the idempotency record is kept in `state_dir/chain-sends.jsonl` and survives restarts.
    ///
    /// `chain` should be connected on the host's I/O runtime ([`crate::blocking::handle`]) or on one that
    /// lives as long as the host: its HTTP connection pool runs tasks on the runtime it was created on.
    pub fn new(chain: Chain, state_dir: Option<&Path>) -> Result<Self, String> {
        let path = match state_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                Some(dir.join(SEND_LOG_FILE))
            }
            None => None,
        };
        Ok(Self { chain, log: Mutex::new(SendLog::open(path)?) })
    }

    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    fn lock_log(&self) -> std::sync::MutexGuard<'_, SendLog> {
        // Every update is one insert after the file write; a panic cannot leave the map half-changed.
        self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn chain_id(&self) -> u64 {
        self.chain.chain_id()
    }

    pub fn sender(&self) -> Address {
        self.chain.address()
    }

    /// `eth_call` to `to` at the latest block.
    pub fn call(&self, granted: &BTreeSet<Address>, to: &str, data: Vec<u8>) -> Result<Vec<u8>, ChainCallError> {
        let to = check_contract(granted, to)?;
        if data.len() > MAX_CALLDATA_BYTES {
            return Err(ChainCallError::InvalidCall(format!("{} bytes of calldata, over the limit of {MAX_CALLDATA_BYTES}", data.len())));
        }
        let provider = self.chain.provider().clone();
        let tx = TransactionRequest::default().with_to(to).with_input(Bytes::from(data));
        let result = blocking::block_on(async move { provider.call(tx).await }, CALL_TIMEOUT)
            .map_err(|_| ChainCallError::Unavailable(format!("eth_call to {to}: no answer within {CALL_TIMEOUT:?}")))?;
        match result {
            Ok(bytes) => Ok(bytes.to_vec()),
            Err(e) => match e.as_error_resp().and_then(|r| r.as_revert_data()) {
                Some(data) => Err(ChainCallError::Reverted(decode_revert(&data))),
                None => Err(ChainCallError::Unavailable(format!("eth_call to {to}: {e}"))),
            },
        }
    }

    /// Signs and sends a transaction to `to` and waits for its receipt; idempotent per (`plugin`, `key`).
    pub fn send_transaction(
        &self,
        plugin: &str,
        granted: &BTreeSet<Address>,
        to: &str,
        data: Vec<u8>,
        value_wei: &str,
        key: &str,
    ) -> Result<TxReceipt, ChainCallError> {
        let to = check_contract(granted, to)?;
        let invalid = ChainCallError::InvalidCall;
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(invalid(format!("the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes")));
        }
        if data.len() > MAX_CALLDATA_BYTES {
            return Err(invalid(format!("{} bytes of calldata, over the limit of {MAX_CALLDATA_BYTES}", data.len())));
        }
        let value = if value_wei.is_empty() {
            U256::ZERO
        } else {
            U256::from_str_radix(value_wei, 10).map_err(|_| invalid(format!("value-wei `{value_wei}` is not a decimal number")))?
        };
        let id = (plugin.to_string(), key.to_string());
        {
            let mut log = self.lock_log();
            match log.records.get(&id) {
                Some(SendRecord::Done { receipt }) => return Ok(receipt.clone()),
                Some(SendRecord::Intent) if !log.in_flight.contains(&id) => {
                    return Err(ChainCallError::InDoubt(format!(
                        "a send with idempotency key `{key}` was under way when the host stopped; it may be on chain"
                    )));
                }
                _ => {}
            }
            if !log.in_flight.insert(id.clone()) {
                return Err(ChainCallError::Unavailable(format!("a send with idempotency key `{key}` is under way; retry")));
            }
            if let Err(e) = log.write(plugin, key, SendRecord::Intent) {
                log.in_flight.remove(&id);
                return Err(ChainCallError::Unavailable(format!("recording the send: {e}")));
            }
        }
        let outcome = self.send_now(to, data, value, key);
        let mut log = self.lock_log();
        log.in_flight.remove(&id);
        let record = match &outcome {
            Ok(receipt) => Some(SendRecord::Done { receipt: receipt.clone() }),
            Err(ChainCallError::InDoubt(_)) => None,
            Err(_) => Some(SendRecord::Abandoned),
        };
        if let Some(record) = record
            && let Err(e) = log.write(plugin, key, record)
        {
            // The chain has the outcome; only the record failed. In memory it is right; the file keeps
            // the intent, so after a restart the key is in doubt rather than sent twice.
            tracing::error!(plugin, key, error = %e, "chain send log: could not record the outcome");
        }
        outcome
    }

    fn send_now(&self, to: Address, data: Vec<u8>, value: U256, key: &str) -> Result<TxReceipt, ChainCallError> {
        let chain = self.chain.clone();
        let what = format!("plugin transaction to {to} (idempotency key {key})");
        let tx = TransactionRequest::default().with_to(to).with_input(Bytes::from(data)).with_value(value);
        let deadline = RECEIPT_TIMEOUT + CALL_TIMEOUT * 2;
        let result = blocking::block_on(
            async move {
                match chain.send_transaction(&what, tx).await {
                    Ok(receipt) => {
                        let number = receipt.block_number.ok_or_else(|| ChainError::MissingInReceipt { what: what.clone(), missing: "block number" })?;
                        let timestamp = chain.timestamp_of(number).await?;
                        Ok(TxReceipt { hash: format!("{:#x}", receipt.transaction_hash), block_number: number, block_timestamp: timestamp, success: true })
                    }
                    // Mined but reverted: a receipt all the same, with success false.
                    Err(ChainError::Failed { tx_hash, .. }) => failed_receipt(&chain, tx_hash).await,
                    Err(e) => Err(e),
                }
            },
            deadline,
        );
        match result {
            Err(_) => Err(ChainCallError::InDoubt(format!("no receipt within {deadline:?}; the transaction may be on chain"))),
            Ok(Ok(receipt)) => Ok(receipt),
            Ok(Err(e)) => Err(classify(e)),
        }
    }
}

async fn failed_receipt(chain: &Chain, tx_hash: B256) -> Result<TxReceipt, ChainError> {
    let receipt = chain
        .provider()
        .get_transaction_receipt(tx_hash)
        .await
        .map_err(|e| ChainError::Rpc { context: "eth_getTransactionReceipt".into(), message: e.to_string() })?
        .ok_or_else(|| ChainError::Rpc { context: "eth_getTransactionReceipt".into(), message: format!("no receipt for {tx_hash}") })?;
    let number = receipt
        .block_number
        .ok_or_else(|| ChainError::MissingInReceipt { what: format!("transaction {tx_hash}"), missing: "block number" })?;
    let timestamp = chain.timestamp_of(number).await?;
    Ok(TxReceipt { hash: format!("{tx_hash:#x}"), block_number: number, block_timestamp: timestamp, success: false })
}

fn classify(e: ChainError) -> ChainCallError {
    match e {
        ChainError::Reverted { reason, .. } => ChainCallError::Reverted(reason),
        // `Chain` waits for the receipt after broadcasting: failing there means the transaction went out.
        ChainError::Rpc { context, message } if context.starts_with("waiting for the receipt") => {
            ChainCallError::InDoubt(format!("{context}: {message}"))
        }
        other => ChainCallError::Unavailable(other.to_string()),
    }
}

fn check_contract(granted: &BTreeSet<Address>, to: &str) -> Result<Address, ChainCallError> {
    let address: Address = to
        .parse()
        .map_err(|_| ChainCallError::InvalidCall(format!("`{to}` is not a 0x-prefixed 20-byte address")))?;
    if !granted.contains(&address) {
        return Err(ChainCallError::ContractNotGranted(format!("{address:#x}")));
    }
    Ok(address)
}

/// What one plugin instance may reach: the host's chain service and this plugin's contracts.
#[derive(Debug, Clone)]
pub struct ChainAccess {
    pub service: Arc<ChainService>,
    pub contracts: Arc<BTreeSet<Address>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_granted_contracts_pass() {
        let a: Address = "0xBcC58fb72409BA1CdEc5dBcDD3Cd6c42E3e04242".parse().unwrap();
        let granted = BTreeSet::from([a]);
        assert_eq!(check_contract(&granted, "0xbcc58fb72409ba1cdec5dbcdd3cd6c42e3e04242"), Ok(a));
        let other = "0x0000000000000000000000000000000000000001";
        assert_eq!(check_contract(&granted, other), Err(ChainCallError::ContractNotGranted(other.into())));
        assert!(matches!(check_contract(&granted, "0x12"), Err(ChainCallError::InvalidCall(_))));
    }

    #[test]
    fn the_send_log_survives_a_restart_and_intents_come_back_in_doubt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SEND_LOG_FILE);
        let receipt = TxReceipt { hash: format!("{:#x}", B256::repeat_byte(7)), block_number: 5, block_timestamp: 99, success: true };
        {
            let mut log = SendLog::open(Some(path.clone())).unwrap();
            log.write("rail", "a", SendRecord::Intent).unwrap();
            log.write("rail", "a", SendRecord::Done { receipt: receipt.clone() }).unwrap();
            log.write("rail", "b", SendRecord::Intent).unwrap();
            log.write("rail", "c", SendRecord::Intent).unwrap();
            log.write("rail", "c", SendRecord::Abandoned).unwrap();
        }
        // A torn line at the end (a crash mid-write) is skipped.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"plugin\":\"rail\",\"ke").unwrap();
        let log = SendLog::open(Some(path)).unwrap();
        assert_eq!(log.records.get(&("rail".into(), "a".into())), Some(&SendRecord::Done { receipt }));
        assert_eq!(log.records.get(&("rail".into(), "b".into())), Some(&SendRecord::Intent));
        assert_eq!(log.records.get(&("rail".into(), "c".into())), Some(&SendRecord::Abandoned));
    }
}
