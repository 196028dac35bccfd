//! `GET /metrics` in the Prometheus text format (version 0.0.4): requests by outcome, tokens generated
//! and their recent rate, time to first token (a histogram), queue depth per pool, and per worker what
//! its last heartbeat said (up, active requests, KV caches and their bytes). Counters live here in
//! memory and start from zero with the process, as Prometheus expects of counters; durable per-request
//! records are in the store.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::store::Outcome;

/// Upper bounds of the time-to-first-token buckets, in seconds.
const TTFT_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// The window `computepool_tokens_per_second` averages over.
const RATE_WINDOW: Duration = Duration::from_secs(10);

const OUTCOMES: [Outcome; 4] = [Outcome::Stop, Outcome::Length, Outcome::Error, Outcome::Cancelled];

/// The orchestrator's own counters.
pub struct Metrics {
    requests: [AtomicU64; 4],
    tokens: AtomicU64,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS.len()],
    ttft_count: AtomicU64,
    /// Sum in microseconds (an integer, so it can be atomic).
    ttft_sum_us: AtomicU64,
    in_flight: Mutex<BTreeMap<String, i64>>,
    /// Tokens per whole second since `epoch`, for the last [`RATE_WINDOW`].
    recent: Mutex<VecDeque<(u64, u64)>>,
    epoch: Instant,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            tokens: AtomicU64::new(0),
            ttft_buckets: Default::default(),
            ttft_count: AtomicU64::new(0),
            ttft_sum_us: AtomicU64::new(0),
            in_flight: Mutex::new(BTreeMap::new()),
            recent: Mutex::new(VecDeque::new()),
            epoch: Instant::now(),
        }
    }
}

/// One worker's line items, from its last heartbeat.
pub struct WorkerSample<'a> {
    pub peer: &'a str,
    pub layers: &'a str,
    pub pool: &'a str,
    pub up: bool,
    pub active_requests: u64,
    pub kv_caches: u64,
    pub kv_cache_bytes: u64,
    pub speed: f64,
}

impl Metrics {
    pub fn request_started(&self, pool: &str) {
        *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).entry(pool.to_string()).or_default() += 1;
    }

    pub fn request_ended(&self, pool: &str, outcome: Outcome) {
        if let Some(n) = self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).get_mut(pool) {
            *n -= 1;
        }
        let i = OUTCOMES.iter().position(|o| *o == outcome).expect("every outcome is listed");
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests of `pool` in flight here (the orchestrator's queue for it).
    pub fn queue_depth(&self, pool: &str) -> i64 {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).get(pool).copied().unwrap_or(0)
    }

    pub fn token(&self) {
        self.tokens.fetch_add(1, Ordering::Relaxed);
        let second = self.epoch.elapsed().as_secs();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        match recent.back_mut() {
            Some((s, n)) if *s == second => *n += 1,
            _ => recent.push_back((second, 1)),
        }
        while recent.front().is_some_and(|(s, _)| second - s >= RATE_WINDOW.as_secs()) {
            recent.pop_front();
        }
    }

    pub fn first_token(&self, after: Duration) {
        let s = after.as_secs_f64();
        for (bound, bucket) in TTFT_BUCKETS.iter().zip(&self.ttft_buckets) {
            if s <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ttft_count.fetch_add(1, Ordering::Relaxed);
        self.ttft_sum_us.fetch_add(after.as_micros() as u64, Ordering::Relaxed);
    }

    /// Tokens per second over the last [`RATE_WINDOW`] (whole seconds; the current one counts as whole).
    fn tokens_per_second(&self) -> f64 {
        let now = self.epoch.elapsed().as_secs();
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let total: u64 = recent.iter().filter(|(s, _)| now - s < RATE_WINDOW.as_secs()).map(|(_, n)| n).sum();
        total as f64 / RATE_WINDOW.as_secs_f64()
    }

    /// The whole exposition.
    pub fn render(&self, workers: &[WorkerSample<'_>]) -> String {
        let mut out = String::new();
        let o = &mut out;
        let name = header(o, "computepool_requests_total", "counter", "Completion requests by how they ended.");
        for (outcome, n) in OUTCOMES.iter().zip(&self.requests) {
            let _ = writeln!(o, "{name}{{outcome=\"{}\"}} {}", outcome.as_str(), n.load(Ordering::Relaxed));
        }
        let name = header(o, "computepool_tokens_generated_total", "counter", "Tokens generated and relayed to clients.");
        let _ = writeln!(o, "{name} {}", self.tokens.load(Ordering::Relaxed));
        let help = "Tokens generated per second, averaged over the last 10 s.";
        let name = header(o, "computepool_tokens_per_second", "gauge", help);
        let _ = writeln!(o, "{name} {}", self.tokens_per_second());
        let help = "From receiving a request to relaying its first token.";
        let name = header(o, "computepool_time_to_first_token_seconds", "histogram", help);
        for (bound, bucket) in TTFT_BUCKETS.iter().zip(&self.ttft_buckets) {
            let _ = writeln!(o, "{name}_bucket{{le=\"{bound}\"}} {}", bucket.load(Ordering::Relaxed));
        }
        let count = self.ttft_count.load(Ordering::Relaxed);
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(o, "{name}_sum {}", self.ttft_sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(o, "{name}_count {count}");
        let help = "Requests in flight through the orchestrator, per pool.";
        let name = header(o, "computepool_queue_depth", "gauge", help);
        for (pool, n) in self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(o, "{name}{{pool=\"{}\"}} {n}", escape(pool));
        }

        type Field = fn(&WorkerSample<'_>) -> String;
        let per_worker: [(&str, &str, Field); 5] = [
            ("computepool_worker_up", "1 while the worker heartbeats, 0 after it missed 3 beats.", |w| {
                u8::from(w.up).to_string()
            }),
            ("computepool_worker_active_requests", "Requests in flight through the worker (last heartbeat).", |w| {
                w.active_requests.to_string()
            }),
            ("computepool_worker_kv_caches", "KV caches the worker holds (last heartbeat).", |w| w.kv_caches.to_string()),
            ("computepool_worker_kv_cache_bytes", "Bytes of the KV caches the worker holds (last heartbeat).", |w| {
                w.kv_cache_bytes.to_string()
            }),
            ("computepool_worker_speed_layers_per_second", "The worker's measured one-row decode speed.", |w| {
                w.speed.to_string()
            }),
        ];
        for (name, help, field) in per_worker {
            header(o, name, "gauge", help);
            for w in workers {
                let (peer, pool, layers) = (escape(w.peer), escape(w.pool), escape(w.layers));
                let _ = writeln!(o, "{name}{{peer=\"{peer}\",pool=\"{pool}\",layers=\"{layers}\"}} {}", field(w));
            }
        }
        out
    }
}

fn header<'a>(out: &mut String, name: &'a str, kind: &str, help: &str) -> &'a str {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name
}

/// Label values escape backslash, quote and newline.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_counts_what_happened() {
        let m = Metrics::default();
        m.request_started("p");
        m.request_started("p");
        assert_eq!(m.queue_depth("p"), 2);
        m.first_token(Duration::from_millis(30));
        for _ in 0..5 {
            m.token();
        }
        m.request_ended("p", Outcome::Length);
        m.request_ended("p", Outcome::Cancelled);
        let worker = WorkerSample {
            peer: "abc",
            layers: "0..15",
            pool: "p\"1",
            up: true,
            active_requests: 0,
            kv_caches: 2,
            kv_cache_bytes: 4096,
            speed: 1.5,
        };
        let text = m.render(&[worker]);
        for want in [
            "computepool_requests_total{outcome=\"length\"} 1",
            "computepool_requests_total{outcome=\"cancelled\"} 1",
            "computepool_requests_total{outcome=\"error\"} 0",
            "computepool_tokens_generated_total 5",
            "computepool_tokens_per_second 0.5",
            "computepool_time_to_first_token_seconds_bucket{le=\"0.025\"} 0",
            "computepool_time_to_first_token_seconds_bucket{le=\"0.05\"} 1",
            "computepool_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1",
            "computepool_time_to_first_token_seconds_count 1",
            "computepool_queue_depth{pool=\"p\"} 0",
            "computepool_worker_kv_caches{peer=\"abc\",pool=\"p\\\"1\",layers=\"0..15\"} 2",
            "computepool_worker_kv_cache_bytes{peer=\"abc\",pool=\"p\\\"1\",layers=\"0..15\"} 4096",
            "# TYPE computepool_time_to_first_token_seconds histogram",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
