//! Keepers and coalitions: every payment state transition (propose, activate-and-pool, stream-start,
//! stream-stop, handle-breach) runs as a workflow — on KeeperHub through the `keeperhub` keeper-adapter
//! plugin, or on the built-in `local` keeper — and is logged durably, attempt by attempt, under an
//! idempotency key, so a crash at any point resumes without doing a transition twice. Breaches are judged
//! by coalition-voter plugins and acted on only with a quorum.
//!
//! It never touches activations, and it holds no keys: contract calls go through the host's chain
//! capability.
