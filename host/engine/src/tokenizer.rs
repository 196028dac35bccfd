//! The tokenizer (HF `tokenizer.json` through the `tokenizers` crate), the chat template (Jinja from
//! `tokenizer_config.json`, rendered by minijinja) and stop tokens.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// One chat message, as the OpenAI API and HF chat templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// ChatML, for checkpoints whose tokenizer_config.json carries no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A model's tokenizer, chat template and end-of-sequence tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab", &self.inner.get_vocab_size(true)).field("eos_ids", &self.eos_ids).finish()
    }
}

fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
}

impl Tokenizer {
    /// Loads `tokenizer.json`, plus `tokenizer_config.json` and `generation_config.json` if present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::ModelDir { path: dir.to_path_buf(), message: "no tokenizer.json".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?;
        let gc = read_json(&dir.join("generation_config.json"))?;
        Ok(Self::assemble(inner, tc, gc))
    }

    /// The same from the files' contents (a GGUF file's tokenizer, rebuilt from its metadata).
    pub fn from_parts(
        tokenizer_json: &str,
        tokenizer_config: Option<serde_json::Value>,
        generation_config: Option<serde_json::Value>,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes())
            .map_err(|e| EngineError::Tokenizer(format!("tokenizer.json: {e}")))?;
        Ok(Self::assemble(inner, tokenizer_config, generation_config))
    }

    fn assemble(inner: tokenizers::Tokenizer, tc: Option<serde_json::Value>, gc: Option<serde_json::Value>) -> Self {
        let chat_template = tc.as_ref().and_then(|c| match c.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        });
        let bos_token = tc.as_ref().and_then(|c| token_string(c.get("bos_token")));
        let eos_token = tc.as_ref().and_then(|c| token_string(c.get("eos_token")));
        let mut eos_ids: Vec<u32> = Vec::new();
        if let Some(v) = gc.as_ref().and_then(|g| g.get("eos_token_id")) {
            match v {
                serde_json::Value::Number(n) => eos_ids.extend(n.as_u64().map(|x| x as u32)),
                serde_json::Value::Array(a) => eos_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
                _ => {}
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t))
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        Self { inner, chat_template, bos_token, eos_token, eos_ids }
    }

    /// Token ids of `text`. `add_special_tokens` adds what the tokenizer's post-processor adds (a BOS for
    /// Llama); chat prompts rendered from a template already contain their special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// End-of-sequence ids: generation_config.json's `eos_token_id` plus tokenizer_config.json's
    /// `eos_token`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template (ChatML if the model has none) with `add_generation_prompt`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().unwrap_or(CHATML_TEMPLATE);
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template).map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        let tmpl = env.get_template("chat").map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| EngineError::ChatTemplate(e.to_string()))
    }

    /// A streaming detokenizer for one request.
    pub fn stream(&self) -> DecodeStream<'_> {
        DecodeStream { tokenizer: self, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }
}

/// Turns tokens into text as they arrive, holding back bytes until they form whole characters (a
/// byte-level BPE token can end mid-way through a UTF-8 sequence, e.g. inside an emoji).
pub struct DecodeStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DecodeStream<'_> {
    /// Adds a token; returns the new text it completes, if any. Special tokens are skipped.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        let new = if full.starts_with(&prefix) { full.get(prefix.len()..) } else { None };
        if let Some(new) = new.filter(|n| !n.is_empty() && !n.ends_with('\u{FFFD}')) {
            let new = new.to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Every token pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
