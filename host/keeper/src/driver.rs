//! Drives logged transitions through a `Keeper` to the end: submit, poll the run, record the result —
//! each step logged before and after, retried with capped exponential backoff, and resumable after a
//! crash at any point without acting twice (before re-submitting a transition whose earlier submit
//! may have reached the keeper, it looks the run up by the same idempotency key).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::log::{AttemptAction, LogError, TransitionLog, TransitionRecord, TransitionState};
use crate::transition::{Keeper, KeeperError, RunState, Transition};

/// Retries and polling. Delays double from `initial_backoff` up to `max_backoff`.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// First wait after a failed call to the keeper. Default 500 ms.
    pub initial_backoff: Duration,
    /// Longest wait between two calls. Default 30 s.
    pub max_backoff: Duration,
    /// Consecutive `unavailable` answers (or interrupted attempts) after which `drive` hands the
    /// transition back unsettled (`Driven::Pending`). It is never failed for this: an earlier submit may
    /// have reached the keeper, and only a later lookup can tell. Default 8 (about 1 min 30 s of waiting
    /// with the default delays).
    pub max_unavailable: u32,
    /// Keeper runs (each a full workflow run) before the transition fails. Default 3.
    pub max_runs: u32,
    /// Wait between two status polls of a pending run. Default 1 s.
    pub poll_interval: Duration,
    /// How long one `drive` call waits for a pending run before handing back `Pending` (the run is
    /// left alone: it may still act, so it is polled again, never re-submitted). Default 5 min.
    pub pending_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_unavailable: 8,
            max_runs: 3,
            poll_interval: Duration::from_secs(1),
            pending_timeout: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The wait before the next call after `failures` consecutive failures (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(31);
        self.initial_backoff.saturating_mul(1u32 << exp).min(self.max_backoff)
    }
}

/// Applies a finished transition to the pool's state (the orchestrator's state machine; it confirms
/// claimed on-chain effects first). Called again after a crash between applying and the log saying
/// so, hence keyed by the idempotency key and idempotent.
pub trait TransitionSink: Send + Sync {
    fn record(&self, transition: &TransitionRecord) -> Result<(), String>;
}

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("recording transition {id} failed: {reason}")]
    Record { id: i64, reason: String },
}

/// Where `drive` left a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Driven {
    /// Recorded or failed: nothing more to do.
    Done(TransitionRecord),
    /// Not settled: the keeper's run was still going after `pending_timeout`, or the keeper could not
    /// be reached `max_unavailable` times in a row. Drive it again later (`resume` does).
    Pending(TransitionRecord),
}

pub struct Driver {
    log: Arc<TransitionLog>,
    keeper: Arc<dyn Keeper>,
    sink: Arc<dyn TransitionSink>,
    policy: RetryPolicy,
}

impl Driver {
    pub fn new(log: Arc<TransitionLog>, keeper: Arc<dyn Keeper>, sink: Arc<dyn TransitionSink>, policy: RetryPolicy) -> Self {
        Self { log, keeper, sink, policy }
    }

    pub fn log(&self) -> &Arc<TransitionLog> {
        &self.log
    }

    /// Writes `transition` to the log (before anything acts on it) and drives it to the end.
    pub fn run(&self, transition: &Transition) -> Result<Driven, DriveError> {
        let id = self.log.write(transition)?;
        self.drive(id)
    }

    /// Drives every transition the log has not finished, oldest first: what a restart calls.
    pub fn resume(&self) -> Result<Vec<Driven>, DriveError> {
        let ids = self.log.unfinished()?;
        if !ids.is_empty() {
            tracing::info!(count = ids.len(), "resuming unfinished transitions");
        }
        ids.into_iter().map(|id| self.drive(id)).collect()
    }

    /// Moves transition `id` on from whatever state the log has it in.
    pub fn drive(&self, id: i64) -> Result<Driven, DriveError> {
        let mut pending_since: Option<Instant> = None;
        loop {
            let rec = self.log.get(id)?;
            match rec.state {
                TransitionState::Recorded | TransitionState::Failed => return Ok(Driven::Done(rec)),
                TransitionState::Acted => {
                    let n = self.log.begin_attempt(id, AttemptAction::Record)?;
                    match self.sink.record(&rec) {
                        Ok(()) => {
                            self.log.finish_attempt(id, n, "ok", None)?;
                            self.log.mark_recorded(id)?;
                            tracing::info!(id, key = %rec.idempotency_key, kind = %rec.kind, "transition recorded");
                        }
                        Err(reason) => {
                            self.log.finish_attempt(id, n, "error", Some(&reason))?;
                            return Err(DriveError::Record { id, reason });
                        }
                    }
                }
                TransitionState::Written => {
                    if self.submit(&rec)? {
                        return Ok(Driven::Pending(self.log.get(id)?));
                    }
                }
                TransitionState::Submitted => {
                    let since = *pending_since.get_or_insert_with(Instant::now);
                    if let Some(outcome) = self.poll(&rec, since)? {
                        return Ok(outcome);
                    }
                }
            }
        }
    }

    /// One step from `written`: adopt the run the keeper already has under this key, else submit.
    /// `true` when the keeper stayed unreachable and `drive` should hand the transition back.
    fn submit(&self, rec: &TransitionRecord) -> Result<bool, DriveError> {
        let id = rec.id;
        let transition = rec.for_keeper();
        if self.log.submit_started(id)? {
            // A submit of this run was started before (then the process died or the keeper was
            // unreachable): the keeper may have acted on it. Ask before submitting again.
            let n = self.log.begin_attempt(id, AttemptAction::Lookup)?;
            match self.keeper.lookup(&transition.idempotency_key) {
                Ok(Some(found)) => {
                    self.log.finish_attempt(id, n, "found", Some(&found.reference))?;
                    self.log.mark_submitted(id, &found.reference)?;
                    tracing::info!(id, reference = %found.reference, "adopted the keeper's existing run");
                    return Ok(false);
                }
                Ok(None) => self.log.finish_attempt(id, n, "none", None)?,
                Err(e) => return self.keeper_failed(id, n, e),
            }
        }
        let n = self.log.begin_attempt(id, AttemptAction::Submit)?;
        match self.keeper.submit(&transition) {
            Ok(sub) => {
                self.log.finish_attempt(id, n, "ok", Some(&sub.reference))?;
                self.log.mark_submitted(id, &sub.reference)?;
                Ok(false)
            }
            Err(e) => self.keeper_failed(id, n, e),
        }
    }

    /// One status poll of a submitted run. `Some` when `drive` should return.
    fn poll(&self, rec: &TransitionRecord, since: Instant) -> Result<Option<Driven>, DriveError> {
        let id = rec.id;
        let reference = rec.reference.clone().ok_or_else(|| LogError::Corrupt {
            id,
            what: "submitted without a reference".into(),
        })?;
        let n = self.log.begin_attempt(id, AttemptAction::Status)?;
        match self.keeper.status(&reference) {
            Ok(status) => match status.state {
                RunState::Succeeded => {
                    self.log.finish_attempt(id, n, "succeeded", Some(&status.detail))?;
                    self.log.mark_acted(id, &status.detail)?;
                    Ok(None)
                }
                RunState::Failed => {
                    self.log.finish_attempt(id, n, "failed", Some(&status.detail))?;
                    if rec.run >= self.policy.max_runs {
                        let reason = format!("run {} of {} failed: {}", rec.run, self.policy.max_runs, status.detail);
                        tracing::warn!(id, %reason, "transition failed");
                        self.log.mark_failed(id, &reason)?;
                    } else {
                        let run = self.log.start_next_run(id, &status.detail)?;
                        let wait = self.policy.backoff(rec.run);
                        tracing::warn!(id, failed = %status.detail, next_run = run, ?wait, "keeper run failed, retrying");
                        std::thread::sleep(wait);
                    }
                    Ok(None)
                }
                RunState::Pending => {
                    self.log.finish_attempt(id, n, "pending", None)?;
                    if since.elapsed() >= self.policy.pending_timeout {
                        return Ok(Some(Driven::Pending(self.log.get(id)?)));
                    }
                    std::thread::sleep(self.policy.poll_interval);
                    Ok(None)
                }
            },
            Err(e) => {
                let unreachable = self.keeper_failed(id, n, e)?;
                if unreachable || since.elapsed() >= self.policy.pending_timeout {
                    return Ok(Some(Driven::Pending(self.log.get(id)?)));
                }
                Ok(None)
            }
        }
    }

    /// Logs a keeper error, then: a rejection (or an invalid transition) fails the transition unless
    /// a run may already exist; `unavailable` backs off, or after `max_unavailable` in a row returns
    /// `true` (hand it back unsettled).
    fn keeper_failed(&self, id: i64, attempt: u32, error: KeeperError) -> Result<bool, DriveError> {
        let (outcome, final_answer) = match &error {
            KeeperError::Unavailable(_) => ("unavailable", false),
            KeeperError::Rejected(_) => ("rejected", true),
            KeeperError::InvalidTransition(_) => ("invalid", true),
        };
        self.log.finish_attempt(id, attempt, outcome, Some(&error.to_string()))?;
        // A submitted run exists and may still act: never fail it on what the keeper says about
        // reaching it; `poll` hands it back after `pending_timeout`.
        let submitted = self.log.get(id)?.state == TransitionState::Submitted;
        if final_answer && !submitted {
            tracing::warn!(id, reason = %error, "transition failed");
            self.log.mark_failed(id, &error.to_string())?;
            return Ok(false);
        }
        let failures = self.log.consecutive_failures(id)?;
        if failures >= self.policy.max_unavailable {
            tracing::warn!(id, %error, failures, "keeper unreachable, handing the transition back unsettled");
            return Ok(true);
        }
        let wait = self.policy.backoff(failures);
        tracing::debug!(id, %error, ?wait, "keeper call failed, backing off");
        std::thread::sleep(wait);
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transition::{RunStatus, Submission, TransitionKind};
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;

    /// Where the test keeper makes the process "crash" (a panic that unwinds through the driver,
    /// dropping it and the log's connection, as a killed process would leave them).
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Crash {
        /// In `submit`, before the keeper acts.
        BeforeEffect,
        /// In `submit`, after the keeper acted but before the driver hears back.
        AfterEffect,
    }

    /// A keeper whose runs have an effect (think: a contract call) counted per transition; it
    /// survives the driver's crashes, as KeeperHub and the chain do.
    #[derive(Default)]
    struct CountingKeeper {
        state: Mutex<KeeperState>,
    }

    #[derive(Default)]
    struct KeeperState {
        runs: HashMap<String, String>,
        /// Effects per transition (the run key without its `#n` suffix).
        effects: HashMap<String, u32>,
        submits: u32,
        crash: Option<Crash>,
        unavailable: u32,
        fail_runs: u32,
        failed: HashSet<String>,
        /// Status answers `pending` this many times first.
        pending_polls: u32,
    }

    impl CountingKeeper {
        fn effects(&self, key: &str) -> u32 {
            self.state.lock().unwrap().effects.get(key).copied().unwrap_or(0)
        }
        fn with(f: impl FnOnce(&mut KeeperState)) -> Arc<Self> {
            let k = Self::default();
            f(&mut k.state.lock().unwrap());
            Arc::new(k)
        }
    }

    impl Keeper for CountingKeeper {
        fn submit(&self, t: &Transition) -> Result<Submission, KeeperError> {
            let mut s = self.state.lock().unwrap();
            s.submits += 1;
            if s.unavailable > 0 {
                s.unavailable -= 1;
                return Err(KeeperError::Unavailable("connection refused".into()));
            }
            if t.pool_id == "bad" {
                return Err(KeeperError::Rejected("no such pool".into()));
            }
            if let Some(r) = s.runs.get(&t.idempotency_key) {
                return Ok(Submission { reference: r.clone() });
            }
            let crash = s.crash.take();
            if crash == Some(Crash::BeforeEffect) {
                drop(s);
                panic!("simulated crash before the keeper acts");
            }
            let reference = format!("run-{}", s.runs.len() + 1);
            s.runs.insert(t.idempotency_key.clone(), reference.clone());
            if s.fail_runs > 0 {
                s.fail_runs -= 1;
                s.failed.insert(reference.clone());
            } else {
                let base = t.idempotency_key.split('#').next().unwrap_or_default().to_owned();
                *s.effects.entry(base).or_default() += 1;
            }
            if crash == Some(Crash::AfterEffect) {
                drop(s);
                panic!("simulated crash after the keeper acted");
            }
            Ok(Submission { reference })
        }
        fn status(&self, reference: &str) -> Result<RunStatus, KeeperError> {
            let mut s = self.state.lock().unwrap();
            if s.pending_polls > 0 {
                s.pending_polls -= 1;
                return Ok(RunStatus { state: RunState::Pending, detail: "running".into() });
            }
            if s.failed.contains(reference) {
                return Ok(RunStatus { state: RunState::Failed, detail: "execution reverted".into() });
            }
            Ok(RunStatus { state: RunState::Succeeded, detail: format!("[\"0x{reference}\"]") })
        }
        fn lookup(&self, key: &str) -> Result<Option<Submission>, KeeperError> {
            let s = self.state.lock().unwrap();
            Ok(s.runs.get(key).map(|r| Submission { reference: r.clone() }))
        }
    }

    /// The pool's state machine: applies each transition once by key; can crash after applying.
    #[derive(Default)]
    struct Sink {
        applied: Mutex<HashMap<String, u32>>,
        calls: Mutex<u32>,
        crash_after_apply: Mutex<bool>,
    }

    impl TransitionSink for Sink {
        fn record(&self, t: &TransitionRecord) -> Result<(), String> {
            *self.calls.lock().unwrap() += 1;
            self.applied.lock().unwrap().entry(t.idempotency_key.clone()).or_insert(1);
            if std::mem::take(&mut *self.crash_after_apply.lock().unwrap()) {
                panic!("simulated crash after applying, before the log says recorded");
            }
            Ok(())
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            max_unavailable: 4,
            max_runs: 3,
            poll_interval: Duration::from_millis(1),
            pending_timeout: Duration::from_secs(5),
        }
    }

    fn stream_start(key: &str) -> Transition {
        Transition {
            kind: TransitionKind::StreamStart,
            idempotency_key: key.into(),
            pool_id: "pool-1".into(),
            payload: serde_json::json!({"flowRate": "1000", "members": [{"operator": "0x01", "units": 1}]}),
        }
    }

    fn driver(path: &std::path::Path, keeper: &Arc<CountingKeeper>, sink: &Arc<Sink>) -> Driver {
        let log = Arc::new(TransitionLog::open(path).unwrap());
        Driver::new(log, keeper.clone(), sink.clone(), policy())
    }

    /// Runs `f` on its own thread and expects it to panic (the simulated crash).
    fn crash(f: impl FnOnce() + Send + 'static) {
        assert!(std::thread::spawn(f).join().is_err(), "the simulated crash did not happen");
    }

    fn recorded(d: Driven) -> TransitionRecord {
        match d {
            Driven::Done(r) if r.state == TransitionState::Recorded => r,
            other => panic!("expected a recorded transition, got {other:?}"),
        }
    }

    #[test]
    fn crash_after_written_before_submit_acts_once_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.db");
        let keeper = Arc::new(CountingKeeper::default());
        let sink = Arc::new(Sink::default());
        {
            let d = driver(&path, &keeper, &sink);
            d.log().write(&stream_start("t1")).unwrap();
        } // the process dies here: written, nothing acted
        assert_eq!(keeper.effects("t1"), 0);
        let d = driver(&path, &keeper, &sink);
        let done = d.resume().unwrap();
        assert_eq!(done.len(), 1);
        recorded(done.into_iter().next().unwrap());
        assert_eq!(keeper.effects("t1"), 1);
        assert!(d.resume().unwrap().is_empty());
        assert_eq!(keeper.effects("t1"), 1);
    }

    #[test]
    fn crash_inside_submit_before_the_keeper_acts_acts_once_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.db");
        let keeper = CountingKeeper::with(|s| s.crash = Some(Crash::BeforeEffect));
        let sink = Arc::new(Sink::default());
        let d = driver(&path, &keeper, &sink);
        crash(move || drop(d.run(&stream_start("t1"))));
        assert_eq!(keeper.effects("t1"), 0);
        let d = driver(&path, &keeper, &sink);
        let rec = recorded(d.resume().unwrap().remove(0));
        assert_eq!(keeper.effects("t1"), 1);
        // The interrupted submit is on record, then the lookup that found nothing, then the submit.
        let actions: Vec<_> = rec.attempts.iter().map(|a| (a.action, a.outcome.as_deref())).collect();
        assert_eq!(actions[0], (AttemptAction::Submit, None));
        assert_eq!(actions[1], (AttemptAction::Lookup, Some("none")));
        assert_eq!(actions[2], (AttemptAction::Submit, Some("ok")));
    }

    #[test]
    fn crash_after_the_keeper_acted_before_the_log_knew_is_not_acted_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.db");
        let keeper = CountingKeeper::with(|s| s.crash = Some(Crash::AfterEffect));
        let sink = Arc::new(Sink::default());
        let d = driver(&path, &keeper, &sink);
        crash(move || drop(d.run(&stream_start("t1"))));
        assert_eq!(keeper.effects("t1"), 1);
        {
            let log = TransitionLog::open(&path).unwrap();
            let rec = log.find_by_key("t1").unwrap().unwrap();
            assert_eq!(rec.state, TransitionState::Written, "the log cannot know the keeper acted");
        }
        let d = driver(&path, &keeper, &sink);
        let rec = recorded(d.resume().unwrap().remove(0));
        assert_eq!(keeper.effects("t1"), 1, "resume acted twice");
        assert_eq!(keeper.state.lock().unwrap().submits, 1, "resume re-submitted instead of looking the run up");
        assert_eq!(rec.reference.as_deref(), Some("run-1"));
        assert!(rec.attempts.iter().any(|a| a.action == AttemptAction::Lookup && a.outcome.as_deref() == Some("found")));
    }

    #[test]
    fn crash_after_acted_before_recorded_records_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.db");
        let keeper = Arc::new(CountingKeeper::default());
        let sink = Arc::new(Sink::default());
        *sink.crash_after_apply.lock().unwrap() = true;
        let d = driver(&path, &keeper, &sink);
        crash(move || drop(d.run(&stream_start("t1"))));
        {
            let log = TransitionLog::open(&path).unwrap();
            assert_eq!(log.find_by_key("t1").unwrap().unwrap().state, TransitionState::Acted);
        }
        let d = driver(&path, &keeper, &sink);
        recorded(d.resume().unwrap().remove(0));
        assert_eq!(keeper.effects("t1"), 1);
        assert_eq!(keeper.state.lock().unwrap().submits, 1);
        assert_eq!(sink.applied.lock().unwrap().get("t1"), Some(&1));
        assert_eq!(*sink.calls.lock().unwrap(), 2, "the sink is asked again after the crash");
    }

    #[test]
    fn unavailable_keeper_is_retried_with_backoff_then_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let keeper = CountingKeeper::with(|s| s.unavailable = 3);
        let sink = Arc::new(Sink::default());
        let d = driver(&dir.path().join("keeper.db"), &keeper, &sink);
        let rec = recorded(d.run(&stream_start("t1")).unwrap());
        assert_eq!(keeper.effects("t1"), 1);
        let outcomes: Vec<_> = rec.attempts.iter().map(|a| (a.action, a.outcome.clone().unwrap())).collect();
        assert_eq!(
            outcomes.iter().filter(|(a, o)| *a == AttemptAction::Submit && o == "unavailable").count(),
            3
        );
        // Each retry after an unavailable submit first asks whether the keeper got it anyway.
        assert_eq!(outcomes.iter().filter(|(a, _)| *a == AttemptAction::Lookup).count(), 3);
    }

    #[test]
    fn an_unreachable_keeper_leaves_the_transition_unsettled_not_failed() {
        let dir = tempfile::tempdir().unwrap();
        let keeper = CountingKeeper::with(|s| s.unavailable = 100);
        let sink = Arc::new(Sink::default());
        let d = driver(&dir.path().join("keeper.db"), &keeper, &sink);
        let Driven::Pending(rec) = d.run(&stream_start("t1")).unwrap() else { panic!("not handed back") };
        assert_eq!(rec.state, TransitionState::Written);
        let unavailable = rec.attempts.iter().filter(|a| a.outcome.as_deref() == Some("unavailable")).count();
        assert_eq!(unavailable, 4, "max_unavailable in a row");
        assert_eq!(keeper.effects("t1"), 0);
        // The keeper comes back: the next resume looks the run up, submits it, and it acts once.
        keeper.state.lock().unwrap().unavailable = 0;
        recorded(d.resume().unwrap().remove(0));
        assert_eq!(keeper.effects("t1"), 1);
        assert_eq!(sink.applied.lock().unwrap().len(), 1);
    }

    #[test]
    fn rejected_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let keeper = Arc::new(CountingKeeper::default());
        let sink = Arc::new(Sink::default());
        let d = driver(&dir.path().join("keeper.db"), &keeper, &sink);
        let mut t = stream_start("t1");
        t.pool_id = "bad".into();
        let Driven::Done(rec) = d.run(&t).unwrap() else { panic!("not done") };
        assert_eq!(rec.state, TransitionState::Failed);
        assert!(rec.detail.unwrap().contains("no such pool"));
        assert_eq!(keeper.state.lock().unwrap().submits, 1);
    }

    #[test]
    fn a_failed_run_is_retried_as_a_new_run_and_acts_once() {
        let dir = tempfile::tempdir().unwrap();
        let keeper = CountingKeeper::with(|s| s.fail_runs = 1);
        let sink = Arc::new(Sink::default());
        let d = driver(&dir.path().join("keeper.db"), &keeper, &sink);
        let rec = recorded(d.run(&stream_start("t1")).unwrap());
        assert_eq!(rec.run, 2);
        assert_eq!(rec.reference.as_deref(), Some("run-2"));
        assert_eq!(keeper.effects("t1"), 1);
        assert!(keeper.state.lock().unwrap().runs.contains_key("t1#2"));
    }

    #[test]
    fn every_run_failing_fails_the_transition_after_max_runs() {
        let dir = tempfile::tempdir().unwrap();
        let keeper = CountingKeeper::with(|s| s.fail_runs = 10);
        let sink = Arc::new(Sink::default());
        let d = driver(&dir.path().join("keeper.db"), &keeper, &sink);
        let Driven::Done(rec) = d.run(&stream_start("t1")).unwrap() else { panic!("not done") };
        assert_eq!(rec.state, TransitionState::Failed);
        assert_eq!(rec.run, 3);
        assert!(rec.detail.unwrap().contains("run 3 of 3 failed: execution reverted"));
        assert_eq!(keeper.state.lock().unwrap().runs.len(), 3);
    }

    #[test]
    fn a_long_pending_run_is_handed_back_and_finished_later_without_resubmitting() {
        let dir = tempfile::tempdir().unwrap();
        let keeper = CountingKeeper::with(|s| s.pending_polls = u32::MAX);
        let sink = Arc::new(Sink::default());
        let log = Arc::new(TransitionLog::open(&dir.path().join("keeper.db")).unwrap());
        let short = RetryPolicy { pending_timeout: Duration::from_millis(30), ..policy() };
        let d = Driver::new(log.clone(), keeper.clone(), sink.clone(), short);
        let Driven::Pending(rec) = d.run(&stream_start("t1")).unwrap() else { panic!("not handed back") };
        assert_eq!(rec.state, TransitionState::Submitted);
        keeper.state.lock().unwrap().pending_polls = 2;
        // Resumed with the default timeout: each poll is logged with a full fsync, and two of them on a
        // busy disk can take longer than 30 ms, which would hand the run back again.
        let d = Driver::new(log, keeper.clone(), sink.clone(), policy());
        recorded(d.resume().unwrap().remove(0));
        assert_eq!(keeper.state.lock().unwrap().submits, 1);
        assert_eq!(keeper.effects("t1"), 1);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RetryPolicy { initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(1), ..Default::default() };
        let waits: Vec<_> = (1..=6).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(1000), Duration::from_secs(1));
    }
}
