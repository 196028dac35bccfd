//! A worker's reports to its orchestrator (`computepool worker --orchestrator URL`): it registers
//! (peer id, addresses, model, layers, device, memory, measured speed), then heartbeats what it holds
//! at the interval the orchestrator gave. A refused or unanswered heartbeat means the orchestrator
//! restarted or is unreachable: the worker registers again, retrying with backoff, forever. This runs
//! on its own thread with a blocking HTTP client, off the network runtime and the compute thread.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use computepool_engine::model::{DeviceShard, DeviceStepItem, StepInput};

use computepool_orchestrator::auth::TOKEN_ENV;
use computepool_orchestrator::workers::{RegistrationAnswer, WorkerRegistration, WorkerStats};

/// What a worker holds now; the compute thread and the entry write it, heartbeats read it.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub kv_caches: AtomicU64,
    pub kv_cache_bytes: AtomicU64,
    /// Set by the entry (its requests in flight); other shards count their caches.
    pub entry_requests: Option<AtomicU64>,
}

impl ShardStats {
    pub fn new(is_entry: bool) -> Self {
        Self { entry_requests: is_entry.then(|| AtomicU64::new(0)), ..Self::default() }
    }

    pub fn snapshot(&self) -> WorkerStats {
        let kv_caches = self.kv_caches.load(Ordering::Relaxed);
        WorkerStats {
            active_requests: self.entry_requests.as_ref().map_or(kv_caches, |n| n.load(Ordering::Relaxed)),
            kv_caches,
            kv_cache_bytes: self.kv_cache_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Where to report, and with which token.
#[derive(Debug, Clone)]
pub struct ReportTarget {
    /// The orchestrator's base URL, `http://HOST:PORT`.
    pub url: String,
    pub token: String,
}

impl ReportTarget {
    /// The URL from `--orchestrator`; the token from `--operator-token-file`, else the environment.
    pub fn new(url: &str, token_file: Option<&PathBuf>) -> anyhow::Result<Self> {
        let url = url.trim_end_matches('/').to_string();
        if !url.starts_with("http://") && !url.starts_with("https://") {
            anyhow::bail!("--orchestrator {url:?} must be an http:// or https:// URL");
        }
        let token = match token_file {
            Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            None => std::env::var(TOKEN_ENV).with_context(|| {
                format!("--orchestrator needs the operator token: set {TOKEN_ENV} or pass --operator-token-file")
            })?,
        };
        Ok(Self { url, token: token.trim().to_string() })
    }
}

/// Measures the shard's speed: layers per second of a one-row decode step, the median of a few after a
/// warm-up (about 10 steps' time at start, once).
pub fn measure_speed(shard: &DeviceShard) -> f64 {
    let range = shard.range();
    let zeros = vec![0f32; shard.config().hidden_size];
    let token = [0u32];
    let mut cache = shard.new_cache();
    let mut times = Vec::new();
    for i in 0..6 {
        let input = if range.is_entry() { StepInput::Tokens(&token) } else { StepInput::Hidden(&zeros) };
        let started = Instant::now();
        if let Err(e) = shard.forward_batch(&mut [DeviceStepItem { input, cache: &mut cache }]) {
            tracing::warn!("could not measure this shard's speed: {e}");
            return 0.0;
        }
        if i > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    range.len() as f64 / times[times.len() / 2].max(1e-9)
}

/// Starts the reporting thread; it runs as long as the process.
pub fn spawn(target: ReportTarget, registration: WorkerRegistration, stats: Arc<ShardStats>) {
    let run = move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(1)))
            .timeout_global(Some(Duration::from_secs(3)))
            .user_agent(concat!("computepool-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let auth = format!("Bearer {}", target.token);
        let post = |path: &str, body: String| -> Result<String, String> {
            let url = format!("{}{path}", target.url);
            let mut response = agent
                .post(&url)
                .header("Authorization", &auth)
                .content_type("application/json")
                .send(body.as_bytes())
                .map_err(|e| e.to_string())?;
            response.body_mut().read_to_string().map_err(|e| e.to_string())
        };
        let register_body = serde_json::to_string(&registration).expect("registrations serialise");
        let heartbeat_path = format!("/workers/{}/heartbeat", registration.peer);
        let mut interval: Option<Duration> = None;
        let mut backoff = Duration::from_millis(100);
        let mut last_error = String::new();
        loop {
            let Some(every) = interval else {
                match post("/workers", register_body.clone()) {
                    Ok(answer) => {
                        let every = serde_json::from_str::<RegistrationAnswer>(&answer)
                            .map(|a| Duration::from_millis(a.heartbeat_interval_ms.max(10)))
                            .unwrap_or(Duration::from_secs(2));
                        tracing::info!(url = %target.url, heartbeat_ms = every.as_millis() as u64, "registered with the orchestrator");
                        interval = Some(every);
                        backoff = Duration::from_millis(100);
                        last_error.clear();
                    }
                    Err(e) => {
                        if e != last_error {
                            tracing::warn!(url = %target.url, "cannot register with the orchestrator (retrying): {e}");
                            last_error = e;
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
                continue;
            };
            std::thread::sleep(every);
            let body = serde_json::to_string(&stats.snapshot()).expect("stats serialise");
            if let Err(e) = post(&heartbeat_path, body) {
                tracing::warn!(url = %target.url, "heartbeat failed, registering again: {e}");
                interval = None;
            }
        }
    };
    std::thread::Builder::new().name("report".into()).spawn(run).expect("the OS can start one thread");
}
