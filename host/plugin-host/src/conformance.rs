//! The conformance kit: runs a folder of cases against a loaded plugin with the production settings and
//! says which pass. Each case is a folder holding `case.toml`; budgets are in fuel, never wall time, so a
//! result does not depend on the machine.
//!
//! Sampler cases (`computepool:sampler`; the suite every sampler must pass is
//! `host/plugin-host/conformance/sampler/<version>/`, a plugin may ship more in its own `conformance/`):
//!
//! ```toml
//! description = "temperature 0 is greedy: the first maximum wins"
//! [input]
//! logits = [0.5, 2.0, 2.0, -1.0]   # or: vocab = 128256 and logits-seed = 7 (generated, see below)
//! history = [1, 2]                 # default []
//! generated = 0                    # default 0
//! repeat = 2                       # run this many times with fresh streams; all answers must agree
//! [input.params]                   # SamplingParams, defaults as there
//! temperature = 0.0
//! [expect]
//! token = 1                        # or: error = "invalid-input" | "rejected" | "out-of-fuel" | …
//!                                  # or: any-token = true (any in-vocabulary token; with repeat: the same)
//! max-fuel = 1_000_000             # optional budget per call
//! ```
//!
//! Generated logits: entry `i` is `(next_f64() - 0.5) * 20` from a [`RequestRandom`] seeded with
//! `logits-seed`, so every host makes the same vector.
//!
//! Coalition-voter cases (`computepool:coalition-voter`; kind suite
//! `host/plugin-host/conformance/coalition-voter/<version>/`, plus the plugin's own `conformance/`):
//!
//! ```toml
//! description = "the accused's route alone disagrees: eject"
//! [input]                          # the breach report
//! pool-id = "pool-1"               # default "pool-1"
//! operator = "0x00000000000000000000000000000000000000aa"
//! kind = "wrong-output"            # missed-heartbeat | wrong-output | too-slow | stream-cut | other
//! evidence = '''{"runs": []}'''    # the evidence text, as the voter receives it
//! observed-at-ms = 1764200000000   # default 0
//! repeat = 2                       # ask this many times; every answer must be the same
//! [expect]
//! decision = "eject"               # or: error = "invalid-report" | "unavailable" | "trap" | …
//!                                  # or: any-answer = true (a ballot or the voter's own error — never a
//!                                  #     trap, fuel, memory or contract failure)
//! max-fuel = 50_000_000            # optional budget per call
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::CallError;
use crate::random::RequestRandom;
use crate::sampler::{SampleInput, SamplerPlugin, SamplingParams};
use crate::voter::{self, VoterCallError, VoterError, VoterPlugin};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[serde(default)]
    description: String,
    input: CaseInput,
    expect: Expectation,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CaseInput {
    logits: Option<Vec<f32>>,
    vocab: Option<usize>,
    logits_seed: Option<u64>,
    #[serde(default)]
    history: Vec<u32>,
    #[serde(default)]
    generated: u32,
    #[serde(default = "one")]
    repeat: u32,
    #[serde(default)]
    params: CaseParams,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
struct CaseParams {
    temperature: Option<f32>,
    top_k: Option<u32>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
}

impl CaseParams {
    fn resolve(&self) -> SamplingParams {
        let d = SamplingParams::default();
        SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            seed: self.seed.unwrap_or(d.seed),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Expectation {
    token: Option<u32>,
    #[serde(default)]
    any_token: bool,
    error: Option<String>,
    max_fuel: Option<u64>,
}

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    /// The case folder's name.
    pub name: String,
    pub description: String,
    /// `None` when the case passed; otherwise what went wrong.
    pub failure: Option<String>,
}

/// The outcome of a suite.
#[derive(Debug, Clone, Default)]
pub struct SuiteReport {
    pub cases: Vec<CaseResult>,
}

impl SuiteReport {
    pub fn passed(&self) -> bool {
        !self.cases.is_empty() && self.cases.iter().all(|c| c.failure.is_none())
    }

    pub fn failures(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases.iter().filter(|c| c.failure.is_some())
    }
}

/// The short name of a call error, as `expect.error` spells it.
pub fn error_name(error: &CallError) -> &'static str {
    match error {
        CallError::OutOfFuel { .. } => "out-of-fuel",
        CallError::MemoryLimit { .. } => "memory-limit",
        CallError::Trap { .. } => "trap",
        CallError::TokenOutOfRange { .. } => "token-out-of-range",
        CallError::ContractBreach { .. } => "contract-breach",
        CallError::Rejected { .. } => "rejected",
        CallError::Disabled { .. } => "disabled",
        CallError::InvalidInput { .. } => "invalid-input",
        CallError::Instantiate { .. } => "instantiate",
    }
}

fn generated_logits(vocab: usize, seed: u64) -> Vec<f32> {
    let mut random = RequestRandom::new(seed);
    (0..vocab).map(|_| ((random.next_f64() - 0.5) * 20.0) as f32).collect()
}

/// Runs every case folder under `suite` against `sampler`, in name order. A suite folder that cannot be
/// read, or holds no case, is one failed case (an empty suite must not pass).
pub fn run_sampler_suite(sampler: &SamplerPlugin, suite: &Path) -> SuiteReport {
    run_cases(suite, |dir| {
        let case = read_case(dir).map_err(|m| (String::new(), m))?;
        run_case(sampler, &case).map_err(|m| (case.description.clone(), m))?;
        Ok(case.description)
    })
}

fn read_case(dir: &Path) -> Result<Case, String> {
    let path = dir.join("case.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn run_case(sampler: &SamplerPlugin, case: &Case) -> Result<(), String> {
    let logits = match (&case.input.logits, case.input.vocab, case.input.logits_seed) {
        (Some(logits), None, None) => logits.clone(),
        (None, Some(vocab), Some(seed)) => generated_logits(vocab, seed),
        _ => return Err("input needs either `logits` or both `vocab` and `logits-seed`".to_string()),
    };
    let expect = &case.expect;
    if [expect.token.is_some(), expect.error.is_some(), expect.any_token].iter().filter(|b| **b).count() != 1 {
        return Err("expect needs exactly one of `token`, `error` and `any-token`".to_string());
    }
    let params = case.input.params.resolve();
    let input = SampleInput { logits: &logits, history: &case.input.history, generated: case.input.generated, params };
    let mut first: Option<u32> = None;
    for run in 0..case.input.repeat.max(1) {
        let mut random = RequestRandom::new(params.seed);
        match (sampler.sample_metered(&mut random, &input), expect.token, &expect.error) {
            (Ok((token, fuel)), expected, _) => {
                if let Some(expected) = expected
                    && token != expected
                {
                    return Err(format!("run {run}: expected token {expected}, got {token}"));
                }
                if expect.error.is_some() {
                    return Err(format!("run {run}: expected error `{}`, got token {token}", expect.error.as_deref().unwrap_or("")));
                }
                if let Some(budget) = expect.max_fuel
                    && fuel > budget
                {
                    return Err(format!("run {run}: burned {fuel} fuel, over the budget of {budget}"));
                }
                if let Some(previous) = first
                    && previous != token
                {
                    return Err(format!("run {run}: answered {token}, an earlier run answered {previous} (not deterministic)"));
                }
                first = Some(token);
            }
            (Err(error), _, Some(expected)) if error_name(&error) == expected => {}
            (Err(error), _, _) => return Err(format!("run {run}: {error} ({})", error_name(&error))),
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VoterCase {
    #[serde(default)]
    description: String,
    input: VoterCaseInput,
    expect: VoterExpectation,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct VoterCaseInput {
    #[serde(default = "default_pool")]
    pool_id: String,
    operator: String,
    kind: String,
    evidence: String,
    #[serde(default)]
    observed_at_ms: u64,
    #[serde(default = "one")]
    repeat: u32,
}

fn default_pool() -> String {
    "pool-1".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct VoterExpectation {
    decision: Option<String>,
    error: Option<String>,
    #[serde(default)]
    any_answer: bool,
    max_fuel: Option<u64>,
}

fn breach_kind(name: &str) -> Option<voter::BreachKind> {
    use voter::BreachKind::*;
    Some(match name {
        "missed-heartbeat" => MissedHeartbeat,
        "wrong-output" => WrongOutput,
        "too-slow" => TooSlow,
        "stream-cut" => StreamCut,
        "other" => Other,
        _ => return None,
    })
}

fn decision_name(d: voter::Decision) -> &'static str {
    match d {
        voter::Decision::Eject => "eject",
        voter::Decision::Warn => "warn",
        voter::Decision::Dismiss => "dismiss",
        voter::Decision::Abstain => "abstain",
    }
}

/// The short name of a failed vote, as `expect.error` spells it.
pub fn voter_error_name(error: &VoterCallError) -> &'static str {
    match error {
        VoterCallError::Voter { error: VoterError::InvalidReport(_), .. } => "invalid-report",
        VoterCallError::Voter { error: VoterError::Unavailable(_), .. } => "unavailable",
        VoterCallError::Plugin(e) => error_name(e),
    }
}

/// Runs every case folder under `suite` against `voter`, in name order (as [`run_sampler_suite`]).
pub fn run_voter_suite(voter: &VoterPlugin, suite: &Path) -> SuiteReport {
    run_cases(suite, |dir| {
        let path = dir.join("case.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| (String::new(), format!("{}: {e}", path.display())))?;
        let case: VoterCase = toml::from_str(&text).map_err(|e| (String::new(), format!("{}: {e}", path.display())))?;
        run_voter_case(voter, &case).map_err(|m| (case.description.clone(), m))?;
        Ok(case.description)
    })
}

/// The suite walk shared by the kinds: each case folder in name order, `run` giving the case's
/// description or (description, failure).
fn run_cases(suite: &Path, run: impl Fn(&Path) -> Result<String, (String, String)>) -> SuiteReport {
    let mut report = SuiteReport::default();
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(suite) {
        Ok(entries) => entries.flatten().map(|e| e.path()).filter(|p| p.join("case.toml").is_file()).collect(),
        Err(e) => {
            report.cases.push(CaseResult {
                name: suite.display().to_string(),
                description: String::new(),
                failure: Some(format!("cannot read the suite: {e}")),
            });
            return report;
        }
    };
    dirs.sort();
    if dirs.is_empty() {
        report.cases.push(CaseResult {
            name: suite.display().to_string(),
            description: String::new(),
            failure: Some("the suite holds no case folder with a case.toml".to_string()),
        });
    }
    for dir in dirs {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (description, failure) = match run(&dir) {
            Ok(description) => (description, None),
            Err((description, message)) => (description, Some(message)),
        };
        report.cases.push(CaseResult { name, description, failure });
    }
    report
}

fn run_voter_case(voter: &VoterPlugin, case: &VoterCase) -> Result<(), String> {
    let expect = &case.expect;
    if [expect.decision.is_some(), expect.error.is_some(), expect.any_answer].iter().filter(|b| **b).count() != 1 {
        return Err("expect needs exactly one of `decision`, `error` and `any-answer`".to_string());
    }
    let input = &case.input;
    let kind = breach_kind(&input.kind).ok_or_else(|| format!("input.kind {:?} is not a breach kind", input.kind))?;
    let report = voter::BreachReport {
        pool_id: input.pool_id.clone(),
        operator: input.operator.clone(),
        kind,
        evidence: input.evidence.clone(),
        observed_at_ms: input.observed_at_ms,
    };
    let mut first: Option<String> = None;
    for run in 0..input.repeat.max(1) {
        let (answer, fuel) = match voter.vote_metered(&report) {
            Ok((ballot, fuel)) => {
                if let Some(want) = &expect.decision
                    && decision_name(ballot.decision) != want
                {
                    return Err(format!("run {run}: expected {want}, got {} ({})", decision_name(ballot.decision), ballot.reason));
                }
                if let Some(want) = &expect.error {
                    return Err(format!("run {run}: expected error `{want}`, got {} ({})", decision_name(ballot.decision), ballot.reason));
                }
                (format!("{}: {}", decision_name(ballot.decision), ballot.reason), Some(fuel))
            }
            Err(error) => {
                let name = voter_error_name(&error);
                let own = error.voter_error().is_some();
                match &expect.error {
                    Some(want) if want == name => {}
                    None if expect.any_answer && own => {}
                    _ => return Err(format!("run {run}: {error} ({name})")),
                }
                (error.to_string(), None)
            }
        };
        if let (Some(budget), Some(fuel)) = (expect.max_fuel, fuel)
            && fuel > budget
        {
            return Err(format!("run {run}: burned {fuel} fuel, over the budget of {budget}"));
        }
        if let Some(previous) = &first
            && *previous != answer
        {
            return Err(format!("run {run}: answered {answer:?}, an earlier run answered {previous:?} (not deterministic)"));
        }
        first = Some(answer);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kind suite's expected tokens for generated logits are the native argmax of those logits.
    #[test]
    fn generated_case_expectations_are_the_native_argmax() {
        for case in [
            "conformance/sampler/0.1.0/greedy-large-vocab-budget",
            "../../plugins/samplers/top-p/conformance/top-k-one-is-argmax",
        ] {
            check_argmax_case(&Path::new(env!("CARGO_MANIFEST_DIR")).join(case));
        }
    }

    fn check_argmax_case(dir: &Path) {
        let case = read_case(dir).unwrap();
        let logits = generated_logits(case.input.vocab.unwrap(), case.input.logits_seed.unwrap());
        let mut best = 0;
        for (i, v) in logits.iter().enumerate() {
            if *v > logits[best] {
                best = i;
            }
        }
        assert_eq!(case.expect.token, Some(best as u32), "{}", dir.display());
    }
}

/// The kind suites shipped with this crate (`<kind>/<version>/<case>/case.toml`), in its source tree.
pub const KIND_SUITES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance");

/// What [`test_plugin`] ran: each suite folder and its report.
#[derive(Debug, Default)]
pub struct PluginTestReport {
    pub id: String,
    pub suites: Vec<(PathBuf, SuiteReport)>,
}

impl PluginTestReport {
    /// Every suite ran at least one case and every case passed.
    pub fn passed(&self) -> bool {
        !self.suites.is_empty() && self.suites.iter().all(|(_, r)| r.passed())
    }
}

/// Why a plugin could not be tested at all.
#[derive(Debug, thiserror::Error)]
pub enum PluginTestError {
    #[error(transparent)]
    Load(#[from] crate::error::LoadError),
    #[error("plugin `{id}` is a {kind}; the kit has suites for samplers and coalition voters only so far")]
    NoSuite { id: String, kind: crate::manifest::PluginKind },
}

/// Loads the plugin in `dir` into `host` (the production settings are the host's), then runs its kind's
/// suite for the WIT version it implements (under `kind_suites`) and the plugin's own `conformance/` cases.
pub fn test_plugin(host: &crate::PluginHost, dir: &Path, kind_suites: &Path) -> Result<PluginTestReport, PluginTestError> {
    let plugin = host.load_plugin(dir)?;
    let manifest = &plugin.manifest;
    let run_suite: Box<dyn Fn(&Path) -> SuiteReport> = match (plugin.as_sampler(), plugin.as_voter()) {
        (Some(sampler), _) => Box::new(move |f| run_sampler_suite(sampler, f)),
        (None, Some(voter)) => Box::new(move |f| run_voter_suite(voter, f)),
        (None, None) => return Err(PluginTestError::NoSuite { id: manifest.id.clone(), kind: manifest.kind }),
    };
    let mut folders = vec![kind_suites.join(manifest.kind.to_string()).join(manifest.wit.version.to_string())];
    let own = dir.join("conformance");
    if own.is_dir() {
        folders.push(own);
    }
    let suites = folders.into_iter().map(|f| {
        let report = run_suite(&f);
        (f, report)
    });
    Ok(PluginTestReport { id: manifest.id.clone(), suites: suites.collect() })
}
