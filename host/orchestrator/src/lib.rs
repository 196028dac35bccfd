//! The orchestrator (`computepool orchestrator`): the control plane. It holds pools (a model served by a
//! pipeline of shards), serves an OpenAI-compatible API and the pool REST API over HTTP (axum), and relays
//! each request to its pool's entry shard through [`computepool_entry_api::client::EntryClient`]: text
//! and token events only, never activations. That is a fact of the dependency graph, not a convention:
//! this crate does not depend on the engine, directly or through any other crate
//! (tests/dependency_rule.rs checks it). State lives in SQLite.
//!
//! - [`routes`]: the HTTP handlers (thin).
//! - [`service`]: a completion request from pool choice to JSON or SSE, with its usage recorded.
//! - [`openai`]: OpenAI request and response shapes.
//! - [`pools`]: pools and their entry connections.
//! - [`workers`]: worker registration and heartbeats; which are up; ejections.
//! - [`audits`]: output audits (finished requests re-run on other routes) and the breach reports they make.
//! - [`metrics`]: `GET /metrics` (Prometheus text).
//! - [`auth`]: the operator token on the write routes.
//! - [`store`]: SQLite (WAL): pools, workers, ejections, requests and audits.
//! - [`error`]: errors as OpenAI-shaped bodies with their status codes.

pub mod audits;
pub mod auth;
pub mod error;
pub mod keeping;
pub mod metrics;
pub mod openai;
pub mod payments;
pub mod pools;
pub mod routes;
pub mod service;
pub mod store;
pub mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use clap::Args;
use computepool_axl::transport::{SecretKey, load_or_create_secret_key};

use audits::Auditor;
use auth::OperatorToken;
use computepool_keeper::coalition::BreachReport;
use error::ApiError;
use metrics::Metrics;
use pools::{Pool, Pools};
use store::Store;
use workers::{RegistrationAnswer, WorkerRegistration, Workers};

/// Shared state of the HTTP handlers.
pub struct AppState {
    pub pools: Pools,
    pub workers: Arc<Workers>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// Required on the write routes.
    pub token: OperatorToken,
    /// This orchestrator's peer id (pools' topologies list it as a client).
    pub peer: String,
    /// Paid pools' payments; `None` when payments are off (every pool serves free).
    pub payments: Option<Arc<payments::Payments>>,
    /// Picks finished requests for output audits and runs them; it holds the sending end of the breach
    /// reports' channel.
    pub audits: Arc<Auditor>,
    /// The receiving end of the breach reports, until someone takes it ([`AppState::take_breach_receiver`]).
    breach_receiver: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<BreachReport>>>,
    /// The transition log and keepers; `None` when keepers are off (flows go straight to their rails).
    pub keepers: Option<Arc<keeping::KeeperService>>,
}

/// Breach reports waiting for the judge; an audit that finds the queue full waits (holding its slot).
const BREACH_QUEUE: usize = 64;

/// How the orchestrator runs, apart from where its state lives.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often workers heartbeat; one missing [`workers::MISSED_HEARTBEATS`] in a row is down.
    pub heartbeat: Duration,
    pub token: OperatorToken,
    /// The share of finished requests audited (0 to 1; [`audits::DEFAULT_RATE`] by default).
    pub audit_rate: f64,
}

impl AppState {
    /// Opens the database in `state_dir` and restores its pools and workers; `key` is the
    /// orchestrator's identity.
    pub fn open(state_dir: &Path, key: SecretKey, settings: Settings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        let db = state_dir.join("orchestrator.db");
        let store = Store::open(&db).with_context(|| format!("opening {}", db.display()))?;
        let peer = key.public().to_string();
        let pools = Pools::load(&store, key).with_context(|| format!("reading pools from {}", db.display()))?;
        let workers =
            Workers::load(&store, settings.heartbeat).with_context(|| format!("reading workers from {}", db.display()))?;
        let store = Arc::new(store);
        let (breaches, breach_receiver) = tokio::sync::mpsc::channel(BREACH_QUEUE);
        Ok(Self {
            pools,
            workers: Arc::new(workers),
            audits: Arc::new(Auditor::new(settings.audit_rate, store.clone(), breaches)),
            store,
            metrics: Arc::new(Metrics::default()),
            token: settings.token,
            peer,
            payments: None,
            breach_receiver: std::sync::Mutex::new(Some(breach_receiver)),
            keepers: None,
        })
    }

    /// The receiving end of the breach reports audits make (once: later calls get `None`). Whoever
    /// takes it must keep reading, or audits stall once [`BREACH_QUEUE`] reports wait.
    pub fn take_breach_receiver(&self) -> Option<tokio::sync::mpsc::Receiver<BreachReport>> {
        self.breach_receiver.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Turns keepers on (before [`AppState::enable_payments`], whose flows then run through them):
    /// opens the transition log in `state_dir` and settles what the last run left unfinished — first,
    /// so the meter's recovery finds its stream changes settled under their keys instead of acting again.
    pub async fn enable_keepers(
        &mut self,
        args: &payments::setup::PaymentArgs,
        state_dir: &Path,
        host: Arc<computepool_plugin_host::PluginHost>,
    ) -> anyhow::Result<()> {
        let keepers = keeping::KeeperService::start(args, state_dir, host).await?;
        let resuming = keepers.clone();
        for result in tokio::task::spawn_blocking(move || resuming.resume()).await? {
            match result {
                Ok(settled) => tracing::info!(key = %settled.record.idempotency_key, "transition left by the last run settled"),
                Err(e) => tracing::error!("a transition left by the last run is not settled yet: {e}"),
            }
        }
        self.keepers = Some(keepers);
        Ok(())
    }

    /// Starts what reads the audits' breach reports: with a coalition (`--coalition`, keepers on) its
    /// voters judge them and a quorum's verdict is acted on ([`keeping::breaches`]); without one they are
    /// logged. Call once, on the runtime, after keepers and payments are on.
    pub fn start_breach_handler(
        self: &Arc<Self>,
        coalition: Option<&Path>,
        host: Option<Arc<computepool_plugin_host::PluginHost>>,
        state_dir: &Path,
    ) -> anyhow::Result<()> {
        let Some(reports) = self.take_breach_receiver() else { return Ok(()) };
        match (coalition, &self.keepers, host) {
            (Some(path), Some(keepers), Some(host)) => {
                let handler = keeping::breaches::BreachHandler::from_config(path, keepers.clone(), host, state_dir)?;
                tokio::spawn(Arc::new(handler).run(self.clone(), reports));
            }
            (Some(_), _, _) => anyhow::bail!("--coalition needs keepers on (--keepers) to act on its verdicts"),
            _ => {
                tokio::spawn(audits::log_reports(reports));
            }
        }
        Ok(())
    }

    /// Turns payments on: opens `state_dir/payments.db`, stops what a previous run left streaming, and
    /// puts back every paid pool's settings (a pool whose rails cannot be set up stays paid and answers
    /// 503 until they can: it never falls back to serving free).
    pub async fn enable_payments(&mut self, state_dir: &Path, rails: Arc<computepool_plugin_host::PluginHost>) -> anyhow::Result<()> {
        let saved = self.store.pool_payments().context("reading the pools' payment settings")?;
        let payments =
            payments::Payments::open(&state_dir.join("payments.db"), rails, self.keepers.clone(), &saved, self.store.clone()).await?;
        for (pool_id, settings) in saved {
            let Some(pool) = self.pools.get(&pool_id) else { continue };
            if let Err(e) = payments.configure(&pool, &self.workers, settings.clone()).await {
                tracing::error!(pool = %pool_id, "payments could not be set up again; the pool answers 503 until they are: {e}");
                payments.hold(&pool_id, settings);
            }
        }
        self.payments = Some(payments);
        Ok(())
    }

    /// The peer ids of `pool`'s workers whose payout address is `operator`, each once.
    fn operator_peers(&self, pool: &Pool, operator: &str) -> Vec<String> {
        let mut peers: Vec<String> = Vec::new();
        for shard in pool.members.iter().map(|m| &m.shard) {
            let peer = shard.peer.to_string();
            let pays = self.workers.get(&peer).and_then(|w| w.registration.payout).is_some_and(|p| p.eq_ignore_ascii_case(operator));
            if pays && !peers.contains(&peer) {
                peers.push(peer);
            }
        }
        peers
    }

    /// Whether `operator` has workers in `pool` and every one of them is ejected.
    pub fn operator_ejected(&self, pool: &Pool, operator: &str) -> bool {
        let peers = self.operator_peers(pool, operator);
        !peers.is_empty() && peers.iter().all(|peer| self.workers.ejection(peer).is_some())
    }

    /// Ejects every worker of `pool` that pays `operator` (a coalition's verdict): stored, and no route
    /// through them is picked again. Returns their peer ids.
    pub fn eject_operator(&self, pool: &Pool, operator: &str, reason: &str) -> Result<Vec<String>, String> {
        let peers = self.operator_peers(pool, operator);
        if peers.is_empty() {
            return Err(format!("no worker of pool {} pays {operator}", pool.record.id));
        }
        for peer in &peers {
            self.workers.eject(&self.store, peer, reason).map_err(|e| format!("ejecting {peer}: {e}"))?;
        }
        Ok(peers)
    }

    /// Registers (or registers again) a worker. A pool's plan fixes the layers of the peers it lists.
    /// When the worker's payout address is not the one it had (its first registration with one, a new
    /// one, or none any more), every paid pool that lists it recomputes its flow's members under its
    /// current settings, so the operator is paid from the pool's next stream on without the payments
    /// being put again. A pool whose settings cannot take the change (its price no longer a multiple of
    /// the members' units) keeps the members it had, and the log says why.
    pub async fn register_worker(&self, registration: WorkerRegistration) -> Result<RegistrationAnswer, ApiError> {
        let expected = self.assignments(&registration.peer).into_iter().next();
        let (peer, payout) = (registration.peer.clone(), registration.payout.clone());
        let payout_before = self.workers.get(&peer).and_then(|w| w.registration.payout);
        let answer = self.workers.register(&self.store, registration, expected)?;
        let same = match (&payout_before, &payout) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            (a, b) => a.is_none() && b.is_none(),
        };
        if !same {
            self.payout_changed(&peer).await;
        }
        Ok(answer)
    }

    /// See [`AppState::register_worker`]: recomputes the flow's members of every paid pool that lists
    /// `peer`.
    async fn payout_changed(&self, peer: &str) {
        let Some(payments) = &self.payments else { return };
        let mut pools: Vec<String> = self.assignments(peer).into_iter().map(|(pool, _)| pool).collect();
        pools.dedup();
        // A free pool has no members to recompute; it takes them when its payments are put.
        for pool_id in pools.into_iter().filter(|pool| payments.settings(pool).is_some()) {
            let Some(pool) = self.pools.get(&pool_id) else { continue };
            match payments.reconfigure(&pool, &self.workers).await {
                Ok(()) => tracing::info!(pool = %pool_id, %peer, "a worker's payout address changed: the flow's members recomputed"),
                Err(e) => tracing::error!(
                    pool = %pool_id, %peer,
                    "a worker's payout address changed, but the flow's members could not be recomputed (put the pool's payments again): {e}"
                ),
            }
        }
    }

    /// The pools whose plan (topology or replicas) lists `peer`, with the layers each gives it.
    pub fn assignments(&self, peer: &str) -> Vec<(String, computepool_axl::transport::Layers)> {
        let mut found = Vec::new();
        for pool in self.pools.all() {
            for shard in pool.members.iter().map(|m| &m.shard) {
                if shard.peer.to_string() == peer {
                    found.push((pool.record.id.clone(), shard.layers));
                }
            }
        }
        found
    }

    /// `Err(503)` when every route of `pool` has a registered worker that stopped heartbeating: a
    /// request would only fail later, after the data plane's own timeout. A worker that never
    /// registered (started without `--orchestrator`) is not judged here.
    pub fn check_route(&self, pool: &Pool) -> Result<(), ApiError> {
        if pool.has_live_route(&self.workers) {
            return Ok(());
        }
        let mut silent = Vec::new();
        for shard in pool.members.iter().map(|m| &m.shard) {
            if let Some(ejection) = self.workers.ejection(&shard.peer.to_string()) {
                silent.push(format!(
                    "the worker for layers {} (peer {}) is ejected ({})",
                    shard.layers,
                    shard.peer.fmt_short(),
                    ejection.reason
                ));
            } else if let Some(worker) = self.workers.get(&shard.peer.to_string())
                && !self.workers.is_up(&worker)
            {
                let ms = workers::now_ms() - worker.last_seen_ms;
                silent.push(format!(
                    "the worker for layers {} (peer {}) has sent no heartbeat for {:.1} s",
                    shard.layers,
                    shard.peer.fmt_short(),
                    ms as f64 / 1e3
                ));
            }
        }
        Err(ApiError::Unavailable {
            model: pool.record.model.clone(),
            reason: format!("no live route: {}", silent.join("; ")),
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct OrchestratorArgs {
    /// HTTP address to serve on (port 0 picks a free one; the ready line says which).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Where the database (orchestrator.db) and the orchestrator's P2P key (orchestrator.key, made if
    /// missing) live.
    #[arg(long, default_value = "computepool-state")]
    pub state_dir: PathBuf,
    /// How often workers heartbeat, in ms (they are told when they register); a worker that misses 3 in
    /// a row is down. Shorter notices a dead worker sooner, at one small HTTP request per beat.
    #[arg(long, default_value_t = 2000)]
    pub heartbeat_ms: u64,
    /// The share of finished requests (0 to 1) re-run on up to two other live routes of their pool to
    /// check their tokens (output audits; unbilled). Each audit costs up to two more runs of the
    /// request; a route that disagrees with a majority is reported to the coalition's voters.
    #[arg(long, default_value_t = audits::DEFAULT_RATE, value_parser = audits::parse_rate)]
    pub audit_rate: f64,
    #[command(flatten)]
    pub payments: payments::setup::PaymentArgs,
}

/// The key file of an orchestrator whose state lives in `state_dir`.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("orchestrator.key")
}

/// The HTTP API.
pub fn router(state: Arc<AppState>) -> Router {
    let keepers = state.keepers.as_ref().map(|k| k.router());
    let api = Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/pools", get(routes::list_pools).post(routes::create_pool))
        .route("/pools/{id}", get(routes::get_pool))
        .route("/pools/{id}/infer", post(routes::infer))
        .route("/pools/{id}/payments", get(routes::get_pool_payments).put(routes::put_pool_payments))
        .route("/sessions/{id}", get(routes::get_session))
        .route("/workers", get(routes::list_workers).post(routes::register_worker))
        .route("/workers/{peer}/heartbeat", post(routes::heartbeat))
        .route("/workers/{peer}/eject", post(routes::eject_worker))
        .route("/audits", get(routes::list_audits))
        .route("/topology", get(routes::topology))
        .route("/metrics", get(routes::metrics))
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{model}", get(routes::get_model))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .fallback(routes::no_route)
        .layer(DefaultBodyLimit::max(routes::MAX_BODY_BYTES))
        .with_state(state);
    // `GET /transitions` and `POST /webhooks/keeperhub` (the webhook keeps its own, smaller body limit).
    match keepers {
        Some(keepers) => api.merge(keepers),
        None => api,
    }
}

/// Serves `state` on `listener` until `shutdown` resolves; streams still open then get `grace` to end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    // Nagle's algorithm off: a streamed token is one small write, and with it on, a write waits for the
    // client's ACK of the previous one, which the client may delay by up to 40 ms (delayed ACKs).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("could not set TCP_NODELAY on a connection: {e}");
        }
    });
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(signal);
    let deadline = async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result,
        _ = deadline => Ok(()),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Runs the orchestrator until Ctrl-C or SIGTERM.
pub fn run(args: OrchestratorArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let key = load_or_create_secret_key(&key_path(&args.state_dir))?;
    let settings = Settings {
        heartbeat: Duration::from_millis(args.heartbeat_ms.max(10)),
        token: OperatorToken::load_or_create(&args.state_dir)?,
        audit_rate: args.audit_rate,
    };
    let mut state = AppState::open(&args.state_dir, key, settings)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        // Held for the server's life: dropping it stops the rails folder's watcher.
        let rails_host = if args.payments.payments {
            let rails = payments::setup::RailHost::start(&args.payments, &args.state_dir).await?;
            if args.payments.keepers.is_some() {
                state.enable_keepers(&args.payments, &args.state_dir, rails.host.clone()).await?;
            }
            state.enable_payments(&args.state_dir, rails.host.clone()).await?;
            Some(rails)
        } else {
            None
        };
        let state = Arc::new(state);
        state.start_breach_handler(args.payments.coalition.as_deref(), rails_host.as_ref().map(|r| r.host.clone()), &args.state_dir)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        // Whoever started us (tests, `computepool up`) waits for this line.
        println!("{}", serde_json::json!({"event": "ready", "url": format!("http://{addr}"), "peer": state.peer}));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tracing::info!(%addr, pools = state.pools.all().len(), "orchestrator serving");
        serve(listener, state.clone(), shutdown_signal(), Duration::from_secs(2)).await?;
        state.pools.disconnect_all().await;
        Ok(())
    })
}
