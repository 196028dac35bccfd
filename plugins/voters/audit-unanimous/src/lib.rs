//! The `audit-unanimous` coalition voter: a second wrong-output judge, written apart from
//! `audit-majority` on purpose (it walks the JSON by hand, shares no code with it and applies a stricter
//! rule), so that one bug in evidence handling cannot put two ballots on the same side of a quorum.
//!
//! Its rule: the voting runs (those with tokens) the accused operator did not work on ("clean" runs)
//! must be at least two and agree token for token; every voting run the accused worked on (at least one)
//! must disagree with them; then eject. Anything less — a single clean run, clean runs that disagree
//! among themselves, an accused run that matches them, an accused on no voting run — is a dismissal, and
//! so is evidence whose `voting_runs`, `majority` or `first_divergence` the tokens do not show (they are
//! recomputed here; nothing the reporter concluded is trusted). Every other breach kind: abstain.
//!
//! Evidence it accepts: version 1 of the orchestrator's audit evidence (the doc comment of
//! host/orchestrator/src/audits.rs; audit-evidence-example.json beside it), read here by hand:
//!
//! ```json
//! {"version": 1,
//!  "runs": [{"role": "original", "route": 0,
//!            "shards": [{"peer": "…", "operator": "0x…", "layers": "0..15"}, {"peer": "…", "operator": null, …}],
//!            "tokens": [504, 3575, 1085], …},
//!           {"role": "audit", "route": 1, "shards": […], "tokens": null, "error": "…", …}, …],
//!  "voting_runs": 1, "majority": [], "first_divergence": null}
//! ```
//!
//! Required: `version` 1; `runs` (2 to 16), each with `route` (an integer), `shards` (1 to 64 objects,
//! each with `operator`: a string compared without regard to case, or `null`) and `tokens` (at most
//! 65 536 integers in u32, or `null` for a failed run, which does not vote); `voting_runs` (integer);
//! `majority` (a list of run indices: the runs sharing one token list that are a strict majority of at
//! least two voting runs, else `[]`); `first_divergence` (the smallest index where a voting run differs
//! from the majority's tokens, or `null` when there is no majority or all agree). Anything else is
//! ignored. A report whose accused is not `0x` and 40 hex digits, or whose evidence breaks the above, is
//! an `invalid-report`.
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

/// One run as this voter reads it: its route, whether the accused worked on it, its tokens (`None`:
/// failed, no vote).
struct Run {
    route: u64,
    accused: bool,
    tokens: Option<Vec<u32>>,
}

/// What the reporter concluded, to be checked against the tokens.
struct Claims {
    voting_runs: u64,
    majority: Vec<u64>,
    first_divergence: Option<u64>,
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
        let (runs, claims) = read(&root, &accused).map_err(VoterError::InvalidReport)?;
        let (decision, reason) = decide(&accused, &runs, &claims);
        Ok(Ballot { decision, reason })
    }
}

fn read(root: &Value, accused: &str) -> Result<(Vec<Run>, Claims), String> {
    match root.get("version").and_then(Value::as_u64) {
        Some(1) => {}
        other => return Err(format!("evidence version {other:?}; this voter reads version 1")),
    }
    let list = root.get("runs").and_then(Value::as_array).ok_or("evidence has no `runs` list")?;
    if !(2..=16).contains(&list.len()) {
        return Err(format!("{} runs; expected 2 to 16", list.len()));
    }
    let mut runs = Vec::with_capacity(list.len());
    for (i, run) in list.iter().enumerate() {
        let route = run.get("route").and_then(Value::as_u64).ok_or_else(|| format!("run {i} has no integer `route`"))?;
        let shards = run.get("shards").and_then(Value::as_array).ok_or_else(|| format!("run {i} has no `shards` list"))?;
        if shards.is_empty() || shards.len() > 64 {
            return Err(format!("run {i} has {} shards; expected 1 to 64", shards.len()));
        }
        let mut has_accused = false;
        for shard in shards {
            match shard.get("operator") {
                Some(Value::Null) => {}
                Some(Value::String(op)) => has_accused |= op.eq_ignore_ascii_case(accused),
                _ => return Err(format!("a shard of run {i} has no `operator` string or null")),
            }
        }
        let tokens = match run.get("tokens") {
            Some(Value::Null) => None,
            Some(Value::Array(ids)) => {
                if ids.len() > 65_536 {
                    return Err(format!("run {i} has {} tokens; at most 65536", ids.len()));
                }
                Some(
                    ids.iter()
                        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(|| format!("run {i} has a token that is not a u32")))
                        .collect::<Result<Vec<u32>, String>>()?,
                )
            }
            _ => return Err(format!("run {i} has no `tokens` list or null")),
        };
        runs.push(Run { route, accused: has_accused, tokens });
    }
    let voting_runs = root.get("voting_runs").and_then(Value::as_u64).ok_or("`voting_runs` is not a non-negative integer")?;
    let majority = root
        .get("majority")
        .and_then(Value::as_array)
        .ok_or("`majority` is not a list")?
        .iter()
        .map(|v| v.as_u64().ok_or("`majority` holds a value that is not a run index"))
        .collect::<Result<Vec<u64>, &str>>()?;
    let first_divergence = match root.get("first_divergence") {
        Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or("`first_divergence` is not a non-negative integer or null")?),
        None => return Err("evidence has no `first_divergence`".to_string()),
    };
    Ok((runs, Claims { voting_runs, majority, first_divergence }))
}

/// Where `a` and `b` first differ (the shorter one's end counts), if they do.
fn divergence(a: &[u32], b: &[u32]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len())))
}

fn decide(accused: &str, runs: &[Run], claims: &Claims) -> (Decision, String) {
    // Check the reporter's conclusions against the tokens before anything else.
    let voting: Vec<(usize, &Run, &[u32])> =
        runs.iter().enumerate().filter_map(|(i, r)| r.tokens.as_deref().map(|t| (i, r, t))).collect();
    if claims.voting_runs != voting.len() as u64 {
        return (Decision::Dismiss, format!("claimed {} voting runs but {} runs have tokens", claims.voting_runs, voting.len()));
    }
    let mut majority: Vec<u64> = Vec::new();
    let mut truth: Option<&[u32]> = None;
    for (_, _, t) in &voting {
        let same: Vec<u64> = voting.iter().filter(|(_, _, u)| u == t).map(|(j, _, _)| *j as u64).collect();
        if voting.len() >= 2 && 2 * same.len() > voting.len() {
            majority = same;
            truth = Some(t);
            break;
        }
    }
    if claims.majority != majority {
        return (Decision::Dismiss, format!("claimed majority runs {:?} but the tokens give {majority:?}", claims.majority));
    }
    let earliest = truth.and_then(|truth| voting.iter().filter_map(|(_, _, t)| divergence(t, truth)).min());
    if claims.first_divergence != earliest.map(|d| d as u64) {
        return (
            Decision::Dismiss,
            format!("claimed first divergence {:?} but the tokens first differ at {earliest:?}", claims.first_divergence),
        );
    }
    // The unanimity rule itself, over voting runs only.
    let clean: Vec<(&Run, &[u32])> = voting.iter().filter(|(_, r, _)| !r.accused).map(|(_, r, t)| (*r, *t)).collect();
    let dirty: Vec<(&Run, &[u32])> = voting.iter().filter(|(_, r, _)| r.accused).map(|(_, r, t)| (*r, *t)).collect();
    if dirty.is_empty() {
        return (Decision::Dismiss, format!("{accused} is on none of the voting runs"));
    }
    if clean.len() < 2 {
        return (Decision::Dismiss, format!("{} voting run(s) without {accused}: two are needed to tell who is wrong", clean.len()));
    }
    let reference = clean[0].1;
    if let Some((odd, _)) = clean.iter().find(|(_, t)| *t != reference) {
        return (Decision::Dismiss, format!("runs without {accused} disagree (routes {} and {})", clean[0].0.route, odd.route));
    }
    if let Some((same, _)) = dirty.iter().find(|(_, t)| *t == reference) {
        return (Decision::Dismiss, format!("route {} with {accused} matches the clean runs", same.route));
    }
    let at = dirty.iter().filter_map(|(_, t)| divergence(reference, t)).min().unwrap_or(0);
    (
        Decision::Eject,
        format!("all {} voting runs without {accused} agree; all {} with it differ, first at token {at}", clean.len(), dirty.len()),
    )
}
