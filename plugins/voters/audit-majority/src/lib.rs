//! The `audit-majority` coalition voter: judges wrong-output reports from the orchestrator's output
//! audits (host/node/src/orchestrator/audits.rs), which re-run a finished request on other routes of the
//! pool and compare the token ids. It ejects the accused operator only if the runs it worked on disagree
//! with a strict majority of runs that agree with one another token for token, and it worked on none of
//! those agreeing runs; otherwise it dismisses. Every other breach kind: abstain.
//!
//! It recomputes agreement and the first divergence from the token lists itself, and trusts nothing the
//! reporter concluded: a `firstDivergence` that the tokens do not show makes it dismiss (the reporter is
//! broken, so its conviction is not evidence).
//!
//! Evidence it accepts (the breach report's `evidence`, JSON; camelCase; unknown fields ignored):
//!
//! ```json
//! {
//!   "request": {"id": "req-1", "model": "smollm2-135m-instruct"},
//!   "runs": [
//!     {"route": "r-1",
//!      "workers": [{"peer": "12D3KooW…", "operator": "0x…40 hex…", "layers": "0..15"}],
//!      "tokens": [2, 17, 9]},
//!     {"route": "r-2", "workers": [ … ], "tokens": [2, 17, 9]},
//!     {"route": "r-3", "workers": [ … ], "tokens": [2, 17, 4]}
//!   ],
//!   "firstDivergence": 2
//! }
//! ```
//!
//! - `request`: any JSON; recorded with the report, not judged.
//! - `runs`: 2 to 16 runs (the user's run first, then the audit re-runs). `route`: a label. `workers`: 1
//!   to 64, the route's workers in pipeline order; `peer` a string; `operator` the worker's payout
//!   address, compared without regard to case (`""` for a worker that has none, never matching an
//!   accused); `layers` any JSON (the worker's `START..END`), not judged. `tokens`: at most 65 536 token
//!   ids (u32).
//! - `firstDivergence`: the first position at which any two runs differ (a run that ends first differs
//!   where it ends), or `null` when all runs agree.
//!
//! The accused (the report's `operator`) must be `0x` and 40 hex digits. Evidence that does not parse,
//! or breaks a bound above, is an `invalid-report` error (no ballot).
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Evidence {
    runs: Vec<Run>,
    first_divergence: Option<u64>,
}

#[derive(Deserialize)]
struct Run {
    route: String,
    workers: Vec<Worker>,
    tokens: Vec<u32>,
}

#[derive(Deserialize)]
struct Worker {
    #[allow(dead_code)]
    peer: String,
    operator: String,
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
    if evidence.runs.len() < 2 || evidence.runs.len() > MAX_RUNS {
        return Err(invalid(format!("evidence has {} runs; an audit has 2 to {MAX_RUNS}", evidence.runs.len())));
    }
    for run in &evidence.runs {
        if run.workers.is_empty() || run.workers.len() > MAX_WORKERS {
            return Err(invalid(format!("route {:?} has {} workers; a route has 1 to {MAX_WORKERS}", run.route, run.workers.len())));
        }
        if run.tokens.len() > MAX_TOKENS {
            return Err(invalid(format!("route {:?} has {} tokens, more than {MAX_TOKENS}", run.route, run.tokens.len())));
        }
    }
    Ok(evidence)
}

/// The first position at which any two runs differ (a shorter run differs where it ends), if any.
fn first_divergence(runs: &[Run]) -> Option<usize> {
    let first = &runs[0].tokens;
    runs[1..]
        .iter()
        .filter_map(|r| {
            let common = first.iter().zip(&r.tokens).take_while(|(a, b)| a == b).count();
            (common < first.len().max(r.tokens.len())).then_some(common)
        })
        .min()
}

fn judge(accused: &str, evidence: &Evidence) -> Ballot {
    let runs = &evidence.runs;
    let actual = first_divergence(runs);
    if evidence.first_divergence != actual.map(|i| i as u64) {
        return ballot(
            Decision::Dismiss,
            format!("the evidence claims first divergence {:?}, its tokens show {:?}", evidence.first_divergence, actual),
        );
    }
    // The largest group of runs with identical tokens; it convicts only as a strict majority.
    let (group, size) = (0..runs.len())
        .map(|i| (i, runs.iter().filter(|r| r.tokens == runs[i].tokens).count()))
        .max_by_key(|(i, size)| (*size, core::cmp::Reverse(*i)))
        .unwrap_or((0, 0));
    if 2 * size <= runs.len() {
        return ballot(Decision::Dismiss, format!("no strict majority: at most {size} of {} runs agree", runs.len()));
    }
    let majority = &runs[group].tokens;
    let involves = |r: &Run| r.workers.iter().any(|w| w.operator.eq_ignore_ascii_case(accused));
    let accused_runs: Vec<&Run> = runs.iter().filter(|r| involves(r)).collect();
    if accused_runs.is_empty() {
        return ballot(Decision::Dismiss, format!("the accused {accused} worked on none of the {} runs", runs.len()));
    }
    if let Some(agreeing) = accused_runs.iter().find(|r| &r.tokens == majority) {
        return ballot(
            Decision::Dismiss,
            format!("the accused {accused} worked on route {:?}, which agrees with the majority", agreeing.route),
        );
    }
    let routes: Vec<&str> = accused_runs.iter().map(|r| r.route.as_str()).collect();
    ballot(
        Decision::Eject,
        format!(
            "{size} of {} runs agree on {} tokens; the accused {accused} worked only on disagreeing routes {routes:?} (first divergence at {})",
            runs.len(),
            majority.len(),
            actual.unwrap_or(0)
        ),
    )
}
