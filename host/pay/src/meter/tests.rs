//! The meter against a fake rail with a controllable clock. The fake keeps the flow it was told to run
//! (every applied change with its time), answers a repeated key with its first receipt, and can fail
//! before or after applying a change, so the tests can compare what requests were charged with what the
//! members were paid.

use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use proptest::prelude::*;

use super::*;

const PAYER: &str = "0x00000000000000000000000000000000000000a1";
const PAYER_B: &str = "0x00000000000000000000000000000000000000b2";

/// One change the fake applied.
#[derive(Debug, Clone)]
struct Effect {
    key: String,
    pool: String,
    rate: u128,
    at: u64,
}

#[derive(Default)]
struct FakeState {
    receipts: HashMap<String, FlowReceipt>,
    effects: Vec<Effect>,
    /// Fail this many calls without applying anything.
    fail_before: u32,
    /// Apply the next change this many times but lose the answer (a mined transaction whose receipt
    /// never arrived).
    fail_after: u32,
    in_flight: u32,
    max_in_flight: u32,
}

#[derive(Default)]
struct FakeRail {
    clock: AtomicU64,
    state: Mutex<FakeState>,
}

impl FakeRail {
    fn at(clock: u64) -> Arc<Self> {
        let rail = Self::default();
        rail.clock.store(clock, Ordering::SeqCst);
        Arc::new(rail)
    }

    fn advance(&self, seconds: u64) {
        self.clock.fetch_add(seconds, Ordering::SeqCst);
    }

    fn now(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    fn effects(&self) -> Vec<Effect> {
        lock(&self.state).effects.clone()
    }

    /// What the members of `pool` received: Σ rate × Δt over the applied changes. The flow must be
    /// stopped (last rate 0), or the sum would still be growing.
    fn paid(&self, pool: &str) -> u128 {
        let effects: Vec<Effect> = self.effects().into_iter().filter(|e| e.pool == pool).collect();
        if let Some(last) = effects.last() {
            assert_eq!(last.rate, 0, "pool {pool} still flows");
        }
        effects.windows(2).map(|w| w[0].rate * u128::from(w[1].at - w[0].at)).sum()
    }

    fn assert_each_key_applied_once(&self) {
        let effects = self.effects();
        let mut seen = BTreeSet::new();
        for effect in &effects {
            assert!(seen.insert(effect.key.clone()), "change {} applied twice", effect.key);
        }
    }
}

impl FlowRail for FakeRail {
    fn set_flow(&self, change: &FlowChange) -> Result<FlowReceipt, RailFailure> {
        let mut state = lock(&self.state);
        state.in_flight += 1;
        state.max_in_flight = state.max_in_flight.max(state.in_flight);
        let result = (|| {
            if let Some(first) = state.receipts.get(&change.idempotency_key) {
                return Ok(first.clone());
            }
            if state.fail_before > 0 {
                state.fail_before -= 1;
                return Err(RailFailure::new("rpc unreachable"));
            }
            let receipt = FlowReceipt {
                reference: format!("0xtx{}", state.effects.len()),
                effective_at_s: self.now(),
                flow_rate_per_s: change.flow_rate_per_s,
            };
            state.effects.push(Effect {
                key: change.idempotency_key.clone(),
                pool: change.pool.clone(),
                rate: change.flow_rate_per_s,
                at: receipt.effective_at_s,
            });
            state.receipts.insert(change.idempotency_key.clone(), receipt.clone());
            if state.fail_after > 0 {
                state.fail_after -= 1;
                return Err(RailFailure::new("receipt timed out"));
            }
            Ok(receipt)
        })();
        state.in_flight -= 1;
        result
    }
}

/// A fake whose calls are slow, to catch overlapping calls on one pool.
struct SlowRail(Arc<FakeRail>);

impl FlowRail for SlowRail {
    fn set_flow(&self, change: &FlowChange) -> Result<FlowReceipt, RailFailure> {
        {
            let mut state = lock(&self.0.state);
            state.in_flight += 1;
            state.max_in_flight = state.max_in_flight.max(state.in_flight);
        }
        std::thread::sleep(Duration::from_millis(2));
        lock(&self.0.state).in_flight -= 1;
        self.0.set_flow(change)
    }
}

fn no_wait(attempts: u32) -> RetryPolicy {
    RetryPolicy { attempts, first_backoff: Duration::ZERO, max_backoff: Duration::ZERO }
}

fn terms(pool: &str, price_per_s: u128) -> PoolFlow {
    PoolFlow {
        pool: pool.into(),
        token: "0xtoken".into(),
        members: vec![
            FlowMember { operator: "0x01".into(), units: 3 },
            FlowMember { operator: "0x02".into(), units: 7 },
        ],
        price_per_s,
    }
}

fn meter_with(sessions: Sessions, rail: Arc<dyn FlowRail>, attempts: u32) -> Meter {
    let meter = Meter::open(sessions, rail, no_wait(attempts)).unwrap();
    meter.configure_pool(terms("pool-a", 1_000)).unwrap();
    meter.configure_pool(terms("pool-b", 30)).unwrap();
    meter
}

fn fund(sessions: &Sessions, payer: &str, voucher: &str, amount: u128) -> String {
    let ticket = sessions.begin_credit(payer, voucher, amount).unwrap();
    sessions.complete_credit(voucher, "0xsettled").unwrap();
    ticket.session_id
}

fn charged(meter: &Meter) -> u128 {
    let conn = meter.store().conn();
    let mut stmt = conn.prepare("SELECT cost FROM requests WHERE cost IS NOT NULL").unwrap();
    let costs: Vec<String> = stmt.query_map([], |r| r.get(0)).unwrap().map(|c| c.unwrap()).collect();
    costs.iter().map(|c| c.parse::<u128>().unwrap()).sum()
}

fn charged_in(meter: &Meter, pool: &str) -> u128 {
    let conn = meter.store().conn();
    let mut stmt = conn.prepare("SELECT cost FROM requests WHERE cost IS NOT NULL AND pool = ?1").unwrap();
    let costs: Vec<String> = stmt.query_map([pool], |r| r.get(0)).unwrap().map(|c| c.unwrap()).collect();
    costs.iter().map(|c| c.parse::<u128>().unwrap()).sum()
}

fn unanswered_changes(meter: &Meter) -> i64 {
    meter.store().conn().query_row("SELECT COUNT(*) FROM flow_changes WHERE effective_at_s IS NULL", [], |r| r.get(0)).unwrap()
}

#[test]
fn a_price_that_is_not_a_multiple_of_the_units_is_refused() {
    let err = terms("pool-x", 1_001).validate().unwrap_err();
    assert!(matches!(err, MeterError::PriceNotMultipleOfUnits { price_per_s: 1_001, total_units: 10, .. }));
    assert!(err.to_string().contains("floors the per-unit rate"), "{err}");
    assert_eq!(terms("pool-x", 1_000).validate().unwrap(), 10);
    let mut twice = terms("pool-x", 1_000);
    twice.members[1].operator = "0x01".into();
    assert!(matches!(twice.validate(), Err(MeterError::InvalidPool { .. })));
    let mut zero = terms("pool-x", 1_000);
    zero.members.iter_mut().for_each(|m| m.units = 0);
    assert!(matches!(zero.validate(), Err(MeterError::InvalidPool { .. })));
}

#[test]
fn one_request_pays_price_times_the_seconds_between_its_receipts() {
    let sessions = Sessions::in_memory().unwrap();
    let rail = FakeRail::at(1_000);
    let meter = meter_with(sessions.clone(), rail.clone(), 1);
    let session = fund(&sessions, PAYER, "v1", 1_000_000);
    assert_eq!(meter.admit(&session, "r1", "pool-a", 60).unwrap().reserved, 60_000);

    let started = meter.request_started("r1").unwrap();
    assert_eq!((started.started_at_s, started.deadline_s), (1_000, 1_060));
    assert_eq!(meter.deadline("r1").unwrap(), Some(1_060));
    assert_eq!(meter.request_started("r1").unwrap(), started, "a repeated start changes nothing");
    let view = sessions.view(&session).unwrap();
    assert_eq!((view.state, view.stream.state), (SessionState::Streaming, "flowing"));
    assert_eq!(view.stream.requests[0].deadline_s, Some(1_060));

    rail.advance(7);
    let ended = meter.request_ended("r1", EndReason::Completed).unwrap();
    assert_eq!((ended.state, ended.seconds, ended.cost), (RequestState::Ended, 7, 7_000));
    assert_eq!((ended.started_at_s, ended.stopped_at_s), (Some(1_000), Some(1_007)));
    assert_eq!(ended.start_reference.as_deref(), Some("0xtx0"));
    assert_eq!(ended.stop_reference.as_deref(), Some("0xtx1"));
    assert_eq!(meter.request_ended("r1", EndReason::Completed).unwrap(), ended, "a repeated end changes nothing");

    let view = sessions.view(&session).unwrap();
    assert_eq!(view.state, SessionState::Idle);
    assert_eq!((view.balance, view.reserved, view.available), (993_000, 0, 993_000));
    assert_eq!(view.usage, crate::session::Usage { requests: 1, seconds: 7, cost: 7_000 });
    let rates: Vec<(u128, u64)> = rail.effects().iter().map(|e| (e.rate, e.at)).collect();
    assert_eq!(rates, vec![(1_000, 1_000), (0, 1_007)]);
    assert_eq!(rail.paid("pool-a"), 7_000);
}

#[test]
fn overlapping_requests_share_one_flow_and_the_costs_add_up_to_what_was_paid() {
    let sessions = Sessions::in_memory().unwrap();
    let rail = FakeRail::at(50);
    let meter = meter_with(sessions.clone(), rail.clone(), 1);
    let a = fund(&sessions, PAYER, "va", 1_000_000);
    let b = fund(&sessions, PAYER_B, "vb", 1_000_000);
    meter.admit(&a, "ra", "pool-a", 100).unwrap();
    meter.admit(&b, "rb", "pool-a", 100).unwrap();
    meter.request_started("ra").unwrap();
    rail.advance(3);
    meter.request_started("rb").unwrap();
    rail.advance(5);
    assert_eq!(meter.request_ended("ra", EndReason::ClientDisconnected).unwrap().cost, 8_000);
    rail.advance(2);
    assert_eq!(meter.request_ended("rb", EndReason::ShardFault("worker 2".into())).unwrap().cost, 7_000);
    let rates: Vec<u128> = rail.effects().iter().map(|e| e.rate).collect();
    assert_eq!(rates, vec![1_000, 2_000, 1_000, 0]);
    assert_eq!(rail.paid("pool-a"), 15_000);
    assert_eq!(charged(&meter), 15_000);
    assert_eq!(meter.request_ended("rb", EndReason::Completed).unwrap().state, RequestState::Failed);
}

#[test]
fn a_request_that_never_started_is_released_without_a_rail_call() {
    let sessions = Sessions::in_memory().unwrap();
    let rail = FakeRail::at(0);
    let meter = meter_with(sessions.clone(), rail.clone(), 1);
    let session = fund(&sessions, PAYER, "v", 10_000);
    meter.admit(&session, "r", "pool-a", 10).unwrap();
    assert_eq!(sessions.view(&session).unwrap().available, 0);
    let ended = meter.request_ended("r", EndReason::Error("tokenizer".into())).unwrap();
    assert_eq!((ended.state, ended.cost, ended.seconds), (RequestState::Failed, 0, 0));
    assert!(rail.effects().is_empty());
    let view = sessions.view(&session).unwrap();
    assert_eq!((view.state, view.available), (SessionState::Paid, 10_000));
    // An ended request cannot start.
    assert!(matches!(meter.request_started("r"), Err(MeterError::NotStartable { .. })));
    assert!(matches!(meter.admit(&session, "r2", "pool-z", 1), Err(MeterError::UnknownPool(_))));
}

#[test]
fn a_lost_receipt_is_answered_under_the_same_key_and_applied_once() {
    let sessions = Sessions::in_memory().unwrap();
    let rail = FakeRail::at(10);
    // Two failures before and one lost answer: the fourth try gets the first receipt.
    let meter = meter_with(sessions.clone(), rail.clone(), 4);
    let session = fund(&sessions, PAYER, "v", 1_000_000);
    meter.admit(&session, "r", "pool-a", 100).unwrap();
    lock(&rail.state).fail_after = 1;
    meter.request_started("r").unwrap();
    rail.advance(4);
    lock(&rail.state).fail_before = 2;
    lock(&rail.state).fail_after = 1;
    assert_eq!(meter.request_ended("r", EndReason::Completed).unwrap().cost, 4_000);
    assert_eq!(rail.effects().len(), 2);
    rail.assert_each_key_applied_once();
    assert_eq!(rail.paid("pool-a"), 4_000);
}

#[test]
fn a_stop_that_keeps_failing_breaches_the_session_and_is_charged_once_the_rail_answers() {
    let sessions = Sessions::in_memory().unwrap();
    let rail = FakeRail::at(100);
    let meter = meter_with(sessions.clone(), rail.clone(), 3);
    let session = fund(&sessions, PAYER, "v", 1_000_000);
    let other = fund(&sessions, PAYER_B, "w", 1_000_000);
    meter.admit(&session, "r", "pool-a", 5).unwrap();
    meter.admit(&other, "o", "pool-a", 100).unwrap();
    meter.request_started("r").unwrap();
    meter.request_started("o").unwrap();
    rail.advance(5);
    lock(&rail.state).fail_before = 3;
    match meter.request_ended("r", EndReason::DeadlineReached) {
        Err(MeterError::StopFailed { breached, .. }) => assert_eq!(breached, vec![session.clone()]),
        other => panic!("expected a failed stop, got {other:?}"),
    }
    let view = sessions.view(&session).unwrap();
    assert_eq!(view.state, SessionState::Breached);
    assert!(view.note.unwrap().contains("could not be stopped"));
    assert!(matches!(meter.admit(&session, "r2", "pool-a", 1), Err(MeterError::Session(SessionError::NotAdmitting { .. }))));
    // The other payer's request is still fine, but nothing new starts on the pool until the rail answers.
    assert_eq!(sessions.view(&other).unwrap().state, SessionState::Streaming);
    assert_eq!(unanswered_changes(&meter), 1);

    rail.advance(6);
    assert!(meter.retry_stuck().is_empty());
    assert_eq!(unanswered_changes(&meter), 0);
    let ended = meter.request_ended("r", EndReason::DeadlineReached).unwrap();
    // Charged to the receipt that removed it, past its 5 reserved seconds: 11 s.
    assert_eq!((ended.state, ended.seconds, ended.cost), (RequestState::Ended, 11, 11_000));
    let view = sessions.view(&session).unwrap();
    assert_eq!((view.state, view.balance, view.reserved), (SessionState::Breached, 989_000, 0));
    rail.advance(1);
    meter.request_ended("o", EndReason::Completed).unwrap();
    assert_eq!(rail.paid("pool-a"), charged(&meter));
    assert_eq!(charged(&meter), 11_000 + 12_000);
    // An operator closes the breached session.
    assert_eq!(sessions.close(&session, "reviewed").unwrap().state, SessionState::Closed);
}

#[test]
fn a_late_stop_beyond_the_balance_is_recorded_as_overdraft() {
    let sessions = Sessions::in_memory().unwrap();
    let rail = FakeRail::at(0);
    let meter = meter_with(sessions.clone(), rail.clone(), 1);
    let session = fund(&sessions, PAYER, "v", 3_000);
    meter.admit(&session, "r", "pool-a", 3).unwrap();
    meter.request_started("r").unwrap();
    rail.advance(5);
    assert_eq!(meter.request_ended("r", EndReason::Completed).unwrap().cost, 5_000);
    let view = sessions.view(&session).unwrap();
    assert_eq!((view.balance, view.overdraft, view.usage.cost), (0, 2_000, 5_000));
}

#[test]
fn the_price_changes_only_while_nothing_flows() {
    let sessions = Sessions::in_memory().unwrap();
    let rail = FakeRail::at(0);
    let meter = meter_with(sessions.clone(), rail.clone(), 1);
    let session = fund(&sessions, PAYER, "v", 1_000_000);
    meter.admit(&session, "r", "pool-a", 10).unwrap();
    meter.request_started("r").unwrap();
    assert!(matches!(meter.configure_pool(terms("pool-a", 2_000)), Err(MeterError::PoolBusy { .. })));
    // Members may change while flowing; the next change carries them.
    let mut more = terms("pool-a", 1_000);
    more.members.push(FlowMember { operator: "0x03".into(), units: 0 });
    meter.configure_pool(more).unwrap();
    meter.request_ended("r", EndReason::Completed).unwrap();
    meter.configure_pool(terms("pool-a", 2_000)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starts_and_stops_reach_the_rail_one_at_a_time_per_pool() {
    let sessions = Sessions::in_memory().unwrap();
    let fake = FakeRail::at(0);
    let meter = Arc::new(meter_with(sessions.clone(), Arc::new(SlowRail(fake.clone())), 1));
    let controller = StreamController::new(meter.clone());
    let session = fund(&sessions, PAYER, "v", u64::MAX.into());
    let mut tasks = Vec::new();
    for i in 0..24 {
        let controller = controller.clone();
        let session = session.clone();
        let fake = fake.clone();
        let pool = if i % 3 == 0 { "pool-b" } else { "pool-a" };
        tasks.push(tokio::spawn(async move {
            let id = format!("r{i}");
            controller.admit(&session, &id, pool, 1_000).await.unwrap();
            controller.request_started(&id).await.unwrap();
            fake.advance(1);
            controller.request_ended(&id, EndReason::Completed).await.unwrap()
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let max_in_flight = lock(&fake.state).max_in_flight;
    // Two pools may overlap with each other, never with themselves.
    assert!(max_in_flight <= 2, "{max_in_flight} rail calls overlapped");
    for pool in ["pool-a", "pool-b"] {
        assert_eq!(fake.paid(pool), charged_in(&meter, pool), "{pool}");
    }
    assert_eq!(sessions.view(&session).unwrap().reserved, 0);
}

/// A fake whose calls wait at a gate the test opens, so the test can pile calls up behind one in flight.
struct GateRail {
    inner: Arc<FakeRail>,
    open: Mutex<bool>,
    turn: std::sync::Condvar,
    waiting: AtomicUsize,
}

impl GateRail {
    fn set(&self, open: bool) {
        *lock(&self.open) = open;
        self.turn.notify_all();
    }
}

impl FlowRail for GateRail {
    fn set_flow(&self, change: &FlowChange) -> Result<FlowReceipt, RailFailure> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // Bounded, so a failing test fails instead of hanging on a gate nobody opens.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut open = lock(&self.open);
        while !*open && std::time::Instant::now() < deadline {
            open = self.turn.wait_timeout(open, Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner()).0;
        }
        drop(open);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.inner.set_flow(change)
    }
}

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn requests_in(meter: &Meter, state: &str, start_requested: bool) -> i64 {
    meter
        .store()
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM requests WHERE state = ?1 AND (?2 = 0 OR start_requested = 1)",
            params![state, i64::from(start_requested)],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn starts_and_ends_that_arrive_during_a_rail_call_share_the_next_change() {
    let sessions = Sessions::in_memory().unwrap();
    let fake = FakeRail::at(100);
    let gate = Arc::new(GateRail { inner: fake.clone(), open: Mutex::new(true), turn: Default::default(), waiting: AtomicUsize::new(0) });
    let meter = &meter_with(sessions.clone(), gate.clone(), 1);
    let session = fund(&sessions, PAYER, "v", 1_000_000);
    for id in ["r1", "r2", "r3", "r4"] {
        meter.admit(&session, id, "pool-a", 100).unwrap();
    }
    meter.request_started("r1").unwrap();
    std::thread::scope(|scope| {
        gate.set(false);
        let first = scope.spawn(move || meter.request_started("r2").unwrap());
        wait_until("r2's change is at the rail", || gate.waiting.load(Ordering::SeqCst) == 1);
        let later: Vec<_> = ["r3", "r4"].map(|id| scope.spawn(move || meter.request_started(id).unwrap())).into();
        // r2 (its change at the rail) and r3, r4 (waiting for the pool).
        wait_until("r3 and r4 asked to start", || requests_in(meter, "admitted", true) == 3);
        gate.set(true);
        first.join().unwrap();
        for started in later {
            assert_eq!(started.join().unwrap().started_at_s, 100);
        }
    });
    fake.advance(5);
    std::thread::scope(|scope| {
        gate.set(false);
        let first = scope.spawn(move || meter.request_ended("r1", EndReason::Completed).unwrap());
        wait_until("r1's stop is at the rail", || gate.waiting.load(Ordering::SeqCst) == 1);
        let later: Vec<_> =
            ["r2", "r3", "r4"].map(|id| scope.spawn(move || meter.request_ended(id, EndReason::Completed).unwrap())).into();
        wait_until("r2, r3 and r4 ended", || requests_in(meter, "stopping", false) == 4);
        gate.set(true);
        assert_eq!(first.join().unwrap().cost, 5_000);
        for ended in later {
            assert_eq!(ended.join().unwrap().cost, 5_000);
        }
    });
    let rates: Vec<u128> = fake.effects().iter().map(|e| e.rate).collect();
    // r1; r2; r3 and r4 together; r1 out; the other three together.
    assert_eq!(rates, vec![1_000, 2_000, 4_000, 3_000, 0]);
    assert_eq!(fake.paid("pool-a"), 20_000);
    assert_eq!(charged(meter), 20_000);
}

/// One step of a random workload.
#[derive(Debug, Clone)]
enum Step {
    Start { pool: usize, max_seconds: u64 },
    End { pick: usize },
    Tick(u64),
    /// The next rail call fails before doing anything / does it but loses the answer.
    FailBefore,
    FailAfter,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0usize..2, 1u64..40).prop_map(|(pool, max_seconds)| Step::Start { pool, max_seconds }),
        3 => any::<usize>().prop_map(|pick| Step::End { pick }),
        3 => (0u64..6).prop_map(Step::Tick),
        1 => Just(Step::FailBefore),
        1 => Just(Step::FailAfter),
    ]
}

const POOLS: [&str; 2] = ["pool-a", "pool-b"];
const PRICES: [u128; 2] = [1_000, 30];

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Any interleaving of starts, stops, clock ticks and rail hiccups: every request pays price × its
    /// seconds in the flow, the sum per pool equals Σ rate × Δt the members received, each change is
    /// applied once, and every reservation is released at the end.
    #[test]
    fn costs_equal_what_the_flow_paid(steps in proptest::collection::vec(step(), 1..60)) {
        let sessions = Sessions::in_memory().unwrap();
        let rail = FakeRail::at(1_700_000_000);
        // Enough tries to outlast any injected failure: one hiccup at most is pending per call.
        let meter = meter_with(sessions.clone(), rail.clone(), 4);
        let payers = [fund(&sessions, PAYER, "va", u64::MAX.into()), fund(&sessions, PAYER_B, "vb", u64::MAX.into())];
        let mut open: Vec<String> = Vec::new();
        let mut next = 0;
        for step in steps {
            match step {
                Step::Start { pool, max_seconds } => {
                    let id = format!("r{next}");
                    meter.admit(&payers[next % 2], &id, POOLS[pool], max_seconds).unwrap();
                    next += 1;
                    meter.request_started(&id).unwrap();
                    open.push(id);
                }
                Step::End { pick } if !open.is_empty() => {
                    let id = open.remove(pick % open.len());
                    meter.request_ended(&id, EndReason::Completed).unwrap();
                }
                Step::End { .. } => {}
                Step::Tick(seconds) => rail.advance(seconds),
                Step::FailBefore => lock(&rail.state).fail_before = 1,
                Step::FailAfter => lock(&rail.state).fail_after = 1,
            }
        }
        for id in open.drain(..) {
            meter.request_ended(&id, EndReason::Completed).unwrap();
        }
        rail.assert_each_key_applied_once();
        prop_assert_eq!(unanswered_changes(&meter), 0);
        for (pool, price) in POOLS.iter().zip(PRICES) {
            prop_assert_eq!(rail.paid(pool), charged_in(&meter, pool));
            // Each request: price × (stop − start) from the fake's own receipts.
            let conn = meter.store().conn();
            let mut stmt = conn.prepare("SELECT start_key, stop_key, cost FROM requests WHERE pool = ?1").unwrap();
            let rows: Vec<(String, String, String)> =
                stmt.query_map([pool], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(|r| r.unwrap()).collect();
            let at: BTreeMap<String, u64> = rail.effects().into_iter().map(|e| (e.key, e.at)).collect();
            for (start, stop, cost) in rows {
                prop_assert_eq!(cost.parse::<u128>().unwrap(), price * u128::from(at[&stop] - at[&start]));
            }
        }
        let mut total_cost = 0;
        for session in &payers {
            let view = sessions.view(session).unwrap();
            prop_assert_eq!(view.reserved, 0);
            prop_assert_eq!(view.balance, u128::from(u64::MAX) - view.usage.cost);
            prop_assert!(matches!(view.state, SessionState::Idle | SessionState::Paid));
            total_cost += view.usage.cost;
        }
        prop_assert_eq!(total_cost, charged(&meter));
    }
}

// ---- crash recovery ----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrashPoint {
    /// The intent is committed; the process dies before the rail hears of it.
    BeforeRail,
    /// The rail applied the change; the process dies before the receipt is committed.
    AfterRail,
}

/// Delegates to the fake, dying (panicking) at one chosen call.
struct CrashingRail {
    inner: Arc<FakeRail>,
    calls: AtomicUsize,
    crash_at: usize,
    point: CrashPoint,
}

impl FlowRail for CrashingRail {
    fn set_flow(&self, change: &FlowChange) -> Result<FlowReceipt, RailFailure> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call != self.crash_at {
            return self.inner.set_flow(change);
        }
        if self.point == CrashPoint::AfterRail {
            let _ = self.inner.set_flow(change);
        }
        panic!("simulated crash at rail call {call} ({:?})", self.point);
    }
}

/// The workload the crash tests cut short: three requests over two payers, overlapping.
/// Rail calls: 0 start r1, 1 start r2, 2 end r1, 3 start r3, 4 end r2, 5 end r3.
fn workload(meter: &Meter, rail: &FakeRail, sessions: [&str; 2]) {
    meter.admit(sessions[0], "r1", "pool-a", 100).unwrap();
    meter.admit(sessions[1], "r2", "pool-a", 100).unwrap();
    meter.admit(sessions[0], "r3", "pool-a", 100).unwrap();
    meter.admit(sessions[1], "r4", "pool-a", 100).unwrap(); // never starts
    meter.request_started("r1").unwrap();
    rail.advance(3);
    meter.request_started("r2").unwrap();
    rail.advance(4);
    meter.request_ended("r1", EndReason::Completed).unwrap();
    rail.advance(2);
    meter.request_started("r3").unwrap();
    rail.advance(5);
    meter.request_ended("r2", EndReason::Completed).unwrap();
    rail.advance(1);
    meter.request_ended("r3", EndReason::Completed).unwrap();
}

fn crash_and_recover(crash_at: usize, point: CrashPoint) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payments.db");
    let fake = FakeRail::at(1_000);
    let sessions = Sessions::open(&path).unwrap();
    let payers = [fund(&sessions, PAYER, "va", 1_000_000), fund(&sessions, PAYER_B, "vb", 1_000_000)];
    {
        let rail = Arc::new(CrashingRail { inner: fake.clone(), calls: AtomicUsize::new(0), crash_at, point });
        let meter = meter_with(sessions, rail, 1);
        let crashed = catch_unwind(AssertUnwindSafe(|| workload(&meter, &fake, [&payers[0], &payers[1]])));
        assert!(crashed.is_err(), "the workload should have died at call {crash_at}");
        // Dropping the meter and every handle: only the database file survives.
    }
    let effects_before = fake.effects().len();
    // The orchestrator is down for a while; the flow keeps running on the rail.
    fake.advance(10);
    let recovery_time = fake.now();

    let sessions = Sessions::open(&path).unwrap();
    let meter = Meter::open(sessions.clone(), fake.clone(), no_wait(1)).unwrap();
    let report = meter.recover().unwrap();
    assert!(report.unresolved.is_empty(), "{:?}", report.unresolved);
    assert_eq!(report.resolved_changes.len(), 1, "exactly the change the crash interrupted");
    // BeforeRail: the interrupted change reaches the rail now; AfterRail: the rail answers with its first
    // receipt and applies nothing.
    let resolved_now = usize::from(point == CrashPoint::BeforeRail);
    let stop_now = usize::from(!report.stopped_pools.is_empty());
    assert_eq!(fake.effects().len(), effects_before + resolved_now + stop_now);
    fake.assert_each_key_applied_once();
    assert_eq!(unanswered_changes(&meter), 0);
    assert_eq!(fake.paid("pool-a"), charged(&meter), "costs equal what the members received");

    // Every request is finished, none lost; the ones open at the crash failed with the reason, charged
    // up to the recovery's stop.
    let conn = meter.store().conn();
    let mut stmt = conn
        .prepare("SELECT id, state, end_reason, start_at_s, stop_at_s, seconds, cost FROM requests ORDER BY id")
        .unwrap();
    type Row = (String, String, String, Option<i64>, Option<i64>, i64, String);
    let rows: Vec<Row> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    drop(stmt);
    drop(conn);
    assert_eq!(rows.len(), 4);
    for (id, state, reason, start, stop, seconds, cost) in &rows {
        assert!(state == "ended" || state == "failed", "{id} is {state}");
        if state == "failed" {
            assert_eq!(reason, "orchestrator restarted", "{id}");
            if let Some(stop) = stop {
                assert_eq!(*stop as u64, recovery_time, "{id} is charged until the recovery's stop");
            }
        }
        if let (Some(start), Some(stop)) = (start, stop) {
            assert_eq!(*seconds, stop - start);
            assert_eq!(cost.parse::<u128>().unwrap(), 1_000 * (*seconds as u128), "{id}");
        } else {
            assert_eq!(cost, "0", "{id} never flowed");
        }
    }
    assert!(report.failed_requests.iter().any(|r| r.request_id == "r4"), "the never-started request is failed too");
    for session in &payers {
        let view = sessions.view(session).unwrap();
        assert_eq!(view.reserved, 0);
        assert_eq!(view.balance, 1_000_000 - view.usage.cost);
        assert_ne!(view.state, SessionState::Streaming);
    }
    // A second recovery finds nothing to do.
    let again = meter.recover().unwrap();
    assert!(again.resolved_changes.is_empty() && again.stopped_pools.is_empty() && again.failed_requests.is_empty());
    assert_eq!(fake.effects().len(), effects_before + resolved_now + stop_now);
}

#[test]
fn a_crash_after_the_intent_and_before_the_rail_call_is_recovered_exactly() {
    for crash_at in 0..6 {
        crash_and_recover(crash_at, CrashPoint::BeforeRail);
    }
}

#[test]
fn a_crash_after_the_rail_call_and_before_its_receipt_is_recorded_is_recovered_exactly() {
    for crash_at in 0..6 {
        crash_and_recover(crash_at, CrashPoint::AfterRail);
    }
}

#[test]
fn after_recovery_the_pool_serves_again_with_fresh_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payments.db");
    let fake = FakeRail::at(0);
    let sessions = Sessions::open(&path).unwrap();
    let session = fund(&sessions, PAYER, "v", 1_000_000);
    {
        let rail = Arc::new(CrashingRail { inner: fake.clone(), calls: AtomicUsize::new(0), crash_at: 1, point: CrashPoint::AfterRail });
        let meter = meter_with(sessions, rail, 1);
        meter.admit(&session, "r1", "pool-a", 100).unwrap();
        meter.request_started("r1").unwrap();
        fake.advance(2);
        assert!(catch_unwind(AssertUnwindSafe(|| meter.request_ended("r1", EndReason::Completed))).is_err());
    }
    let sessions = Sessions::open(&path).unwrap();
    let meter = meter_with(sessions.clone(), fake.clone(), 1);
    let report = meter.recover().unwrap();
    // The stop had reached the rail: recovery only learns its receipt; the request had ended normally.
    assert_eq!((report.resolved_changes.len(), report.stopped_pools.len()), (1, 0));
    let ended = meter.request_ended("r1", EndReason::Completed).unwrap();
    assert_eq!((ended.state, ended.cost), (RequestState::Ended, 2_000));
    assert_eq!(sessions.view(&session).unwrap().state, SessionState::Idle);
    meter.admit(&session, "r2", "pool-a", 100).unwrap();
    meter.request_started("r2").unwrap();
    fake.advance(3);
    meter.request_ended("r2", EndReason::Completed).unwrap();
    fake.assert_each_key_applied_once();
    assert_eq!(fake.paid("pool-a"), 5_000);
    assert_eq!(charged(&meter), 5_000);
}

#[test]
fn a_crash_during_recovery_is_recovered_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payments.db");
    let fake = FakeRail::at(500);
    let sessions = Sessions::open(&path).unwrap();
    let payers = [fund(&sessions, PAYER, "va", 1_000_000), fund(&sessions, PAYER_B, "vb", 1_000_000)];
    {
        // Dies with r1 and r2 flowing, as r1's stop reaches the rail.
        let rail = Arc::new(CrashingRail { inner: fake.clone(), calls: AtomicUsize::new(0), crash_at: 2, point: CrashPoint::BeforeRail });
        let meter = meter_with(sessions, rail, 1);
        assert!(catch_unwind(AssertUnwindSafe(|| workload(&meter, &fake, [&payers[0], &payers[1]]))).is_err());
    }
    fake.advance(4);
    {
        // The first recovery resolves r1's stop (call 0) and dies after its own stop reached the rail (call 1).
        let rail = Arc::new(CrashingRail { inner: fake.clone(), calls: AtomicUsize::new(0), crash_at: 1, point: CrashPoint::AfterRail });
        let meter = Meter::open(Sessions::open(&path).unwrap(), rail, no_wait(1)).unwrap();
        assert!(catch_unwind(AssertUnwindSafe(|| meter.recover())).is_err());
    }
    fake.advance(4);
    let meter = Meter::open(Sessions::open(&path).unwrap(), fake.clone(), no_wait(1)).unwrap();
    let report = meter.recover().unwrap();
    assert_eq!((report.resolved_changes.len(), report.stopped_pools.len()), (1, 0), "only learns the stop's receipt");
    fake.assert_each_key_applied_once();
    assert_eq!(unanswered_changes(&meter), 0);
    // r1 started at 500 and its stop reached the rail at 511 (first recovery); r2 started at 503 and
    // was stopped by the first recovery's stop, also at 511.
    let rates: Vec<(u128, u64)> = fake.effects().iter().map(|e| (e.rate, e.at)).collect();
    assert_eq!(rates, vec![(1_000, 500), (2_000, 503), (1_000, 511), (0, 511)]);
    assert_eq!(fake.paid("pool-a"), charged(&meter));
    assert_eq!(charged(&meter), 11_000 + 8_000);
    let r2 = meter.request_ended("r2", EndReason::Completed).unwrap();
    assert_eq!((r2.state, r2.reason.as_str(), r2.cost), (RequestState::Failed, "orchestrator restarted", 8_000));
    let r1 = meter.request_ended("r1", EndReason::Completed).unwrap();
    assert_eq!((r1.state, r1.cost), (RequestState::Ended, 11_000), "r1 had ended normally before the crash");
}

#[test]
fn a_start_with_an_unknown_outcome_that_cannot_be_stopped_breaches_a_paid_session() {
    let sessions = Sessions::in_memory().unwrap();
    let rail = FakeRail::at(0);
    let meter = meter_with(sessions.clone(), rail.clone(), 2);
    let session = fund(&sessions, PAYER, "v", 1_000_000);
    meter.admit(&session, "r", "pool-a", 100).unwrap();
    // The start's transaction is mined but both answers are lost.
    lock(&rail.state).fail_after = 1;
    lock(&rail.state).fail_before = 3;
    assert!(matches!(meter.request_started("r"), Err(MeterError::StartFailed { .. })));
    assert_eq!(sessions.view(&session).unwrap().state, SessionState::Paid);
    match meter.request_ended("r", EndReason::Error("start failed".into())) {
        Err(MeterError::StopFailed { breached, .. }) => assert_eq!(breached, vec![session.clone()]),
        other => panic!("expected a failed stop, got {other:?}"),
    }
    assert_eq!(sessions.view(&session).unwrap().state, SessionState::Breached);
    rail.advance(3);
    assert!(meter.retry_stuck().is_empty());
    // It flowed from the lost start (0) to the stop retry_stuck made (3).
    let ended = meter.request_ended("r", EndReason::Error("start failed".into())).unwrap();
    assert_eq!((ended.state, ended.seconds, ended.cost), (RequestState::Failed, 3, 3_000));
    assert_eq!(rail.paid("pool-a"), 3_000);
    rail.assert_each_key_applied_once();
}
