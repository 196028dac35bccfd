//! The entry shard's request API: what a client (the orchestrator, or `computepool generate --shards`)
//! sends over a [`GENERATE_ALPN`](computepool_axl::transport::GENERATE_ALPN) stream, and what comes
//! back. One bidirectional QUIC stream per request: the client writes one JSON object and a newline,
//! the entry answers with JSON lines (events) and closes its side. Closing or resetting the stream
//! cancels the request. docs/PROTOCOL.md §12 is the spec.
//!
//! This crate holds that API's types (served by the entry worker in host/node) and [`client`], which
//! speaks it. It carries text and token ids only: it depends on the transport, never on the engine,
//! so the orchestrator can use it and still not touch an activation (ARCHITECTURE.md, invariant 1).

pub mod client;

use serde::{Deserialize, Serialize};

/// Largest request line the entry reads, in bytes.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// What to generate. Exactly one of `prompt`, `messages` and `prompt_tokens` is given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// Request id (1–128 of `A-Z a-z 0-9 . _ : -`); the entry makes one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Raw text, tokenized with the tokenizer's special tokens (BOS) added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// A conversation, rendered with the model's chat template and a generation prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    /// Token ids, used as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<Vec<u32>>,
    /// Most tokens to generate (at least 1). Default: as many as the context window has room for after
    /// the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// Default 0 (greedy).
    #[serde(default)]
    pub temperature: f32,
    /// Default 1.
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    /// Default 0 (no limit).
    #[serde(default)]
    pub top_k: u32,
    /// Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Minimum probability relative to the most likely token, in [0, 1]. Default off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Multiplicative penalty on sampled tokens, > 0. Default off (1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// Default off (0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// Default off (0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// The sampler: `native` or the id of a sampler plugin the pool's workers load. Default: the entry's
    /// `--default-sampler`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<String>,
    /// Stop strings; not part of the output.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Generate through end-of-sequence tokens (benchmarks). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
    /// Tokens this request already generated elsewhere (a failover from a broken pipeline): the entry
    /// replays them after the prompt to rebuild every shard's KV cache, then generates on from there.
    /// Their events are not sent again, and they count towards `max_tokens` and `completion_tokens`.
    /// Greedy and seeded requests continue exactly as if nothing happened (the exit skips the random
    /// draws of the replayed tokens); penalties count only the tokens sampled after the move.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resume_tokens: Vec<u32>,
    /// The shards after the entry, one per layer range in order, as peer ids: the request's route
    /// (the orchestrator picks one worker per range). Default: the topology's default route (for
    /// each range, the first worker it lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Vec<String>>,
}

fn default_top_p() -> f32 {
    1.0
}

impl GenerateRequest {
    /// A greedy request for `prompt` with the defaults.
    pub fn text(prompt: impl Into<String>, max_tokens: usize) -> Self {
        Self {
            id: None,
            prompt: Some(prompt.into()),
            messages: None,
            prompt_tokens: None,
            max_tokens: Some(max_tokens),
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            min_p: None,
            repetition_penalty: None,
            presence_penalty: None,
            frequency_penalty: None,
            sampler: None,
            stop: Vec::new(),
            ignore_eos: false,
            resume_tokens: Vec::new(),
            route: None,
        }
    }
}

/// Why a request ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// What class of failure an error event reports (the `code` of the data plane's error frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is at fault; do not retry it unchanged.
    InvalidRequest,
    /// The prompt, plus `max_tokens` when given, does not fit the model's context window.
    ContextLengthExceeded,
    /// Frames were lost or reordered; a retry may work.
    Sequence,
    /// A shard is down or unreachable; retry later.
    Unavailable,
    /// Something else broke inside a shard.
    Internal,
}

/// One line of the entry's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The request was accepted and its prompt tokenized.
    Started {
        /// The request id.
        id: String,
        /// Prompt length in tokens.
        prompt_tokens: usize,
    },
    /// One sampled token and the text that became final with it (may be empty: text is held back
    /// inside multi-byte characters and possible stop strings).
    Token {
        /// The token id.
        token: u32,
        /// New text.
        text: String,
    },
    /// The request finished.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Prompt length in tokens.
        prompt_tokens: usize,
        /// Tokens generated (a final stop token included).
        completion_tokens: usize,
    },
    /// The request failed; nothing follows.
    Error {
        /// The class of failure.
        code: ErrorKind,
        /// Why, for a person.
        message: String,
    },
}

impl From<computepool_axl::frame::ErrorCode> for ErrorKind {
    fn from(code: computepool_axl::frame::ErrorCode) -> Self {
        use computepool_axl::frame::ErrorCode as C;
        match code {
            C::InvalidRequest => ErrorKind::InvalidRequest,
            C::Sequence => ErrorKind::Sequence,
            C::Unavailable => ErrorKind::Unavailable,
            C::Internal => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_strict_and_defaulted() {
        let r: GenerateRequest = serde_json::from_str(r#"{"prompt":"hi"}"#).expect("parses");
        assert_eq!(r.max_tokens, None);
        assert_eq!(r.top_p, 1.0);
        assert!(serde_json::from_str::<GenerateRequest>(r#"{"prompt":"hi","n":2}"#).is_err());
        let line = serde_json::to_string(&Event::Token { token: 5, text: "a".into() }).expect("serialises");
        assert_eq!(line, r#"{"event":"token","token":5,"text":"a"}"#);
    }
}
