//! The `liveness` coalition voter: judges missed-heartbeat and stream-cut reports against fixed
//! thresholds, so that a brief hiccup earns a warning and only a long silence an ejection. Every other
//! breach kind: abstain.
//!
//! Evidence it accepts (the breach report's `evidence`, JSON; camelCase; unknown fields ignored):
//!
//! - `missed-heartbeat`: `{"peer": "12D3KooW…", "intervalMs": 5000, "lastHeartbeatMs": 1764200000000}` —
//!   the heartbeat interval the worker was given and when its last heartbeat arrived (Unix ms). The
//!   silence is the report's `observed-at-ms` minus `lastHeartbeatMs`; the beats missed are the silence
//!   divided by the interval. Eject at [`EJECT_MISSED_BEATS`] or more, warn at [`WARN_MISSED_BEATS`] or
//!   more, dismiss below.
//! - `stream-cut`: `{"peer": "12D3KooW…", "request": {…}, "tokensDue": 64, "tokensReceived": 10,
//!   "silentMs": 45000}` — how many tokens the request was due, how many arrived, and how long the stream
//!   had been silent when it was cut. Dismiss if every due token arrived; otherwise eject at
//!   [`EJECT_SILENT_MS`] or more of silence, warn at [`WARN_SILENT_MS`] or more, dismiss below.
//!
//! `invalid-report` (no ballot): evidence that does not parse, an interval of 0 or over an hour, a last
//! heartbeat after the observation, or a report observed more than [`MAX_CLOCK_SKEW_MS`] in the future
//! of this host's wall clock (a reporter cannot make silence longer by dating its report ahead).
#![no_std]

use alloc::format;
use alloc::string::{String, ToString};
use computepool::coalition_voter::types::{Ballot, BreachKind, BreachReport, Decision, VoterError};
use computepool::host::clock;
use exports::computepool::coalition_voter::voter::Guest;
use serde::Deserialize;

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/coalition-voter/0.1.0"],
    world: "computepool:coalition-voter/coalition-voter@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

// Links the kit's `memcmp`/`bcmp` (serde compares field names; a no_std guest has no libc).
use computepool_rail_kit as _;

/// Six missed beats (30 s at the usual 5 s interval): long past a restart or a network blip.
pub const EJECT_MISSED_BEATS: u64 = 6;
pub const WARN_MISSED_BEATS: u64 = 3;
/// A stream silent for 30 s while tokens were due is cut, not slow (a decode step is milliseconds).
pub const EJECT_SILENT_MS: u64 = 30_000;
pub const WARN_SILENT_MS: u64 = 10_000;
pub const MAX_CLOCK_SKEW_MS: u64 = 60_000;
const MAX_INTERVAL_MS: u64 = 3_600_000;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Heartbeat {
    peer: String,
    interval_ms: u64,
    last_heartbeat_ms: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StreamCut {
    peer: String,
    tokens_due: u64,
    tokens_received: u64,
    silent_ms: u64,
}

struct Liveness;
export!(Liveness);

impl Guest for Liveness {
    fn vote(report: BreachReport) -> Result<Ballot, VoterError> {
        let now = clock::wall_now_ms();
        if report.observed_at_ms > now.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(VoterError::InvalidReport(format!(
                "the report is dated {} ms in the future of this host's clock",
                report.observed_at_ms - now
            )));
        }
        match report.kind {
            BreachKind::MissedHeartbeat => {
                let e: Heartbeat = parse(&report.evidence)?;
                Ok(heartbeat(&e, report.observed_at_ms)?)
            }
            BreachKind::StreamCut => {
                let e: StreamCut = parse(&report.evidence)?;
                Ok(stream_cut(&e))
            }
            _ => Ok(Ballot { decision: Decision::Abstain, reason: "liveness judges missed heartbeats and cut streams only".to_string() }),
        }
    }
}

fn parse<'a, T: Deserialize<'a>>(evidence: &'a str) -> Result<T, VoterError> {
    serde_json::from_str(evidence).map_err(|e| VoterError::InvalidReport(format!("evidence: {e}")))
}

fn heartbeat(e: &Heartbeat, observed_at_ms: u64) -> Result<Ballot, VoterError> {
    if e.interval_ms == 0 || e.interval_ms > MAX_INTERVAL_MS {
        return Err(VoterError::InvalidReport(format!("a heartbeat interval of {} ms", e.interval_ms)));
    }
    let silence = observed_at_ms
        .checked_sub(e.last_heartbeat_ms)
        .ok_or_else(|| VoterError::InvalidReport("the last heartbeat is after the observation".to_string()))?;
    let missed = silence / e.interval_ms;
    let decision = if missed >= EJECT_MISSED_BEATS {
        Decision::Eject
    } else if missed >= WARN_MISSED_BEATS {
        Decision::Warn
    } else {
        Decision::Dismiss
    };
    Ok(Ballot { decision, reason: format!("peer {} silent {silence} ms: {missed} heartbeats of {} ms missed", e.peer, e.interval_ms) })
}

fn stream_cut(e: &StreamCut) -> Ballot {
    if e.tokens_received >= e.tokens_due {
        let reason = format!("peer {} delivered all {} due tokens", e.peer, e.tokens_due);
        return Ballot { decision: Decision::Dismiss, reason };
    }
    let decision = if e.silent_ms >= EJECT_SILENT_MS {
        Decision::Eject
    } else if e.silent_ms >= WARN_SILENT_MS {
        Decision::Warn
    } else {
        Decision::Dismiss
    };
    let reason: String =
        format!("peer {} delivered {} of {} tokens, then {} ms of silence", e.peer, e.tokens_received, e.tokens_due, e.silent_ms);
    Ballot { decision, reason }
}
