//! The operator token: the one secret that guards the orchestrator's write side (`POST /pools`, worker
//! registration and heartbeats). Clients of the OpenAI routes do not need it.
//!
//! Where it comes from, first found wins: the `COMPUTEPOOL_OPERATOR_TOKEN` environment variable, else
//! `operator.token` in the state directory (made with 256 random bits, mode 0600, when missing). Tools
//! send it as `Authorization: Bearer <token>`; workers read it from the same variable or from
//! `--operator-token-file`. It never goes in the database or the logs.

use std::path::{Path, PathBuf};

use anyhow::Context;
use axum::http::HeaderMap;

use super::error::ApiError;

/// The variable both the orchestrator and its workers read the token from.
pub const TOKEN_ENV: &str = "COMPUTEPOOL_OPERATOR_TOKEN";

/// The token file in a state directory.
pub fn token_path(state_dir: &Path) -> PathBuf {
    state_dir.join("operator.token")
}

/// The operator token required on the orchestrator's write routes.
#[derive(Clone)]
pub struct OperatorToken(String);

impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorToken(…)")
    }
}

impl OperatorToken {
    pub fn new(token: impl Into<String>) -> anyhow::Result<Self> {
        let token = token.into().trim().to_string();
        if token.len() < 8 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!("the operator token must be at least 8 printable ASCII characters without spaces");
        }
        Ok(Self(token))
    }

    /// The environment's token, else the state directory's (made if missing).
    pub fn load_or_create(state_dir: &Path) -> anyhow::Result<Self> {
        if let Ok(token) = std::env::var(TOKEN_ENV) {
            return Self::new(token).context(TOKEN_ENV);
        }
        let path = token_path(state_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::new(text).with_context(|| format!("{}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // An ed25519 secret key is 32 bytes from the OS's CSPRNG: the same source, no new dependency.
                let bytes = computepool_axl::transport::SecretKey::generate().to_bytes();
                let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                write_private(&path, &token).with_context(|| format!("writing {}", path.display()))?;
                tracing::info!(path = %path.display(), "made a new operator token");
                Self::new(token)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks a request's `Authorization: Bearer` header.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            None => Err(ApiError::Unauthorized("this route needs the operator token: send `Authorization: Bearer <token>`".into())),
            Some(given) if constant_time_eq(given.as_bytes(), self.0.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::Unauthorized("the operator token is wrong".into())),
        }
    }
}

/// Compares without stopping at the first difference, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_from_the_bearer_header() {
        let token = OperatorToken::new("s3cret-token").expect("valid");
        let mut headers = HeaderMap::new();
        assert!(matches!(token.check(&headers), Err(ApiError::Unauthorized(_))));
        headers.insert("authorization", "Bearer wrong-token".parse().expect("header"));
        assert!(matches!(token.check(&headers), Err(ApiError::Unauthorized(m)) if m.contains("wrong")));
        headers.insert("authorization", "Bearer s3cret-token".parse().expect("header"));
        assert!(token.check(&headers).is_ok());
        assert!(OperatorToken::new("short").is_err());
        assert!(OperatorToken::new("has a space").is_err());
    }

    #[test]
    fn a_missing_token_file_is_made_private_and_then_reused() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Only when the variable is unset (the test environment does not set it).
        if std::env::var(TOKEN_ENV).is_ok() {
            return;
        }
        let first = OperatorToken::load_or_create(dir.path()).expect("made");
        assert_eq!(first.as_str().len(), 64);
        let again = OperatorToken::load_or_create(dir.path()).expect("read back");
        assert_eq!(first.as_str(), again.as_str());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(token_path(dir.path())).expect("exists").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
