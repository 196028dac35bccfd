//! The tokenizer side of a GGUF import: HF `tokenizer.json`, `tokenizer_config.json` and the token ids
//! of `generation_config.json`, rebuilt from llama.cpp's `tokenizer.ggml.*` metadata.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) are supported: the tokens in the
//! file are already in GPT-2's byte-to-unicode alphabet, and the merges are "left right" strings in
//! rank order, so they map one-to-one onto a HF `BPE` model. What GGUF does not store is the
//! pre-tokenizer: llama.cpp names it (`tokenizer.ggml.pre`) and hard-codes its regexes, so we map that
//! name back to the HF pre-tokenizer the original `tokenizer.json` had (see [`PreTokenizer`]).

use std::collections::HashMap;

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Value, json};

use super::reader::GgufFile;
use crate::error::Result;

/// llama.cpp's token types (`llama_token_type`).
pub mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

/// The ChatML template, used when the file carries no `tokenizer.chat_template`.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Llama 3's split regex, as in its tokenizer.json (llama.cpp runs an equivalent without `(?i:)`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's fallback regexes for `tokenizer.ggml.pre = "default"` (or absent), applied in turn.
const LLAMA_CPP_DEFAULT_SPLITS: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];
/// Qwen 2's split regex, as in its tokenizer.json.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The HF pre-tokenizer family matching a `tokenizer.ggml.pre` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// `gpt-2` and friends: `ByteLevel(add_prefix_space=false, use_regex=true)`.
    Gpt2,
    /// `smollm`, `starcoder` and friends: `Digits(individual_digits=true)` then the GPT-2 byte-level
    /// split — llama.cpp's `\p{N}` + GPT-2 regex pair.
    DigitsThenGpt2,
    /// `llama-bpe` / `llama3`: Llama 3's split regex then `ByteLevel(use_regex=false)`.
    Llama3,
    /// `qwen2`: Qwen 2's split regex then `ByteLevel(use_regex=false)`.
    Qwen2,
    /// `default` or no `tokenizer.ggml.pre` (old files): llama.cpp's four fallback regexes, each
    /// splitting the previous one's pieces (what a `Sequence` of `Split`s does), then
    /// `ByteLevel(use_regex=false)`. Reproduces llama.cpp, which itself warns that such files
    /// may not match the original tokenizer.
    LlamaCppDefault,
}

impl PreTokenizer {
    /// The family for a `tokenizer.ggml.pre` value (llama.cpp's names, `llama-vocab.cpp`).
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Some(match name {
            "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de" | "jina-v1-en"
            | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" => {
                PreTokenizer::Gpt2
            }
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
                PreTokenizer::DigitsThenGpt2
            }
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
            | "dbrx" | "smaug-bpe" => PreTokenizer::Llama3,
            "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" => PreTokenizer::Qwen2,
            "default" => PreTokenizer::LlamaCppDefault,
            _ => return None,
        })
    }

    fn to_json(self) -> Value {
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        match self {
            PreTokenizer::Gpt2 => byte_level(true),
            PreTokenizer::DigitsThenGpt2 => json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
            }),
            PreTokenizer::Llama3 => json!({
                "type": "Sequence",
                "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]
            }),
            PreTokenizer::Qwen2 => json!({
                "type": "Sequence",
                "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]
            }),
            PreTokenizer::LlamaCppDefault => {
                let mut steps: Vec<Value> = LLAMA_CPP_DEFAULT_SPLITS.iter().map(|r| split(r)).collect();
                steps.push(byte_level(false));
                json!({"type": "Sequence", "pretokenizers": steps})
            }
        }
    }

    /// Whether the merges are skipped for words already in the vocabulary (llama.cpp's and HF's
    /// `ignore_merges`, set for Llama 3).
    fn ignore_merges(self) -> bool {
        matches!(self, PreTokenizer::Llama3)
    }
}

/// A GGUF file's byte-level BPE vocabulary and special tokens.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    pub tokens: Vec<String>,
    pub token_types: Vec<i64>,
    pub merges: Vec<(String, String)>,
    pub pre: PreTokenizer,
    pub pre_name: String,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// Reads and validates the `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model = file.require_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(file.error(format!(
                "tokenizer.ggml.model is {model:?}: only byte-level BPE (\"gpt2\") vocabularies can be imported"
            )));
        }
        let pre_name = file.opt_str("tokenizer.ggml.pre")?.unwrap_or("default").to_string();
        let pre = PreTokenizer::from_gguf_name(&pre_name).ok_or_else(|| {
            file.error(format!(
                "tokenizer.ggml.pre is {pre_name:?}, a pre-tokenizer this importer does not know; \
                 supported: default, gpt-2, smollm/starcoder, llama-bpe/llama3, qwen2 families"
            ))
        })?;
        let tokens: Vec<String> = file
            .opt_str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| file.error("metadata key tokenizer.ggml.tokens is missing"))?
            .to_vec();
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            return Err(file.error(format!("tokenizer.ggml.tokens has {} entries", tokens.len())));
        }
        let token_types = match file.opt_i64_array("tokenizer.ggml.token_type")? {
            Some(t) if t.len() == tokens.len() => t,
            Some(t) => {
                return Err(file.error(format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                )));
            }
            None => vec![token_type::NORMAL; tokens.len()],
        };
        let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            if let Some(first) = ids.insert(t.as_str(), id) {
                return Err(file.error(format!(
                    "token {t:?} appears twice in the vocabulary (ids {first} and {id})"
                )));
            }
        }
        let raw_merges = file.opt_str_array("tokenizer.ggml.merges")?.unwrap_or(&[]);
        let mut merges = Vec::with_capacity(raw_merges.len());
        for (rank, m) in raw_merges.iter().enumerate() {
            // Split at the first space after the first character, as llama.cpp does.
            let split = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
            let Some(i) = split else {
                return Err(file.error(format!("merge #{rank} {m:?} is not two tokens separated by a space")));
            };
            let (left, right) = (&m[..i], &m[i + 1..]);
            for part in [left, right] {
                if !ids.contains_key(part) {
                    return Err(file.error(format!(
                        "merge #{rank} {m:?} names {part:?}, which is not in the vocabulary"
                    )));
                }
            }
            let merged = format!("{left}{right}");
            if !ids.contains_key(merged.as_str()) {
                return Err(file.error(format!(
                    "merge #{rank} {m:?} makes {merged:?}, which is not in the vocabulary"
                )));
            }
            merges.push((left.to_string(), right.to_string()));
        }
        let id = |key: &str| -> Result<Option<u32>> {
            match file.opt_u64(key)? {
                None => Ok(None),
                Some(v) if (v as usize) < tokens.len() => Ok(Some(v as u32)),
                Some(v) => Err(file.error(format!(
                    "{key} is {v}, outside the vocabulary of {} tokens",
                    tokens.len()
                ))),
            }
        };
        let vocab = GgufVocab {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: file.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            add_eos: file.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            chat_template: file.opt_str("tokenizer.chat_template")?.map(str::to_string),
            tokens,
            token_types,
            merges,
            pre,
            pre_name,
        };
        if vocab.add_bos && vocab.bos.is_none() {
            return Err(file.error("tokenizer.ggml.add_bos_token is set but there is no bos_token_id"));
        }
        if vocab.add_eos && vocab.eos.is_none() {
            return Err(file.error("tokenizer.ggml.add_eos_token is set but there is no eos_token_id"));
        }
        Ok(vocab)
    }

    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize)).map(String::as_str)
    }

    /// Whether `id` is one of the bos/eos/unk/pad ids.
    fn is_named_special(&self, id: usize) -> bool {
        [self.bos, self.eos, self.unk, self.pad]
            .iter()
            .flatten()
            .any(|&s| s as usize == id)
    }

    /// Tokens HF must treat as added tokens: (id, special). Control and unknown tokens and the named
    /// special ids are special (never split, skipped by `skip_special_tokens`); user-defined tokens
    /// are added but not special.
    pub fn added_tokens(&self) -> Vec<(usize, bool)> {
        self.token_types
            .iter()
            .enumerate()
            .filter_map(|(id, &ty)| {
                if ty == token_type::CONTROL || ty == token_type::UNKNOWN || self.is_named_special(id) {
                    Some((id, true))
                } else if ty == token_type::USER_DEFINED {
                    Some((id, false))
                } else {
                    None
                }
            })
            .collect()
    }

    /// The chat template: the file's, or ChatML.
    pub fn chat_template(&self) -> &str {
        self.chat_template.as_deref().unwrap_or(CHATML_TEMPLATE)
    }

    /// `tokenizer.json` text.
    pub fn tokenizer_json(&self) -> Result<String> {
        let added: Vec<Value> = self
            .added_tokens()
            .into_iter()
            .map(|(id, special)| {
                json!({
                    "id": id,
                    "content": self.tokens[id],
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": special,
                })
            })
            .collect();
        let post_processor = if self.add_bos || self.add_eos {
            self.template_processing()
        } else {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        };
        let doc = TokenizerJson {
            version: "1.0",
            truncation: Value::Null,
            padding: Value::Null,
            added_tokens: added,
            normalizer: Value::Null,
            pre_tokenizer: self.pre.to_json(),
            post_processor,
            decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            model: BpeModel {
                kind: "BPE",
                dropout: None,
                unk_token: None,
                continuing_subword_prefix: None,
                end_of_word_suffix: None,
                fuse_unk: false,
                byte_fallback: false,
                ignore_merges: self.pre.ignore_merges(),
                vocab: OrderedVocab(&self.tokens),
                merges: &self.merges,
            },
        };
        serde_json::to_string_pretty(&doc).map_err(|e| crate::EngineError::Tokenizer(e.to_string()))
    }

    /// `TemplateProcessing` that adds bos and/or eos, as llama.cpp does when `add_bos_token` /
    /// `add_eos_token` is set.
    fn template_processing(&self) -> Value {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = serde_json::Map::new();
        let special = |id: u32, tok: &str| json!({"id": tok, "ids": [id], "tokens": [tok]});
        let bos = self.bos.filter(|_| self.add_bos).zip(self.token(self.bos));
        let eos = self.eos.filter(|_| self.add_eos).zip(self.token(self.eos));
        for (seq, type_id) in [("A", 0), ("B", 1)] {
            let out = if seq == "A" { &mut single } else { &mut pair };
            if let Some((id, tok)) = bos {
                out.push(json!({"SpecialToken": {"id": tok, "type_id": type_id}}));
                specials.insert(tok.to_string(), special(id, tok));
            }
            out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some((id, tok)) = eos {
                out.push(json!({"SpecialToken": {"id": tok, "type_id": type_id}}));
                specials.insert(tok.to_string(), special(id, tok));
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    }

    /// `tokenizer_config.json`, as transformers writes it for a GPT-2 style tokenizer.
    pub fn tokenizer_config(&self, model_max_length: Option<u64>) -> Value {
        let mut decoder = serde_json::Map::new();
        for (id, special) in self.added_tokens() {
            decoder.insert(
                id.to_string(),
                json!({
                    "content": self.tokens[id],
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": special,
                }),
            );
        }
        let template = self.chat_template();
        // The control tokens the chat template itself uses (`<|im_start|>`, `<|im_end|>`, …).
        let additional: Vec<&str> = self
            .added_tokens()
            .into_iter()
            .filter(|&(_, special)| special)
            .map(|(id, _)| self.tokens[id].as_str())
            .filter(|t| template.contains(t))
            .collect();
        let mut config = json!({
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "add_prefix_space": false,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": additional,
            "bos_token": self.token(self.bos),
            "chat_template": template,
            "clean_up_tokenization_spaces": false,
            "eos_token": self.token(self.eos),
            "pad_token": self.token(self.pad),
            "tokenizer_class": "GPT2Tokenizer",
            "unk_token": self.token(self.unk),
            "vocab_size": self.tokens.len(),
        });
        if let (Some(len), Some(obj)) = (model_max_length, config.as_object_mut()) {
            obj.insert("model_max_length".into(), json!(len));
        }
        config
    }

    /// The token ids for `generation_config.json` / `config.json`.
    pub fn special_ids(&self) -> SpecialIds {
        SpecialIds {
            bos: self.bos,
            eos: self.eos,
            pad: self.pad,
        }
    }
}

/// bos / eos / pad ids, as config files carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
}

#[derive(Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Value,
    padding: Value,
    added_tokens: Vec<Value>,
    normalizer: Value,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: BpeModel<'a>,
}

#[derive(Serialize)]
struct BpeModel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: OrderedVocab<'a>,
    merges: &'a [(String, String)],
}

/// The vocabulary as a JSON object in id order (as HF writes it), without building a map.
struct OrderedVocab<'a>(&'a [String]);

impl Serialize for OrderedVocab<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (id, token) in self.0.iter().enumerate() {
            map.serialize_entry(token, &id)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::writer::GgufWriter;
    use crate::gguf::writer::tests_support::tiny_llama_gguf;

    fn tiny_vocab() -> GgufVocab {
        let file = GgufFile::from_bytes("tiny.gguf", tiny_llama_gguf()).unwrap();
        GgufVocab::from_gguf(&file).unwrap()
    }

    fn load(json: &str) -> tokenizers::Tokenizer {
        json.parse::<tokenizers::Tokenizer>()
            .expect("tokenizer.json must load in the tokenizers crate")
    }

    #[test]
    fn tiny_tokenizer_loads_encodes_and_round_trips() {
        let vocab = tiny_vocab();
        let tok = load(&vocab.tokenizer_json().unwrap());
        let id = |s: &str| vocab.tokens.iter().position(|t| t == s).unwrap() as u32;
        let enc = tok.encode("hello world", false).unwrap();
        assert_eq!(enc.get_ids(), [id("hello"), id("Ġworld")]);
        // Digits split one by one (SmolLM's pre-tokenizer); control tokens are never split.
        let enc = tok.encode("<|im_start|>42<|im_end|>", false).unwrap();
        assert_eq!(enc.get_ids(), [1, id("4"), id("2"), 2]);
        for text in [
            "hello world",
            "  tabs\tand\nnewlines ",
            "naïve café 🦀 你好",
            "<|im_start|>user\nhi<|im_end|>",
        ] {
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
        // Special tokens are skipped on request.
        let ids = tok.encode("<|im_start|>hello", false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello");
    }

    #[test]
    fn config_names_the_special_tokens_and_template() {
        let vocab = tiny_vocab();
        let cfg = vocab.tokenizer_config(Some(256));
        assert_eq!(cfg["bos_token"], "<|im_start|>");
        assert_eq!(cfg["eos_token"], "<|im_end|>");
        assert_eq!(cfg["unk_token"], "<|endoftext|>");
        assert_eq!(cfg["chat_template"], CHATML_TEMPLATE);
        assert_eq!(cfg["model_max_length"], 256);
        assert_eq!(cfg["additional_special_tokens"], json!(["<|im_start|>", "<|im_end|>"]));
        assert_eq!(cfg["added_tokens_decoder"]["1"]["special"], true);
    }

    fn vocab_with(edit: impl FnOnce(&mut GgufWriter)) -> Result<GgufVocab> {
        let (tokens, types, merges) = crate::gguf::writer::tests_support::tiny_vocab();
        let mut w = GgufWriter::new();
        w.add_string("tokenizer.ggml.model", "gpt2")
            .add_string_array("tokenizer.ggml.tokens", &tokens)
            .add_i32_array("tokenizer.ggml.token_type", &types)
            .add_u32("tokenizer.ggml.bos_token_id", 1);
        let _ = merges;
        edit(&mut w);
        GgufVocab::from_gguf(&GgufFile::from_bytes("v.gguf", w.to_bytes()).unwrap())
    }

    #[test]
    fn bad_vocabularies_are_clear_errors() {
        let e = vocab_with(|w| {
            w.add_string_array("tokenizer.ggml.merges", &["h e", "zz y"]);
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("merge #1 \"zz y\" names \"zz\""), "{e}");
        let e = vocab_with(|w| {
            w.add_string_array("tokenizer.ggml.merges", &["hello"]);
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("not two tokens"), "{e}");
        let e = vocab_with(|w| {
            w.add_string("tokenizer.ggml.pre", "mystery");
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"mystery\""), "{e}");
        let e = vocab_with(|w| {
            w.add_u32("tokenizer.ggml.eos_token_id", 100_000);
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
    }

    #[test]
    fn add_bos_uses_template_processing() {
        let v = vocab_with(|w| {
            w.add_bool("tokenizer.ggml.add_bos_token", true)
                .add_string_array("tokenizer.ggml.merges", &["h e"]);
        })
        .unwrap();
        let tok = load(&v.tokenizer_json().unwrap());
        let enc = tok.encode("he", true).unwrap();
        assert_eq!(enc.get_ids()[0], 1);
        assert_eq!(enc.get_ids().len(), 2);
        assert_eq!(tok.encode("he", false).unwrap().get_ids().len(), 1);
    }

    /// The imported SmolLM2 tokenizer against llama.cpp's own tokenization of the same GGUF, recorded
    /// by testdata/make_smollm2_tokens.py (which also checks an independent build with the Python
    /// `tokenizers` API agrees). Needs `computepool model fetch smollm2-135m-instruct` to have run.
    #[test]
    fn real_smollm2_tokenizer_matches_llama_cpp() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-135m-instruct");
        let Ok(json) = std::fs::read_to_string(dir.join("tokenizer.json")) else {
            eprintln!(
                "skipping: {} has no imported tokenizer (run `computepool model fetch smollm2-135m-instruct`)",
                dir.display()
            );
            return;
        };
        let tok = load(&json);
        let fixture: Value = serde_json::from_str(include_str!("testdata/smollm2_tokens.json")).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let got = tok.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(got, want, "encode {text:?}");
            assert_eq!(tok.decode(&got, false).unwrap(), text, "decode(encode({text:?}))");
        }
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
        assert_eq!(config["bos_token"], "<|im_start|>");
        assert_eq!(config["eos_token"], "<|im_end|>");
        assert!(config["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    }

    #[test]
    fn every_pre_tokenizer_family_loads() {
        for pre in ["default", "gpt-2", "smollm", "llama-bpe", "qwen2"] {
            let v = vocab_with(|w| {
                w.add_string("tokenizer.ggml.pre", pre);
            })
            .unwrap();
            let tok = load(&v.tokenizer_json().unwrap());
            let text = "It's 2024: héllo  wörld\n\n";
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{pre}");
        }
    }
}
