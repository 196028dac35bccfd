//! Generation on a whole model in one process: prefill, decode, stop tokens, stop strings, max tokens,
//! streaming text — for one request or a batch of them stepping together.

use std::time::{Duration, Instant};

use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::model::{Shard, StepInput, StepItem, StepOutput};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// One generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    /// Generation ends when one of these strings appears; it is not part of the output.
    pub stop_strings: Vec<String>,
    /// Extra stop ids besides the tokenizer's end-of-sequence ids.
    pub stop_token_ids: Vec<u32>,
    /// Generate through end-of-sequence tokens (benchmarks that need exactly `max_new_tokens`).
    pub ignore_eos: bool,
}

impl GenerateRequest {
    pub fn new(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self { prompt, params: SamplingParams::default(), max_new_tokens, stop_strings: Vec::new(), stop_token_ids: Vec::new(), ignore_eos: false }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token was sampled (it is in `tokens`, not in `text`).
    Stop,
    /// A stop string appeared (cut from `text`).
    StopString,
    /// `max_new_tokens` were generated.
    Length,
}

impl FinishReason {
    /// The OpenAI API's name for it.
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::StopString => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Every sampled token, the final stop token included.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Checks the request against the model before any work is done.
pub fn validate(shard: &Shard, req: &GenerateRequest) -> Result<()> {
    let cfg = shard.config();
    if !(shard.range().is_entry() && shard.range().is_exit()) {
        return Err(EngineError::Invalid("single-process generation needs the whole model [0, L)".into()));
    }
    if req.prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    if req.prompt.len() + req.max_new_tokens > cfg.max_position_embeddings {
        return Err(EngineError::ContextOverflow {
            prompt_tokens: req.prompt.len(),
            max_new_tokens: req.max_new_tokens,
            context: cfg.max_position_embeddings,
        });
    }
    req.params.validate()
}

/// Text accumulated for one request, released as it becomes safe: never inside a possible stop string,
/// never inside a UTF-8 sequence.
struct TextState {
    text: String,
    emitted: usize,
    stop_strings: Vec<String>,
}

impl TextState {
    /// Appends `new`; returns true if a stop string now appears (the text is cut before it).
    fn push(&mut self, new: &str) -> bool {
        let search_from = self.emitted.saturating_sub(self.stop_strings.iter().map(|s| s.len()).max().unwrap_or(0));
        self.text.push_str(new);
        let search_from = (0..=search_from).rev().find(|&i| self.text.is_char_boundary(i)).unwrap_or(0);
        let hit = self
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[search_from..].find(s.as_str()).map(|i| search_from + i))
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            return true;
        }
        false
    }

    /// The part that can be shown now: everything except a tail that might begin a stop string.
    fn releasable(&mut self, finished: bool) -> Option<&str> {
        let mut end = self.text.len();
        if !finished {
            for s in &self.stop_strings {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                        end = end.min(self.text.len() - k);
                        break;
                    }
                }
            }
        }
        if end <= self.emitted {
            return None;
        }
        let out = &self.text[self.emitted..end];
        self.emitted = end;
        Some(out)
    }
}

/// What a request has produced so far, and whether it is over: the stop rules (end-of-sequence and
/// stop tokens, stop strings, the token budget) and the streaming detokenizer in one place, so that
/// the single-process generator and a pipeline's entry shard end requests at exactly the same token.
pub struct RequestOutput<'t> {
    tokenizer: &'t Tokenizer,
    stream: crate::tokenizer::DecodeStream<'t>,
    text: TextState,
    tokens: Vec<u32>,
    finish: Option<FinishReason>,
    max_new_tokens: usize,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
}

impl<'t> RequestOutput<'t> {
    /// Empty output for `req`.
    pub fn new(tokenizer: &'t Tokenizer, req: &GenerateRequest) -> Self {
        Self {
            tokenizer,
            stream: tokenizer.stream(),
            text: TextState { text: String::new(), emitted: 0, stop_strings: req.stop_strings.clone() },
            tokens: Vec::new(),
            finish: None,
            max_new_tokens: req.max_new_tokens,
            stop_token_ids: req.stop_token_ids.clone(),
            ignore_eos: req.ignore_eos,
        }
    }

    /// Takes the next sampled token; returns the text that became final with it (possibly empty).
    /// Must not be called once [`Self::finish_reason`] is set.
    pub fn push(&mut self, token: u32) -> Result<&str> {
        debug_assert!(self.finish.is_none(), "token pushed after the request finished");
        self.tokens.push(token);
        if (!self.ignore_eos && self.tokenizer.eos_ids().contains(&token)) || self.stop_token_ids.contains(&token) {
            self.finish = Some(FinishReason::Stop);
        } else if let Some(piece) = self.stream.push(token)?
            && self.text.push(&piece)
        {
            self.finish = Some(FinishReason::StopString);
        }
        if self.finish.is_none() && self.tokens.len() >= self.max_new_tokens {
            self.finish = Some(FinishReason::Length);
        }
        Ok(self.text.releasable(self.finish.is_some()).unwrap_or(""))
    }

    /// Why the request is over; `None` while it goes on.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Every sampled token, a final stop token included.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The text so far (stop strings cut).
    pub fn text(&self) -> &str {
        &self.text.text
    }
}

/// Generates for one request, calling `on_text` with each piece of text as it becomes final.
pub fn generate(shard: &Shard, tokenizer: &Tokenizer, req: &GenerateRequest, mut on_text: impl FnMut(&str)) -> Result<Generation> {
    let mut out = generate_batch(shard, tokenizer, std::slice::from_ref(req), |_, t| on_text(t))?;
    Ok(out.pop().expect("one request in, one generation out"))
}

/// Generates for several requests together: each is prefilled alone, then all decode in one batch per
/// step, leaving the batch as they finish. `on_text(i, piece)` streams request `i`'s text.
pub fn generate_batch(
    shard: &Shard,
    tokenizer: &Tokenizer,
    reqs: &[GenerateRequest],
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    for r in reqs {
        validate(shard, r)?;
    }
    struct Live<'t> {
        cache: KvCache,
        sampler: Sampler,
        output: RequestOutput<'t>,
        prefill_time: Duration,
        decode_start: Instant,
        decode_time: Duration,
    }
    let mut live: Vec<Live<'_>> = Vec::with_capacity(reqs.len());
    let mut logits: Vec<Vec<f32>> = Vec::with_capacity(reqs.len());
    for r in reqs {
        let start = Instant::now();
        let mut cache = shard.new_cache();
        let out = shard.forward(StepInput::Tokens(&r.prompt), &mut cache)?;
        let StepOutput::Logits(l) = out else { unreachable!("a whole-model shard returns logits") };
        logits.push(l);
        live.push(Live {
            cache,
            sampler: Sampler::new(r.params)?,
            output: RequestOutput::new(tokenizer, r),
            prefill_time: start.elapsed(),
            decode_start: Instant::now(),
            decode_time: Duration::ZERO,
        });
    }
    for l in &mut live {
        l.decode_start = Instant::now();
    }

    loop {
        // Sample for every live request, then decide who goes on.
        let mut stepping: Vec<usize> = Vec::new();
        for (i, l) in live.iter_mut().enumerate() {
            if l.output.finish_reason().is_some() {
                continue;
            }
            let token = l.sampler.sample(&logits[i]);
            let piece = l.output.push(token)?;
            if !piece.is_empty() {
                on_text(i, piece);
            }
            match l.output.finish_reason() {
                Some(_) => l.decode_time = l.decode_start.elapsed(),
                None => stepping.push(i),
            }
        }
        if stepping.is_empty() {
            break;
        }
        let last: Vec<u32> =
            stepping.iter().map(|&i| *live[i].output.tokens().last().expect("sampled above")).collect();
        let mut items: Vec<StepItem<'_>> = Vec::with_capacity(stepping.len());
        let mut stepping_iter = stepping.iter().peekable();
        for (i, l) in live.iter_mut().enumerate() {
            if stepping_iter.peek() == Some(&&i) {
                let k = items.len();
                items.push(StepItem { input: StepInput::Tokens(std::slice::from_ref(&last[k])), cache: &mut l.cache });
                stepping_iter.next();
            }
        }
        let outs = shard.forward_batch(&mut items)?;
        for (&i, out) in stepping.iter().zip(outs) {
            let StepOutput::Logits(l) = out else { unreachable!("a whole-model shard returns logits") };
            logits[i] = l;
        }
    }

    Ok(live
        .into_iter()
        .zip(reqs)
        .map(|(l, r)| Generation {
            finish_reason: l.output.finish_reason().expect("loop ends when all finish"),
            tokens: l.output.tokens,
            text: l.output.text.text,
            prompt_tokens: r.prompt.len(),
            prefill_time: l.prefill_time,
            decode_time: l.decode_time,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_cut_and_never_streamed() {
        let mut t = TextState { text: String::new(), emitted: 0, stop_strings: vec!["</s>".into()] };
        assert!(!t.push("Hello <"));
        assert_eq!(t.releasable(false), Some("Hello "));
        assert!(!t.push("/"));
        assert_eq!(t.releasable(false), None);
        assert!(t.push("s> more"));
        assert_eq!(t.releasable(true), None);
        assert_eq!(t.text, "Hello ");
    }

    #[test]
    fn partial_stop_prefix_is_released_when_it_diverges() {
        let mut t = TextState { text: String::new(), emitted: 0, stop_strings: vec!["END".into()] };
        assert!(!t.push("the EN"));
        assert_eq!(t.releasable(false), Some("the "));
        assert!(!t.push("ter"));
        assert_eq!(t.releasable(false), Some("ENter"));
    }
}
