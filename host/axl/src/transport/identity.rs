//! Peer identities: an ed25519 key pair per worker, its public half the peer id everyone knows it by.
//!
//! QUIC's TLS handshake (iroh's raw-public-key certificates) proves that the far end holds the secret
//! key of the id we dialled, so a peer id is both an address and an authentication: a frame that
//! arrives on a connection came from that peer.

use std::fs;
use std::io::Write;
use std::path::Path;

pub use iroh::{PublicKey as PeerId, SecretKey};

use super::TransportError;

/// Reads a secret key written by [`write_secret_key`]: 64 hex characters, optional trailing newline.
pub fn read_secret_key(path: &Path) -> Result<SecretKey, TransportError> {
    let text = fs::read_to_string(path)
        .map_err(|e| TransportError::Key { path: path.display().to_string(), reason: e.to_string() })?;
    let hex = text.trim();
    let bytes: [u8; 32] = hex::decode(hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| TransportError::Key {
            path: path.display().to_string(),
            reason: "expected 64 hex characters (an ed25519 secret key)".into(),
        })?;
    Ok(SecretKey::from_bytes(&bytes))
}

/// Writes `key` as 64 hex characters to a new file readable only by its owner (mode 0600 on Unix).
/// Refuses to overwrite an existing file: a worker's key is its identity in every pool it serves.
pub fn write_secret_key(path: &Path, key: &SecretKey) -> Result<(), TransportError> {
    let key_error = |reason: String| TransportError::Key { path: path.display().to_string(), reason };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| key_error(e.to_string()))?;
    writeln!(file, "{}", hex::encode(key.to_bytes())).map_err(|e| key_error(e.to_string()))?;
    file.sync_all().map_err(|e| key_error(e.to_string()))
}

/// Reads the key at `path`, or makes a new one there if the file does not exist.
pub fn load_or_create_secret_key(path: &Path) -> Result<SecretKey, TransportError> {
    if path.exists() {
        return read_secret_key(path);
    }
    let key = SecretKey::generate();
    write_secret_key(path, &key)?;
    Ok(key)
}

/// Parses a peer id (64 hex characters), with an error that says what was expected.
pub fn parse_peer_id(text: &str) -> Result<PeerId, TransportError> {
    text.trim().parse().map_err(|e| TransportError::PeerId { text: text.chars().take(80).collect(), reason: format!("{e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_are_private() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("worker.key");
        let key = load_or_create_secret_key(&path).expect("created");
        assert_eq!(load_or_create_secret_key(&path).expect("read back").public(), key.public());
        assert!(write_secret_key(&path, &key).is_err(), "an existing key is never overwritten");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let id = key.public();
        assert_eq!(parse_peer_id(&id.to_string()).expect("parses"), id);
    }

    #[test]
    fn bad_keys_and_ids_are_typed_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bad.key");
        fs::write(&path, "not hex").expect("written");
        assert!(matches!(read_secret_key(&path), Err(TransportError::Key { .. })));
        fs::write(&path, "abcd").expect("written");
        assert!(matches!(read_secret_key(&path), Err(TransportError::Key { .. })));
        assert!(matches!(read_secret_key(&dir.path().join("missing")), Err(TransportError::Key { .. })));
        assert!(matches!(parse_peer_id("zz"), Err(TransportError::PeerId { .. })));
    }
}
