//! A pool's payment transitions and the `Keeper` that acts them out: the Rust side of
//! `wit/keeper-adapter/0.1.0` (its `submit` / `status`), plus `lookup`, which the driver needs to resume
//! after a crash without doing a transition twice.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The five workflows a pool's payments go through (one file each in `keeperhub/workflows/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransitionKind {
    Propose,
    ActivateAndPool,
    StreamStart,
    StreamStop,
    HandleBreach,
}

impl TransitionKind {
    pub const ALL: [TransitionKind; 5] =
        [Self::Propose, Self::ActivateAndPool, Self::StreamStart, Self::StreamStop, Self::HandleBreach];

    /// The kebab-case name used in the WIT enum, the log and the workflow file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Propose => "propose",
            Self::ActivateAndPool => "activate-and-pool",
            Self::StreamStart => "stream-start",
            Self::StreamStop => "stream-stop",
            Self::HandleBreach => "handle-breach",
        }
    }
}

impl fmt::Display for TransitionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transition kind {0:?} (expected propose, activate-and-pool, stream-start, stream-stop or handle-breach)")]
pub struct UnknownKind(pub String);

impl FromStr for TransitionKind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// One transition as the keeper sees it. `idempotency_key` is stable across retries and restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    pub kind: TransitionKind,
    pub idempotency_key: String,
    pub pool_id: String,
    /// The transition's arguments as JSON (per kind: see keeperhub/README.md).
    pub payload: serde_json::Value,
}

/// What the keeper answered to `submit`: its own id for the run (a workflow execution id, a tx hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    pub reference: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Pending,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    pub state: RunState,
    /// What the keeper reported (transaction hashes as JSON, an error message).
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeeperError {
    #[error("invalid transition: {0}")]
    InvalidTransition(String),
    /// Retrying with the same idempotency key is safe.
    #[error("keeper unavailable: {0}")]
    Unavailable(String),
    #[error("keeper rejected the transition: {0}")]
    Rejected(String),
}

/// A keeper (KeeperHub, the local keeper, a test double). Blocking: plugin calls are, and the
/// orchestrator runs the driver on a blocking thread.
pub trait Keeper: Send + Sync {
    /// Starts a run for `transition`. A keeper that already has a run under this idempotency key
    /// returns that run instead of starting another.
    fn submit(&self, transition: &Transition) -> Result<Submission, KeeperError>;
    /// The state of a run `submit` returned.
    fn status(&self, reference: &str) -> Result<RunStatus, KeeperError>;
    /// The run already started under `idempotency_key`, if any. The driver asks this before
    /// re-submitting a transition whose earlier submit may have reached the keeper, so that a crash
    /// between the keeper acting and the log recording it does not act twice.
    fn lookup(&self, idempotency_key: &str) -> Result<Option<Submission>, KeeperError>;
}
