//! The compute thread of a worker: it owns the shard, every request's KV cache (and, on the exit, its
//! sampler), and turns jobs into frames for the next peer.
//!
//! One thread, because the shard's CPU backend has its own thread pool and one step at a time keeps
//! every core on that step. Jobs that arrive together are batched: decode steps (one row each) of
//! different requests run as one `forward_batch`, so each weight is read once for all of them; a
//! prefill runs alone. That split is also what keeps a sharded run bit-identical to an unsharded one:
//! a request's rows are computed in the same groups as `generate_batch` computes them (prefill alone,
//! decode rows at most `CpuBackend::BF16_EXACT_MAX_ROWS` per step).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use computepool_axl::frame::{
    ActivationsRef, DType as WireDType, ErrorCode, Frame, FrameLimits, HeadPart, RequestId, TokenHeader, split_activations,
};
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{DeviceCache, DeviceShard, DeviceStepItem, StepInput, StepOutput};
use computepool_engine::sampling::{SamplingParams, argmax};
use tokio::sync::mpsc;

use super::Outbound;
use super::report::ShardStats;
use crate::samplers::{RequestSampler, Samplers};

/// Work for the compute thread.
#[derive(Debug)]
pub enum EngineJob {
    /// A new request: make its KV cache (and sampler, on the exit: `sampler` names a plugin, `None` is
    /// native sampling). `resumed`: tokens it generated on a route that broke (the exit samples nothing
    /// while they are replayed, then skips that many draws of the request's random stream).
    Start { request: RequestId, sampling: SamplingParams, sampler: Option<String>, resumed: u64 },
    /// The next positions of a request, starting at `start_pos` (checked against its cache).
    Step { request: RequestId, start_pos: u64, input: StepData },
    /// The request is over: free what it holds here.
    End { request: RequestId },
    /// The link these requests came over is gone: free each, and report it failed towards its entry
    /// with `reason`.
    Fail { requests: Vec<RequestId>, reason: String },
    /// (Entry of a split head) a head frame from the request's exit: the normed state of position
    /// `pos`, or the exit's logits for it.
    Head { request: RequestId, part: HeadPart, pos: u64, values: Vec<f32> },
}

/// The new positions of a step.
#[derive(Debug)]
pub enum StepData {
    /// Token ids (entry shard).
    Tokens(Vec<u32>),
    /// Hidden states, `rows × hidden` f32 values (every other shard).
    Hidden(Vec<f32>),
}

impl StepData {
    fn rows(&self, hidden: usize) -> usize {
        match self {
            StepData::Tokens(t) => t.len(),
            StepData::Hidden(h) => h.len() / hidden.max(1),
        }
    }
}

struct RequestState {
    cache: DeviceCache,
    /// Only on the exit shard.
    sampler: Option<RequestSampler>,
    /// Tokens sampled for the request so far (a fault drill counts them).
    sampled: u64,
    /// Tokens it generated on another route before it moved here (exit: what the replay rebuilds).
    resumed: u64,
    /// (Exit, resumed requests) the position the replay ends at, once the prompt step gave the prompt's
    /// length: steps that end before it are replay and sample nothing.
    replay_until: Option<u64>,
    /// (Entry of a split head) the position whose normed state came, and this shard's logits for it,
    /// until the exit's logits come.
    own_logits: Option<(u64, Vec<f32>, Instant)>,
    /// Whether the token is the largest logit (native greedy sampling, no penalty): an exit of a split
    /// head then sends only its largest logit, and the entry expects no more.
    plain_greedy: bool,
    last_used: Instant,
}

/// Settings of the compute thread.
pub struct EngineLoopConfig {
    /// Frame size limits for what it sends.
    pub limits: FrameLimits,
    /// A request that has seen no job for this long is freed (its entry is presumably gone).
    pub request_idle_timeout: Duration,
    /// How long to poll for the next job before sleeping (`--busy-poll-us`); `None`: sleep at once.
    pub busy_poll: Option<Duration>,
    /// Where the caches held are published (heartbeats and metrics read them).
    pub stats: std::sync::Arc<ShardStats>,
    /// The samplers the exit can run.
    pub samplers: std::sync::Arc<Samplers>,
    /// A fault drill the exit runs (`--fault`), if any.
    pub fault: Option<super::fault::Fault>,
    /// The CPUs the compute thread runs on (`--compute-cpus`); `None`: wherever the OS puts it.
    pub cpus: Option<super::cpus::CpuSet>,
    /// Spinners that keep the CPUs from idling while a request is live (`--keep-cpus-awake`), if any.
    pub keep_awake: Option<super::keep_awake::KeepAwake>,
}

/// Runs until the job channel closes. Every frame it produces goes to `out`, in order.
pub fn run(shard: DeviceShard, mut jobs: mpsc::Receiver<EngineJob>, out: mpsc::Sender<Outbound>, config: EngineLoopConfig) {
    let mut state = EngineState { shard, requests: HashMap::new(), out, config, last_sweep: Instant::now() };
    let max_batch = CpuBackend::BF16_EXACT_MAX_ROWS;
    loop {
        let first = match jobs.try_recv() {
            Ok(job) => job,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Nothing queued: the next job needs a round trip through the other shards. Let this
                // backend's threads sleep meanwhile, so the shards sharing our cores get them.
                state.shard.idle();
                // With a core to spare, poll for a while first: the job then starts without a wake.
                let spun = state.config.busy_poll.and_then(|window| spin_recv(&mut jobs, window));
                match spun.or_else(|| jobs.blocking_recv()) {
                    Some(job) => job,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        let mut batch = vec![first];
        coalesce(&mut jobs, &mut batch, state.requests.len());
        let mut decode: Vec<(RequestId, u64, StepData)> = Vec::new();
        let mut normed: Vec<(RequestId, u64, Vec<f32>)> = Vec::new();
        for job in batch {
            match job {
                // Normed states of several requests share one product with this shard's lm_head rows.
                EngineJob::Head { request, part: HeadPart::Normed, pos, values } => normed.push((request, pos, values)),
                EngineJob::Step { request, start_pos, input }
                    if input.rows(state.shard.config().hidden_size) == 1 && decode.len() < max_batch =>
                {
                    if decode.iter().any(|(r, _, _)| r == &request) {
                        state.run_decode(std::mem::take(&mut decode));
                    }
                    decode.push((request, start_pos, input));
                }
                other => {
                    // Jobs of one request must keep their order: run what is batched before a job
                    // that might touch the same request.
                    if !decode.is_empty() {
                        state.run_decode(std::mem::take(&mut decode));
                    }
                    if !normed.is_empty() {
                        state.run_own_head(std::mem::take(&mut normed));
                    }
                    state.handle(other);
                }
            }
        }
        if !normed.is_empty() {
            state.run_own_head(normed);
        }
        if !decode.is_empty() {
            let (rows, started) = (decode.len(), Instant::now());
            let forward = state.run_decode(decode);
            // `forward_us` is the model alone; `elapsed_us` adds checking, sampling and handing the frames
            // to the network thread (which may run first, on this core).
            tracing::debug!(
                rows,
                forward_us = forward.as_micros() as u64,
                elapsed_us = started.elapsed().as_micros() as u64,
                "decode step"
            );
        }
        state.sweep_idle();
        state.publish_stats();
        if let Some(awake) = &state.config.keep_awake {
            awake.set_active(!state.requests.is_empty());
        }
        if state.out.is_closed() {
            break;
        }
    }
}

/// After a job wakes the thread, more of the same step are usually on their way: the upstream shard
/// sends a batch's frames back to back. Waits for them while they keep coming (gaps under
/// [`COALESCE_GAP`], at most [`COALESCE_MAX`] in all), so the batch runs as one product instead of
/// fragments; returns at once when every live request already has its step queued (a single stream
/// never waits).
fn coalesce(jobs: &mut mpsc::Receiver<EngineJob>, batch: &mut Vec<EngineJob>, live_requests: usize) {
    let steps = |b: &[EngineJob]| b.iter().filter(|j| matches!(j, EngineJob::Step { .. })).count();
    let start = Instant::now();
    let mut last_arrival = start;
    loop {
        while let Ok(job) = jobs.try_recv() {
            batch.push(job);
            last_arrival = Instant::now();
        }
        let now = Instant::now();
        if steps(batch) == 0
            || steps(batch) >= live_requests
            || now - last_arrival > COALESCE_GAP
            || now - start > COALESCE_MAX
        {
            return;
        }
        std::thread::yield_now();
    }
}

/// Longest quiet gap between two frames of one batch; see [`coalesce`].
const COALESCE_GAP: Duration = Duration::from_micros(100);
/// Longest a batch waits for its stragglers; see [`coalesce`].
const COALESCE_MAX: Duration = Duration::from_millis(1);

struct EngineState {
    shard: DeviceShard,
    requests: HashMap<RequestId, RequestState>,
    out: mpsc::Sender<Outbound>,
    config: EngineLoopConfig,
    last_sweep: Instant,
}

impl EngineState {
    fn send(&self, msg: Outbound) {
        // A closed channel means the worker is shutting down; nothing is left to tell.
        let _ = self.out.blocking_send(msg);
    }

    fn fail(&mut self, request: &RequestId, code: ErrorCode, message: String) {
        if self.requests.remove(request).is_some() {
            tracing::info!(%request, %code, "request failed, KV cache freed: {message}");
        }
        self.send(Outbound::Frame(Frame::error(request.clone(), 0, code, message)));
    }

    /// Whether this shard samples its requests' tokens: the one that holds lm_head's first row (the
    /// exit, or with a split head the entry).
    fn samples(&self) -> bool {
        self.shard.head_rows().is_some_and(|rows| rows.start == 0)
    }

    fn handle(&mut self, job: EngineJob) {
        match job {
            EngineJob::Head { request, part: part @ (HeadPart::Logits { .. } | HeadPart::Max { .. }), pos, values } => {
                self.take_exit_logits(request, part, pos, values)
            }
            EngineJob::Head { request, part: HeadPart::Normed, pos, values } => self.run_own_head(vec![(request, pos, values)]),
            EngineJob::Start { request, sampling, sampler, resumed } => {
                let plain_greedy = sampler.is_none() && sampling.is_plain_greedy();
                let sampler = if self.samples() {
                    match self.config.samplers.for_request(sampling, sampler.as_deref()) {
                        Ok(s) => Some(s),
                        Err(e) => return self.fail(&request, ErrorCode::InvalidRequest, e),
                    }
                } else {
                    None
                };
                let cache = self.shard.new_cache();
                let state = RequestState {
                    cache,
                    sampler,
                    sampled: 0,
                    resumed,
                    replay_until: None,
                    own_logits: None,
                    plain_greedy,
                    last_used: Instant::now(),
                };
                self.requests.insert(request, state);
            }
            EngineJob::Step { request, start_pos, input } => {
                self.run_decode(vec![(request, start_pos, input)]);
            }
            EngineJob::End { request } => {
                if let Some(st) = self.requests.remove(&request) {
                    tracing::info!(%request, positions = st.cache.len(), "request ended, KV cache freed");
                }
            }
            EngineJob::Fail { requests, reason } => {
                for id in requests {
                    self.fail(&id, ErrorCode::Unavailable, reason.clone());
                }
            }
        }
    }

    /// Runs one step for each listed request (all at once), then sends what it produced.
    /// Runs one batch of decode steps and sends what they produce; returns the time its forward pass took
    /// (zero if no step was left to run).
    fn run_decode(&mut self, steps: Vec<(RequestId, u64, StepData)>) -> Duration {
        // Check each step against its request before computing anything.
        let mut ready: Vec<(RequestId, StepData)> = Vec::with_capacity(steps.len());
        for (request, start_pos, input) in steps {
            let Some(st) = self.requests.get(&request) else {
                // Ended (or failed) while the step was on its way: nothing to do.
                continue;
            };
            if st.cache.len() as u64 != start_pos {
                let msg = format!(
                    "activations for position {start_pos} arrived but shard {} holds {} positions of this request",
                    self.shard.range(),
                    st.cache.len()
                );
                self.fail(&request, ErrorCode::Sequence, msg);
                continue;
            }
            ready.push((request, input));
        }
        if ready.is_empty() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let outputs = {
            let mut caches: HashMap<&RequestId, &mut RequestState> =
                self.requests.iter_mut().filter(|(id, _)| ready.iter().any(|(r, _)| r == *id)).collect();
            let mut items: Vec<DeviceStepItem<'_>> = Vec::with_capacity(ready.len());
            for (request, input) in &ready {
                let st = caches.remove(request).expect("each request steps once per batch and was checked above");
                st.last_used = now;
                let input = match input {
                    StepData::Tokens(t) => StepInput::Tokens(t),
                    StepData::Hidden(h) => StepInput::Hidden(h),
                };
                items.push(DeviceStepItem { input, cache: &mut st.cache });
            }
            self.shard.forward_batch(&mut items)
        };
        let forward = now.elapsed();
        let outputs = match outputs {
            Ok(o) => o,
            Err(e) => {
                // forward_batch changes no cache on error; fail every request of the batch, since the
                // error does not say which one was at fault (each was checked alone above).
                for (request, _) in &ready {
                    self.fail(request, ErrorCode::InvalidRequest, e.to_string());
                }
                return forward;
            }
        };
        let mut normed: Vec<(RequestId, u64, Vec<f32>)> = Vec::new();
        for ((request, input), output) in ready.into_iter().zip(outputs) {
            match output {
                StepOutput::Hidden(hidden) => {
                    let positions = self.requests[&request].cache.len() as u64;
                    let rows = input.rows(self.shard.config().hidden_size) as u64;
                    self.send_hidden(&request, positions - rows, &hidden);
                }
                StepOutput::Logits(logits) => {
                    if let Some(token) = self.sample(&request, &logits) {
                        self.send_token(request, token);
                    }
                }
                StepOutput::Normed(state) => {
                    // A split head: the entry computes its rows' logits from the state, meanwhile.
                    let pos = self.requests[&request].cache.len() as u64 - 1;
                    self.send(Outbound::Frame(Frame::head(request.clone(), HeadPart::Normed, pos, &state)));
                    normed.push((request, pos, state));
                }
            }
        }
        if !normed.is_empty() {
            self.send_exit_logits(normed);
        }
        forward
    }

    /// (Exit of a split head) this shard's rows' logits for each state just sent to the entry, one
    /// product for all of them, each request's sent after.
    fn send_exit_logits(&mut self, normed: Vec<(RequestId, u64, Vec<f32>)>) {
        let states: Vec<f32> = normed.iter().flat_map(|(_, _, s)| s.iter().copied()).collect();
        let vocab_start = self.shard.head_rows().expect("a split exit holds its rows of lm_head").start as u64;
        match self.shard.head_logits(&states) {
            Ok(logits) => {
                let width = logits.len() / normed.len();
                for ((request, pos, _), part) in normed.into_iter().zip(logits.chunks_exact(width)) {
                    let plain_greedy = self.requests.get(&request).is_some_and(|st| st.plain_greedy);
                    let frame = if plain_greedy {
                        // Only the largest logit can be the token: 4 bytes rather than the whole part.
                        let (row, value) = largest_logit(part);
                        Frame::head(request, HeadPart::Max { vocab_start: vocab_start + row as u64 }, pos, &[value])
                    } else {
                        Frame::head(request, HeadPart::Logits { vocab_start }, pos, part)
                    };
                    self.send(Outbound::Frame(frame));
                }
            }
            Err(e) => {
                for (request, _, _) in normed {
                    self.fail(&request, ErrorCode::Internal, format!("the exit's part of the head: {e}"));
                }
            }
        }
    }

    /// (Entry of a split head) this shard's rows' logits for normed states from the exits, one product
    /// for all of them; each is kept until its exit's logits come.
    fn run_own_head(&mut self, normed: Vec<(RequestId, u64, Vec<f32>)>) {
        let hidden = self.shard.config().hidden_size;
        let mut ready: Vec<(RequestId, u64)> = Vec::with_capacity(normed.len());
        let mut states: Vec<f32> = Vec::with_capacity(normed.len() * hidden);
        for (request, pos, state) in normed {
            let Some(st) = self.requests.get(&request) else { continue }; // ended meanwhile
            // An entry without part of the head never gets here: `Entry::deliver_head` fails those.
            let problem = if state.len() != hidden {
                Some(format!("a normed state of {} values for a model of hidden size {hidden}", state.len()))
            } else if st.cache.len() as u64 != pos + 1 {
                Some(format!("the normed state of position {pos} came, but this entry holds {} positions", st.cache.len()))
            } else if st.own_logits.is_some() {
                Some(format!("a second normed state (position {pos}) before the exit's logits for the first"))
            } else {
                None
            };
            if let Some(message) = problem {
                let code = if st.cache.len() as u64 != pos + 1 { ErrorCode::Sequence } else { ErrorCode::InvalidRequest };
                self.fail(&request, code, message);
                continue;
            }
            states.extend_from_slice(&state);
            ready.push((request, pos));
        }
        if ready.is_empty() {
            return;
        }
        let started = Instant::now();
        let product = self.shard.head_logits(&states);
        tracing::debug!(rows = ready.len(), elapsed_us = started.elapsed().as_micros() as u64, "head step");
        match product {
            Ok(logits) => {
                let width = logits.len() / ready.len();
                for ((request, pos), own) in ready.into_iter().zip(logits.chunks_exact(width)) {
                    let st = self.requests.get_mut(&request).expect("present: checked above");
                    st.own_logits = Some((pos, own.to_vec(), Instant::now()));
                }
            }
            Err(e) => {
                for (request, _) in ready {
                    self.fail(&request, ErrorCode::Internal, format!("the entry's part of the head: {e}"));
                }
            }
        }
    }

    /// (Entry of a split head) the exit's part for a position whose normed state came before: its
    /// logits, which with this shard's make the whole vocabulary's, or for a plain greedy request its
    /// largest logit, which with this shard's decides the largest of all. The request's next token is
    /// drawn from them.
    fn take_exit_logits(&mut self, request: RequestId, part: HeadPart, pos: u64, values: Vec<f32>) {
        let vocab = self.shard.config().vocab_size;
        let Some(st) = self.requests.get_mut(&request) else { return }; // ended meanwhile
        st.last_used = Instant::now();
        let own_end = self.shard.head_rows().map_or(0, |rows| rows.end);
        let (mut own, computed) = match st.own_logits.take() {
            None => {
                let message = format!("the exit's {} for position {pos} came before its normed state", part.name());
                return self.fail(&request, ErrorCode::Sequence, message);
            }
            Some((own_pos, _, _)) if own_pos != pos => {
                let message =
                    format!("the exit's {} is for position {pos}, its normed state was for position {own_pos}", part.name());
                return self.fail(&request, ErrorCode::Sequence, message);
            }
            Some((_, own, computed)) => (own, computed),
        };
        let problem = match part {
            HeadPart::Logits { vocab_start } if vocab_start != own_end as u64 || own_end + values.len() != vocab => Some(format!(
                "the exit's logits cover vocabulary rows {vocab_start}..{}, this entry holds rows 0..{own_end} of {vocab}",
                vocab_start.saturating_add(values.len() as u64)
            )),
            HeadPart::Logits { .. } => {
                own.extend_from_slice(&values);
                None
            }
            HeadPart::Max { .. } if !st.plain_greedy => {
                Some("the exit sent only its largest logit, but this request does not take the largest logit".to_string())
            }
            HeadPart::Max { vocab_start } if !(own_end as u64..vocab as u64).contains(&vocab_start) || values[0].is_nan() => {
                Some(format!(
                    "the exit's largest logit ({}) at vocabulary row {vocab_start}, outside its rows {own_end}..{vocab}",
                    values[0]
                ))
            }
            HeadPart::Max { vocab_start } => {
                own = with_exit_max(own, vocab, vocab_start as usize, values[0]);
                None
            }
            HeadPart::Normed => unreachable!("normed states go to run_own_head"),
        };
        if let Some(message) = problem {
            return self.fail(&request, ErrorCode::InvalidRequest, message);
        }
        tracing::debug!(waited_us = computed.elapsed().as_micros() as u64, part = part.name(), "exit's part of the head");
        if let Some(token) = self.sample(&request, &own) {
            self.send_token(request, token);
        }
    }

    /// Draws a request's next token from the whole vocabulary's logits of its last position (the
    /// sampling shard); `None` while a resumed request replays (nothing is drawn) or when the request
    /// failed (its sampler did).
    fn sample(&mut self, request: &RequestId, logits: &[f32]) -> Option<u32> {
        let st = self.requests.get_mut(request).expect("present: it just stepped");
        let positions = st.cache.len() as u64;
        if st.resumed > 0 {
            // The first step is the prompt: the replay of the tokens generated elsewhere ends `resumed`
            // positions after it. Its steps sample nothing; the step that ends it samples the next
            // token with the stream where the lost route left it.
            let until = *st.replay_until.get_or_insert(positions + st.resumed);
            if positions < until {
                return None;
            }
            let skipped = std::mem::take(&mut st.resumed);
            st.sampler.as_mut().expect("the sampling shard holds a sampler per request").skip(skipped);
            st.sampled = skipped;
        }
        let sampled = st.sampler.as_mut().expect("the sampling shard holds a sampler per request").sample(logits);
        let token = match sampled {
            Ok(token) => match self.config.fault {
                Some(fault) => fault.token(st.sampled, token, self.shard.config().vocab_size),
                None => token,
            },
            // The plugin's instance is already replaced; this request fails, others go on.
            Err(message) => {
                self.fail(request, ErrorCode::Internal, message);
                return None;
            }
        };
        st.sampled += 1;
        Some(token)
    }

    /// A sampled token to the request's entry: over the link from an exit, in-process on the entry of a
    /// split head.
    fn send_token(&self, request: RequestId, token: u32) {
        if self.shard.range().is_exit() {
            let header = TokenHeader { request, seq: 0, tokens: vec![token], finish: None };
            self.send(Outbound::Frame(Frame::token(header)));
        } else {
            self.send(Outbound::OwnTokens { request, tokens: vec![token] });
        }
    }

    fn send_hidden(&mut self, request: &RequestId, start_pos: u64, hidden: &[f32]) {
        // f32 little-endian on the wire; this is the in-memory layout on every target we build for.
        #[cfg(target_endian = "big")]
        compile_error!("activation frames are little-endian; convert here on big-endian targets");
        let bytes: &[u8] = bytemuck::cast_slice(hidden);
        let acts = ActivationsRef {
            request,
            dtype: WireDType::F32,
            hidden: self.shard.config().hidden_size as u64,
            start_pos,
            data: bytes,
        };
        match split_activations(acts, 0, &self.config.limits) {
            Ok(chunks) => {
                let frames: Vec<Frame> = chunks.map(|c| c.to_frame()).collect();
                for frame in frames {
                    self.send(Outbound::Frame(frame));
                }
            }
            Err(e) => self.fail(request, ErrorCode::Internal, format!("cannot frame activations: {e}")),
        }
    }

    fn publish_stats(&self) {
        use std::sync::atomic::Ordering;
        let bytes: usize = self.requests.values().map(|st| st.cache.size_in_bytes()).sum();
        self.config.stats.kv_caches.store(self.requests.len() as u64, Ordering::Relaxed);
        self.config.stats.kv_cache_bytes.store(bytes as u64, Ordering::Relaxed);
    }

    fn sweep_idle(&mut self) {
        if self.last_sweep.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_sweep = Instant::now();
        let timeout = self.config.request_idle_timeout;
        let idle: Vec<RequestId> =
            self.requests.iter().filter(|(_, st)| st.last_used.elapsed() > timeout).map(|(id, _)| id.clone()).collect();
        for id in idle {
            self.fail(&id, ErrorCode::Unavailable, format!("request idle for more than {timeout:?}: freed"));
        }
    }
}

/// (Exit of a split head) the row of `part`'s largest logit, the lowest on ties, NaN never counting
/// (sampling's greedy rule), and its value; -∞ when no logit is above it.
fn largest_logit(part: &[f32]) -> (usize, f32) {
    let row = argmax(part) as usize;
    let value = part.get(row).copied().filter(|v| *v > f32::NEG_INFINITY).unwrap_or(f32::NEG_INFINITY);
    (row, value)
}

/// (Entry of a split head) a whole vocabulary's row of logits from this shard's rows `own` and the
/// exit's largest logit `value` at row `row` (past `own`), the exit's other rows -∞. Its largest logit,
/// and the lowest row holding it, are those of the true row: the exit's value is the largest of its rows
/// at the lowest such row, and every row of `own` comes before them.
fn with_exit_max(mut own: Vec<f32>, vocab: usize, row: usize, value: f32) -> Vec<f32> {
    own.resize(vocab, f32::NEG_INFINITY);
    own[row] = value;
    own
}

/// Hands the shard to a new compute thread; returns the job sender.
pub fn spawn(
    shard: DeviceShard,
    out: mpsc::Sender<Outbound>,
    config: EngineLoopConfig,
) -> (mpsc::Sender<EngineJob>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let handle = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            if let Some(cpus) = &config.cpus
                && let Err(e) = cpus.pin_current_thread()
            {
                tracing::warn!(%cpus, "the compute thread runs unpinned: {e}");
            }
            run(shard, rx, out, config)
        })
        .expect("the OS can start one thread");
    (tx, handle)
}

/// Polls `jobs` for up to `window`, offering the CPU to other threads between rounds of polls (the
/// worker's network thread runs on these cores too); `None` if nothing came in time or the channel
/// closed (the caller's blocking receive then says which).
fn spin_recv(jobs: &mut mpsc::Receiver<EngineJob>, window: Duration) -> Option<EngineJob> {
    let started = Instant::now();
    loop {
        for _ in 0..32 {
            match jobs.try_recv() {
                Ok(job) => return Some(job),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => std::hint::spin_loop(),
            }
        }
        if started.elapsed() > window {
            return None;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(id: &str) -> EngineJob {
        EngineJob::End { request: RequestId::new(id).expect("a valid id") }
    }

    /// The exit's largest logit, put with the entry's rows, picks the token greedy sampling picks from
    /// the whole row: on ties (within and across the halves), NaN, -∞ and rows with nothing above -∞.
    #[test]
    fn the_exits_largest_logit_and_the_entrys_rows_pick_the_whole_rows_greedy_token() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let special = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 0.0, -0.0, 1.5, 1.5];
        for round in 0..4000 {
            let vocab = 2 + (next() % 70) as usize;
            let split = 1 + (next() % (vocab as u64 - 1)) as usize;
            let row: Vec<f32> = (0..vocab)
                .map(|_| match next() % 10 {
                    0..=3 => special[(next() % special.len() as u64) as usize],
                    4 if round % 3 == 0 => f32::NEG_INFINITY,
                    _ => ((next() % 7) as f32 - 3.0) / 2.0,
                })
                .collect();
            let (at, value) = largest_logit(&row[split..]);
            let rebuilt = with_exit_max(row[..split].to_vec(), vocab, split + at, value);
            assert_eq!(argmax(&rebuilt), argmax(&row), "round {round}: {row:?} cut at {split}");
        }
        // Nothing above -∞ on either side: token 0, as from the whole row.
        let row = [f32::NAN, f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY];
        let (at, value) = largest_logit(&row[2..]);
        assert_eq!(value, f32::NEG_INFINITY);
        assert_eq!(argmax(&with_exit_max(row[..2].to_vec(), 4, 2 + at, value)), 0);
    }

    #[test]
    fn polling_takes_a_job_sent_meanwhile_and_gives_up_after_its_window() {
        let (tx, mut rx) = mpsc::channel(4);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.blocking_send(end("r-1")).expect("sent");
            tx
        });
        let job = spin_recv(&mut rx, Duration::from_secs(5)).expect("the job sent while polling");
        assert!(matches!(job, EngineJob::End { request } if request.as_str() == "r-1"));
        let tx = sender.join().expect("sender");

        let started = Instant::now();
        assert!(spin_recv(&mut rx, Duration::from_millis(30)).is_none(), "nothing came");
        assert!(started.elapsed() >= Duration::from_millis(30), "it polled for its whole window");

        drop(tx);
        let started = Instant::now();
        assert!(spin_recv(&mut rx, Duration::from_secs(5)).is_none(), "a closed channel");
        assert!(started.elapsed() < Duration::from_secs(1), "a closed channel ends the polling at once");
    }
}
