//! The component: `computepool:keeper-adapter/keeper` over [`crate::run`], with the host's chain, kv store
//! and log as its [`Host`].

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use computepool::host::{chain, kv_store, log};
use computepool::keeper_adapter::types::{
    KeeperError, Submission, Transition, TransitionKind, TransitionState, TransitionStatus,
};
use exports::computepool::keeper_adapter::keeper::Guest;

use crate::run::{ChainFailure, Host, Keeper, KeeperFailure, Outcome, Receipt};

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/keeper-adapter/0.1.0"],
    world: "computepool:keeper-adapter/keeper-adapter@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

struct WitHost;

fn chain_failure(e: chain::ChainError) -> ChainFailure {
    match e {
        chain::ChainError::ContractNotGranted(c) => ChainFailure::NotGranted(c),
        chain::ChainError::Reverted(r) => ChainFailure::Reverted(r),
        chain::ChainError::InvalidCall(m) => ChainFailure::InvalidCall(m),
        chain::ChainError::Unavailable(m) => ChainFailure::Unavailable(m),
        chain::ChainError::InDoubt(m) => ChainFailure::InDoubt(m),
    }
}

fn kv_failure(e: kv_store::KvError) -> String {
    match e {
        kv_store::KvError::InvalidKey(n) => format!("kv key longer than {n} bytes"),
        kv_store::KvError::QuotaExceeded(n) => format!("the keeper's kv store is full ({n} bytes): raise kv-quota-bytes"),
        kv_store::KvError::Unavailable(m) => m,
    }
}

impl Host for WitHost {
    fn chain_id(&self) -> Result<u64, ChainFailure> {
        chain::chain_id().map_err(chain_failure)
    }

    fn send(&self, to: &str, data: Vec<u8>, idempotency_key: &str) -> Result<Receipt, ChainFailure> {
        let tx = chain::Transaction { to: to.to_string(), data, value_wei: "0".into(), idempotency_key: idempotency_key.to_string() };
        chain::send_transaction(&tx).map(|r| Receipt { hash: r.hash, success: r.success }).map_err(chain_failure)
    }

    fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        kv_store::get(key).map_err(kv_failure)
    }

    fn kv_set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        kv_store::set(key, value).map_err(kv_failure)
    }

    fn warn(&self, message: &str) {
        log::log(log::Level::Warn, message);
    }
}

fn keeper_error(e: KeeperFailure) -> KeeperError {
    match e {
        KeeperFailure::InvalidTransition(m) => KeeperError::InvalidTransition(m),
        KeeperFailure::Unavailable(m) => KeeperError::Unavailable(m),
        KeeperFailure::Rejected(m) => KeeperError::Rejected(m),
    }
}

fn kind_name(kind: TransitionKind) -> &'static str {
    match kind {
        TransitionKind::Propose => "propose",
        TransitionKind::ActivateAndPool => "activate-and-pool",
        TransitionKind::StreamStart => "stream-start",
        TransitionKind::StreamStop => "stream-stop",
        TransitionKind::HandleBreach => "handle-breach",
    }
}

struct Local;

impl Guest for Local {
    fn submit(t: Transition) -> Result<Submission, KeeperError> {
        let keeper = Keeper { host: &WitHost };
        keeper
            .submit(kind_name(t.kind), &t.idempotency_key, &t.pool_id, &t.payload)
            .map(|reference| Submission { reference })
            .map_err(keeper_error)
    }

    fn status(reference: String) -> Result<TransitionStatus, KeeperError> {
        let keeper = Keeper { host: &WitHost };
        Ok(match keeper.status(&reference).map_err(keeper_error)? {
            Outcome::Pending(detail) => TransitionStatus { state: TransitionState::Pending, detail },
            Outcome::Succeeded(detail) => TransitionStatus { state: TransitionState::Succeeded, detail },
            Outcome::Failed(detail) => TransitionStatus { state: TransitionState::Failed, detail },
        })
    }

    fn lookup(idempotency_key: String) -> Result<Option<Submission>, KeeperError> {
        let keeper = Keeper { host: &WitHost };
        Ok(keeper.lookup(&idempotency_key).map_err(keeper_error)?.map(|reference| Submission { reference }))
    }
}

export!(Local);

/// `memcmp`, which slice and string comparisons lower to: a `no_std` guest links no libc and
/// compiler_builtins does not provide it on wasm32-wasip2 (see plugins/rails/kit for the same pair).
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes, as for C's `memcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller promises both are valid for n bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// `bcmp`: equality only; LLVM lowers `==` on byte slices to it.
///
/// # Safety
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    unsafe { memcmp(a, b, n) }
}
