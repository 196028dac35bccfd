//! The `audit-unanimous` coalition voter: a second wrong-output judge, written apart from
//! `audit-majority` on purpose (it walks the JSON by hand, shares no code with it and applies a stricter
//! rule), so that one bug in evidence handling cannot put two ballots on the same side of a quorum.
//!
//! Its rule: the runs the accused operator did not work on ("clean" runs) must be at least two and agree
//! token for token; every run the accused worked on must disagree with them; then eject. Anything less —
//! a single clean run, clean runs that disagree among themselves, an accused run that matches them, an
//! accused on no run, a `firstDivergence` the tokens do not show — is a dismissal. Every other breach
//! kind: abstain.
//!
//! Evidence it accepts: the audit JSON that `audit-majority` documents (plugins/voters/audit-majority/
//! src/lib.rs), read here by hand:
//!
//! ```json
//! {"request": {…},
//!  "runs": [{"route": "r-1", "workers": [{"peer": "12D3KooW…", "operator": "0x…", "layers": "0..15"}],
//!            "tokens": [2, 17, 9]}, …],
//!  "firstDivergence": 2}
//! ```
//!
//! Required: `runs` (2 to 16), each with `route` (string), `workers` (1 to 64 objects, each with an
//! `operator` string, compared without regard to case) and `tokens` (at most 65 536 integers in u32);
//! `firstDivergence`: an integer, or `null` when all runs agree. Anything else is ignored. A report whose
//! accused is not `0x` and 40 hex digits, or whose evidence breaks the above, is an `invalid-report`.
#![no_std]

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use computepool::coalition_voter::types::{Ballot, BreachKind, BreachReport, Decision, VoterError};
use exports::computepool::coalition_voter::voter::Guest;
use serde_json::Value;

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/coalition-voter/0.1.0"],
    world: "computepool:coalition-voter/coalition-voter@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

// Links the kit's `memcmp`/`bcmp` (token lists are compared with `==`; a no_std guest has no libc).
use computepool_rail_kit as _;

/// One run as this voter reads it: its label, whether the accused worked on it, its tokens.
struct Run {
    route: String,
    accused: bool,
    tokens: Vec<u32>,
}

struct AuditUnanimous;
export!(AuditUnanimous);

impl Guest for AuditUnanimous {
    fn vote(report: BreachReport) -> Result<Ballot, VoterError> {
        if report.kind != BreachKind::WrongOutput {
            return Ok(Ballot { decision: Decision::Abstain, reason: "audit-unanimous judges wrong-output reports only".to_string() });
        }
        let accused = report.operator.to_ascii_lowercase();
        let hex = accused.strip_prefix("0x").unwrap_or("");
        if hex.len() != 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(VoterError::InvalidReport(format!("accused {:?} is not an address", report.operator)));
        }
        let root: Value =
            serde_json::from_str(&report.evidence).map_err(|e| VoterError::InvalidReport(format!("evidence: {e}")))?;
        let (runs, claimed) = read(&root, &accused).map_err(VoterError::InvalidReport)?;
        let (decision, reason) = decide(&accused, &runs, claimed);
        Ok(Ballot { decision, reason })
    }
}

fn read(root: &Value, accused: &str) -> Result<(Vec<Run>, Option<u64>), String> {
    let list = root.get("runs").and_then(Value::as_array).ok_or("evidence has no `runs` list")?;
    if !(2..=16).contains(&list.len()) {
        return Err(format!("{} runs; expected 2 to 16", list.len()));
    }
    let mut runs = Vec::with_capacity(list.len());
    for (i, run) in list.iter().enumerate() {
        let route = run.get("route").and_then(Value::as_str).ok_or_else(|| format!("run {i} has no `route` string"))?;
        let workers = run.get("workers").and_then(Value::as_array).ok_or_else(|| format!("run {i} has no `workers` list"))?;
        if workers.is_empty() || workers.len() > 64 {
            return Err(format!("run {i} has {} workers; expected 1 to 64", workers.len()));
        }
        let mut has_accused = false;
        for w in workers {
            let op = w.get("operator").and_then(Value::as_str).ok_or_else(|| format!("a worker of run {i} has no `operator`"))?;
            has_accused |= op.eq_ignore_ascii_case(accused);
        }
        let ids = run.get("tokens").and_then(Value::as_array).ok_or_else(|| format!("run {i} has no `tokens` list"))?;
        if ids.len() > 65_536 {
            return Err(format!("run {i} has {} tokens; at most 65536", ids.len()));
        }
        let tokens = ids
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(|| format!("run {i} has a token that is not a u32")))
            .collect::<Result<Vec<u32>, String>>()?;
        runs.push(Run { route: route.to_string(), accused: has_accused, tokens });
    }
    let claimed = match root.get("firstDivergence") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or("`firstDivergence` is not a non-negative integer or null")?),
    };
    Ok((runs, claimed))
}

/// Where `a` and `b` first differ (the shorter one's end counts), if they do.
fn divergence(a: &[u32], b: &[u32]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len())))
}

fn decide(accused: &str, runs: &[Run], claimed: Option<u64>) -> (Decision, String) {
    // The earliest disagreement between any pair of runs.
    let mut earliest: Option<usize> = None;
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            if let Some(d) = divergence(&a.tokens, &b.tokens) {
                earliest = Some(earliest.map_or(d, |e| e.min(d)));
            }
        }
    }
    if claimed != earliest.map(|d| d as u64) {
        return (Decision::Dismiss, format!("claimed first divergence {claimed:?} but the tokens first differ at {earliest:?}"));
    }
    let clean: Vec<&Run> = runs.iter().filter(|r| !r.accused).collect();
    let dirty: Vec<&Run> = runs.iter().filter(|r| r.accused).collect();
    if dirty.is_empty() {
        return (Decision::Dismiss, format!("{accused} is on none of the runs"));
    }
    if clean.len() < 2 {
        return (Decision::Dismiss, format!("{} run(s) without {accused}: two are needed to tell who is wrong", clean.len()));
    }
    let reference = &clean[0].tokens;
    if let Some(odd) = clean.iter().find(|r| &r.tokens != reference) {
        return (Decision::Dismiss, format!("runs without {accused} disagree ({:?} vs {:?})", clean[0].route, odd.route));
    }
    if let Some(same) = dirty.iter().find(|r| &r.tokens == reference) {
        return (Decision::Dismiss, format!("route {:?} with {accused} matches the clean runs", same.route));
    }
    let at = dirty.iter().filter_map(|r| divergence(reference, &r.tokens)).min().unwrap_or(0);
    (
        Decision::Eject,
        format!("all {} runs without {accused} agree; all {} with it differ, first at token {at}", clean.len(), dirty.len()),
    )
}
