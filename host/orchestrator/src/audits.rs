//! Output audits: after a request finishes on one route, with probability `--audit-rate` the
//! orchestrator runs the same request again on up to [`MAX_PARTNERS`] other live routes of the pool and
//! compares the token ids. Every request is reproducible (greedy, or seeded: a request without a seed
//! was given one before it went out), and a sharded run gives exactly the tokens of any other split on
//! the same backend (ARCHITECTURE.md, invariant 2), so honest routes agree token for token. The
//! partner routes share as few workers as possible with the user's route and with each other. A strict
//! majority of agreeing runs convicts the workers found only in disagreeing runs; when that is more than
//! one worker, each of them is run once more on a route whose other workers the majority cleared (a run
//! that tests it alone: agreeing clears it, disagreeing pins it), and the evidence is concluded again
//! over every run; each accused operator
//! (the worker's payout address) gets a [`BreachReport`] of kind `WrongOutput`, sent to the coalition's
//! judge through the channel [`AppState`](super::AppState) owns. The voters decide; an audit ejects
//! nobody by itself.
//!
//! Audit runs are internal: never billed, not recorded as requests, not in the request metrics, and
//! their request ids have the same shape as users' (a worker cannot tell an audit from traffic by its
//! id). Every concluded audit is stored with its evidence and reports (`GET /audits`, operator token:
//! the evidence holds the user's prompt and output).
//!
//! What an audit cannot do, and so does not try:
//! - Tell apart the workers of one route. It sees tokens only (the orchestrator never touches
//!   activations), so when a route disagrees alone every worker of it that serves in no agreeing route
//!   is accused; a pool whose routes share workers narrows the blame (the partners are picked to share
//!   as few workers as possible with the user's route, so in a pool with several workers per range the
//!   agreeing runs clear the workers they share).
//! - Compare runs on different numerics. Only routes whose workers run on the same kind of device as
//!   the user's route are partners (all on CPU, or all on one GPU model; a mixed route only with a route
//!   that has the same device per layer range). Every worker of both must be registered.
//! - Judge a request that moved routes mid-stream (a failover): its tokens came from two routes.
//!
//! # Evidence (the `evidence` of every report; version 1)
//!
//! One JSON object, the same text in every report of one audit (its digest is what ballots sign). A
//! complete literal example: `audit-evidence-example.json` beside this file. In outline:
//!
//! ```json
//! {
//!   "version": 1,
//!   "pool": "smol",
//!   "request_id": "chatcmpl-…",
//!   "request": { "prompt": "…", "max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 7 },
//!   "runs": [
//!     { "role": "original", "route": 0,
//!       "shards": [ { "peer": "<peer id>", "operator": "0x…", "layers": "0..15" },
//!                   { "peer": "<peer id>", "operator": null, "layers": "15..30" } ],
//!       "tokens": [504, 3575, 314], "error": null, "agrees": false, "divergence": 2 },
//!     { "role": "audit", "route": 1, "shards": [ … ], "tokens": [504, 3575, 1085], "error": null,
//!       "agrees": true, "divergence": null },
//!     { "role": "audit", "route": 2, "shards": [ … ], "tokens": null, "error": "Unavailable: …",
//!       "agrees": null, "divergence": null }
//!   ],
//!   "voting_runs": 2,
//!   "majority": [1],
//!   "accused": [ { "peer": "<peer id>", "operator": "0x…", "layers": "0..15" } ],
//!   "first_divergence": 2
//! }
//! ```
//!
//! - `request`: the worker request every run used (docs/PROTOCOL.md §12's shape, `computepool_entry_api::GenerateRequest`):
//!   the user's, with `max_tokens` = the tokens the user's run produced, and no `id`, `stop` or
//!   `resume_tokens`.
//! - `runs[0]` is the user's own run (`role` `original`), the rest are the audit runs (`audit`). `route`
//!   is the route's number in the pool (its topologies that are single rings first: 0 the topology, then
//!   the replicas; then the routes that mix workers of one topology). `shards` lists the route's
//!   workers, entry first: peer id, payout address (`null`: none registered), layer range.
//! - `tokens`: the run's token ids; `null` when it failed (`error` says why), and then it does not vote.
//! - `agrees`: the run's tokens equal the majority's (`null`: failed, or there is no majority).
//!   `divergence`: for a disagreeing run, the first index where its tokens differ from the majority's
//!   (where one list is a prefix of the other, the shorter length).
//! - `voting_runs`: runs with tokens. `majority`: indices into `runs` of the runs sharing one token list
//!   whose count is a strict majority of the voting runs (2 × count > voting_runs, with at least 2
//!   voting runs); empty when there is none.
//! - `accused`: the workers in at least one disagreeing run and in no agreeing run.
//!   `first_divergence`: the smallest `divergence`, `null` when every voting run agrees.
//!
//! A voter should recompute all of this from `runs[*].tokens` and `runs[*].shards` rather than trust the
//! derived fields: the report's operator is guilty only if the majority runs share one token list and
//! are a strict majority of the runs with tokens, and some accused worker paid to that operator serves
//! in no majority run and in a run whose tokens differ from the majority's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use computepool_keeper::coalition::{BreachKind, BreachReport};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

use super::pools::Pool;
use super::store::{AuditRecord, Store};
use super::workers::{Workers, now_ms};
use computepool_entry_api::GenerateRequest;

/// `--audit-rate`'s default: one finished request in 20. Each audit costs up to [`MAX_PARTNERS`] more
/// runs of the request, so the pool computes up to 10% more on average.
pub const DEFAULT_RATE: f64 = 0.05;

/// Routes an audit re-runs a request on, besides the user's: two make a 2-of-3 majority possible.
pub const MAX_PARTNERS: usize = 2;

/// Audits in flight at once; a finished request picked for an audit while this many run is not audited
/// (audits must never crowd out users).
pub const MAX_CONCURRENT: usize = 4;

/// Longest an audit run may take before it counts as failed.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

/// The version of the evidence JSON this module writes.
pub const EVIDENCE_VERSION: u32 = 1;

/// Checks an `--audit-rate` value: a probability.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text.parse().map_err(|e| format!("{text:?} is not a number: {e}"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!("the audit rate is a probability, from 0 to 1; got {rate}"));
    }
    Ok(rate)
}

/// A request that finished on the route it started on: what an audit checks.
pub struct FinishedRun {
    pub pool: Arc<Pool>,
    pub route: usize,
    /// The request as the user's route ran it.
    pub request: GenerateRequest,
    /// Every token id it produced, a final stop token included.
    pub tokens: Vec<u32>,
}

/// Whose run it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The user's own run.
    Original,
    /// A re-run by the audit.
    Audit,
}

/// One worker of a run's route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardEvidence {
    pub peer: String,
    /// Its payout address, if it registered one.
    pub operator: Option<String>,
    pub layers: String,
}

/// One run of the audited request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEvidence {
    pub role: Role,
    pub route: usize,
    pub shards: Vec<ShardEvidence>,
    pub tokens: Option<Vec<u32>>,
    pub error: Option<String>,
    pub agrees: Option<bool>,
    pub divergence: Option<usize>,
}

/// The evidence of one audit (the schema in this module's documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub version: u32,
    pub pool: String,
    pub request_id: String,
    pub request: GenerateRequest,
    pub runs: Vec<RunEvidence>,
    pub voting_runs: usize,
    pub majority: Vec<usize>,
    pub accused: Vec<ShardEvidence>,
    pub first_divergence: Option<usize>,
}

/// What an audit concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every run with tokens agrees (at least two).
    Agreed,
    /// A strict majority agrees and some workers serve only in disagreeing runs.
    Convicted,
    /// No strict majority, too few runs, or a disagreement no worker can be blamed for alone.
    Inconclusive,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agreed => "agreed",
            Self::Convicted => "convicted",
            Self::Inconclusive => "inconclusive",
        }
    }
}

/// The first index where `a` and `b` differ; where one is a prefix of the other, the shorter length;
/// `None` when they are equal.
pub fn divergence(a: &[u32], b: &[u32]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() == b.len() => None,
        None => Some(a.len().min(b.len())),
    }
}

/// Fills in the derived fields of `runs` (`agrees`, `divergence`) and returns the evidence and what it
/// shows.
pub fn conclude(pool: &str, request_id: &str, request: GenerateRequest, mut runs: Vec<RunEvidence>) -> (Evidence, Outcome) {
    let voting: Vec<usize> = (0..runs.len()).filter(|&i| runs[i].tokens.is_some()).collect();
    // Runs grouped by their token lists; a BTreeMap keeps the grouping independent of run order.
    let mut groups: BTreeMap<&[u32], Vec<usize>> = BTreeMap::new();
    for &i in &voting {
        groups.entry(runs[i].tokens.as_deref().expect("voting runs have tokens")).or_default().push(i);
    }
    let majority: Vec<usize> = match groups.values().find(|g| voting.len() >= 2 && 2 * g.len() > voting.len()) {
        Some(group) => group.clone(),
        None => Vec::new(),
    };
    let truth: Option<Vec<u32>> = majority.first().and_then(|&i| runs[i].tokens.clone());
    let mut agreeing_peers = BTreeSet::new();
    for &i in &majority {
        agreeing_peers.extend(runs[i].shards.iter().map(|s| s.peer.clone()));
    }
    let mut accused: Vec<ShardEvidence> = Vec::new();
    for run in &mut runs {
        let (Some(tokens), Some(truth)) = (&run.tokens, &truth) else {
            run.agrees = None;
            run.divergence = None;
            continue;
        };
        run.divergence = divergence(tokens, truth);
        run.agrees = Some(run.divergence.is_none());
        if run.divergence.is_some() {
            for shard in &run.shards {
                if !agreeing_peers.contains(&shard.peer) && !accused.iter().any(|a| a.peer == shard.peer) {
                    accused.push(shard.clone());
                }
            }
        }
    }
    let first_divergence = runs.iter().filter_map(|r| r.divergence).min();
    let outcome = match (truth.is_some(), first_divergence, accused.is_empty()) {
        (true, None, _) => Outcome::Agreed,
        (true, Some(_), false) => Outcome::Convicted,
        _ => Outcome::Inconclusive,
    };
    let evidence = Evidence {
        version: EVIDENCE_VERSION,
        pool: pool.to_string(),
        request_id: request_id.to_string(),
        request,
        voting_runs: voting.len(),
        majority,
        accused,
        first_divergence,
        runs,
    };
    (evidence, outcome)
}

/// One report per accused operator, each carrying `evidence_text` (the evidence as sent). Accused
/// workers without a payout address have no operator to report: they are returned apart.
pub fn reports(evidence: &Evidence, evidence_text: &str, observed_at_ms: u64) -> (Vec<BreachReport>, Vec<ShardEvidence>) {
    let mut operators = BTreeSet::new();
    let mut unpaid = Vec::new();
    for shard in &evidence.accused {
        match &shard.operator {
            Some(operator) => {
                operators.insert(operator.to_ascii_lowercase());
            }
            None => unpaid.push(shard.clone()),
        }
    }
    let reports = operators
        .into_iter()
        .map(|operator| BreachReport {
            pool_id: evidence.pool.clone(),
            operator,
            kind: BreachKind::WrongOutput,
            evidence: evidence_text.to_string(),
            observed_at_ms,
        })
        .collect();
    (reports, unpaid)
}

/// The request an audit runs: the user's, to the same length, with nothing that could end it
/// differently on an honest route (stop strings are applied to text, after the tokens).
pub fn audit_request(original: &GenerateRequest, tokens: usize) -> GenerateRequest {
    GenerateRequest {
        id: None,
        max_tokens: Some(tokens.max(1)),
        stop: Vec::new(),
        resume_tokens: Vec::new(),
        ..original.clone()
    }
}

/// A fresh request id shaped like `like` (`chatcmpl-…`, `cmpl-…`, `infer-…`): the prefix, the time in
/// microseconds and 24 random bits, as the orchestrator makes its own.
fn fresh_id(like: Option<&str>) -> String {
    let prefix = like.and_then(|id| id.rsplit_once('-')).map(|(p, _)| p).filter(|p| !p.is_empty() && p.len() <= 64);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let noise = getrandom::u32().unwrap_or(0) & 0xff_ffff;
    format!("{}-{:x}{noise:06x}", prefix.unwrap_or("req"), now.as_micros())
}

/// `cpu` for every CPU (its thread count does not change the numbers), else the GPU's name.
fn device_class(device: &str) -> &str {
    if device.starts_with("cpu") { "cpu" } else { device }
}

/// Each shard's (layers, device class) of a route, or `None` if a worker never registered.
fn numerics(pool: &Pool, route: usize, workers: &Workers) -> Option<Vec<(String, String)>> {
    pool.route_shards(route)
        .map(|s| {
            let worker = workers.get(&s.peer.to_string())?;
            Some((s.layers.to_string(), device_class(&worker.registration.device).to_string()))
        })
        .collect()
}

/// Whether routes with these numerics give the same tokens: one device class everywhere on both, or
/// the same class per layer range.
fn comparable(a: &[(String, String)], b: &[(String, String)]) -> bool {
    let classes = |r: &[(String, String)]| r.iter().map(|(_, c)| c.clone()).collect::<BTreeSet<_>>();
    let (ca, cb) = (classes(a), classes(b));
    (ca.len() == 1 && ca == cb) || a == b
}

/// Up to [`MAX_PARTNERS`] live routes to re-run on, comparable with `route`: each shares as few
/// workers as it can with the user's route and the partners picked before it (so a bad worker is
/// outvoted by runs it took no part in), cheapest first among equals (as a user's request would be
/// routed).
fn partners(pool: &Pool, route: usize, workers: &Workers) -> Vec<usize> {
    let Some(original) = numerics(pool, route, workers) else { return Vec::new() };
    let exclude: Vec<usize> = (0..pool.routes.len())
        .filter(|&r| numerics(pool, r, workers).is_none_or(|n| !comparable(&original, &n)))
        .collect();
    let mut picked = vec![route];
    while picked.len() <= MAX_PARTNERS {
        let Some(r) = pool.pick_route(workers, &exclude, &picked) else { break };
        picked.push(r);
    }
    picked.split_off(1)
}

/// A live route through `peer` whose other workers are all in `cleared`, if the pool has one: a run on
/// it tests `peer` alone.
fn isolating_route(pool: &Pool, peer: &str, cleared: &BTreeSet<String>, workers: &Workers) -> Option<usize> {
    let peers = |r: usize| pool.route_peers(r);
    let candidates: Vec<usize> = (0..pool.routes.len())
        .filter(|&r| {
            let p = peers(r);
            p.iter().any(|x| x == peer) && p.iter().all(|x| x == peer || cleared.contains(x))
        })
        .collect();
    // Among them, the one a request would take now (live, cheapest).
    let exclude: Vec<usize> = (0..pool.routes.len()).filter(|r| !candidates.contains(r)).collect();
    pool.pick_route(workers, &exclude, &[])
}

/// A route's workers as the evidence names them.
/// Runs `request` on each of `routes` at once, each under a fresh id like `like` and within
/// [`RUN_DEADLINE`]: one audit run's evidence per route (a failed run is evidence too, with its error).
async fn rerun(
    pool: &Arc<Pool>,
    workers: &Arc<Workers>,
    request: &GenerateRequest,
    like: Option<&str>,
    routes: impl IntoIterator<Item = usize>,
) -> Vec<RunEvidence> {
    let runs = routes.into_iter().map(|route| {
        let (pool, workers) = (pool.clone(), workers.clone());
        let mut request = request.clone();
        request.id = Some(fresh_id(like));
        async move {
            let shards = shards_of(&pool, route, &workers);
            let result = match tokio::time::timeout(RUN_DEADLINE, pool.run_on(route, &request, workers)).await {
                Ok(result) => result,
                Err(_) => Err(format!("no end within {RUN_DEADLINE:?}")),
            };
            let (tokens, error) = match result {
                Ok(tokens) => (Some(tokens), None),
                Err(e) => {
                    tracing::warn!(pool = %pool.record.id, request = like.unwrap_or_default(), route, "an audit run failed: {e}");
                    (None, Some(e))
                }
            };
            RunEvidence { role: Role::Audit, route, shards, tokens, error, agrees: None, divergence: None }
        }
    });
    futures_util::future::join_all(runs).await
}

fn shards_of(pool: &Pool, route: usize, workers: &Workers) -> Vec<ShardEvidence> {
    pool.route_shards(route)
        .map(|s| {
            let peer = s.peer.to_string();
            let operator = workers.get(&peer).and_then(|w| w.registration.payout);
            ShardEvidence { peer, operator, layers: s.layers.to_string() }
        })
        .collect()
}

/// Picks finished requests for audits, runs them, stores what they show and reports convictions.
pub struct Auditor {
    rate: f64,
    store: Arc<Store>,
    reports: mpsc::Sender<BreachReport>,
    slots: Arc<Semaphore>,
    /// Concluded audits by outcome (agreed, convicted, inconclusive), and reports sent, for `/metrics`.
    concluded: [AtomicU64; 3],
    reported: AtomicU64,
    /// Requests picked for an audit but not audited because [`MAX_CONCURRENT`] were running.
    skipped_busy: AtomicU64,
}

impl Auditor {
    /// Audits a share `rate` (0 to 1) of finished requests, sending reports into `reports`.
    pub fn new(rate: f64, store: Arc<Store>, reports: mpsc::Sender<BreachReport>) -> Self {
        Self {
            rate: rate.clamp(0.0, 1.0),
            store,
            reports,
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            concluded: Default::default(),
            reported: AtomicU64::new(0),
            skipped_busy: AtomicU64::new(0),
        }
    }

    /// Appends the audit counters to a Prometheus text exposition.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# HELP computepool_audits_total Output audits concluded, by outcome.");
        let _ = writeln!(out, "# TYPE computepool_audits_total counter");
        for (i, outcome) in [Outcome::Agreed, Outcome::Convicted, Outcome::Inconclusive].iter().enumerate() {
            let n = self.concluded[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "computepool_audits_total{{outcome=\"{}\"}} {n}", outcome.as_str());
        }
        let _ = writeln!(out, "# HELP computepool_audits_skipped_busy_total Requests drawn for an audit but not audited: too many audits running.");
        let _ = writeln!(out, "# TYPE computepool_audits_skipped_busy_total counter");
        let _ = writeln!(out, "computepool_audits_skipped_busy_total {}", self.skipped_busy.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP computepool_breach_reports_total Breach reports sent to the coalition's judge.");
        let _ = writeln!(out, "# TYPE computepool_breach_reports_total counter");
        let _ = writeln!(out, "computepool_breach_reports_total {}", self.reported.load(Ordering::Relaxed));
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Whether this request is audited: a fresh draw from the OS's randomness each time, so nobody can
    /// tell in advance which requests will be checked.
    fn draw(&self) -> bool {
        if self.rate <= 0.0 {
            return false;
        }
        let Ok(bits) = getrandom::u64() else { return false };
        ((bits >> 11) as f64 / (1u64 << 53) as f64) < self.rate
    }

    /// A request finished: maybe audit it, in the background (the user's answer never waits for it).
    pub fn finished(self: &Arc<Self>, run: FinishedRun, workers: Arc<Workers>) {
        if run.tokens.is_empty() || !self.draw() {
            return;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            self.skipped_busy.fetch_add(1, Ordering::Relaxed);
            tracing::info!(pool = %run.pool.record.id, "not auditing a request: {MAX_CONCURRENT} audits are running");
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let auditor = self.clone();
        runtime.spawn(async move {
            let _slot = slot;
            auditor.audit(run, workers).await;
        });
    }

    /// Runs one audit to its end: re-runs, evidence, storage, reports.
    pub async fn audit(&self, run: FinishedRun, workers: Arc<Workers>) -> Option<(Evidence, Outcome)> {
        let pool = run.pool.clone();
        let pool_id = pool.record.id.clone();
        let request_id = run.request.id.clone().unwrap_or_default();
        let partners = partners(&pool, run.route, &workers);
        if partners.is_empty() {
            tracing::debug!(pool = %pool_id, request = %request_id, "not audited: no other live route of the same numerics");
            return None;
        }
        let request = audit_request(&run.request, run.tokens.len());
        let mut runs = vec![RunEvidence {
            role: Role::Original,
            route: run.route,
            shards: shards_of(&pool, run.route, &workers),
            tokens: Some(run.tokens),
            error: None,
            agrees: None,
            divergence: None,
        }];
        let like = run.request.id.as_deref();
        runs.extend(rerun(&pool, &workers, &request, like, partners.iter().copied()).await);
        let (mut evidence, mut outcome) = conclude(&pool_id, &request_id, request.clone(), runs.clone());
        // Several accused workers: each one may be innocent, only sharing a route with the one that is
        // not. Run each of them once more among workers the majority cleared: its run agreeing clears
        // it, disagreeing pins it (one unverified worker per run).
        if outcome == Outcome::Convicted && evidence.accused.len() > 1 {
            let cleared: BTreeSet<String> =
                evidence.majority.iter().flat_map(|&i| evidence.runs[i].shards.iter().map(|s| s.peer.clone())).collect();
            let isolating = evidence.accused.iter().filter_map(|a| isolating_route(&pool, &a.peer, &cleared, &workers));
            let mut more = runs;
            more.extend(rerun(&pool, &workers, &request, like, isolating.collect::<BTreeSet<usize>>()).await);
            (evidence, outcome) = conclude(&pool_id, &request_id, request, more);
        }
        let text = serde_json::to_string(&evidence).expect("evidence serialises");
        let at_ms = now_ms();
        let (reports, unpaid) = reports(&evidence, &text, at_ms.max(0) as u64);
        for shard in &unpaid {
            tracing::warn!(pool = %pool_id, peer = %shard.peer, layers = %shard.layers,
                "an audit convicts a worker with no payout address: there is no operator to report (eject it by hand)");
        }
        let record = AuditRecord {
            pool_id: pool_id.clone(),
            request_id: request_id.clone(),
            at_ms,
            outcome: outcome.as_str().to_string(),
            evidence: text,
            reports: serde_json::to_string(&reports).expect("reports serialise"),
        };
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.record_audit(&record)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(pool = %pool_id, request = %request_id, "could not store an audit: {e}"),
            Err(e) => tracing::error!(pool = %pool_id, request = %request_id, "storing an audit panicked: {e}"),
        }
        let counter = match outcome {
            Outcome::Agreed => 0,
            Outcome::Convicted => 1,
            Outcome::Inconclusive => 2,
        };
        self.concluded[counter].fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Convicted => tracing::warn!(pool = %pool_id, request = %request_id, accused = evidence.accused.len(),
                reports = reports.len(), first_divergence = ?evidence.first_divergence, "an output audit convicts workers"),
            Outcome::Inconclusive => tracing::info!(pool = %pool_id, request = %request_id, "an output audit is inconclusive"),
            Outcome::Agreed => tracing::debug!(pool = %pool_id, request = %request_id, runs = evidence.voting_runs, "an output audit agrees"),
        }
        for report in reports {
            if self.reports.send(report).await.is_ok() {
                self.reported.fetch_add(1, Ordering::Relaxed);
            } else {
                tracing::error!(pool = %pool_id, request = %request_id, "nobody takes breach reports any more: one is lost (it stays in the audit log)");
            }
        }
        Some((evidence, outcome))
    }
}

/// Stands in for the coalition's judge where none is wired: each report is logged (and stays in the
/// audit log), so the channel never fills and audits go on.
pub async fn log_reports(mut reports: mpsc::Receiver<BreachReport>) {
    while let Some(report) = reports.recv().await {
        tracing::warn!(pool = %report.pool_id, operator = %report.operator, kind = ?report.kind,
            "breach report: no coalition judge is configured, so nothing acts on it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(peer: &str, operator: Option<&str>, layers: &str) -> ShardEvidence {
        ShardEvidence { peer: peer.into(), operator: operator.map(str::to_string), layers: layers.into() }
    }

    fn run(route: usize, peers: [(&str, Option<&str>); 2], tokens: Option<&[u32]>) -> RunEvidence {
        RunEvidence {
            role: if route == 0 { Role::Original } else { Role::Audit },
            route,
            shards: vec![shard(peers[0].0, peers[0].1, "0..15"), shard(peers[1].0, peers[1].1, "15..30")],
            tokens: tokens.map(<[u32]>::to_vec),
            error: tokens.is_none().then(|| "Unavailable: gone".to_string()),
            agrees: None,
            divergence: None,
        }
    }

    fn request() -> GenerateRequest {
        audit_request(&GenerateRequest::text("The capital of France is", 64), 4)
    }

    const A: Option<&str> = Some("0x00000000000000000000000000000000000000aa");
    const B: Option<&str> = Some("0x00000000000000000000000000000000000000bb");
    const C: Option<&str> = Some("0x00000000000000000000000000000000000000CC");

    #[test]
    fn divergence_is_the_first_differing_index_or_the_shorter_length() {
        assert_eq!(divergence(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(divergence(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(divergence(&[1, 2], &[1, 2, 3]), Some(2));
        assert_eq!(divergence(&[], &[7]), Some(0));
    }

    #[test]
    fn one_disagreeing_route_of_three_is_convicted_and_its_operator_reported_once() {
        let runs = vec![
            run(0, [("e0", A), ("x0", A)], Some(&[1, 2, 3, 4])),
            run(1, [("e1", B), ("x1", B)], Some(&[1, 2, 3, 4])),
            run(2, [("e2", C), ("x2", C)], Some(&[1, 2, 9, 9])),
        ];
        let (evidence, outcome) = conclude("smol", "chatcmpl-1", request(), runs);
        assert_eq!(outcome, Outcome::Convicted);
        assert_eq!(evidence.majority, [0, 1]);
        assert_eq!(evidence.voting_runs, 3);
        assert_eq!(evidence.accused.iter().map(|s| s.peer.as_str()).collect::<Vec<_>>(), ["e2", "x2"]);
        assert_eq!(evidence.first_divergence, Some(2));
        assert_eq!((evidence.runs[2].agrees, evidence.runs[2].divergence), (Some(false), Some(2)));
        assert_eq!((evidence.runs[0].agrees, evidence.runs[0].divergence), (Some(true), None));
        let text = serde_json::to_string(&evidence).expect("serialises");
        let (reports, unpaid) = reports(&evidence, &text, 5);
        assert!(unpaid.is_empty());
        assert_eq!(reports.len(), 1, "one operator runs both accused workers: one report");
        assert_eq!(reports[0].operator, "0x00000000000000000000000000000000000000cc", "addresses are reported lower-case");
        assert_eq!(reports[0].kind, BreachKind::WrongOutput);
        assert_eq!(reports[0].evidence, text);
        assert_eq!(reports[0].pool_id, "smol");
    }

    #[test]
    fn the_users_own_route_is_convicted_when_both_audits_outvote_it() {
        let runs = vec![
            run(0, [("e0", A), ("x0", B)], Some(&[1, 2, 3, 8])),
            run(1, [("e1", C), ("x1", C)], Some(&[1, 2, 3, 4])),
            run(2, [("e2", C), ("x2", C)], Some(&[1, 2, 3, 4])),
        ];
        let (evidence, outcome) = conclude("smol", "cmpl-1", request(), runs);
        assert_eq!(outcome, Outcome::Convicted);
        assert_eq!(evidence.majority, [1, 2]);
        let text = serde_json::to_string(&evidence).expect("serialises");
        let (reports, _) = reports(&evidence, &text, 5);
        let named: Vec<&str> = reports.iter().map(|r| r.operator.as_str()).collect();
        assert_eq!(named, [A.unwrap(), B.unwrap()], "two operators in the outvoted route: one report each");
    }

    #[test]
    fn a_worker_that_also_serves_in_an_agreeing_route_is_not_accused() {
        // x0 serves in routes 0 and 2; route 2 disagrees through e2 alone.
        let runs = vec![
            run(0, [("e0", A), ("x0", A)], Some(&[1, 2])),
            run(1, [("e1", B), ("x1", B)], Some(&[1, 2])),
            run(2, [("e2", C), ("x0", A)], Some(&[1, 3])),
        ];
        let (evidence, outcome) = conclude("smol", "r", request(), runs);
        assert_eq!(outcome, Outcome::Convicted);
        assert_eq!(evidence.accused, [shard("e2", C, "0..15")]);
    }

    #[test]
    fn agreement_and_inconclusive_audits_report_nobody() {
        let cases: Vec<(Vec<RunEvidence>, Outcome)> = vec![
            // All agree.
            (vec![run(0, [("e0", A), ("x0", A)], Some(&[1, 2])), run(1, [("e1", B), ("x1", B)], Some(&[1, 2]))], Outcome::Agreed),
            // One against one: no strict majority.
            (vec![run(0, [("e0", A), ("x0", A)], Some(&[1, 2])), run(1, [("e1", B), ("x1", B)], Some(&[1, 3]))], Outcome::Inconclusive),
            // Three different answers.
            (
                vec![
                    run(0, [("e0", A), ("x0", A)], Some(&[1, 2])),
                    run(1, [("e1", B), ("x1", B)], Some(&[1, 3])),
                    run(2, [("e2", C), ("x2", C)], Some(&[1, 4])),
                ],
                Outcome::Inconclusive,
            ),
            // Both audit runs failed: one run alone proves nothing.
            (
                vec![
                    run(0, [("e0", A), ("x0", A)], Some(&[1, 2])),
                    run(1, [("e1", B), ("x1", B)], None),
                    run(2, [("e2", C), ("x2", C)], None),
                ],
                Outcome::Inconclusive,
            ),
            // A failed run does not vote: one against one again.
            (
                vec![
                    run(0, [("e0", A), ("x0", A)], Some(&[1, 2])),
                    run(1, [("e1", B), ("x1", B)], Some(&[1, 5])),
                    run(2, [("e2", C), ("x2", C)], None),
                ],
                Outcome::Inconclusive,
            ),
            // The disagreeing route's workers all serve in agreeing routes too: nobody to blame.
            (
                vec![
                    run(0, [("e0", A), ("x0", A)], Some(&[1, 2])),
                    run(1, [("e1", B), ("x1", B)], Some(&[1, 2])),
                    run(2, [("e0", A), ("x1", B)], Some(&[1, 9])),
                ],
                Outcome::Inconclusive,
            ),
        ];
        for (i, (runs, want)) in cases.into_iter().enumerate() {
            let (evidence, outcome) = conclude("smol", "r", request(), runs);
            assert_eq!(outcome, want, "case {i}: {evidence:?}");
            if want == Outcome::Inconclusive && evidence.majority.is_empty() {
                assert!(evidence.runs.iter().all(|r| r.agrees.is_none()), "case {i}: no majority, no agreement");
            }
            let (reports, _) = reports(&evidence, "{}", 1);
            let expect_reports = usize::from(outcome == Outcome::Convicted);
            assert_eq!(reports.len(), expect_reports, "case {i}");
        }
    }

    #[test]
    fn a_convicted_worker_without_a_payout_address_is_set_apart() {
        let runs = vec![
            run(0, [("e0", A), ("x0", A)], Some(&[1, 2])),
            run(1, [("e1", B), ("x1", B)], Some(&[1, 2])),
            run(2, [("e2", C), ("x2", None)], Some(&[1, 3])),
        ];
        let (evidence, _) = conclude("smol", "r", request(), runs);
        let (reports, unpaid) = reports(&evidence, "{}", 1);
        assert_eq!(reports.iter().map(|r| r.operator.as_str()).collect::<Vec<_>>(), ["0x00000000000000000000000000000000000000cc"]);
        assert_eq!(unpaid, [shard("x2", None, "15..30")]);
    }

    #[test]
    fn evidence_has_the_documented_shape_and_round_trips() {
        let runs = vec![
            run(0, [("e0", A), ("x0", None)], Some(&[504, 3575, 314])),
            run(1, [("e1", B), ("x1", B)], Some(&[504, 3575, 1085])),
            run(2, [("e2", C), ("x2", C)], Some(&[504, 3575, 1085])),
        ];
        let (evidence, _) = conclude("smol", "chatcmpl-1", request(), runs);
        let value = serde_json::to_value(&evidence).expect("serialises");
        let keys: BTreeSet<&str> = value.as_object().expect("object").keys().map(String::as_str).collect();
        let want: BTreeSet<&str> =
            ["version", "pool", "request_id", "request", "runs", "voting_runs", "majority", "accused", "first_divergence"].into();
        assert_eq!(keys, want);
        let run_keys: BTreeSet<&str> = value["runs"][0].as_object().expect("object").keys().map(String::as_str).collect();
        assert_eq!(run_keys, ["role", "route", "shards", "tokens", "error", "agrees", "divergence"].into());
        assert_eq!(value["version"], 1);
        assert_eq!(value["runs"][0]["role"], "original");
        assert_eq!(value["runs"][1]["role"], "audit");
        assert_eq!(value["runs"][0]["shards"][1], serde_json::json!({"peer": "x0", "operator": null, "layers": "15..30"}));
        assert_eq!(value["runs"][0]["divergence"], 2);
        assert_eq!(value["first_divergence"], 2);
        assert_eq!(value["request"]["max_tokens"], 4);
        assert!(value["request"].get("id").is_none() && value["request"].get("stop").is_none());
        let back: Evidence = serde_json::from_value(value).expect("parses back");
        assert_eq!(back, evidence);
    }

    /// The literal example of the evidence (the voters' tests use the same one): parsing it, deriving
    /// its fields again from its runs, and writing it out give it back exactly.
    #[test]
    fn the_literal_example_is_what_conclude_writes() {
        let text = include_str!("audit-evidence-example.json");
        let literal: serde_json::Value = serde_json::from_str(text).expect("the example is JSON");
        let example: Evidence = serde_json::from_str(text).expect("the example is evidence");
        let blank: Vec<RunEvidence> =
            example.runs.iter().map(|r| RunEvidence { agrees: None, divergence: None, ..r.clone() }).collect();
        let (derived, outcome) = conclude(&example.pool, &example.request_id, example.request.clone(), blank);
        assert_eq!(outcome, Outcome::Convicted);
        assert_eq!(derived, example);
        assert_eq!(serde_json::to_value(&derived).expect("serialises"), literal);
        let (reports, unpaid) = reports(&derived, text, 1);
        assert_eq!(reports.iter().map(|r| r.operator.as_str()).collect::<Vec<_>>(), ["0x00000000000000000000000000000000000000a0"]);
        assert!(unpaid.is_empty(), "b1's worker without a payout is in an agreeing run: not accused");
    }

    #[test]
    fn the_audit_request_is_the_users_to_the_same_length_without_stops() {
        let mut user = GenerateRequest::text("Hi", 100);
        user.id = Some("chatcmpl-18c3a9f2b7d000001".into());
        user.stop = vec!["\n".into()];
        user.temperature = 0.7;
        user.seed = 42;
        user.resume_tokens = vec![1, 2];
        let audit = audit_request(&user, 7);
        assert_eq!(audit.max_tokens, Some(7));
        assert!(audit.id.is_none() && audit.stop.is_empty() && audit.resume_tokens.is_empty());
        assert_eq!((audit.temperature, audit.seed, audit.prompt.as_deref()), (0.7, 42, Some("Hi")));
        let id = fresh_id(user.id.as_deref());
        assert!(id.starts_with("chatcmpl-") && id != user.id.clone().unwrap_or_default(), "{id}");
        assert!(computepool_axl::frame::RequestId::new(id.clone()).is_ok(), "{id} is a valid request id");
        assert!(fresh_id(None).starts_with("req-"));
    }

    /// Three workers per range in one topology: the partners share no worker with the user's route nor
    /// with each other, and an accused entry is re-run with workers the majority cleared.
    #[test]
    fn partners_avoid_the_users_workers_and_isolating_runs_test_one_worker() {
        use crate::store::PoolRecord;
        use crate::workers::WorkerRegistration;
        use computepool_axl::transport::{Layers, SecretKey, ShardPeer, Topology};
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("config.json"), r#"{"num_hidden_layers": 4, "max_position_embeddings": 64}"#)
            .expect("config");
        let key = SecretKey::generate();
        let keys: Vec<SecretKey> = (0..6).map(|_| SecretKey::generate()).collect();
        let layers = |i: usize| if i.is_multiple_of(2) { Layers { start: 0, end: 2 } } else { Layers { start: 2, end: 4 } };
        let shards = keys
            .iter()
            .enumerate()
            .map(|(i, k)| ShardPeer { peer: k.public(), layers: layers(i), addrs: vec!["127.0.0.1:4000".parse().expect("address")], relay: None })
            .collect();
        let topology = Topology { num_layers: 4, shards, clients: vec![key.public()] };
        let record = PoolRecord {
            id: "p".into(),
            model: "m".into(),
            model_dir: dir.path().to_path_buf(),
            topology,
            replicas: vec![],
            created_at: 0,
        };
        let pool = Pool::new(record, key).expect("valid pool");
        assert_eq!(pool.routes.len(), 9);
        let store = Store::in_memory().expect("store");
        let workers = Workers::load(&store, Duration::from_secs(60)).expect("workers");
        for (i, k) in keys.iter().enumerate() {
            let registration = WorkerRegistration {
                peer: k.public().to_string(),
                addrs: vec!["127.0.0.1:4000".parse().expect("address")],
                model: "m".into(),
                layers: layers(i).to_string(),
                device: "cpu (2 threads)".into(),
                weight_bytes: 1,
                rss_bytes: None,
                speed: 100.0,
                payout: None,
            };
            workers.register(&store, registration, None).expect("registers");
        }
        let p = |i: usize| keys[i].public().to_string();
        let user = (0..9).find(|&r| pool.route_peers(r) == [p(0), p(1)]).expect("a1 → b1");
        let picked = partners(&pool, user, &workers);
        assert_eq!(picked.len(), MAX_PARTNERS);
        for (n, &r) in picked.iter().enumerate() {
            assert_eq!(pool.shared(r, user), 0, "{:?}", pool.route_peers(r));
            for &other in &picked[..n] {
                assert_eq!(pool.shared(r, other), 0, "partners share no worker either");
            }
        }
        let cleared: BTreeSet<String> = picked.iter().flat_map(|&r| pool.route_peers(r)).collect();
        let alone = isolating_route(&pool, &p(0), &cleared, &workers).expect("a route testing a1 alone");
        let peers = pool.route_peers(alone);
        assert_eq!(peers[0], p(0));
        assert!(cleared.contains(&peers[1]), "its exit was cleared: {peers:?}");
        assert!(isolating_route(&pool, &p(0), &BTreeSet::new(), &workers).is_none(), "nobody cleared: no such route");
    }

    #[test]
    fn audit_rates_are_probabilities() {
        assert_eq!(parse_rate("0.05"), Ok(0.05));
        assert_eq!(parse_rate("1"), Ok(1.0));
        for bad in ["-0.1", "1.5", "NaN", "x"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        let (tx, _rx) = mpsc::channel(1);
        let store = Arc::new(Store::in_memory().expect("store"));
        let always = Auditor::new(1.0, store.clone(), tx.clone());
        assert!((0..100).all(|_| always.draw()));
        let never = Auditor::new(0.0, store.clone(), tx.clone());
        assert!((0..100).all(|_| !never.draw()));
        let half = Auditor::new(0.5, store, tx);
        let picked = (0..2000).filter(|_| half.draw()).count();
        // Binomial(2000, 0.5): sd ≈ 22; ±200 is 9 sd, so a failure here means a broken draw.
        assert!((800..1200).contains(&picked), "{picked} of 2000 at rate 0.5");
    }

    #[test]
    fn routes_compare_on_the_same_device_class() {
        let l = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        assert!(comparable(&l(&[("0..15", "cpu"), ("15..30", "cpu")]), &l(&[("0..10", "cpu"), ("10..30", "cpu")])));
        assert!(!comparable(&l(&[("0..15", "cpu"), ("15..30", "cpu")]), &l(&[("0..15", "NVIDIA H100"), ("15..30", "NVIDIA H100")])));
        assert!(comparable(&l(&[("0..15", "cpu"), ("15..30", "H100")]), &l(&[("0..15", "cpu"), ("15..30", "H100")])));
        assert!(!comparable(&l(&[("0..15", "cpu"), ("15..30", "H100")]), &l(&[("0..15", "H100"), ("15..30", "cpu")])));
        assert_eq!(device_class("cpu (8 threads)"), "cpu");
    }
}
