//! The `audit-majority` coalition voter: judges wrong-output reports from the orchestrator's output
//! audits (host/orchestrator/src/audits.rs), which re-run a finished request on other routes of the
//! pool and compare the token ids. It ejects the accused operator only if the runs it worked on disagree
//! with a strict majority of runs that agree with one another token for token, and it worked on none of
//! those agreeing runs; otherwise it dismisses. Every other breach kind: abstain.
//!
//! It recomputes the voting runs, the majority and the first divergence from the token lists itself and
//! trusts nothing the reporter concluded: a `voting_runs`, `majority` or `first_divergence` that the
//! tokens do not show makes it dismiss (the reporter is broken, so its conviction is not evidence).
//!
//! Evidence it accepts: version 1 of the orchestrator's audit evidence, exactly as the doc comment of
//! host/orchestrator/src/audits.rs specifies it (a literal example: audit-evidence-example.json
//! beside it). snake_case keys; unknown fields ignored. What this voter reads:
//!
//! ```json
//! {
//!   "version": 1,
//!   "runs": [
//!     {"role": "original", "route": 0,
//!      "shards": [{"peer": "…", "operator": "0x…40 hex…", "layers": "0..15"},
//!                 {"peer": "…", "operator": null, "layers": "15..30"}],
//!      "tokens": [504, 3575, 1085], "error": null, "agrees": false, "divergence": 2},
//!     {"role": "audit", "route": 1, "shards": [ … ], "tokens": [504, 3575, 314], …},
//!     {"role": "audit", "route": 2, "shards": [ … ], "tokens": null, "error": "Unavailable: …", …}
//!   ],
//!   "voting_runs": 2,
//!   "majority": [1],
//!   "first_divergence": 2
//! }
//! ```
//!
//! - `version`: must be 1.
//! - `runs`: 2 to 16 runs. `route`: the route's index in the pool. `shards`: 1 to 64, the route's
//!   workers; `operator` the worker's payout address, compared without regard to case, or `null` (none
//!   registered, never matching an accused). `tokens`: at most 65 536 token ids (u32), or `null` for a
//!   failed run, which does not vote.
//! - `voting_runs`: the runs with tokens. `majority`: the indices of the runs sharing one token list
//!   that are a strict majority of the voting runs (at least two voting), `[]` when none is.
//!   `first_divergence`: the smallest index at which a voting run's tokens differ from the majority's
//!   (a prefix differs where it ends); `null` when there is no majority or every voting run agrees.
//!
//! Rule: eject iff a strict majority exists, no majority run has a shard paid to the accused, and at
//! least one disagreeing voting run does. The accused (the report's `operator`) must be `0x` and 40 hex
//! digits. Evidence that does not parse, has another version, or breaks a bound above is an
//! `invalid-report` error (no ballot).
#![no_std]

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use computepool::coalition_voter::types::{Ballot, BreachKind, BreachReport, Decision, VoterError};
use exports::computepool::coalition_voter::voter::Guest;
use serde::Deserialize;

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/coalition-voter/0.1.0"],
    world: "computepool:coalition-voter/coalition-voter@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

// Links the kit's `memcmp`/`bcmp` (token lists are compared with `==`; a no_std guest has no libc).
use computepool_rail_kit as _;

const MAX_RUNS: usize = 16;
const MAX_WORKERS: usize = 64;
const MAX_TOKENS: usize = 65_536;
/// The evidence version this voter reads (host/orchestrator/src/audits.rs, `EVIDENCE_VERSION`).
const VERSION: u32 = 1;

// serde ignores unknown fields by default: `pool`, `request_id`, `request`, `role`, `error`, `agrees`,
// `divergence` and `accused` are read by nobody here (the last three are the reporter's conclusions).
#[derive(Deserialize)]
struct Evidence {
    version: u32,
    runs: Vec<Run>,
    voting_runs: usize,
    majority: Vec<usize>,
    first_divergence: Option<usize>,
}

#[derive(Deserialize)]
struct Run {
    route: u64,
    shards: Vec<Shard>,
    /// `None`: the run failed and does not vote.
    tokens: Option<Vec<u32>>,
}

#[derive(Deserialize)]
struct Shard {
    operator: Option<String>,
}

struct AuditMajority;
export!(AuditMajority);

impl Guest for AuditMajority {
    fn vote(report: BreachReport) -> Result<Ballot, VoterError> {
        if report.kind != BreachKind::WrongOutput {
            return Ok(ballot(Decision::Abstain, String::from("audit-majority judges wrong-output reports only")));
        }
        let evidence = parse(&report)?;
        Ok(judge(&report.operator, &evidence))
    }
}

fn ballot(decision: Decision, reason: String) -> Ballot {
    Ballot { decision, reason }
}

fn invalid(message: String) -> VoterError {
    VoterError::InvalidReport(message)
}

fn is_address(s: &str) -> bool {
    s.len() == 42 && s.starts_with("0x") && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn parse(report: &BreachReport) -> Result<Evidence, VoterError> {
    if !is_address(&report.operator) {
        return Err(invalid(format!("the accused operator {:?} is not a 0x-prefixed 20-byte hex address", report.operator)));
    }
    let evidence: Evidence =
        serde_json::from_str(&report.evidence).map_err(|e| invalid(format!("evidence is not the audit's JSON: {e}")))?;
    if evidence.version != VERSION {
        return Err(invalid(format!("evidence version {}; this voter reads version {VERSION}", evidence.version)));
    }
    if evidence.runs.len() < 2 || evidence.runs.len() > MAX_RUNS {
        return Err(invalid(format!("evidence has {} runs; an audit has 2 to {MAX_RUNS}", evidence.runs.len())));
    }
    for run in &evidence.runs {
        if run.shards.is_empty() || run.shards.len() > MAX_WORKERS {
            return Err(invalid(format!("route {} has {} shards; a route has 1 to {MAX_WORKERS}", run.route, run.shards.len())));
        }
        if run.tokens.as_ref().is_some_and(|t| t.len() > MAX_TOKENS) {
            return Err(invalid(format!("route {} has more than {MAX_TOKENS} tokens", run.route)));
        }
    }
    Ok(evidence)
}

/// Where `a` and `b` first differ (where one is a prefix of the other, the shorter length), if they do.
fn divergence(a: &[u32], b: &[u32]) -> Option<usize> {
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    (common < a.len().max(b.len())).then_some(common)
}

fn judge(accused: &str, evidence: &Evidence) -> Ballot {
    let runs = &evidence.runs;
    // Failed runs (no tokens) do not vote.
    let voting: Vec<(usize, &[u32])> =
        runs.iter().enumerate().filter_map(|(i, r)| r.tokens.as_deref().map(|t| (i, t))).collect();
    if evidence.voting_runs != voting.len() {
        return ballot(
            Decision::Dismiss,
            format!("the evidence claims {} voting runs, {} runs have tokens", evidence.voting_runs, voting.len()),
        );
    }
    // The runs sharing one token list that are a strict majority of the voting runs (at least two vote).
    let majority: Vec<usize> = voting
        .iter()
        .map(|(_, t)| voting.iter().filter(|(_, u)| u == t).map(|(j, _)| *j).collect::<Vec<usize>>())
        .find(|group| voting.len() >= 2 && 2 * group.len() > voting.len())
        .unwrap_or_default();
    if evidence.majority != majority {
        return ballot(
            Decision::Dismiss,
            format!("the evidence claims majority runs {:?}, its tokens show {majority:?}", evidence.majority),
        );
    }
    let truth: Option<&[u32]> = majority.first().and_then(|&i| runs[i].tokens.as_deref());
    let actual = truth.and_then(|truth| voting.iter().filter_map(|(_, t)| divergence(t, truth)).min());
    if evidence.first_divergence != actual {
        return ballot(
            Decision::Dismiss,
            format!("the evidence claims first divergence {:?}, its tokens show {actual:?}", evidence.first_divergence),
        );
    }
    let Some(truth) = truth else {
        return ballot(Decision::Dismiss, format!("no strict majority among {} voting runs", voting.len()));
    };
    let involves = |r: &Run| r.shards.iter().any(|s| s.operator.as_deref().is_some_and(|o| o.eq_ignore_ascii_case(accused)));
    if let Some(&agreeing) = majority.iter().find(|&&i| involves(&runs[i])) {
        return ballot(
            Decision::Dismiss,
            format!("the accused {accused} worked on route {}, which is in the majority", runs[agreeing].route),
        );
    }
    let disagreeing: Vec<u64> = voting
        .iter()
        .filter(|(i, t)| *t != truth && involves(&runs[*i]))
        .map(|(i, _)| runs[*i].route)
        .collect();
    if disagreeing.is_empty() {
        return ballot(Decision::Dismiss, format!("the accused {accused} worked on no disagreeing voting run"));
    }
    ballot(
        Decision::Eject,
        format!(
            "{} of {} voting runs agree on {} tokens; the accused {accused} worked only on disagreeing routes {disagreeing:?} (first divergence at {})",
            majority.len(),
            voting.len(),
            truth.len(),
            actual.unwrap_or(0)
        ),
    )
}
