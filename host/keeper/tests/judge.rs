//! The judge over real coalition-voter plugins (plugins/voters/, plugins/test/voter-dissent,
//! plugins/bad/voter-trap; built by scripts/build-plugins.sh): a wrong-output report with a faulty
//! route is judged 2 of 3 with a dissenter, a crashed voter and a dissenter leave one honest voter short
//! of a quorum, a lone voter cannot force a verdict, every signed ballot is in the coalition store, and
//! the orchestrator's literal example evidence (audit-evidence-example.json) convicts its accused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use computepool_keeper::coalition::{BreachKind, BreachReport, Decision, Outcome, Quorum, tally};
use computepool_keeper::judge::{Cast, Judge, JudgeConfig, Voter};
use computepool_plugin_host::{HostConfig, PluginHost};
use serde_json::json;

const ACCUSED: &str = "0x00000000000000000000000000000000000000aa";

fn plugin_dir(relative: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins").join(relative);
    assert!(
        std::fs::read_dir(&dir).unwrap().any(|e| e.unwrap().path().extension().is_some_and(|x| x == "wasm")),
        "{} is not built: run `bash scripts/build-plugins.sh` (make test does)",
        dir.display()
    );
    dir
}

/// A host with the voters loaded, and the voters in the order asked.
fn voters(relatives: &[(&str, &str)]) -> (PluginHost, Vec<Arc<dyn Voter>>) {
    let host = PluginHost::new(HostConfig::default()).unwrap();
    let voters = relatives
        .iter()
        .map(|(relative, id)| {
            host.load_plugin(&plugin_dir(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"));
            host.voter(id).unwrap() as Arc<dyn Voter>
        })
        .collect();
    (host, voters)
}

/// An audit where the accused's route alone disagrees with two routes that agree: version 1 evidence,
/// as the orchestrator's output audits write it (host/orchestrator/src/audits.rs).
fn faulty_route_report() -> BreachReport {
    let run = |route: u64, op: &str, tokens: &[u32], agrees: bool, divergence: Option<u64>| {
        json!({
            "role": if route == 0 { "original" } else { "audit" }, "route": route,
            "shards": [{"peer": format!("peer-{route}"), "operator": op, "layers": "0..30"}],
            "tokens": tokens, "error": null, "agrees": agrees, "divergence": divergence,
        })
    };
    let evidence = json!({
        "version": 1,
        "pool": "pool-1",
        "request_id": "chatcmpl-7",
        "request": {"prompt": "Hello", "max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 7},
        "runs": [
            run(0, ACCUSED, &[11, 12, 99, 14], false, Some(2)),
            run(1, "0x00000000000000000000000000000000000000b1", &[11, 12, 13, 14], true, None),
            run(2, "0x00000000000000000000000000000000000000b2", &[11, 12, 13, 14], true, None),
        ],
        "voting_runs": 3,
        "majority": [1, 2],
        "accused": [{"peer": "peer-0", "operator": ACCUSED, "layers": "0..30"}],
        "first_divergence": 2,
    });
    BreachReport {
        pool_id: "pool-1".into(),
        operator: ACCUSED.into(),
        kind: BreachKind::WrongOutput,
        evidence: evidence.to_string(),
        observed_at_ms: 1_764_200_000_000,
    }
}

fn config() -> JudgeConfig {
    JudgeConfig { k: None, deadline: Duration::from_secs(30) }
}

fn decisions(j: &computepool_keeper::judge::Judgement) -> Vec<Option<Decision>> {
    j.voters
        .iter()
        .map(|v| match &v.cast {
            Cast::Ballot { ballot } => Some(ballot.decision),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_honest_voters_and_a_dissenter_eject() {
    let (_host, voters) = voters(&[
        ("voters/audit-majority", "audit-majority"),
        ("voters/audit-unanimous", "audit-unanimous"),
        ("test/voter-dissent", "test-voter-dissent"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let judge = Judge::open(dir.path(), voters, config()).unwrap();
    assert_eq!((judge.quorum().k(), judge.quorum().n()), (2, 3));
    let report = faulty_route_report();
    let j = judge.judge(report.clone()).await.unwrap();
    assert_eq!(decisions(&j), vec![Some(Decision::Eject), Some(Decision::Eject), Some(Decision::Dismiss)]);
    assert_eq!(j.tally.outcome, Outcome::Decided(Decision::Eject));
    assert!(j.tally.rejected.is_empty());
    // The store holds the report, the three signed ballots and the verdict; re-tallying what it holds,
    // under a quorum of the judge's own keys, gives the same outcome.
    let store = judge.store();
    assert_eq!(store.report(&j.digest).unwrap(), Some(report.clone()));
    let ballots = store.ballots(&j.digest).unwrap();
    assert_eq!(ballots.len(), 3);
    assert_eq!(store.verdict(&j.digest).unwrap(), Some(Decision::Eject));
    let quorum = Quorum::new(2, judge.voters().into_iter().map(|(_, id)| id).collect()).unwrap();
    assert_eq!(tally(&quorum, &report, &ballots).outcome, Outcome::Decided(Decision::Eject));
    // A ballot altered after signing does not count.
    let mut forged = ballots.clone();
    forged[2].decision = Decision::Eject;
    let t = tally(&quorum, &report, &forged);
    assert_eq!(t.counted.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_honest_voter_a_dissenter_and_a_trap_reach_no_quorum() {
    let (_host, voters) = voters(&[
        ("voters/audit-majority", "audit-majority"),
        ("test/voter-dissent", "test-voter-dissent"),
        ("bad/voter-trap", "test-voter-trap"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let judge = Judge::open(dir.path(), voters, config()).unwrap();
    let j = judge.judge(faulty_route_report()).await.unwrap();
    assert_eq!(decisions(&j), vec![Some(Decision::Eject), Some(Decision::Dismiss), None]);
    match &j.voters[2].cast {
        Cast::Failed { error } => assert!(error.contains("trapped"), "{error}"),
        other => panic!("the trapping voter should have failed, got {other:?}"),
    }
    assert_eq!(j.tally.outcome, Outcome::NoQuorum);
    assert_eq!(j.verdict(), None);
    assert_eq!(judge.store().ballots(&j.digest).unwrap().len(), 2, "the trap cast nothing");
    assert_eq!(judge.store().verdict(&j.digest).unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_voter_cannot_force_a_verdict() {
    // Only audit-majority would eject; liveness abstains on wrong output, the dissenter dismisses.
    let (_host, voters) = voters(&[
        ("voters/audit-majority", "audit-majority"),
        ("voters/liveness", "liveness"),
        ("test/voter-dissent", "test-voter-dissent"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let judge = Judge::open(dir.path(), voters, config()).unwrap();
    let j = judge.judge(faulty_route_report()).await.unwrap();
    assert_eq!(decisions(&j), vec![Some(Decision::Eject), Some(Decision::Abstain), Some(Decision::Dismiss)]);
    assert_eq!(j.tally.outcome, Outcome::NoQuorum);
    // Nor can it by asking for a quorum of one: a threshold must be a strict majority.
    let (_host, voters) = self::voters(&[("voters/audit-majority", "audit-majority"), ("voters/liveness", "liveness"), ("test/voter-dissent", "test-voter-dissent")]);
    let dir = tempfile::tempdir().unwrap();
    assert!(Judge::open(dir.path(), voters, JudgeConfig { k: Some(1), ..config() }).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_audit_is_dismissed() {
    let (_host, voters) = voters(&[
        ("voters/audit-majority", "audit-majority"),
        ("voters/audit-unanimous", "audit-unanimous"),
        ("voters/liveness", "liveness"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let judge = Judge::open(dir.path(), voters, config()).unwrap();
    let mut report = faulty_route_report();
    let mut evidence: serde_json::Value = serde_json::from_str(&report.evidence).unwrap();
    evidence["runs"][0]["tokens"] = json!([11, 12, 13, 14]);
    evidence["majority"] = json!([0, 1, 2]);
    evidence["accused"] = json!([]);
    evidence["first_divergence"] = serde_json::Value::Null;
    report.evidence = evidence.to_string();
    let j = judge.judge(report).await.unwrap();
    assert_eq!(decisions(&j), vec![Some(Decision::Dismiss), Some(Decision::Dismiss), Some(Decision::Abstain)]);
    assert_eq!(j.tally.outcome, Outcome::Decided(Decision::Dismiss));
}

/// The orchestrator's literal example evidence (the file its own tests check it writes) through the real
/// voters: its original route (operator ...a0) alone disagrees with two agreeing audit routes, one of
/// whose shards has no operator. The reporter's accused is ejected; an operator on an agreeing route is
/// not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrators_example_evidence_ejects_the_accused_only() {
    const EXAMPLE: &str = include_str!("../../orchestrator/src/audit-evidence-example.json");
    let (_host, voters) = voters(&[
        ("voters/audit-majority", "audit-majority"),
        ("voters/audit-unanimous", "audit-unanimous"),
        ("voters/liveness", "liveness"),
    ]);
    let majority = voters[0].clone();
    let dir = tempfile::tempdir().unwrap();
    let judge = Judge::open(dir.path(), voters, config()).unwrap();
    let report = |operator: &str| BreachReport {
        pool_id: "smol".into(),
        operator: operator.into(),
        kind: BreachKind::WrongOutput,
        evidence: EXAMPLE.to_string(),
        observed_at_ms: 1_764_200_000_000,
    };
    let guilty = report("0x00000000000000000000000000000000000000a0");
    let (decision, reason) = majority.vote(&guilty).unwrap();
    assert_eq!(decision, Decision::Eject, "audit-majority: {reason}");
    let j = judge.judge(guilty).await.unwrap();
    assert_eq!(decisions(&j), vec![Some(Decision::Eject), Some(Decision::Eject), Some(Decision::Abstain)]);
    assert_eq!(j.tally.outcome, Outcome::Decided(Decision::Eject));
    let j = judge.judge(report("0x00000000000000000000000000000000000000B1")).await.unwrap();
    assert_eq!(decisions(&j), vec![Some(Decision::Dismiss), Some(Decision::Dismiss), Some(Decision::Abstain)]);
    assert_eq!(j.tally.outcome, Outcome::Decided(Decision::Dismiss));
}
