//! Pools: a model served by workers that each run one layer range, reached only through the entry
//! shards' request API (`client::EntryClient`). The orchestrator never sees activations; it sends text
//! or messages and reads token events back.
//!
//! Routes: a pool's topology (and its `replicas`, more topologies of the same model) lists its workers;
//! a range may have several. A **route** is one worker per range, chained from the first layer to the
//! last, each hop between workers that share a topology (a worker accepts frames only from the peers of
//! its own topology file, so rings given as separate files stay whole routes, and a file that lists
//! every worker lets routes mix them). Each request gets the route where it would finish soonest by the
//! workers' queues and measured speeds; when a worker dies under a request, the request moves to a
//! live route that avoids the broken one's workers where it can: the new entry replays the prompt and
//! the tokens generated so far (`resume_tokens`) to rebuild the caches, and the client's stream goes on
//! with no error and no token repeated or missing. Without another route the client gets the error.
//!
//! A route that fails before the request's first token (its entry cannot reach the next worker yet: a
//! restarted worker is up here before its neighbours have redialled it) is not the client's problem:
//! the request is routed again, on another route or the same one once it takes requests, for up to
//! [`REROUTE_WINDOW`], with nothing to replay; only then does the client get the error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use computepool_axl::transport::{SecretKey, ShardPeer, Topology};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::audits::{Auditor, FinishedRun};
use super::error::ApiError;
use super::store::{PoolRecord, Store};
use super::workers::Workers;
use computepool_entry_api::client::{EntryClient, RequestStream};
use computepool_entry_api::{ErrorKind, Event, GenerateRequest};

/// How long connecting to an entry may take before the pool counts as unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request that has streamed no token yet keeps being routed again when its route fails
/// (counted from when it was first sent). A restarted worker's neighbours redial it within their link
/// backoff (at most 0.5 s between tries), so this covers a few of their tries; a route still broken
/// after it is really broken, and the client hears so.
pub const REROUTE_WINDOW: Duration = Duration::from_secs(2);

/// The pause before routing such a request again once every route has failed it: long enough not to
/// spin on an entry that refuses at once, short next to the redial backoff.
const REROUTE_PAUSE: Duration = Duration::from_millis(100);

/// One route a request was sent on, as its row in the `requests` table keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteLeg {
    /// The route's number in its pool.
    pub route: usize,
    /// Its workers' peer ids, entry first.
    pub workers: Vec<String>,
    /// How many tokens the request had streamed when it was sent on this route (0: from the start;
    /// more: a failover that replayed them).
    pub from_token: usize,
    /// Why the route failed the request, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broke: Option<String>,
}

/// The routes one request took, shared between its [`PoolRequest`] (which appends a leg per route and
/// marks a broken one) and its row in the store (which reads them when it is written). Locked only
/// when a route is taken or breaks, and once when the row is written: never per token.
pub type RouteLog = Arc<Mutex<Vec<RouteLeg>>>;

/// The legs of `log`, locked.
pub fn legs(log: &RouteLog) -> std::sync::MutexGuard<'_, Vec<RouteLeg>> {
    // Each change is one push or one field set: a panic elsewhere cannot leave the list inconsistent.
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks the last leg of `log` broken, saying why.
fn mark_broken(log: &RouteLog, why: &str) {
    if let Some(leg) = legs(log).last_mut() {
        leg.broke = Some(why.to_string());
    }
}

/// What `POST /pools` takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// 1–64 of `A-Z a-z 0-9 . _ -`; default: the model name.
    #[serde(default)]
    pub id: Option<String>,
    /// The name clients give as `model`.
    pub model: String,
    /// The model's Hugging Face layout directory, on the orchestrator's machine.
    pub model_dir: PathBuf,
    /// The pool's topology (the workers' topology file); it must list this orchestrator as a client.
    pub topology: Topology,
    /// More topologies of the same model (each its workers' topology file), for load spreading and
    /// failover. Default: none. Workers of different topologies are never chained in one route (they do
    /// not know each other); one topology that lists several workers per range mixes them freely.
    #[serde(default)]
    pub replicas: Vec<Topology>,
}

/// The parts of a model's `config.json` the orchestrator reads.
#[derive(Deserialize)]
struct ModelLimits {
    num_hidden_layers: u32,
    max_position_embeddings: usize,
}

fn read_limits(dir: &Path) -> Result<ModelLimits, String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Most routes a pool enumerates (a pool of `w` workers per range over `r` ranges has `w^r`).
const MAX_ROUTES: usize = 4096;

/// One worker of a pool.
pub struct Member {
    pub shard: ShardPeer,
    /// The pool's topologies that list it (0: the topology, then the replicas).
    topologies: Vec<usize>,
    /// (Entries) the connection to its request API, made lazily and remade when broken.
    entry: tokio::sync::Mutex<Option<Arc<EntryClient>>>,
    /// Requests routed through it now.
    in_flight: AtomicI64,
    /// Requests routed through it since the orchestrator started (failovers count again).
    routed: AtomicU64,
}

impl Member {
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }
}

/// A route: indices into the pool's members, the entry first and the exit last.
pub type Route = Vec<usize>;

/// One pool: its workers and every route through them.
pub struct Pool {
    pub record: PoolRecord,
    /// The model's context window in tokens.
    pub context_window: usize,
    key: SecretKey,
    /// Every worker of the pool's topologies, each once, in listed order.
    pub members: Vec<Member>,
    /// Every route, numbered: first each topology that is a single ring (in spec order: 0 the
    /// topology, then the replicas), then the routes that mix workers.
    pub routes: Vec<Route>,
}

/// Counts a request on its route's workers while it lives there.
struct OnRoute {
    pool: Arc<Pool>,
    route: usize,
}

impl Drop for OnRoute {
    fn drop(&mut self) {
        for &m in &self.pool.routes[self.route] {
            self.pool.members[m].in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A request in flight on a pool. Dropping it cancels the request at its entry.
pub struct PoolRequest {
    // Dropped first: stopping the stream is the cancel signal, and it needs the connection alive.
    events: RequestStream,
    _client: Arc<EntryClient>,
    on_route: OnRoute,
    workers: Arc<Workers>,
    request: GenerateRequest,
    /// Token ids streamed so far (what a failover replays).
    generated: Vec<u32>,
    /// Routes that broke under this request.
    failed: Vec<usize>,
    /// The caller has seen `started`: a new route's is not passed on.
    started: bool,
    /// Told about the request when it finishes on the route it started on (output audits).
    auditor: Option<Arc<Auditor>>,
    /// Until when a failure before the first token routes the request again rather than ending it.
    reroute_until: Instant,
    /// Every route the request was sent on (its row in the store).
    routes: RouteLog,
}

impl PoolRequest {
    /// The route serving the request now (its number in the pool's routes).
    pub fn route(&self) -> usize {
        self.on_route.route
    }

    /// The peer ids of the route serving the request now, entry first.
    pub fn route_peers(&self) -> Vec<String> {
        self.on_route.pool.route_peers(self.on_route.route)
    }

    /// Hands the request to `auditor` when it finishes (not when it fails or is dropped), which may
    /// re-run it on other routes to check its tokens.
    pub fn audit_with(&mut self, auditor: Arc<Auditor>) {
        self.auditor = Some(auditor);
    }

    /// The next event; a route that breaks under the request (`unavailable` or `sequence`) is replaced
    /// by another live one, invisibly to the caller. `None` after the final event.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            let event = self.events.next_event().await;
            match &event {
                Some(Event::Started { .. }) if self.started => continue,
                Some(Event::Started { .. }) => self.started = true,
                Some(Event::Token { token, .. }) => self.generated.push(*token),
                Some(Event::Done { .. }) => {
                    // One route made every token only without a failover midway: a mixed run proves
                    // nothing about either route (routes that failed before the first token made none).
                    if let Some(auditor) = self.auditor.take()
                        && legs(&self.routes).last().is_some_and(|leg| leg.from_token == 0)
                    {
                        let finished = FinishedRun {
                            pool: self.on_route.pool.clone(),
                            route: self.on_route.route,
                            request: self.request.clone(),
                            tokens: self.generated.clone(),
                        };
                        auditor.finished(finished, self.workers.clone());
                    }
                }
                Some(Event::Error { code: code @ (ErrorKind::Unavailable | ErrorKind::Sequence), message }) => {
                    let (code, message) = (*code, message.clone());
                    match self.failover(&message).await {
                        Ok(()) => continue,
                        Err(why) => return Some(Event::Error { code, message: format!("{message} ({why})") }),
                    }
                }
                _ => {}
            }
            return event;
        }
    }

    /// Moves the request to another live route, replaying what it generated. Before its first token
    /// (nothing to replay, nothing the client saw) it may also wait for a route to take requests again,
    /// the broken ones included, until [`REROUTE_WINDOW`] has passed since it was first sent.
    async fn failover(&mut self, message: &str) -> Result<(), String> {
        let pool = self.on_route.pool.clone();
        mark_broken(&self.routes, message);
        if !self.failed.contains(&self.on_route.route) {
            self.failed.push(self.on_route.route);
        }
        let mut request = self.request.clone();
        request.resume_tokens = self.generated.clone();
        let nothing_served = self.generated.is_empty();
        loop {
            // Which worker broke is not known here; a route that shares none of the broken routes'
            // workers (or the fewest) avoids it for sure where the pool has one.
            let route = match pool.pick_route(&self.workers, &[], &self.failed) {
                Some(route) => route,
                None if nothing_served && Instant::now() < self.reroute_until => {
                    tokio::time::sleep(REROUTE_PAUSE.min(self.reroute_until - Instant::now())).await;
                    match pool.pick_route(&self.workers, &[], &[]) {
                        Some(route) => route,
                        None => continue,
                    }
                }
                None if nothing_served => return Err(format!("no route took the request within {REROUTE_WINDOW:?}")),
                None => return Err("no replica route is left to continue on".into()),
            };
            if nothing_served {
                tracing::info!(
                    pool = %pool.record.id, from = self.on_route.route, to = route,
                    "a route failed a request before its first token ({message}); routing it again"
                );
            } else {
                tracing::warn!(
                    pool = %pool.record.id, from = self.on_route.route, to = route, tokens = self.generated.len(),
                    "a route broke under a request ({message}); moving it"
                );
            }
            match pool.start_on(route, &request, self.workers.clone(), &self.routes, self.reroute_until).await {
                Ok(moved) => {
                    self.events = moved.events;
                    self._client = moved._client;
                    self.on_route = moved.on_route;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(pool = %pool.record.id, route, "the route failed too: {e}");
                    mark_broken(&self.routes, &e);
                    if !self.failed.contains(&route) {
                        self.failed.push(route);
                    }
                }
            }
        }
    }
}

impl Member {
    async fn client(&self, key: &SecretKey, fresh: bool) -> Result<Arc<EntryClient>, String> {
        let mut entry = self.entry.lock().await;
        if let Some(client) = entry.as_ref()
            && !fresh
            && !client.is_closed()
        {
            return Ok(client.clone());
        }
        let connect = EntryClient::connect(key.clone(), &self.shard);
        let client = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(client)) => Arc::new(client),
            Ok(Err(e)) => return Err(format!("cannot connect to the entry shard: {e:#}")),
            Err(_) => return Err(format!("the entry shard did not answer within {CONNECT_TIMEOUT:?}")),
        };
        *entry = Some(client.clone());
        Ok(client)
    }
}

impl Pool {
    pub(crate) fn new(record: PoolRecord, key: SecretKey) -> Result<Self, String> {
        let limits = read_limits(&record.model_dir)?;
        let mut members: Vec<Member> = Vec::new();
        let topologies: Vec<&Topology> = std::iter::once(&record.topology).chain(&record.replicas).collect();
        for (i, topology) in topologies.iter().enumerate() {
            let which = if i == 0 { "the topology".to_string() } else { format!("replica {i}") };
            if limits.num_hidden_layers != topology.num_layers {
                return Err(format!(
                    "the model in {} has {} layers, {which} {}",
                    record.model_dir.display(),
                    limits.num_hidden_layers,
                    topology.num_layers
                ));
            }
            if !topology.clients.contains(&key.public()) {
                return Err(format!(
                    "{which} does not list this orchestrator as a client: add its peer id {} to `clients`",
                    key.public()
                ));
            }
            for shard in &topology.shards {
                match members.iter_mut().find(|m| m.shard.peer == shard.peer) {
                    Some(m) if m.shard.layers != shard.layers => {
                        return Err(format!(
                            "peer {} serves layers {} in one topology and {} in {which}",
                            shard.peer.fmt_short(),
                            m.shard.layers,
                            shard.layers
                        ));
                    }
                    Some(m) => m.topologies.push(i),
                    None => members.push(Member {
                        shard: shard.clone(),
                        topologies: vec![i],
                        entry: tokio::sync::Mutex::new(None),
                        in_flight: AtomicI64::new(0),
                        routed: AtomicU64::new(0),
                    }),
                }
            }
        }
        let routes = enumerate_routes(&members, &topologies, limits.num_hidden_layers);
        if routes.len() >= MAX_ROUTES {
            tracing::warn!(pool = %record.id, "the pool has more than {MAX_ROUTES} routes: only the first {MAX_ROUTES} are used");
        }
        Ok(Self { record, context_window: limits.max_position_embeddings, key, members, routes })
    }

    /// The peer ids of route `route`, entry first.
    pub fn route_peers(&self, route: usize) -> Vec<String> {
        self.routes[route].iter().map(|&m| self.members[m].shard.peer.to_string()).collect()
    }

    /// The shards of route `route`, entry first.
    pub fn route_shards(&self, route: usize) -> impl Iterator<Item = &ShardPeer> {
        self.routes[route].iter().map(|&m| &self.members[m].shard)
    }

    /// Seconds per token of one more request on route `route`: for each of its workers, (its requests
    /// in flight + 1) × its layers ÷ its measured speed (a worker that has not registered counts as the
    /// average of those that have; none registered: 1 layer per second).
    fn cost(&self, route: usize, workers: &Workers) -> f64 {
        let speeds: Vec<Option<f64>> = self
            .members
            .iter()
            .map(|m| workers.get(&m.shard.peer.to_string()).map(|w| w.registration.speed).filter(|v| *v > 0.0))
            .collect();
        let known: Vec<f64> = speeds.iter().flatten().copied().collect();
        let average = if known.is_empty() { 1.0 } else { known.iter().sum::<f64>() / known.len() as f64 };
        self.routes[route]
            .iter()
            .map(|&m| {
                let member = &self.members[m];
                (member.in_flight() + 1) as f64 * member.shard.layers.len() as f64 / speeds[m].unwrap_or(average)
            })
            .sum()
    }

    /// Whether every worker of route `route` may take requests: none ejected, none known to be down.
    fn live(&self, route: usize, workers: &Workers) -> bool {
        self.routes[route].iter().all(|&m| workers.routable(&self.members[m].shard.peer.to_string()))
    }

    /// How many workers two routes share.
    pub fn shared(&self, a: usize, b: usize) -> usize {
        self.routes[a].iter().filter(|m| self.routes[b].contains(m)).count()
    }

    /// Runs `request` on route `route` alone, to its end, and returns its token ids: no failover (an
    /// audit must know which workers made its tokens), nothing recorded or billed. `Err` says why the
    /// run did not finish.
    pub async fn run_on(self: &Arc<Self>, route: usize, request: &GenerateRequest, workers: Arc<Workers>) -> Result<Vec<u32>, String> {
        let routes = RouteLog::default();
        let mut run = self.start_on(route, request, workers, &routes, Instant::now()).await?;
        let mut tokens = Vec::new();
        loop {
            // Read below PoolRequest::next_event: that one would move a broken run to another route.
            match run.events.next_event().await {
                Some(Event::Started { .. }) => {}
                Some(Event::Token { token, .. }) => tokens.push(token),
                Some(Event::Done { .. }) => return Ok(tokens),
                Some(Event::Error { code, message }) => return Err(format!("{code:?}: {message}")),
                None => return Err("the entry closed the stream before the end".into()),
            }
        }
    }

    /// The route a new request should take: among the live routes not in `exclude`, the one that shares
    /// the fewest workers with the routes in `avoid` (the routes that broke under it), and among those
    /// the one where it would finish soonest by its workers' queues and speeds ([`Self::cost`]); ties go
    /// to the lower route number.
    pub fn pick_route(&self, workers: &Workers, exclude: &[usize], avoid: &[usize]) -> Option<usize> {
        let mut best: Option<(usize, usize, f64)> = None;
        for route in 0..self.routes.len() {
            if exclude.contains(&route) || avoid.contains(&route) || !self.live(route, workers) {
                continue;
            }
            let shared = avoid.iter().map(|&a| self.shared(route, a)).sum::<usize>();
            let cost = self.cost(route, workers);
            if best.is_none_or(|(_, s, c)| shared < s || (shared == s && cost < c)) {
                best = Some((route, shared, cost));
            }
        }
        best.map(|(route, _, _)| route)
    }

    /// Whether some route has no worker known to be down or ejected.
    pub fn has_live_route(&self, workers: &Workers) -> bool {
        (0..self.routes.len()).any(|r| self.live(r, workers))
    }

    /// Sends `request` on a route picked for it: another one if the entry cannot be reached, and, while
    /// every route fails it, the same ones again until [`REROUTE_WINDOW`] has passed. Each route it is
    /// sent on is added to `routes`.
    pub async fn start(
        self: &Arc<Self>,
        request: &GenerateRequest,
        workers: Arc<Workers>,
        routes: &RouteLog,
    ) -> Result<PoolRequest, ApiError> {
        let unavailable = |reason: String| ApiError::Unavailable { model: self.record.model.clone(), reason };
        let reroute_until = Instant::now() + REROUTE_WINDOW;
        let mut tried = Vec::new();
        let mut last = String::from("no live route");
        loop {
            while let Some(route) = self.pick_route(&workers, &tried, &[]) {
                match self.start_on(route, request, workers.clone(), routes, reroute_until).await {
                    Ok(started) => return Ok(started),
                    Err(e) => {
                        mark_broken(routes, &e);
                        last = e;
                    }
                }
                tried.push(route);
            }
            let now = Instant::now();
            if now >= reroute_until {
                return Err(unavailable(last));
            }
            tokio::time::sleep(REROUTE_PAUSE.min(reroute_until - now)).await;
            tried.clear();
        }
    }

    /// Sends `request` to the entry of route `route`, naming the route's other workers, reconnecting
    /// once if the cached connection turns out to be dead; the leg is added to `routes`.
    async fn start_on(
        self: &Arc<Self>,
        route: usize,
        request: &GenerateRequest,
        workers: Arc<Workers>,
        routes: &RouteLog,
        reroute_until: Instant,
    ) -> Result<PoolRequest, String> {
        legs(routes).push(RouteLeg {
            route,
            workers: self.route_peers(route),
            from_token: request.resume_tokens.len(),
            broke: None,
        });
        let entry = &self.members[self.routes[route][0]];
        let mut routed = request.clone();
        routed.route = Some(self.route_peers(route).split_off(1));
        let mut last = String::new();
        for fresh in [false, true] {
            let client = entry.client(&self.key, fresh).await?;
            match client.start(&routed).await {
                Ok(events) => {
                    for &m in &self.routes[route] {
                        self.members[m].in_flight.fetch_add(1, Ordering::Relaxed);
                        self.members[m].routed.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(PoolRequest {
                        events,
                        _client: client,
                        on_route: OnRoute { pool: self.clone(), route },
                        workers,
                        request: request.clone(),
                        generated: Vec::new(),
                        failed: Vec::new(),
                        started: false,
                        auditor: None,
                        reroute_until,
                        routes: routes.clone(),
                    });
                }
                Err(e) => last = format!("{e:#}"),
            }
        }
        Err(last)
    }

    /// Closes the connections to the entries (when no request holds them any more).
    pub async fn disconnect(&self) {
        for member in &self.members {
            let client = member.entry.lock().await.take();
            if let Some(client) = client.and_then(Arc::into_inner) {
                client.close().await;
            }
        }
    }

    /// The pool as `GET /pools` shows it.
    pub fn describe(&self) -> Value {
        let r = &self.record;
        json!({
            "id": r.id,
            "object": "pool",
            "model": r.model,
            "model_dir": r.model_dir,
            "context_window": self.context_window,
            "num_layers": r.topology.num_layers,
            "entry": r.topology.entry().peer.to_string(),
            "shards": r.topology.shards,
            "replicas": r.replicas.iter().map(|t| &t.shards).collect::<Vec<_>>(),
            "routes": self.routes.len(),
            "created_at": r.created_at,
        })
    }
}

/// Every route through `members`: one worker per range from layer 0 to `num_layers`, each hop (and the
/// exit's hop back to the entry) between workers that share a topology. The topologies that are single
/// rings come first, in order, so a pool of rings numbers its routes as its spec lists them.
fn enumerate_routes(members: &[Member], topologies: &[&Topology], num_layers: u32) -> Vec<Route> {
    let index = |s: &ShardPeer| members.iter().position(|m| m.shard.peer == s.peer).expect("every shard is a member");
    let mut routes: Vec<Route> = Vec::new();
    for topology in topologies {
        let ring = &topology.shards;
        let chained = ring.first().is_some_and(|s| s.layers.start == 0)
            && ring.windows(2).all(|w| w[0].layers.end == w[1].layers.start)
            && ring.last().is_some_and(|s| s.layers.end == num_layers);
        if chained {
            let route: Route = ring.iter().map(index).collect();
            if !routes.contains(&route) {
                routes.push(route);
            }
        }
    }
    let share = |a: usize, b: usize| members[a].topologies.iter().any(|t| members[b].topologies.contains(t));
    // Depth first from each entry, in listed order.
    fn extend(
        members: &[Member],
        share: &dyn Fn(usize, usize) -> bool,
        num_layers: u32,
        path: &mut Route,
        routes: &mut Vec<Route>,
    ) {
        if routes.len() >= MAX_ROUTES {
            return;
        }
        let last = *path.last().expect("a path starts with its entry");
        let end = members[last].shard.layers.end;
        if end == num_layers {
            if share(last, path[0]) && !routes.contains(path) {
                routes.push(path.clone());
            }
            return;
        }
        for next in 0..members.len() {
            if members[next].shard.layers.start == end && share(last, next) {
                path.push(next);
                extend(members, share, num_layers, path, routes);
                path.pop();
            }
        }
    }
    for entry in 0..members.len() {
        if members[entry].shard.layers.start == 0 {
            let mut path = vec![entry];
            extend(members, &share, num_layers, &mut path, &mut routes);
        }
    }
    routes
}

/// Every pool, by id; the model name picks a pool for OpenAI requests.
pub struct Pools {
    key: SecretKey,
    by_id: RwLock<BTreeMap<String, Arc<Pool>>>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Pools {
    /// Loads the stored pools. A stored pool that no longer checks out (its model directory moved, say)
    /// is skipped with a warning rather than keeping the orchestrator from starting.
    pub fn load(store: &Store, key: SecretKey) -> rusqlite::Result<Self> {
        let pools = Self { key, by_id: RwLock::new(BTreeMap::new()) };
        for record in store.pools()? {
            let id = record.id.clone();
            match Pool::new(record, pools.key.clone()) {
                Ok(pool) => {
                    tracing::info!(pool = %id, model = %pool.record.model, "pool restored");
                    pools.write().insert(id, Arc::new(pool));
                }
                Err(why) => tracing::warn!(pool = %id, "stored pool not served: {why}"),
            }
        }
        Ok(pools)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Pool>>> {
        // Inserts are single map operations: a panic elsewhere cannot leave the map inconsistent.
        self.by_id.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Pool>>> {
        self.by_id.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `spec`, stores it, and starts serving it. With `replace`, a pool with the same id or
    /// model is replaced; otherwise that is a conflict.
    pub fn register(&self, store: &Store, spec: PoolSpec, replace: bool) -> Result<Arc<Pool>, ApiError> {
        let id = spec.id.clone().unwrap_or_else(|| spec.model.clone());
        if !valid_id(&id) {
            return Err(ApiError::invalid("id", format!("pool id {id:?} must be 1-64 of A-Z a-z 0-9 . _ -")));
        }
        if spec.model.trim().is_empty() {
            return Err(ApiError::invalid("model", "model must not be empty"));
        }
        spec.topology.validate().map_err(|e| ApiError::invalid("topology", e.to_string()))?;
        for (i, replica) in spec.replicas.iter().enumerate() {
            replica.validate().map_err(|e| ApiError::invalid(format!("replicas[{i}]"), e.to_string()))?;
        }
        let created_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let record = PoolRecord {
            id: id.clone(),
            model: spec.model,
            model_dir: spec.model_dir,
            topology: spec.topology,
            replicas: spec.replicas,
            created_at,
        };
        let pool = Arc::new(Pool::new(record, self.key.clone()).map_err(|e| ApiError::invalid("topology", e))?);
        let mut pools = self.write();
        let clash = pools.values().find(|p| p.record.id == id || p.record.model == pool.record.model);
        if let (Some(existing), false) = (clash, replace) {
            return Err(ApiError::Conflict(format!(
                "pool {} already serves model {}",
                existing.record.id, existing.record.model
            )));
        }
        store.put_pool(&pool.record, replace)?;
        pools.retain(|_, p| p.record.id != id && p.record.model != pool.record.model);
        pools.insert(id.clone(), pool.clone());
        tracing::info!(pool = %id, model = %pool.record.model, "pool registered");
        Ok(pool)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Pool>> {
        self.read().get(id).cloned()
    }

    pub fn by_model(&self, model: &str) -> Option<Arc<Pool>> {
        self.read().values().find(|p| p.record.model == model).cloned()
    }

    /// Closes every pool's entry connection (shutting down).
    pub async fn disconnect_all(&self) {
        for pool in self.all() {
            pool.disconnect().await;
        }
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.read().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::WorkerRegistration;
    use computepool_axl::transport::Layers;

    fn shard(k: &SecretKey, (start, end): (u32, u32)) -> ShardPeer {
        ShardPeer { peer: k.public(), layers: Layers { start, end }, addrs: vec!["127.0.0.1:4000".parse().expect("address")], relay: None }
    }

    fn ring(key: &SecretKey) -> (Topology, Vec<SecretKey>) {
        let keys: Vec<SecretKey> = (0..2).map(|_| SecretKey::generate()).collect();
        let shards = keys.iter().zip([(0, 2), (2, 4)]).map(|(k, r)| shard(k, r)).collect();
        (Topology { num_layers: 4, shards, clients: vec![key.public()] }, keys)
    }

    fn model_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("config.json"), r#"{"num_hidden_layers": 4, "max_position_embeddings": 64}"#)
            .expect("config");
        dir
    }

    fn record(dir: &tempfile::TempDir, topology: Topology, replicas: Vec<Topology>) -> PoolRecord {
        PoolRecord { id: "p".into(), model: "m".into(), model_dir: dir.path().to_path_buf(), topology, replicas, created_at: 0 }
    }

    fn register(workers: &Workers, store: &Store, k: &SecretKey, layers: &str, speed: f64) {
        let registration = WorkerRegistration {
            peer: k.public().to_string(),
            addrs: vec!["127.0.0.1:4000".parse().expect("address")],
            model: "m".into(),
            layers: layers.into(),
            device: "cpu".into(),
            weight_bytes: 1,
            rss_bytes: None,
            speed,
            payout: None,
        };
        workers.register(store, registration, None).expect("registers");
    }

    #[test]
    fn routes_are_picked_by_load_and_measured_speed() {
        let dir = model_dir();
        let key = SecretKey::generate();
        let ((fast, fast_keys), (slow, slow_keys)) = (ring(&key), ring(&key));
        let pool = Pool::new(record(&dir, fast, vec![slow]), key).expect("valid pool");
        assert_eq!(pool.routes.len(), 2, "separate topologies stay whole rings: {:?}", pool.routes);
        let store = Store::in_memory().expect("store");
        let workers = Workers::load(&store, Duration::from_secs(60)).expect("workers");
        // Unregistered workers: equal routes, the first wins.
        assert_eq!(pool.pick_route(&workers, &[], &[]), Some(0));
        pool.members[pool.routes[0][0]].in_flight.store(1, Ordering::Relaxed);
        pool.members[pool.routes[0][1]].in_flight.store(1, Ordering::Relaxed);
        assert_eq!(pool.pick_route(&workers, &[], &[]), Some(1), "the idle route");
        for (keys, speed) in [(&fast_keys, 100.0), (&slow_keys, 50.0)] {
            for (k, layers) in keys.iter().zip(["0..2", "2..4"]) {
                register(&workers, &store, k, layers, speed);
            }
        }
        // Twice as fast: one request in flight costs the same as none on the slow route (a tie: first).
        assert_eq!(pool.pick_route(&workers, &[], &[]), Some(0));
        for &m in &pool.routes[0] {
            pool.members[m].in_flight.store(2, Ordering::Relaxed);
        }
        assert_eq!(pool.pick_route(&workers, &[], &[]), Some(1));
        assert_eq!(pool.pick_route(&workers, &[1], &[]), Some(0), "an excluded route is not picked");
        assert_eq!(pool.pick_route(&workers, &[], &[1]), Some(0), "nor a broken one");
        assert_eq!(pool.pick_route(&workers, &[0, 1], &[]), None);
        assert!(pool.has_live_route(&workers));

        // An ejected worker takes its routes out, however fast and idle they are.
        for &m in &pool.routes[0] {
            pool.members[m].in_flight.store(0, Ordering::Relaxed);
        }
        workers.eject(&store, &fast_keys[1].public().to_string(), "wrong output").expect("ejects");
        assert_eq!(pool.pick_route(&workers, &[], &[]), Some(1));
        assert_eq!(pool.pick_route(&workers, &[1], &[]), None);
        workers.eject(&store, &slow_keys[0].public().to_string(), "wrong output").expect("ejects");
        assert!(!pool.has_live_route(&workers));
    }

    /// One topology listing two workers per range: four routes, the two rings first; load on one
    /// worker moves new requests to routes without it, mixing the rings; a failover avoids the broken
    /// route's workers; a down worker is never picked.
    #[test]
    fn one_topology_with_two_workers_per_range_mixes_routes() {
        let dir = model_dir();
        let key = SecretKey::generate();
        let k: Vec<SecretKey> = (0..4).map(|_| SecretKey::generate()).collect();
        // Listed as two rings back to back: a1 b1 a2 b2.
        let shards = vec![shard(&k[0], (0, 2)), shard(&k[1], (2, 4)), shard(&k[2], (0, 2)), shard(&k[3], (2, 4))];
        let topology = Topology { num_layers: 4, shards, clients: vec![key.public()] };
        let pool = Pool::new(record(&dir, topology, vec![]), key).expect("valid pool");
        let names: Vec<Vec<String>> = (0..pool.routes.len()).map(|r| pool.route_peers(r)).collect();
        let p = |i: usize| k[i].public().to_string();
        assert_eq!(names, [vec![p(0), p(1)], vec![p(0), p(3)], vec![p(2), p(1)], vec![p(2), p(3)]]);
        let store = Store::in_memory().expect("store");
        let workers = Workers::load(&store, Duration::from_secs(60)).expect("workers");
        for (i, layers) in [(0, "0..2"), (1, "2..4"), (2, "0..2"), (3, "2..4")] {
            register(&workers, &store, &k[i], layers, 100.0);
        }
        assert_eq!(pool.pick_route(&workers, &[], &[]), Some(0));
        // b1 is busy: a1's requests go on through b2.
        pool.members[1].in_flight.store(3, Ordering::Relaxed);
        assert_eq!(pool.route_peers(pool.pick_route(&workers, &[], &[]).expect("a route")), [p(0), p(3)]);
        pool.members[1].in_flight.store(0, Ordering::Relaxed);
        // Route a1→b1 broke: the route sharing none of its workers is taken.
        assert_eq!(pool.route_peers(pool.pick_route(&workers, &[], &[0]).expect("a route")), [p(2), p(3)]);
        // b1 ejected: only the routes through b2.
        workers.eject(&store, &p(1), "down").expect("ejects");
        assert_eq!(pool.route_peers(pool.pick_route(&workers, &[], &[]).expect("a route")), [p(0), p(3)]);
        assert_eq!(pool.route_peers(pool.pick_route(&workers, &[], &[1]).expect("a route")), [p(2), p(3)]);
        assert_eq!(pool.pick_route(&workers, &[], &[1, 3]), None);
    }
}
