//! Every sampler in plugins/ passes its kind's suite (host/plugin-host/conformance/sampler/<version>) and
//! its own cases; the kit fails a plugin that breaks the contract and a case whose expectation is wrong.

mod support;

use std::path::Path;

use computepool_plugin_host::conformance::{KIND_SUITES_DIR, run_sampler_suite};
use support::{host, plugin};

fn kind_suite() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/sampler/0.1.0")
}

/// `test_plugin` (what `computepool plugin test` runs; host/node/tests/plugin_cli.rs runs that on every
/// plugin in plugins/) loads a plugin and runs its kind's suite and its own cases.
#[test]
fn test_plugin_runs_the_kind_suite_and_the_plugins_own_cases() {
    let host = host();
    let dir = plugin("samplers/top-p");
    let report = computepool_plugin_host::conformance::test_plugin(&host, &dir, Path::new(KIND_SUITES_DIR)).unwrap();
    assert!(report.passed(), "{report:?}");
    assert_eq!(report.suites.len(), 2, "the kind suite and conformance/");
    assert_eq!(report.suites[0].1.cases.len(), 6);
    assert!(!report.suites[1].1.cases.is_empty());
}

#[test]
fn the_kit_fails_a_plugin_that_breaks_the_contract() {
    let host = host();
    host.load_plugin(&plugin("bad/out-of-range-token")).unwrap();
    let report = run_sampler_suite(&host.sampler("bad-out-of-range-token").unwrap(), &kind_suite());
    assert!(!report.passed());
    let failure = report.failures().find(|c| c.name == "greedy-first-maximum").expect("the greedy case fails");
    assert!(failure.failure.as_deref().unwrap().contains("token-out-of-range"), "{failure:?}");
    // The host-side input checks still hold for it.
    assert!(report.cases.iter().any(|c| c.name == "empty-logits" && c.failure.is_none()));
}

#[test]
fn the_kit_fails_wrong_expectations_budgets_and_empty_suites() {
    let tmp = tempfile::tempdir().unwrap();
    let case = |name: &str, text: &str| {
        std::fs::create_dir_all(tmp.path().join(name)).unwrap();
        std::fs::write(tmp.path().join(name).join("case.toml"), text).unwrap();
    };
    case("wrong-token", "[input]\nlogits = [1.0, 2.0]\n[expect]\ntoken = 0\n");
    case("over-budget", "[input]\nlogits = [1.0, 2.0]\n[expect]\ntoken = 1\nmax-fuel = 1\n");
    case("two-expectations", "[input]\nlogits = [1.0]\n[expect]\ntoken = 0\nerror = \"trap\"\n");
    case("unknown-field", "[input]\nlogits = [1.0]\nlogit = 2\n[expect]\ntoken = 0\n");
    let host = host();
    host.load_plugin(&plugin("samplers/greedy")).unwrap();
    let greedy = host.sampler("greedy").unwrap();
    let report = run_sampler_suite(&greedy, tmp.path());
    let failures: Vec<(&str, &str)> =
        report.cases.iter().map(|c| (c.name.as_str(), c.failure.as_deref().unwrap_or("passed"))).collect();
    assert_eq!(failures.len(), 4);
    assert!(failures[0].1.contains("over the budget of 1"), "{failures:?}");
    assert!(failures[1].1.contains("exactly one of"), "{failures:?}");
    assert!(failures[2].1.contains("unknown field"), "{failures:?}");
    assert!(failures[3].1.contains("expected token 0, got 1"), "{failures:?}");
    let empty = tempfile::tempdir().unwrap();
    assert!(!run_sampler_suite(&greedy, empty.path()).passed(), "an empty suite must not pass");
}

/// Every coalition voter in plugins/ passes the coalition-voter suite and its own cases; the trapping
/// voter fails the kind suite, and a wrong decision is reported as such.
#[test]
fn every_voter_passes_its_suites_and_the_trap_fails() {
    let host = host();
    for (relative, own_cases) in
        [("voters/audit-majority", true), ("voters/audit-unanimous", true), ("voters/liveness", true), ("test/voter-dissent", false)]
    {
        let report = computepool_plugin_host::conformance::test_plugin(&host, &plugin(relative), Path::new(KIND_SUITES_DIR)).unwrap();
        assert!(report.passed(), "{relative}: {report:?}");
        assert_eq!(report.suites.len(), 1 + own_cases as usize, "{relative}");
        assert_eq!(report.suites[0].1.cases.len(), 4, "{relative}");
    }
    let report = computepool_plugin_host::conformance::test_plugin(&host, &plugin("bad/voter-trap"), Path::new(KIND_SUITES_DIR)).unwrap();
    assert!(!report.passed());
    assert!(report.suites[0].1.cases.iter().all(|c| c.failure.as_deref().is_some_and(|f| f.contains("(trap)"))), "{report:?}");

    let tmp = tempfile::tempdir().unwrap();
    let case = |name: &str, text: &str| {
        std::fs::create_dir_all(tmp.path().join(name)).unwrap();
        std::fs::write(tmp.path().join(name).join("case.toml"), text).unwrap();
    };
    let input = "[input]\noperator = \"0x00000000000000000000000000000000000000aa\"\nkind = \"other\"\nevidence = \"{}\"\n";
    case("a-wrong-decision", &format!("{input}[expect]\ndecision = \"eject\"\n"));
    case("b-over-budget", &format!("{input}[expect]\ndecision = \"dismiss\"\nmax-fuel = 1\n"));
    case("c-bad-kind", "[input]\noperator = \"x\"\nkind = \"slow\"\nevidence = \"\"\n[expect]\nany-answer = true\n");
    case("d-passes", &format!("{input}[expect]\ndecision = \"dismiss\"\n"));
    let dissent = host.voter("test-voter-dissent").unwrap();
    let report = computepool_plugin_host::conformance::run_voter_suite(&dissent, tmp.path());
    let failures: Vec<&str> = report.cases.iter().map(|c| c.failure.as_deref().unwrap_or("passed")).collect();
    assert!(failures[0].contains("expected eject, got dismiss"), "{failures:?}");
    assert!(failures[1].contains("over the budget of 1"), "{failures:?}");
    assert!(failures[2].contains("not a breach kind"), "{failures:?}");
    assert_eq!(failures[3], "passed");
}
