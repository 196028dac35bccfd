//! Sessions and the meter through the public API only, the way the orchestrator drives them: a payments
//! database file, a voucher that opens a session, admission, a metered streamed request through the async
//! controller, `GET /sessions/{id}`'s JSON, and a 402 for a request the balance cannot cover.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use computepool_pay::meter::{
    EndReason, FlowChange, FlowMember, FlowRail, FlowReceipt, Meter, MeterError, PoolFlow, RailFailure, RetryPolicy,
    StreamController,
};
use computepool_pay::session::{SessionError, SessionState, Sessions};

/// A rail like the ledger plugin: applies a change at its clock, answers a repeated key with its first receipt.
struct ClockRail {
    clock: AtomicU64,
    receipts: Mutex<HashMap<String, FlowReceipt>>,
}

impl ClockRail {
    fn new(at: u64) -> Arc<Self> {
        Arc::new(Self { clock: AtomicU64::new(at), receipts: Mutex::new(HashMap::new()) })
    }
}

impl FlowRail for ClockRail {
    fn set_flow(&self, change: &FlowChange) -> Result<FlowReceipt, RailFailure> {
        let mut receipts = self.receipts.lock().unwrap();
        let count = receipts.len();
        Ok(receipts
            .entry(change.idempotency_key.clone())
            .or_insert_with(|| FlowReceipt {
                reference: format!("ledger-{count}"),
                effective_at_s: self.clock.load(Ordering::SeqCst),
                flow_rate_per_s: change.flow_rate_per_s,
            })
            .clone())
    }
}

fn pool_terms() -> PoolFlow {
    PoolFlow {
        pool: "0xpool".into(),
        token: "0xtoken".into(),
        members: vec![
            FlowMember { operator: "0xoperator1".into(), units: 1 },
            FlowMember { operator: "0xoperator2".into(), units: 1 },
        ],
        price_per_s: 500,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voucher_pays_for_a_metered_stream_and_the_payer_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let sessions = Sessions::open(&dir.path().join("payments.db")).unwrap();
    let rail = ClockRail::new(1_800_000_000);
    let meter = Arc::new(Meter::open(sessions.clone(), rail.clone(), RetryPolicy::default()).unwrap());
    meter.configure_pool(pool_terms()).unwrap();
    let controller = StreamController::new(meter.clone());

    // After the facilitator's /verify, before /settle; then the settlement's transaction hash.
    let payer = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
    let ticket = sessions.begin_credit(payer, "eip3009:0xtoken:0x7099:0xnonce1", 10_000).unwrap();
    let secret = ticket.secret.clone().unwrap();
    let credited = sessions.complete_credit(&ticket.voucher_key, "0xsettlement").unwrap();
    assert_eq!(credited.balance, 10_000);

    let admission = controller.admit(&ticket.session_id, "req-1", "0xpool", 12).await.unwrap();
    assert_eq!((admission.reserved, admission.available), (6_000, 4_000));
    // A second request needing more than is free: the orchestrator answers 402 for `needed`.
    match controller.admit(&ticket.session_id, "req-2", "0xpool", 12).await {
        Err(MeterError::Session(SessionError::Insufficient { needed, available, shortfall, .. })) => {
            assert_eq!((needed, available, shortfall), (6_000, 4_000, 2_000))
        }
        other => panic!("expected insufficient, got {other:?}"),
    }

    let started = controller.request_started("req-1").await.unwrap();
    assert_eq!(started.deadline_s, 1_800_000_012);
    assert_eq!(meter.deadlines().unwrap(), vec![("req-1".to_owned(), 1_800_000_012)]);
    rail.clock.fetch_add(9, Ordering::SeqCst);
    let ended = controller.request_ended("req-1", EndReason::Completed).await.unwrap();
    assert_eq!((ended.seconds, ended.cost), (9, 4_500));

    sessions.authenticate(&ticket.session_id, &secret).unwrap();
    let json = serde_json::to_value(sessions.view(&ticket.session_id).unwrap()).unwrap();
    assert_eq!(json["state"], SessionState::Idle.as_str());
    assert_eq!(json["balance"], "5500");
    assert_eq!(json["available"], "5500");
    assert_eq!(json["usage"], serde_json::json!({ "requests": 1, "seconds": 9, "cost": "4500" }));
    assert_eq!(json["stream"]["state"], "stopped");

    // A restart with nothing open finds nothing to do.
    drop(controller);
    drop(meter);
    let meter = Meter::open(Sessions::open(&dir.path().join("payments.db")).unwrap(), rail, RetryPolicy::default()).unwrap();
    let report = meter.recover().unwrap();
    assert!(report.failed_requests.is_empty() && report.stopped_pools.is_empty());
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// What the meter adds to a rail call (two SQLite commits, synchronous=FULL, on this machine's disk):
/// run with `--ignored --nocapture`. Prints medians with min/max; asserts nothing about speed.
#[test]
#[ignore = "a measurement, run by hand"]
fn meter_overhead_per_start_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let sessions = Sessions::open(&dir.path().join("payments.db")).unwrap();
    let rail = ClockRail::new(1_800_000_000);
    let meter = Meter::open(sessions.clone(), rail.clone(), RetryPolicy::default()).unwrap();
    meter.configure_pool(pool_terms()).unwrap();
    let ticket = sessions.begin_credit("0x70997970C51812dc3A010C7d01b50e0d17dc79C8", "v", u64::MAX.into()).unwrap();
    sessions.complete_credit("v", "0x1").unwrap();
    let (mut starts, mut stops) = (Vec::new(), Vec::new());
    for i in 0..300 {
        let id = format!("r{i}");
        meter.admit(&ticket.session_id, &id, "0xpool", 60).unwrap();
        let t = Instant::now();
        meter.request_started(&id).unwrap();
        starts.push(t.elapsed());
        rail.clock.fetch_add(1, Ordering::SeqCst);
        let t = Instant::now();
        meter.request_ended(&id, EndReason::Completed).unwrap();
        stops.push(t.elapsed());
    }
    for (what, samples) in [("start", &mut starts), ("stop", &mut stops)] {
        samples.sort();
        println!(
            "meter overhead per {what} (n={}): median {:?}, p99 {:?}, min {:?}, max {:?}",
            samples.len(),
            percentile(samples, 0.5),
            percentile(samples, 0.99),
            samples[0],
            samples[samples.len() - 1]
        );
    }
}
