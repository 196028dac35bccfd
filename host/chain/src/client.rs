//! The `Chain` client: one JSON-RPC endpoint, its chain id, and one signing key.
//!
//! Nonces are the client's own: one lock per `Chain` (clones share it) hands out the next nonce, counted
//! locally after the first `eth_getTransactionCount(pending)`, and advances it only once the node has
//! accepted the transaction. alloy's cached nonce filler advances before gas estimation, so a call that
//! reverts in `eth_estimateGas` would leave a gap and every later transaction would wait behind it
//! forever. Gas and the chain id come from alloy's fillers (`eth_estimateGas` for every transaction,
//! which also turns a revert into an error before anything is sent). Every transaction waits for its
//! receipt and a failed status is an error. Use one `Chain` (or its clones) per key and process. The key is never logged or
//! displayed: `Chain`'s `Debug` shows the signer's address only.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alloy::contract::{CallBuilder, CallDecoder};
use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolInterface;

use crate::bindings::{Coalition, OracleVerifier, PoolINFT, TestUSD};

/// How long a transaction may wait for its receipt before `send` gives up (a real network's block time
/// is seconds; anvil mines at once).
pub const RECEIPT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("invalid RPC URL {url:?}: {reason}")]
    InvalidRpcUrl { url: String, reason: String },
    #[error("RPC error ({context}): {message}")]
    Rpc { context: String, message: String },
    #[error("the RPC endpoint serves chain id {got}, expected {expected}")]
    WrongChain { expected: u64, got: u64 },
    #[error("reading the key file {path}: {source}")]
    KeyFile { path: PathBuf, source: std::io::Error },
    /// The key's text is not repeated in the message: it may be a near-miss of the real key.
    #[error("{origin} does not hold a secp256k1 private key (64 hex digits, optional 0x)")]
    InvalidKey { origin: String },
    #[error("environment variable {0} is not set")]
    MissingKeyEnv(String),
    #[error("{what} reverted: {reason}")]
    Reverted { what: String, reason: String },
    #[error("{what} failed on chain (transaction {tx_hash}, status 0)")]
    Failed { what: String, tx_hash: B256 },
    #[error("{what}: {message}")]
    Contract { what: String, message: String },
    #[error("{what}: the receipt has no {missing}")]
    MissingInReceipt { what: String, missing: &'static str },
    #[error("Superfluid artifacts: {0}")]
    Artifact(String),
    #[error("deployment file {path}: {reason}")]
    DeploymentFile { path: PathBuf, reason: String },
    #[error("anvil: {0}")]
    Anvil(String),
}

/// Where a signing key comes from. Neither form puts the key on a command line (where `ps` would show it).
#[derive(Clone, Debug)]
pub enum KeySource {
    /// A file holding the key as hex (surrounding whitespace ignored).
    File(PathBuf),
    /// An environment variable holding the key as hex.
    Env(String),
}

impl KeySource {
    pub fn load(&self) -> Result<PrivateKeySigner, ChainError> {
        match self {
            KeySource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ChainError::KeyFile { path: path.clone(), source })?;
                parse_key(&text, &format!("key file {}", path.display()))
            }
            KeySource::Env(name) => {
                let text = std::env::var(name).map_err(|_| ChainError::MissingKeyEnv(name.clone()))?;
                parse_key(&text, &format!("environment variable {name}"))
            }
        }
    }
}

/// Parses a hex private key. Errors name where it came from, never what it said.
pub fn parse_key(text: &str, origin: &str) -> Result<PrivateKeySigner, ChainError> {
    let hex_text = text.trim();
    let hex_text = hex_text.strip_prefix("0x").unwrap_or(hex_text);
    if hex_text.len() != 64 {
        return Err(ChainError::InvalidKey { origin: origin.to_string() });
    }
    let bytes: [u8; 32] = hex::decode(hex_text)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ChainError::InvalidKey { origin: origin.to_string() })?;
    PrivateKeySigner::from_bytes(&B256::from(bytes)).map_err(|_| ChainError::InvalidKey { origin: origin.to_string() })
}

/// Writes a key file readable by its owner only.
pub fn write_key_file(path: &Path, signer: &PrivateKeySigner) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    writeln!(file, "0x{}", hex::encode(signer.to_bytes()))
}

/// A signing client for one chain.
#[derive(Clone)]
pub struct Chain {
    provider: DynProvider,
    chain_id: u64,
    address: Address,
    rpc_url: String,
    /// The next nonce, once known; `None` makes the next send ask the node.
    next_nonce: Arc<tokio::sync::Mutex<Option<u64>>>,
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chain")
            .field("rpc_url", &self.rpc_url)
            .field("chain_id", &self.chain_id)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Chain {
    /// Connects to `rpc_url` with `signer`. With `expected_chain_id`, a node serving another chain is
    /// refused before anything is signed (a key meant for a devnet must not sign for a real network).
    pub async fn connect(
        rpc_url: &str,
        expected_chain_id: Option<u64>,
        signer: PrivateKeySigner,
    ) -> Result<Self, ChainError> {
        let url = reqwest::Url::parse(rpc_url)
            .map_err(|e| ChainError::InvalidRpcUrl { url: rpc_url.into(), reason: e.to_string() })?;
        match url.scheme() {
            "http" | "https" => install_tls_provider(),
            other => {
                return Err(ChainError::InvalidRpcUrl {
                    url: rpc_url.into(),
                    reason: format!("scheme {other} (only http and https are supported)"),
                });
            }
        }
        let address = signer.address();
        let provider = ProviderBuilder::new().wallet(EthereumWallet::from(signer)).connect_http(url).erased();
        let chain_id = provider.get_chain_id().await.map_err(|e| rpc_error("eth_chainId", e))?;
        if let Some(expected) = expected_chain_id
            && expected != chain_id
        {
            return Err(ChainError::WrongChain { expected, got: chain_id });
        }
        tracing::debug!(rpc_url, chain_id, %address, "connected");
        Ok(Self { provider, chain_id, address, rpc_url: rpc_url.to_string(), next_nonce: Arc::default() })
    }

    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// The signer's address (the sender of every transaction).
    pub fn address(&self) -> Address {
        self.address
    }

    pub fn rpc_url(&self) -> &str {
        &self.rpc_url
    }

    /// Sends a contract call, waits for its receipt and checks its status. A revert (caught when its gas
    /// is estimated) comes back as `ChainError::Reverted` with the contract's error decoded.
    pub async fn send<P, D>(&self, what: &str, call: CallBuilder<P, D>) -> Result<TransactionReceipt, ChainError>
    where
        P: Provider,
        D: CallDecoder,
    {
        let mut next = self.next_nonce.lock().await;
        let nonce = self.nonce_from(*next).await?;
        let call = call.nonce(nonce);
        let gas = match call.estimate_gas().await {
            Ok(gas) => with_headroom(gas),
            Err(e) => {
                let error = contract_error(what, e);
                Self::after_failed_send(&mut next, &error);
                return Err(error);
            }
        };
        let pending = match call.gas(gas).send().await {
            Ok(pending) => pending,
            Err(e) => {
                let error = contract_error(what, e);
                Self::after_failed_send(&mut next, &error);
                return Err(error);
            }
        };
        *next = Some(nonce + 1);
        drop(next);
        self.wait(what, pending.with_timeout(Some(RECEIPT_TIMEOUT))).await
    }

    /// Sends a raw transaction request (nonce from the client's counter, gas and chain id filled).
    pub async fn send_transaction(&self, what: &str, tx: TransactionRequest) -> Result<TransactionReceipt, ChainError> {
        let mut next = self.next_nonce.lock().await;
        let nonce = self.nonce_from(*next).await?;
        let tx = tx.with_nonce(nonce);
        let tx = match tx.gas {
            Some(_) => tx,
            None => match self.provider.estimate_gas(tx.clone()).await {
                Ok(gas) => tx.with_gas_limit(with_headroom(gas)),
                Err(e) => {
                    let error = revert_or_rpc(what, e);
                    Self::after_failed_send(&mut next, &error);
                    return Err(error);
                }
            },
        };
        let pending = match self.provider.send_transaction(tx).await {
            Ok(pending) => pending,
            Err(e) => {
                let error = revert_or_rpc(what, e);
                Self::after_failed_send(&mut next, &error);
                return Err(error);
            }
        };
        *next = Some(nonce + 1);
        drop(next);
        self.wait(what, pending.with_timeout(Some(RECEIPT_TIMEOUT))).await
    }

    async fn nonce_from(&self, cached: Option<u64>) -> Result<u64, ChainError> {
        match cached {
            Some(n) => Ok(n),
            None => self
                .provider
                .get_transaction_count(self.address)
                .pending()
                .await
                .map_err(|e| rpc_error("eth_getTransactionCount", e)),
        }
    }

    /// A revert was caught before broadcasting: the nonce is still free. Anything else may or may not
    /// have reached the node: ask it again next time.
    fn after_failed_send(next: &mut Option<u64>, error: &ChainError) {
        if !matches!(error, ChainError::Reverted { .. }) {
            *next = None;
        }
    }

    /// Deploys `creation_code` (constructor arguments appended) and returns the new contract's address.
    pub async fn deploy(&self, what: &str, creation_code: Vec<u8>) -> Result<(Address, TransactionReceipt), ChainError> {
        let tx = TransactionRequest::default().with_deploy_code(creation_code);
        let receipt = self.send_transaction(what, tx).await?;
        let address = receipt
            .contract_address
            .ok_or_else(|| ChainError::MissingInReceipt { what: what.into(), missing: "contract address" })?;
        Ok((address, receipt))
    }

    /// Sends plain value.
    pub async fn send_value(&self, to: Address, wei: U256) -> Result<TransactionReceipt, ChainError> {
        let what = format!("sending {wei} wei to {to}");
        let tx = TransactionRequest::default().with_to(to).with_value(wei);
        self.send_transaction(&what, tx).await
    }

    async fn wait(
        &self,
        what: &str,
        pending: alloy::providers::PendingTransactionBuilder<alloy::network::Ethereum>,
    ) -> Result<TransactionReceipt, ChainError> {
        let receipt = pending.get_receipt().await.map_err(|e| ChainError::Rpc {
            context: format!("waiting for the receipt of {what}"),
            message: e.to_string(),
        })?;
        if !receipt.status() {
            return Err(ChainError::Failed { what: what.into(), tx_hash: receipt.transaction_hash });
        }
        tracing::debug!(what, tx = %receipt.transaction_hash, gas = receipt.gas_used, "mined");
        Ok(receipt)
    }

    /// The timestamp of the block a receipt was mined in.
    pub async fn block_timestamp(&self, receipt: &TransactionReceipt) -> Result<u64, ChainError> {
        let number = receipt
            .block_number
            .ok_or_else(|| ChainError::MissingInReceipt { what: "a mined transaction".into(), missing: "block number" })?;
        self.timestamp_of(number).await
    }

    pub async fn timestamp_of(&self, block_number: u64) -> Result<u64, ChainError> {
        let block = self
            .provider
            .get_block_by_number(block_number.into())
            .await
            .map_err(|e| rpc_error("eth_getBlockByNumber", e))?
            .ok_or_else(|| ChainError::Rpc {
                context: "eth_getBlockByNumber".into(),
                message: format!("block {block_number} not found"),
            })?;
        Ok(block.header.timestamp)
    }
}

/// reqwest is built without a TLS provider of its own (the workspace's rustls uses ring) and refuses to
/// build a client, even for plain http, until a process default exists: install ring, unless something
/// else already did.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(crate) fn rpc_error(context: &str, e: impl fmt::Display) -> ChainError {
    ChainError::Rpc { context: context.into(), message: e.to_string() }
}

fn contract_error(what: &str, e: alloy::contract::Error) -> ChainError {
    match e.as_revert_data() {
        Some(data) => ChainError::Reverted { what: what.into(), reason: decode_revert(&data) },
        None => ChainError::Contract { what: what.into(), message: e.to_string() },
    }
}

fn revert_or_rpc(what: &str, e: alloy::transports::TransportError) -> ChainError {
    match e.as_error_resp().and_then(|r| r.as_revert_data()) {
        Some(data) => ChainError::Reverted { what: what.into(), reason: decode_revert(&data) },
        None => rpc_error(what, e),
    }
}

/// Names a revert: one of ComputePool's custom errors with its arguments, a `require` string, a panic
/// code, or the raw data.
pub fn decode_revert(data: &[u8]) -> String {
    use alloy::sol_types::{Panic, Revert, SolError};
    if let Ok(e) = TestUSD::TestUSDErrors::abi_decode(data) {
        return format!("{e:?}");
    }
    if let Ok(e) = PoolINFT::PoolINFTErrors::abi_decode(data) {
        return format!("{e:?}");
    }
    if let Ok(e) = Coalition::CoalitionErrors::abi_decode(data) {
        return format!("{e:?}");
    }
    if let Ok(e) = OracleVerifier::OracleVerifierErrors::abi_decode(data) {
        return format!("{e:?}");
    }
    if let Ok(revert) = Revert::abi_decode(data) {
        return revert.reason;
    }
    if let Ok(panic) = Panic::abi_decode(data) {
        return format!("panic {}", panic.code);
    }
    format!("0x{}", hex::encode(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_with_or_without_prefix_and_errors_do_not_echo_them() {
        let key = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
        let a = parse_key(key, "test").unwrap();
        let b = parse_key(&format!("  0x{key}\n"), "test").unwrap();
        assert_eq!(a.address(), b.address());
        assert_eq!(a.address(), "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266".parse::<Address>().unwrap());
        let near_miss = &key[..63];
        let err = parse_key(near_miss, "key file k").unwrap_err().to_string();
        assert!(!err.contains(near_miss), "{err}");
        assert!(err.contains("key file k"), "{err}");
        // The zero scalar is not a key.
        assert!(parse_key(&"0".repeat(64), "zero").is_err());
    }

    #[test]
    fn key_sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let signer = PrivateKeySigner::random();
        write_key_file(&path, &signer).unwrap();
        assert_eq!(KeySource::File(path.clone()).load().unwrap().address(), signer.address());
        assert!(write_key_file(&path, &signer).is_err(), "an existing key file is never overwritten");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let missing = KeySource::Env("COMPUTEPOOL_TEST_KEY_THAT_IS_NOT_SET".into()).load().unwrap_err();
        assert!(matches!(missing, ChainError::MissingKeyEnv(_)));
    }

    #[test]
    fn reverts_are_named() {
        use alloy::sol_types::SolError;
        let e = TestUSD::AuthorizationExpired { validBefore: U256::from(5), nowTimestamp: U256::from(9) };
        let text = decode_revert(&e.abi_encode());
        assert!(text.contains("AuthorizationExpired"), "{text}");
        assert_eq!(decode_revert(&[1, 2]), "0x0102");
    }
}

/// The gas limit sent for an estimate: `eth_estimateGas` finds the least gas with which the call succeeds
/// at the state it was estimated on, but Superfluid's host checks `gasleft()` around its agreement
/// callbacks and a later block (another timestamp, a warmer or colder slot) can need a little more: a
/// transaction sent with the bare estimate was seen reverting on chain after estimating fine. A quarter
/// more costs nothing unused (only gas used is paid).
fn with_headroom(estimate: u64) -> u64 {
    estimate.saturating_add(estimate / 4).saturating_add(10_000)
}
