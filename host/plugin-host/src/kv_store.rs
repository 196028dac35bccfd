//! The key-value store behind `computepool:host/kv-store`: one scope per plugin id, bounded in key length
//! and total bytes. It survives instance replacement and reloads of the plugin. With the host's
//! `state-dir`, each scope is also a file (`<state-dir>/kv/<plugin id>.json`) rewritten atomically (temp
//! file, fsync, rename) on every write, so it survives a restart too (the ledger rail's balances live
//! here); a write that cannot be made durable is refused and changes nothing. Without `state-dir` it lives
//! in memory, for one host process.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
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
    #[error("the store could not be written: {0}")]
    Unavailable(String),
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
    /// The file the scope is kept in, when durable.
    file: Option<Arc<PathBuf>>,
}

impl KvScope {
    /// A new empty scope holding at most `quota_bytes` of keys and values together, in memory.
    pub fn new(quota_bytes: u64) -> Self {
        Self { scope: Arc::new(Mutex::new(Scope::default())), quota_bytes, file: None }
    }

    /// The durable scope kept in `file` (created on the first write), loaded from it if it exists.
    pub fn open(file: &Path, quota_bytes: u64) -> Result<Self, KvError> {
        let mut scope = Scope::default();
        match std::fs::read(file) {
            Ok(bytes) => {
                let stored: BTreeMap<String, String> = serde_json::from_slice(&bytes)
                    .map_err(|e| KvError::Unavailable(format!("{} is not a kv scope: {e}", file.display())))?;
                for (key, value) in stored {
                    let value = hex::decode(&value).map_err(|e| KvError::Unavailable(format!("{}: key {key}: {e}", file.display())))?;
                    scope.bytes += (key.len() + value.len()) as u64;
                    scope.entries.insert(key, value);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(KvError::Unavailable(format!("reading {}: {e}", file.display()))),
        }
        Ok(Self { scope: Arc::new(Mutex::new(scope)), quota_bytes, file: Some(Arc::new(file.to_path_buf())) })
    }

    /// Writes the whole scope to its file, atomically. Scopes are small (bounded by the quota).
    fn persist(&self, scope: &Scope) -> Result<(), KvError> {
        let Some(file) = &self.file else { return Ok(()) };
        let stored: BTreeMap<&str, String> = scope.entries.iter().map(|(k, v)| (k.as_str(), hex::encode(v))).collect();
        let bytes = serde_json::to_vec(&stored).map_err(|e| KvError::Unavailable(e.to_string()))?;
        let fail = |e: std::io::Error| KvError::Unavailable(format!("writing {}: {e}", file.display()));
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let tmp = file.with_extension("json.tmp");
        // A stale temporary file from a crash would keep its old mode: start afresh.
        let _ = std::fs::remove_file(&tmp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        // Owner-only: a scope can hold what the operator configured for the plugin (a keeper's API keys).
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut out = options.open(&tmp).map_err(fail)?;
        out.write_all(&bytes).and_then(|()| out.sync_all()).map_err(fail)?;
        std::fs::rename(&tmp, file.as_path()).map_err(fail)
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
        let previous = scope.entries.insert(key.to_string(), value);
        scope.bytes = scope.bytes - old + new;
        if let Err(e) = self.persist(&scope) {
            // Not durable, so not done: put the old value back.
            match previous {
                Some(v) => scope.entries.insert(key.to_string(), v),
                None => scope.entries.remove(key),
            };
            scope.bytes = scope.bytes - new + old;
            return Err(e);
        }
        Ok(())
    }

    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        Self::check_key(key)?;
        let mut scope = self.lock();
        match scope.entries.remove(key) {
            Some(v) => {
                scope.bytes -= (key.len() + v.len()) as u64;
                if let Err(e) = self.persist(&scope) {
                    scope.bytes += (key.len() + v.len()) as u64;
                    scope.entries.insert(key.to_string(), v);
                    return Err(e);
                }
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
    fn a_durable_scope_survives_reopening_and_refuses_what_it_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kv").join("ledger.json");
        let kv = KvScope::open(&file, 100).unwrap();
        kv.set("pool:a", b"{\"x\":1}".to_vec()).unwrap();
        kv.set("gone", vec![1]).unwrap();
        assert_eq!(kv.delete("gone"), Ok(true));
        let reopened = KvScope::open(&file, 100).unwrap();
        assert_eq!(reopened.get("pool:a"), Ok(Some(b"{\"x\":1}".to_vec())));
        assert_eq!(reopened.get("gone"), Ok(None));
        assert_eq!(reopened.bytes(), kv.bytes());
        // The folder turned into a file: the write fails and nothing changes.
        let blocked = KvScope::open(&dir.path().join("blocked").join("s.json"), 100).unwrap();
        std::fs::write(dir.path().join("blocked"), b"not a folder").unwrap();
        assert!(matches!(blocked.set("k", vec![1]), Err(KvError::Unavailable(_))));
        assert_eq!(blocked.get("k"), Ok(None));
        assert_eq!(blocked.bytes(), 0);
    }

    #[test]
    fn clones_share_one_scope() {
        let kv = KvScope::new(100);
        kv.clone().set("x", vec![7]).unwrap();
        assert_eq!(kv.get("x"), Ok(Some(vec![7])));
    }

    #[cfg(unix)]
    #[test]
    fn a_durable_scope_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kv").join("keeperhub.json");
        KvScope::open(&file, 1000).unwrap().set("config", b"{\"apiKey\": \"kh_secret\"}".to_vec()).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
