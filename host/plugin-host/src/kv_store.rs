//! The key-value store behind `computepool:host/kv-store`: one scope per plugin id, bounded in key length
//! and total bytes. Kept in the host's memory in this version: it survives instance replacement and
//! reloads of the plugin within one host process, not a restart (a durable backend comes with the
//! payment issue, which needs one anyway).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// Errors of the store, mirrored one-to-one by WIT's `kv-error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("keys must be 1 to {0} bytes")]
    InvalidKey(u32),
    #[error("the plugin's store would pass its limit of {0} bytes")]
    QuotaExceeded(u64),
}

#[derive(Debug, Default)]
struct Scope {
    entries: HashMap<String, Vec<u8>>,
    bytes: u64,
}

/// One plugin's scope. Clones share the same entries (every instance of the plugin sees the same store).
#[derive(Debug, Clone)]
pub struct KvScope {
    scope: Arc<Mutex<Scope>>,
    quota_bytes: u64,
}

impl KvScope {
    /// A new empty scope holding at most `quota_bytes` of keys and values together.
    pub fn new(quota_bytes: u64) -> Self {
        Self { scope: Arc::new(Mutex::new(Scope::default())), quota_bytes }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Scope> {
        // A panic while holding the lock leaves the map consistent (every update is a single insert/remove
        // followed by a byte count fix-up that cannot panic), so a poisoned lock is safe to keep using.
        self.scope.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check_key(key: &str) -> Result<(), KvError> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(KvError::InvalidKey(MAX_KEY_BYTES as u32));
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Self::check_key(key)?;
        Ok(self.lock().entries.get(key).cloned())
    }

    pub fn set(&self, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        Self::check_key(key)?;
        let mut scope = self.lock();
        let old = scope.entries.get(key).map_or(0, |v| (key.len() + v.len()) as u64);
        let new = (key.len() + value.len()) as u64;
        if scope.bytes - old + new > self.quota_bytes {
            return Err(KvError::QuotaExceeded(self.quota_bytes));
        }
        scope.entries.insert(key.to_string(), value);
        scope.bytes = scope.bytes - old + new;
        Ok(())
    }

    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        Self::check_key(key)?;
        let mut scope = self.lock();
        match scope.entries.remove(key) {
            Some(v) => {
                scope.bytes -= (key.len() + v.len()) as u64;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_delete_and_the_quota() {
        let kv = KvScope::new(10);
        assert_eq!(kv.get("a"), Ok(None));
        kv.set("a", vec![1, 2, 3]).unwrap();
        assert_eq!(kv.get("a"), Ok(Some(vec![1, 2, 3])));
        assert_eq!(kv.bytes(), 4);
        assert_eq!(kv.set("b", vec![0; 9]), Err(KvError::QuotaExceeded(10)));
        kv.set("a", vec![0; 9]).unwrap(); // replacing counts the old value out
        assert_eq!(kv.bytes(), 10);
        assert_eq!(kv.delete("a"), Ok(true));
        assert_eq!(kv.delete("a"), Ok(false));
        assert_eq!(kv.bytes(), 0);
        assert_eq!(kv.get(""), Err(KvError::InvalidKey(256)));
        assert!(kv.set(&"k".repeat(257), vec![]).is_err());
    }

    #[test]
    fn clones_share_one_scope() {
        let kv = KvScope::new(100);
        kv.clone().set("x", vec![7]).unwrap();
        assert_eq!(kv.get("x"), Ok(Some(vec![7])));
    }
}
