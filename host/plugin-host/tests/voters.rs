//! The coalition-voter plugins (plugins/voters/, plugins/test/voter-dissent, plugins/bad/voter-trap)
//! through the host's voter API: each voter's decisions on the evidence formats it documents, its
//! refusals of bad evidence, abstentions on kinds it does not judge, and a trapping voter replaced.

mod support;

use computepool_plugin_host::voter::{BreachKind, BreachReport, Decision, VoterError};
use computepool_plugin_host::{CallError, PluginHost, VoterCallError, VoterPlugin};
use serde_json::{Value, json};
use std::sync::Arc;

const ACCUSED: &str = "0x00000000000000000000000000000000000000Aa";
const OTHER_1: &str = "0x00000000000000000000000000000000000000b1";
const OTHER_2: &str = "0x00000000000000000000000000000000000000b2";

fn load(host: &PluginHost, relative: &str, id: &str) -> Arc<VoterPlugin> {
    host.load_plugin(&support::plugin(relative)).unwrap_or_else(|e| panic!("{relative} loads: {e}"));
    host.voter(id).expect("loaded as a voter")
}

/// One run of version 1 audit evidence (host/orchestrator/src/audits.rs), on route `route`.
/// `agrees` and `divergence` are left null: the voters recompute them and read neither.
fn run(route: u64, operators: &[&str], tokens: &[u32]) -> Value {
    let shards: Vec<Value> = operators
        .iter()
        .enumerate()
        .map(|(i, op)| json!({"peer": format!("peer-{route}-{i}"), "operator": op, "layers": format!("{}..{}", i * 15, i * 15 + 15)}))
        .collect();
    let role = if route == 0 { "original" } else { "audit" };
    json!({"role": role, "route": route, "shards": shards, "tokens": tokens, "error": null, "agrees": null, "divergence": null})
}

/// A run that failed: no tokens, no vote.
fn failed(route: u64, operators: &[&str]) -> Value {
    let mut run = run(route, operators, &[]);
    run["tokens"] = Value::Null;
    run["error"] = json!("Unavailable: the worker went away");
    run
}

/// Version 1 evidence with the reporter's conclusions `majority` and `first_divergence` as given
/// (`voting_runs`: the runs with tokens) and an `accused` list the voters ignore.
fn audit(runs: Vec<Value>, majority: &[usize], first_divergence: Option<u64>) -> String {
    let voting_runs = runs.iter().filter(|r| !r["tokens"].is_null()).count();
    json!({
        "version": 1, "pool": "pool-1", "request_id": "chatcmpl-1",
        "request": {"prompt": "p", "max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 7},
        "runs": runs, "voting_runs": voting_runs, "majority": majority, "accused": [],
        "first_divergence": first_divergence,
    })
    .to_string()
}

fn report(kind: BreachKind, evidence: String) -> BreachReport {
    BreachReport { pool_id: "pool-1".into(), operator: ACCUSED.to_lowercase(), kind, evidence, observed_at_ms: 1_764_200_000_000 }
}

fn decision(voter: &VoterPlugin, r: &BreachReport) -> Decision {
    let ballot = voter.vote(r).unwrap_or_else(|e| panic!("{} votes: {e}", voter.id()));
    assert!(!ballot.reason.is_empty());
    ballot.decision
}

fn invalid(voter: &VoterPlugin, r: &BreachReport) -> String {
    match voter.vote(r) {
        Err(VoterCallError::Voter { error: VoterError::InvalidReport(m), .. }) => m,
        other => panic!("expected invalid-report from {}, got {other:?}", voter.id()),
    }
}

/// The audit scenarios both wrong-output voters are run on, with what each decides.
#[test]
fn the_wrong_output_voters_convict_only_on_agreeing_clean_runs() {
    let host = support::host();
    let majority = load(&host, "voters/audit-majority", "audit-majority");
    let unanimous = load(&host, "voters/audit-unanimous", "audit-unanimous");
    let good = [5, 9, 2, 7];
    let bad = [5, 9, 3, 7];
    // (name, evidence, audit-majority's decision, audit-unanimous's decision)
    let cases: Vec<(&str, String, Decision, Decision)> = vec![
        (
            "the accused's route alone disagrees with two agreeing routes",
            audit(vec![run(0, &[OTHER_1, ACCUSED], &bad), run(1, &[OTHER_1, OTHER_2], &good), run(2, &[OTHER_2], &good)], &[1, 2], Some(2)),
            Decision::Eject,
            Decision::Eject,
        ),
        (
            "all runs agree",
            audit(vec![run(0, &[ACCUSED], &good), run(1, &[OTHER_1], &good), run(2, &[OTHER_2], &good)], &[0, 1, 2], None),
            Decision::Dismiss,
            Decision::Dismiss,
        ),
        (
            "the accused is also on an agreeing route",
            audit(vec![run(0, &[ACCUSED], &bad), run(1, &[ACCUSED, OTHER_1], &good), run(2, &[OTHER_2], &good)], &[1, 2], Some(2)),
            Decision::Dismiss,
            Decision::Dismiss,
        ),
        (
            "two runs, one each: nobody can tell who is wrong",
            audit(vec![run(0, &[ACCUSED], &bad), run(1, &[OTHER_1], &good)], &[], None),
            Decision::Dismiss,
            Decision::Dismiss,
        ),
        (
            "three runs, three answers",
            audit(vec![run(0, &[ACCUSED], &bad), run(1, &[OTHER_1], &good), run(2, &[OTHER_2], &[5, 1])], &[], None),
            Decision::Dismiss,
            Decision::Dismiss,
        ),
        (
            "the accused is on none of the runs",
            audit(vec![run(0, &[OTHER_2], &bad), run(1, &[OTHER_1], &good), run(2, &[OTHER_1], &good)], &[1, 2], Some(2)),
            Decision::Dismiss,
            Decision::Dismiss,
        ),
        (
            "the claimed first divergence is not what the tokens show",
            audit(vec![run(0, &[ACCUSED], &bad), run(1, &[OTHER_1], &good), run(2, &[OTHER_2], &good)], &[1, 2], Some(0)),
            Decision::Dismiss,
            Decision::Dismiss,
        ),
        (
            "a run that stops early diverges where it stops",
            audit(vec![run(0, &[ACCUSED], &good[..2]), run(1, &[OTHER_1], &good), run(2, &[OTHER_2], &good)], &[1, 2], Some(2)),
            Decision::Eject,
            Decision::Eject,
        ),
        (
            // A strict majority convicts for audit-majority; audit-unanimous wants every clean run to agree.
            "four of five agree, the fifth clean run is odd",
            audit(
                vec![
                    run(0, &[ACCUSED], &bad),
                    run(1, &[OTHER_1], &good),
                    run(2, &[OTHER_2], &good),
                    run(3, &[OTHER_1, OTHER_2], &good),
                    run(4, &[OTHER_2, OTHER_1], &[5, 9, 2, 8]),
                ],
                &[1, 2, 3],
                Some(2),
            ),
            Decision::Eject,
            Decision::Dismiss,
        ),
        (
            "a failed run does not vote",
            audit(vec![run(0, &[ACCUSED], &bad), run(1, &[OTHER_1], &good), run(2, &[OTHER_2], &good), failed(3, &[OTHER_1])], &[1, 2], Some(2)),
            Decision::Eject,
            Decision::Eject,
        ),
        (
            "the accused is only on a failed run",
            audit(vec![failed(0, &[ACCUSED]), run(1, &[OTHER_1], &good), run(2, &[OTHER_2], &good)], &[1, 2], None),
            Decision::Dismiss,
            Decision::Dismiss,
        ),
        (
            "the claimed majority is not what the tokens show",
            audit(vec![run(0, &[ACCUSED], &bad), run(1, &[OTHER_1], &good), run(2, &[OTHER_2], &good)], &[0, 1], Some(2)),
            Decision::Dismiss,
            Decision::Dismiss,
        ),
        (
            "the claimed voting runs are not what the tokens show",
            audit(vec![run(0, &[ACCUSED], &bad), run(1, &[OTHER_1], &good), run(2, &[OTHER_2], &good)], &[1, 2], Some(2))
                .replace("\"voting_runs\":3", "\"voting_runs\":4"),
            Decision::Dismiss,
            Decision::Dismiss,
        ),
    ];
    for (name, evidence, want_majority, want_unanimous) in cases {
        let r = report(BreachKind::WrongOutput, evidence);
        assert_eq!(decision(&majority, &r), want_majority, "audit-majority: {name}");
        assert_eq!(decision(&unanimous, &r), want_unanimous, "audit-unanimous: {name}");
    }
    // Other kinds: abstain.
    for kind in [BreachKind::MissedHeartbeat, BreachKind::StreamCut, BreachKind::TooSlow, BreachKind::Other] {
        let r = report(kind, "{}".into());
        assert_eq!(decision(&majority, &r), Decision::Abstain);
        assert_eq!(decision(&unanimous, &r), Decision::Abstain);
    }
    // Bad evidence: typed refusals, and the voter keeps serving.
    let one_run = audit(vec![run(0, &[ACCUSED], &good)], &[], None);
    let no_workers = audit(vec![run(0, &[], &good), run(1, &[OTHER_1], &good)], &[0, 1], None);
    for (evidence, accused) in [
        ("not json".to_string(), ACCUSED),
        (one_run, ACCUSED),
        (no_workers, ACCUSED),
        (audit(vec![run(0, &[ACCUSED], &good), json!({"route": 1, "shards": [{"operator": null}], "tokens": [-1]})], &[], None), ACCUSED),
        (audit(vec![run(0, &[ACCUSED], &good), run(1, &[OTHER_1], &good)], &[0, 1], None).replace("\"version\":1", "\"version\":2"), ACCUSED),
        (audit(vec![run(0, &[ACCUSED], &good), run(1, &[OTHER_1], &good)], &[0, 1], None).replace("\"shards\"", "\"workers\""), ACCUSED),
        (audit(vec![run(0, &[ACCUSED], &good), run(1, &[OTHER_1], &good)], &[0, 1], None), "0x12"),
    ] {
        let mut r = report(BreachKind::WrongOutput, evidence);
        r.operator = accused.into();
        for voter in [&majority, &unanimous] {
            assert!(!invalid(voter, &r).is_empty());
        }
    }
    assert_eq!(majority.idle_instances(), 1, "a refusal is an answer: the instance is kept");
}

#[test]
fn liveness_ejects_past_its_thresholds_and_warns_below() {
    let host = support::host();
    let liveness = load(&host, "voters/liveness", "liveness");
    let observed = support_now_ms();
    let heartbeat = |silence_ms: u64| {
        let mut r = report(
            BreachKind::MissedHeartbeat,
            json!({"peer": "p1", "intervalMs": 5000, "lastHeartbeatMs": observed - silence_ms}).to_string(),
        );
        r.observed_at_ms = observed;
        r
    };
    assert_eq!(decision(&liveness, &heartbeat(9_999)), Decision::Dismiss);
    assert_eq!(decision(&liveness, &heartbeat(15_000)), Decision::Warn);
    assert_eq!(decision(&liveness, &heartbeat(29_999)), Decision::Warn);
    assert_eq!(decision(&liveness, &heartbeat(30_000)), Decision::Eject);
    let cut = |due: u64, received: u64, silent: u64| {
        let mut r = report(
            BreachKind::StreamCut,
            json!({"peer": "p1", "request": {"id": "r"}, "tokensDue": due, "tokensReceived": received, "silentMs": silent}).to_string(),
        );
        r.observed_at_ms = observed;
        r
    };
    assert_eq!(decision(&liveness, &cut(64, 10, 45_000)), Decision::Eject);
    assert_eq!(decision(&liveness, &cut(64, 10, 12_000)), Decision::Warn);
    assert_eq!(decision(&liveness, &cut(64, 10, 2_000)), Decision::Dismiss);
    assert_eq!(decision(&liveness, &cut(64, 64, 45_000)), Decision::Dismiss, "everything due arrived");
    assert_eq!(decision(&liveness, &report(BreachKind::WrongOutput, "{}".into())), Decision::Abstain);
    // A report dated ahead of the host's clock cannot lengthen a silence.
    let mut future = heartbeat(60_000);
    future.observed_at_ms = observed + 3_600_000;
    assert!(invalid(&liveness, &future).contains("future"));
    let mut zero = heartbeat(60_000);
    zero.evidence = json!({"peer": "p1", "intervalMs": 0, "lastHeartbeatMs": 0}).to_string();
    assert!(invalid(&liveness, &zero).contains("interval"));
    let mut after = heartbeat(0);
    after.evidence = json!({"peer": "p1", "intervalMs": 5000, "lastHeartbeatMs": observed + 1}).to_string();
    assert!(invalid(&liveness, &after).contains("after"));
}

fn support_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn the_dissenter_always_dismisses_and_the_trap_is_replaced_each_time() {
    let host = support::host();
    let dissent = load(&host, "test/voter-dissent", "test-voter-dissent");
    let trap = load(&host, "bad/voter-trap", "test-voter-trap");
    let evidence = audit(vec![run(0, &[ACCUSED], &[1]), run(1, &[OTHER_1], &[2]), run(2, &[OTHER_2], &[2])], &[1, 2], Some(0));
    for kind in [BreachKind::WrongOutput, BreachKind::MissedHeartbeat] {
        assert_eq!(decision(&dissent, &report(kind, evidence.clone())), Decision::Dismiss);
    }
    for _ in 0..2 {
        match trap.vote(&report(BreachKind::WrongOutput, evidence.clone())) {
            Err(VoterCallError::Plugin(CallError::Trap { id, message })) => {
                assert_eq!(id, "test-voter-trap");
                assert!(message.contains("unreachable"), "{message}");
            }
            other => panic!("expected a trap, got {other:?}"),
        }
        assert_eq!(trap.idle_instances(), 0, "a trapped instance is not put back");
    }
}

#[test]
fn a_voter_may_not_be_granted_http() {
    let mut grants = computepool_plugin_host::GrantPolicy::default();
    grants.plugins.insert("liveness".into(), [computepool_plugin_host::Capability::Http].into_iter().collect());
    // The manifest does not ask for http, so the grant is unused; the kind's table refuses a manifest that does.
    let dir = tempfile::tempdir().unwrap();
    let copy = support::copy_plugin("voters/liveness", &dir.path().join("liveness"));
    support::edit_manifest(&copy, r#"capabilities = ["clock"]"#, r#"capabilities = ["clock", "http"]"#);
    let host = PluginHost::new(computepool_plugin_host::HostConfig { grants, ..Default::default() }).unwrap();
    let err = host.load_plugin(&copy).unwrap_err();
    assert!(err.to_string().contains("http"), "{err}");
}
