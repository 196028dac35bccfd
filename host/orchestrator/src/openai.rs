//! The OpenAI wire format: request bodies (checked and turned into an entry [`GenerateRequest`]) and
//! the exact shapes of responses, stream chunks and usage.

use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use computepool_entry_api::{FinishReason, GenerateRequest, Message};

/// Which OpenAI endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat.completions",
            Self::Completion => "completions",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Self::Chat => "chatcmpl",
            Self::Completion => "cmpl",
        }
    }

    /// The parameter that holds the prompt (named in context-length errors).
    pub fn prompt_param(self) -> &'static str {
        match self {
            Self::Chat => "messages",
            Self::Completion => "prompt",
        }
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list of up to 4.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Parameters both endpoints share. Unknown fields are ignored (clients send many defaults), but the
/// ones that would change the answer in a way this server cannot honour are refused.
#[derive(Debug, Default, Deserialize)]
pub struct CommonParams {
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopInput>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: Option<Value>,
    #[serde(default)]
    pub tools: Option<Value>,
    /// An extension (vLLM has it too): keep generating through end-of-sequence tokens, so exactly
    /// `max_tokens` are made (benchmarks, tests).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// OpenAI's penalties, in [-2, 2]; over the tokens sampled so far.
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// Extensions (vLLM and llama.cpp servers take them too): top-k (0 = off), min-p in [0, 1], and a
    /// multiplicative repetition penalty > 0.
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// Extension: the sampler, `native` or a sampler plugin id the pool loads (docs/PLUGINS.md).
    /// Default: the pool's. An id the pool does not serve is a 400 before any shard works.
    #[serde(default)]
    pub sampler: Option<String>,
}

/// A checked request, ready for a pool.
#[derive(Debug)]
pub struct Prepared {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub entry: GenerateRequest,
}

impl ChatCompletionRequest {
    pub fn prepare(self) -> Result<Prepared, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must contain at least one message"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!("role {other:?} is not supported: use system, developer, user or assistant"),
                    ));
                }
            };
            let content = match m.content {
                Some(MessageContent::Text(text)) => text,
                Some(MessageContent::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, part) in parts.into_iter().enumerate() {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(text)) => texts.push(text),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}]"),
                                    format!("content parts of type {kind:?} are not supported: only text parts"),
                                ));
                            }
                        }
                    }
                    texts.join("\n")
                }
                None => return Err(ApiError::invalid(format!("messages[{i}].content"), "content is required")),
            };
            messages.push(Message { role: role.into(), content });
        }
        // Chat takes max_completion_tokens, and max_tokens as its older name.
        let max_tokens = match self.common.max_completion_tokens {
            Some(n) => Some(("max_completion_tokens", n)),
            None => self.common.max_tokens.map(|n| ("max_tokens", n)),
        };
        let mut entry = GenerateRequest::text(String::new(), 1);
        entry.prompt = None;
        entry.messages = Some(messages);
        prepare_common(Endpoint::Chat, self.model, max_tokens, self.common, entry)
    }
}

impl CompletionRequest {
    pub fn prepare(self) -> Result<Prepared, ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "suffix is not supported"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::invalid("best_of", "best_of must be 1: one completion is generated per request"));
        }
        let one = "send one prompt per request: batched prompts are not supported";
        let mut entry = GenerateRequest::text(String::new(), 1);
        match self.prompt {
            PromptInput::Text(text) => entry.prompt = Some(text),
            PromptInput::Texts(mut texts) if texts.len() == 1 => entry.prompt = texts.pop(),
            PromptInput::Tokens(tokens) => {
                entry.prompt = None;
                entry.prompt_tokens = Some(tokens);
            }
            PromptInput::TokenLists(mut lists) if lists.len() == 1 => {
                entry.prompt = None;
                entry.prompt_tokens = lists.pop();
            }
            _ => return Err(ApiError::invalid("prompt", one)),
        }
        if entry.prompt.as_deref() == Some("") || entry.prompt_tokens.as_ref().is_some_and(|t| t.is_empty()) {
            return Err(ApiError::invalid("prompt", "prompt must not be empty"));
        }
        let max_tokens = self.common.max_tokens.map(|n| ("max_tokens", n));
        prepare_common(Endpoint::Completion, self.model, max_tokens, self.common, entry)
    }
}

fn prepare_common(
    endpoint: Endpoint,
    model: String,
    max_tokens: Option<(&'static str, i64)>,
    common: CommonParams,
    mut entry: GenerateRequest,
) -> Result<Prepared, ApiError> {
    match common.n {
        None | Some(1) => {}
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!("n = {n} is not supported: this server generates exactly one choice per request (n must be 1)"),
            ));
        }
    }
    entry.max_tokens = match max_tokens {
        None => None, // as many as the context window has room for
        Some((param, n)) if n < 1 => return Err(ApiError::invalid(param, format!("{param} must be at least 1, got {n}"))),
        Some((_, n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    // OpenAI's defaults: temperature 1, top_p 1.
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", format!("temperature must be between 0 and 2, got {temperature}")));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", format!("top_p must be greater than 0 and at most 1, got {top_p}")));
    }
    entry.temperature = temperature as f32;
    entry.top_p = top_p as f32;
    for (param, value) in [("presence_penalty", common.presence_penalty), ("frequency_penalty", common.frequency_penalty)] {
        if let Some(v) = value
            && !(-2.0..=2.0).contains(&v)
        {
            return Err(ApiError::invalid(param, format!("{param} must be between -2 and 2, got {v}")));
        }
    }
    entry.presence_penalty = common.presence_penalty.map(|v| v as f32);
    entry.frequency_penalty = common.frequency_penalty.map(|v| v as f32);
    entry.top_k = match common.top_k {
        None => 0,
        Some(k) if k < 0 => return Err(ApiError::invalid("top_k", format!("top_k must be at least 0 (0 is off), got {k}"))),
        Some(k) => u32::try_from(k).unwrap_or(u32::MAX),
    };
    if let Some(m) = common.min_p
        && !(0.0..=1.0).contains(&m)
    {
        return Err(ApiError::invalid("min_p", format!("min_p must be between 0 and 1, got {m}")));
    }
    entry.min_p = common.min_p.map(|v| v as f32);
    if let Some(r) = common.repetition_penalty
        && !(r.is_finite() && r > 0.0 && r <= 100.0)
    {
        return Err(ApiError::invalid("repetition_penalty", format!("repetition_penalty must be in (0, 100], got {r}")));
    }
    entry.repetition_penalty = common.repetition_penalty.map(|v| v as f32);
    entry.sampler = common.sampler;
    entry.seed = match common.seed {
        // Negative seeds are valid in OpenAI's API; their bits are the seed.
        Some(seed) => seed as u64,
        None => random_seed(),
    };
    entry.stop = match common.stop {
        None => Vec::new(),
        Some(StopInput::One(s)) => vec![s],
        Some(StopInput::Many(list)) => list,
    };
    if entry.stop.len() > 4 {
        return Err(ApiError::invalid("stop", format!("stop takes at most 4 sequences, got {}", entry.stop.len())));
    }
    if entry.stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop sequences must not be empty"));
    }
    if common.logprobs.as_ref().is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false))) {
        return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
    }
    if common.tools.as_ref().is_some_and(|v| !matches!(v, Value::Null) && v.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(ApiError::invalid("tools", "tools are not supported"));
    }
    entry.ignore_eos = common.ignore_eos.unwrap_or(false);
    let stream = common.stream.unwrap_or(false);
    let include_usage = common.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    Ok(Prepared { endpoint, model, stream, include_usage, entry })
}

/// A seed for a request that gave none (OpenAI samples differently each time then).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

/// Parses a JSON body, telling malformed JSON apart from a well-formed body with a bad field.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof | serde_json::error::Category::Io => {
            ApiError::MalformedJson(e.to_string())
        }
        serde_json::error::Category::Data => {
            ApiError::InvalidParameter { param: None, message: format!("invalid request body: {e}") }
        }
    })
}

/// The identity of one response: every chunk of a stream repeats it.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl ResponseMeta {
    pub fn new(endpoint: Endpoint, model: String) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        // Unique across restarts (the start time) and within a run (the counter); valid as an entry
        // request id too, so the shards' logs name the same request.
        let id = format!("{}-{:x}{:06x}", endpoint.id_prefix(), now.as_micros(), NEXT.fetch_add(1, Ordering::Relaxed));
        Self { id, created: now.as_secs(), model, endpoint }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if self.endpoint == Endpoint::Completion
            && let Some(map) = v.as_object_mut()
        {
            map.remove("system_fingerprint");
        }
        v
    }

    /// A whole (non-streamed) response.
    pub fn response(&self, text: &str, finish: FinishReason, usage: Usage) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish_str(finish),
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_str(finish),
            }),
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage.to_json();
        v
    }

    /// A stream chunk carrying `text` (and, for chat, the assistant role on the first chunk), or the
    /// final chunk with `finish`. With `include_usage`, every chunk but the usage chunk has `usage: null`.
    pub fn chunk(&self, text: &str, first: bool, finish: Option<FinishReason>, include_usage: bool) -> Value {
        let finish = finish.map(finish_str);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (first, finish) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, Some(_)) => json!({}),
                    (false, None) => json!({"content": text}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        };
        let mut v = self.envelope(true, json!([choice]));
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The text chunks of one stream, rendered from a template: [`Self::chunk`]'s JSON, made once with a
    /// marker for the text, so each token costs one string escape instead of building and serialising a
    /// JSON tree.
    pub fn text_chunks(&self, include_usage: bool) -> TextChunks {
        // NULs are escaped in JSON, so the marker's serialised form cannot come from escaping anything
        // else; it could only clash with a model name that holds the same characters, and then the
        // chunks are built the slow way.
        const MARKER: &str = "\u{0}computepool-chunk-text\u{0}";
        let rendered = self.chunk(MARKER, false, None, include_usage).to_string();
        let marker = Value::String(MARKER.into()).to_string();
        let template = match rendered.match_indices(&marker).count() {
            1 => rendered.split_once(&marker).map(|(head, tail)| (head.to_string(), tail.to_string())),
            _ => None,
        };
        TextChunks { meta: self.clone(), include_usage, template }
    }

    /// The last chunk of a stream that asked for `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let mut v = self.envelope(true, json!([]));
        v["usage"] = usage.to_json();
        v
    }
}

/// The text chunks of one stream ([`ResponseMeta::text_chunks`]).
pub struct TextChunks {
    meta: ResponseMeta,
    include_usage: bool,
    /// The chunk's JSON before and after the text's JSON string.
    template: Option<(String, String)>,
}

impl TextChunks {
    /// The JSON of the chunk carrying `text`, exactly as [`ResponseMeta::chunk`] has it.
    pub fn render(&self, text: &str) -> String {
        match &self.template {
            Some((head, tail)) => {
                let mut out = String::with_capacity(head.len() + text.len() + 2 + tail.len());
                out.push_str(head);
                out.push_str(&Value::String(text.into()).to_string());
                out.push_str(tail);
                out
            }
            None => self.meta.chunk(text, false, None, self.include_usage).to_string(),
        }
    }
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Prepared, ApiError> {
        parse_body::<ChatCompletionRequest>(body.as_bytes())?.prepare()
    }

    #[test]
    fn chat_requests_become_entry_requests() {
        let p = chat(r#"{"model":"m","messages":[{"role":"developer","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],
            "max_completion_tokens":5,"max_tokens":9,"temperature":0,"seed":-1,"stop":"\n","stream":true,"stream_options":{"include_usage":true},"user":"x"}"#)
        .expect("valid");
        assert!(p.stream && p.include_usage);
        assert_eq!(p.entry.max_tokens, Some(5), "max_completion_tokens wins");
        assert_eq!(p.entry.seed, u64::MAX);
        assert_eq!(p.entry.stop, vec!["\n".to_string()]);
        let messages = p.entry.messages.expect("messages");
        assert_eq!((messages[0].role.as_str(), messages[1].content.as_str()), ("system", "hi"));
        assert_eq!(p.entry.prompt, None);
        assert_eq!((p.entry.sampler.as_deref(), p.entry.top_k, p.entry.min_p), (None, 0, None));
        let p = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"sampler":"top-p","top_k":40,"min_p":0.05,
            "presence_penalty":0.5,"frequency_penalty":-0.25,"repetition_penalty":1.1}"#)
        .expect("valid");
        assert_eq!((p.entry.sampler.as_deref(), p.entry.top_k, p.entry.min_p), (Some("top-p"), 40, Some(0.05)));
        assert_eq!((p.entry.presence_penalty, p.entry.frequency_penalty), (Some(0.5), Some(-0.25)));
        assert_eq!(p.entry.repetition_penalty, Some(1.1));
    }

    #[test]
    fn bad_parameters_name_the_parameter() {
        let param = |body: &str| match chat(body) {
            Err(ApiError::InvalidParameter { param, .. }) => param,
            other => panic!("expected an invalid parameter, got {other:?}"),
        };
        let m = r#""model":"m","messages":[{"role":"user","content":"hi"}]"#;
        assert_eq!(param(&format!("{{{m},\"n\":2}}")), Some("n".into()));
        assert_eq!(param(&format!("{{{m},\"max_tokens\":0}}")), Some("max_tokens".into()));
        assert_eq!(param(&format!("{{{m},\"temperature\":3}}")), Some("temperature".into()));
        assert_eq!(param(&format!("{{{m},\"presence_penalty\":2.5}}")), Some("presence_penalty".into()));
        assert_eq!(param(&format!("{{{m},\"frequency_penalty\":-3}}")), Some("frequency_penalty".into()));
        assert_eq!(param(&format!("{{{m},\"top_k\":-1}}")), Some("top_k".into()));
        assert_eq!(param(&format!("{{{m},\"min_p\":1.5}}")), Some("min_p".into()));
        assert_eq!(param(&format!("{{{m},\"repetition_penalty\":0}}")), Some("repetition_penalty".into()));
        assert_eq!(param(&format!("{{{m},\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}}")), Some("stop".into()));
        assert_eq!(param(r#"{"model":"m","messages":[]}"#), Some("messages".into()));
        assert_eq!(param(r#"{"messages":[{"role":"user","content":"hi"}]}"#), None, "missing model");
        assert!(matches!(chat("{\"model\":"), Err(ApiError::MalformedJson(_))));
    }

    #[test]
    fn completion_prompts_take_one_text_or_token_list() {
        let prep = |body: &str| parse_body::<CompletionRequest>(body.as_bytes()).and_then(|r| r.prepare());
        let p = prep(r#"{"model":"m","prompt":["hi"]}"#).expect("one text");
        assert_eq!(p.entry.prompt.as_deref(), Some("hi"));
        assert_eq!(p.entry.max_tokens, None);
        let p = prep(r#"{"model":"m","prompt":[1,2,3]}"#).expect("tokens");
        assert_eq!(p.entry.prompt_tokens, Some(vec![1, 2, 3]));
        assert!(prep(r#"{"model":"m","prompt":["a","b"]}"#).is_err());
        assert!(prep(r#"{"model":"m","prompt":""}"#).is_err());
    }

    #[test]
    fn text_chunks_render_what_chunk_builds() {
        let texts = ["", "Paris", " \"quoted\" \\ back", "line\nbreak\ttab", "ünïcödé ✓ 🚀", "\u{1}\u{1f}", "{\"a\": [1]}"];
        for endpoint in [Endpoint::Chat, Endpoint::Completion] {
            for model in ["m", "a \"model\" / with \\ odd ünicode"] {
                let meta = ResponseMeta::new(endpoint, model.into());
                for include_usage in [false, true] {
                    let chunks = meta.text_chunks(include_usage);
                    assert!(chunks.template.is_some(), "{endpoint:?} {model:?}: a template");
                    for text in texts {
                        let rendered: Value = serde_json::from_str(&chunks.render(text)).expect("valid JSON");
                        assert_eq!(rendered, meta.chunk(text, false, None, include_usage), "{endpoint:?} {model:?} {text:?}");
                    }
                }
            }
        }
        // A model name that holds the marker: no template, the same chunks the slow way.
        let meta = ResponseMeta::new(Endpoint::Completion, "\u{0}computepool-chunk-text\u{0}".into());
        let chunks = meta.text_chunks(false);
        assert!(chunks.template.is_none());
        assert_eq!(serde_json::from_str::<Value>(&chunks.render("x")).expect("JSON"), meta.chunk("x", false, None, false));
    }

    #[test]
    fn chunks_have_openai_shapes() {
        let meta = ResponseMeta::new(Endpoint::Chat, "m".into());
        assert!(meta.id.starts_with("chatcmpl-"));
        let first = meta.chunk("", true, None, true);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(first["usage"], Value::Null);
        assert!(first.as_object().expect("object").contains_key("usage"));
        let last = meta.chunk("", false, Some(FinishReason::Length), false);
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert!(!last.as_object().expect("object").contains_key("usage"));
        let usage = meta.usage_chunk(Usage { prompt_tokens: 3, completion_tokens: 4 });
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 7);
        let done = ResponseMeta::new(Endpoint::Completion, "m".into()).response("x", FinishReason::Stop, Usage::default());
        assert_eq!(done["object"], "text_completion");
        assert_eq!(done["choices"][0]["text"], "x");
    }
}
