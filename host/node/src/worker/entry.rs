//! The entry shard's side of requests: it takes them from clients, tokenizes, picks the request's route
//! (the client's, or the topology's default), starts it down that route, feeds each sampled token back
//! in, applies the stop rules, streams text to the client, and ends the request everywhere when it is
//! over (finished, failed or cancelled).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use computepool_axl::frame::{ErrorCode, Frame, HeadHeader, RequestId, RouteHeader, SequenceTracker, f32_values};
use computepool_axl::transport::{PeerId, Topology};
use computepool_engine::generate::{self, RequestOutput};
use computepool_engine::sampling::SamplingParams;
use computepool_engine::tokenizer::{ChatMessage, Tokenizer};
use iroh::endpoint::{RecvStream, SendStream};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc;

use computepool_entry_api::{ErrorKind, Event, FinishReason, GenerateRequest, MAX_REQUEST_BYTES};
use super::engine_loop::{EngineJob, StepData};
use super::links::{Links, Outbound};
use super::report::ShardStats;

/// What reaches a live request from the pipeline.
#[derive(Debug)]
enum Delivery {
    Token(u32),
    Failed(ErrorKind, String),
}

struct LiveRequest {
    tx: mpsc::UnboundedSender<Delivery>,
    tracker: SequenceTracker,
    /// The shards after the entry, the exit last.
    route: Vec<PeerId>,
}

impl LiveRequest {
    /// Checks a frame of `kind` ("token", "head") that came back from `from` with sequence number
    /// `seq`: only the request's exit sends them, in order. On a failure the request fails with the
    /// reason and this returns `false`.
    fn accept_from_exit(&mut self, kind: &str, from: &PeerId, seq: u64) -> bool {
        let failure = if self.route.last() != Some(from) {
            (ErrorKind::Internal, format!("{kind} frames from peer {}, which is not this request's exit", from.fmt_short()))
        } else if let Err(e) = self.tracker.check(seq) {
            (ErrorKind::Sequence, format!("{kind} frames from the exit shard: {e}"))
        } else {
            return true;
        };
        let _ = self.tx.send(Delivery::Failed(failure.0, failure.1));
        false
    }
}

/// Where the entry's requests can go: the pool's topology, this worker's place in it, and its links.
pub struct Routing {
    pub topology: Arc<Topology>,
    /// This worker's index in the topology.
    pub me: usize,
    pub links: Arc<Links>,
}

/// How long a request waits for the link to its route's first shard when this worker has not dialled
/// it yet (a link known to be down fails the request at once).
const FIRST_HOP_WAIT: Duration = Duration::from_secs(3);

/// Settings of the entry.
#[derive(Debug, Clone)]
pub struct EntryConfig {
    /// Context window of the model.
    pub context: usize,
    /// Vocabulary size (token ids of `prompt_tokens` are checked against it).
    pub vocab: usize,
    /// A request that gets no token for this long is failed (a backstop: a lost shard is normally
    /// noticed within the transport's peer timeout).
    pub step_timeout: Duration,
    /// When a request times out, first send its `end` and wait this long for a shard to answer that
    /// frames of it were lost (code `sequence`) before failing it for the timeout. `None` (QUIC):
    /// fail at once — an ordered stream loses nothing without losing the link. Set over AXL, where a
    /// lost frame stalls its request and the `end` is the first frame after the gap.
    pub lost_frame_probe: Option<Duration>,
    /// The samplers a request may name (checked here, run by the exit).
    pub samplers: Arc<crate::samplers::Samplers>,
    /// Over AXL: the order checks of the frames that come back, told when each request begins and
    /// ends. `None` over QUIC, whose links need no such word.
    pub return_links: Option<super::axl::ReturnLinks>,
    /// Whether this entry holds part of a split output head (`--split-head`): its compute thread then
    /// samples its requests' tokens from the exits' head frames.
    pub split_head: bool,
}

/// The entry's shared state.
pub struct Entry {
    tokenizer: Arc<Tokenizer>,
    config: EntryConfig,
    requests: Mutex<HashMap<RequestId, LiveRequest>>,
    engine: mpsc::Sender<EngineJob>,
    outbound: mpsc::Sender<Outbound>,
    routing: Routing,
    next_id: AtomicU64,
    id_prefix: String,
    stats: Arc<ShardStats>,
}

impl Entry {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        config: EntryConfig,
        engine: mpsc::Sender<EngineJob>,
        outbound: mpsc::Sender<Outbound>,
        routing: Routing,
        stats: Arc<ShardStats>,
    ) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Self {
            tokenizer,
            config,
            requests: Mutex::new(HashMap::new()),
            engine,
            outbound,
            routing,
            next_id: AtomicU64::new(0),
            id_prefix: format!("req-{:x}", nanos as u64),
            stats,
        }
    }

    /// The shards after this entry for a request: the route it names (checked against the topology),
    /// or the topology's default route.
    fn route(&self, named: Option<&[String]>) -> Result<Vec<PeerId>, String> {
        let topology = &self.routing.topology;
        let me = &topology.shards[self.routing.me];
        let Some(named) = named else {
            return Ok(topology.default_route(me).iter().map(|s| s.peer).collect());
        };
        let next: Vec<PeerId> = named
            .iter()
            .map(|id| id.parse::<PeerId>().map_err(|e| format!("route: {:.16}… is not a peer id: {e}", id)))
            .collect::<Result<_, _>>()?;
        let (shards, _) = topology.resolve_route(me, &next, &me.peer)?;
        Ok(shards.iter().map(|s| s.peer).collect())
    }

    /// Why the route cannot take the request now, if it cannot: the link to its first shard is down
    /// (or does not come up). Shards further on report their own links' failures.
    async fn unavailable(&self, route: &[PeerId]) -> Option<String> {
        let first = route.first()?;
        match self.routing.links.ready(first, FIRST_HOP_WAIT).await {
            Ok(()) => None,
            Err(why) => Some(format!("the pipeline is incomplete: {why}")),
        }
    }

    /// A token frame from `from` (an exit) for `request`, with its sequence number.
    pub fn deliver_tokens(&self, request: &RequestId, from: &PeerId, seq: u64, tokens: &[u32]) {
        let mut requests = self.requests.lock().expect("entry state lock");
        let Some(live) = requests.get_mut(request) else { return }; // over already: late frames are normal
        if !live.accept_from_exit("token", from, seq) {
            return;
        }
        for &t in tokens {
            let _ = live.tx.send(Delivery::Token(t));
        }
    }

    /// A head frame from `from` (an exit that splits the output head with this entry): checked like a
    /// token frame, then the job that hands its values to the compute thread. `None` when the frame is
    /// dropped (its request is over, or failed here because of it).
    pub fn deliver_head(&self, h: &HeadHeader, from: &PeerId, payload: &[u8]) -> Option<EngineJob> {
        let mut requests = self.requests.lock().expect("entry state lock");
        let live = requests.get_mut(&h.request)?; // over already: late frames are normal
        if !live.accept_from_exit("head", from, h.seq) {
            return None;
        }
        // The one place that knows whether this entry holds part of the head: the compute thread
        // never sees a head frame for an entry without it.
        if !self.config.split_head {
            let message = "the exit splits the output head, but this entry holds no part of it: start it with --split-head too";
            let _ = live.tx.send(Delivery::Failed(ErrorKind::InvalidRequest, message.into()));
            return None;
        }
        let values = f32_values(payload).collect();
        Some(EngineJob::Head { request: h.request.clone(), part: h.part, pos: h.pos, values })
    }

    /// Tokens this worker's own compute thread sampled for `request`: a one-worker pool (no link
    /// between its entry and its exit), or the entry of a split head.
    pub fn deliver_own_tokens(&self, request: &RequestId, tokens: &[u32]) {
        let requests = self.requests.lock().expect("entry state lock");
        let Some(live) = requests.get(request) else { return }; // over already
        if !live.route.is_empty() && !self.config.split_head {
            let _ = live.tx.send(Delivery::Failed(
                ErrorKind::Internal,
                "tokens from this worker's own layers, but the request is routed through other shards".into(),
            ));
            return;
        }
        for &t in tokens {
            let _ = live.tx.send(Delivery::Token(t));
        }
    }

    /// A link with `peer` broke: every live request routed through it fails.
    pub fn fail_through(&self, peer: &PeerId, message: &str) {
        for live in self.requests.lock().expect("entry state lock").values() {
            if live.route.contains(peer) {
                let _ = live.tx.send(Delivery::Failed(ErrorKind::Unavailable, message.to_string()));
            }
        }
    }

    /// A request failed somewhere in the pipeline.
    pub fn deliver_failure(&self, request: &RequestId, code: ErrorCode, message: String) {
        if let Some(live) = self.requests.lock().expect("entry state lock").get(request) {
            let _ = live.tx.send(Delivery::Failed(code.into(), message));
        }
    }

    /// Fails every live request (a link went down).
    pub fn fail_all(&self, message: &str) {
        for live in self.requests.lock().expect("entry state lock").values() {
            let _ = live.tx.send(Delivery::Failed(ErrorKind::Unavailable, message.to_string()));
        }
    }

    /// Serves one client stream: one request, answered with JSON lines.
    pub async fn serve_request(self: Arc<Self>, mut send: SendStream, recv: RecvStream) {
        let outcome = self.run_request(&mut send, recv).await;
        if let Err(event) = outcome {
            let _ = write_event(&mut send, &event).await;
        }
        let _ = send.finish();
    }

    async fn run_request(&self, send: &mut SendStream, recv: RecvStream) -> Result<(), Event> {
        let req = read_request(recv).await?;
        let (id, prompt, engine_req, sampler) = self.prepare(&req)?;
        let route = self.route(req.route.as_deref()).map_err(invalid)?;
        if let Some(why) = self.unavailable(&route).await {
            return Err(Event::Error { code: ErrorKind::Unavailable, message: why });
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        {
            let mut requests = self.requests.lock().expect("entry state lock");
            if requests.contains_key(&id) {
                return Err(invalid(format!("request id {id} is already in use")));
            }
            requests.insert(id.clone(), LiveRequest { tx, tracker: SequenceTracker::new(), route: route.clone() });
            self.publish_live(requests.len());
        }
        if let Some(links) = &self.config.return_links {
            links.begin(&route, &id);
        }
        let result =
            self.drive(send, &id, &route, &prompt, &req.resume_tokens, &engine_req, sampler.as_deref(), &mut rx).await;
        {
            let mut requests = self.requests.lock().expect("entry state lock");
            requests.remove(&id);
            self.publish_live(requests.len());
        }
        let _ = self.engine.send(EngineJob::End { request: id.clone() }).await;
        let _ = self.outbound.send(Outbound::Frame(Frame::end(id.clone(), 0))).await;
        if let (Some(links), Some(exit)) = (&self.config.return_links, route.last()) {
            links.end(exit, &id);
            if result.is_err() {
                // Over AXL a dead worker's daemon may live on and swallow the `end` on its way down the
                // route: the shards past the first hop get it straight from here too, so that each
                // frees the request now rather than at its idle timeout.
                for peer in route.iter().skip(1) {
                    let _ = self.outbound.send(Outbound::Direct { peer: *peer, frame: Frame::end(id.clone(), 0) }).await;
                }
            }
        }
        result
    }

    /// Ends a stalled request down its route now and waits up to `wait` for a shard to report that
    /// frames of it went missing; that report, if one comes.
    async fn probe_lost_frames(
        &self,
        id: &RequestId,
        rx: &mut mpsc::UnboundedReceiver<Delivery>,
        wait: Duration,
    ) -> Option<Event> {
        self.outbound.send(Outbound::Frame(Frame::end(id.clone(), 0))).await.ok()?;
        let failure = async {
            loop {
                match rx.recv().await? {
                    Delivery::Failed(code, message) => return Some(Event::Error { code, message }),
                    Delivery::Token(_) => {} // too late: the request is being ended
                }
            }
        };
        tokio::time::timeout(wait, failure).await.ok().flatten()
    }

    fn publish_live(&self, n: usize) {
        if let Some(live) = &self.stats.entry_requests {
            live.store(n as u64, Ordering::Relaxed);
        }
    }

    /// Checks and tokenizes a request.
    #[allow(clippy::type_complexity, reason = "one private call site")]
    fn prepare(
        &self,
        req: &GenerateRequest,
    ) -> Result<(RequestId, Vec<u32>, generate::GenerateRequest, Option<String>), Event> {
        let id = match &req.id {
            Some(id) => RequestId::new(id.clone()).map_err(|e| invalid(e.to_string()))?,
            None => {
                let n = self.next_id.fetch_add(1, Ordering::Relaxed);
                RequestId::new(format!("{}-{n}", self.id_prefix)).expect("generated ids are valid")
            }
        };
        let given = [req.prompt.is_some(), req.messages.is_some(), req.prompt_tokens.is_some()];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(invalid("give exactly one of prompt, messages and prompt_tokens".into()));
        }
        let tokenizer = &self.tokenizer;
        let prompt = if let Some(text) = &req.prompt {
            tokenizer.encode(text, true).map_err(|e| invalid(e.to_string()))?
        } else if let Some(messages) = &req.messages {
            let messages: Vec<ChatMessage> = messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
            let text = tokenizer.apply_chat_template(&messages, true).map_err(|e| invalid(e.to_string()))?;
            tokenizer.encode(&text, false).map_err(|e| invalid(e.to_string()))?
        } else {
            let tokens = req.prompt_tokens.clone().unwrap_or_default();
            if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.config.vocab) {
                return Err(invalid(format!("token id {bad} is outside the vocabulary of {}", self.config.vocab)));
            }
            tokens
        };
        if prompt.is_empty() {
            return Err(invalid("empty prompt: at least one token is needed".into()));
        }
        if let Some(bad) = req.resume_tokens.iter().find(|&&t| t as usize >= self.config.vocab) {
            return Err(invalid(format!("resume token id {bad} is outside the vocabulary of {}", self.config.vocab)));
        }
        let room = self.config.context.saturating_sub(prompt.len());
        let max_tokens = match req.max_tokens {
            Some(0) => return Err(invalid("max_tokens must be at least 1".into())),
            Some(n) => n,
            None => room,
        };
        if max_tokens <= req.resume_tokens.len() && !req.resume_tokens.is_empty() {
            return Err(invalid(format!(
                "{} resume tokens leave nothing to generate within max_tokens {max_tokens}",
                req.resume_tokens.len()
            )));
        }
        if max_tokens == 0 || max_tokens > room {
            let asked = match req.max_tokens {
                Some(n) => format!(" plus {n} new ones"),
                None => String::new(),
            };
            return Err(Event::Error {
                code: ErrorKind::ContextLengthExceeded,
                message: format!(
                    "prompt of {} tokens{asked} exceeds the context window of {} tokens",
                    prompt.len(),
                    self.config.context
                ),
            });
        }
        let off = SamplingParams::default();
        let params = SamplingParams {
            temperature: req.temperature,
            top_k: req.top_k as usize,
            top_p: req.top_p,
            min_p: req.min_p.unwrap_or(off.min_p),
            repetition_penalty: req.repetition_penalty.unwrap_or(off.repetition_penalty),
            presence_penalty: req.presence_penalty.unwrap_or(off.presence_penalty),
            frequency_penalty: req.frequency_penalty.unwrap_or(off.frequency_penalty),
            seed: req.seed,
        };
        params.validate().map_err(|e| invalid(e.to_string()))?;
        // Before any frame goes out: an unknown sampler costs no shard any work.
        let sampler = self.config.samplers.resolve(req.sampler.as_deref()).map_err(invalid)?;
        let engine_req = generate::GenerateRequest {
            prompt: prompt.clone(),
            params,
            max_new_tokens: max_tokens,
            stop_strings: req.stop.clone(),
            stop_token_ids: Vec::new(),
            ignore_eos: req.ignore_eos,
        };
        Ok((id, prompt, engine_req, sampler))
    }

    #[allow(clippy::too_many_arguments, reason = "one private call site")]
    async fn drive(
        &self,
        send: &mut SendStream,
        id: &RequestId,
        route: &[PeerId],
        prompt: &[u32],
        resume: &[u32],
        engine_req: &generate::GenerateRequest,
        sampler: Option<&str>,
        rx: &mut mpsc::UnboundedReceiver<Delivery>,
    ) -> Result<(), Event> {
        let gone = || Event::Error { code: ErrorKind::Unavailable, message: "the worker is shutting down".into() };
        let p = &engine_req.params;
        let sampling = crate::samplers::to_header(p, sampler);
        // The route and the start frame go out before the engine can produce the request's first
        // activations. The start frame names the shards after the first one, and this entry for the
        // exit's tokens; a resumed request says how many tokens it had, for the exit's random stream.
        let me = self.routing.topology.shards[self.routing.me].peer;
        // (The engine uses `resumed` only where it samples: the exit, and here in a one-worker pool.)
        let resumed = resume.len() as u64;
        match route.split_first() {
            Some((first, rest)) => {
                let header = RouteHeader { next: rest.iter().map(|p| p.to_string()).collect(), entry: me.to_string() };
                self.outbound.send(Outbound::Route { request: id.clone(), next: *first, entry: me }).await.map_err(|_| gone())?;
                let start = Frame::start_routed(id.clone(), sampling, Some(header), (resumed > 0).then_some(resumed));
                self.outbound.send(Outbound::Frame(start)).await.map_err(|_| gone())?;
            }
            // This worker serves the whole model (a one-worker pool): its own exit's tokens come back
            // here, and no frame leaves it.
            None => self.outbound.send(Outbound::Route { request: id.clone(), next: me, entry: me }).await.map_err(|_| gone())?,
        }
        let start = EngineJob::Start { request: id.clone(), sampling: *p, sampler: sampler.map(str::to_string), resumed };
        self.engine.send(start).await.map_err(|_| gone())?;
        self.engine
            .send(EngineJob::Step { request: id.clone(), start_pos: 0, input: StepData::Tokens(prompt.to_vec()) })
            .await
            .map_err(|_| gone())?;
        // A resumed request replays what it generated before, in steps of at most RESUME_CHUNK rows: up
        // to that many rows the products keep f32 activations (bf16 rounds them above), so each row is
        // computed as in the one-row steps that built the lost caches, and the prompt goes in as one step
        // both times; the failover test checks that the tokens after a replay are the undisturbed ones.
        let mut pos = prompt.len() as u64;
        for chunk in resume.chunks(RESUME_CHUNK) {
            let input = StepData::Tokens(chunk.to_vec());
            self.engine.send(EngineJob::Step { request: id.clone(), start_pos: pos, input }).await.map_err(|_| gone())?;
            pos += chunk.len() as u64;
        }
        // The exit samples nothing during the replay (the start frame told it how long it is): the
        // first token that comes back is the next new one.
        write_event(send, &Event::Started { id: id.to_string(), prompt_tokens: prompt.len() }).await?;

        let mut output = RequestOutput::new(&self.tokenizer, engine_req);
        for &token in resume {
            // Their text reached the client through the route that broke (what it held back is held
            // back here the same way, and comes out with a later token).
            output.push(token).map_err(|e| Event::Error { code: ErrorKind::Internal, message: e.to_string() })?;
        }
        if !resume.is_empty() {
            tracing::info!(request = %id, tokens = resume.len(), "resuming a request: replaying its tokens");
        }
        loop {
            let delivery = tokio::select! {
                d = rx.recv() => d.ok_or_else(gone)?,
                _ = send.stopped() => return Ok(()), // the client went away: cancel
                _ = tokio::time::sleep(self.config.step_timeout) => {
                    if let Some(wait) = self.config.lost_frame_probe
                        && let Some(failure) = self.probe_lost_frames(id, rx, wait).await
                    {
                        return Err(failure);
                    }
                    return Err(Event::Error {
                        code: ErrorKind::Unavailable,
                        message: format!(
                            "no token from the pipeline within {:?} (a shard of the request's route stopped or cannot be reached)",
                            self.config.step_timeout
                        ),
                    });
                }
            };
            match delivery {
                Delivery::Failed(code, message) => return Err(Event::Error { code, message }),
                Delivery::Token(token) => {
                    let text = output.push(token).map_err(|e| Event::Error { code: ErrorKind::Internal, message: e.to_string() })?;
                    let text = text.to_string();
                    let Some(reason) = output.finish_reason() else {
                        // The next step goes to the engine before the token goes to the client: the step
                        // is the pipeline's critical path, the client's write is not. (A client that is
                        // gone by then costs one step, which the request's `end` frames discard.)
                        self.engine
                            .send(EngineJob::Step { request: id.clone(), start_pos: pos, input: StepData::Tokens(vec![token]) })
                            .await
                            .map_err(|_| gone())?;
                        pos += 1;
                        write_event(send, &Event::Token { token, text }).await?;
                        continue;
                    };
                    write_event(send, &Event::Token { token, text }).await?;
                    let finish_reason = match reason {
                        generate::FinishReason::Length => FinishReason::Length,
                        generate::FinishReason::Stop | generate::FinishReason::StopString => FinishReason::Stop,
                    };
                    let done =
                        Event::Done { finish_reason, prompt_tokens: prompt.len(), completion_tokens: output.tokens().len() };
                    write_event(send, &done).await?;
                    return Ok(());
                }
            }
        }
    }
}

/// Most positions one replay step of a resumed request carries (the workers' exact decode batch).
const RESUME_CHUNK: usize = computepool_engine::backend::cpu::CpuBackend::BF16_EXACT_MAX_ROWS;

fn invalid(message: String) -> Event {
    Event::Error { code: ErrorKind::InvalidRequest, message }
}

async fn read_request(recv: RecvStream) -> Result<GenerateRequest, Event> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(recv.take(MAX_REQUEST_BYTES as u64 + 1));
    reader.read_until(b'\n', &mut line).await.map_err(|e| invalid(format!("reading the request: {e}")))?;
    if line.len() > MAX_REQUEST_BYTES {
        return Err(invalid(format!("the request is larger than {MAX_REQUEST_BYTES} bytes")));
    }
    serde_json::from_slice(&line).map_err(|e| invalid(format!("invalid request JSON: {e}")))
}

/// Writes one event line. A client that stopped reading turns into `Err` with nothing to send.
async fn write_event(send: &mut SendStream, event: &Event) -> Result<(), Event> {
    let mut line = serde_json::to_vec(event).expect("events always serialise");
    line.push(b'\n');
    send.write_all(&line).await.map_err(|e| Event::Error { code: ErrorKind::Unavailable, message: e.to_string() })
}
