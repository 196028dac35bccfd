//! `computepool generate`: one prompt through the whole model in this process.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::generate::{self, GenerateRequest};
use computepool_engine::model::{LoadOptions, Shard};
use computepool_engine::sampling::SamplingParams;
use computepool_engine::tokenizer::{ChatMessage, Tokenizer};
use computepool_engine::DType;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face layout model directory.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message for --chat.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Weight dtype: f32 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the token ids and timings as JSON on stderr at the end.
    #[arg(long)]
    json: bool,
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let dtype: DType = args.dtype.parse()?;
    let backend = Arc::new(CpuBackend::new(args.threads.unwrap_or_else(default_threads)));
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let shard = Shard::load(&args.model, &LoadOptions { dtype, range: None, progress: true }, backend)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", &args.prompt));
        let text = tokenizer.apply_chat_template(&messages, true)?;
        tokenizer.encode(&text, false)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    let req = GenerateRequest {
        prompt,
        params: SamplingParams { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed },
        max_new_tokens: args.max_tokens,
        stop_strings: args.stop.clone(),
        stop_token_ids: Vec::new(),
    };
    let mut stdout = std::io::stdout().lock();
    let generation = generate::generate(&shard, &tokenizer, &req, |piece| {
        // A closed stdout (e.g. piped into `head`) ends the output, not the process.
        let _ = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush());
    })?;
    let _ = writeln!(stdout);
    if args.json {
        let decode_tps = generation.tokens.len() as f64 / generation.decode_time.as_secs_f64().max(1e-9);
        eprintln!(
            "{}",
            serde_json::json!({
                "prompt_tokens": generation.prompt_tokens,
                "tokens": generation.tokens,
                "finish_reason": generation.finish_reason.as_openai(),
                "prefill_ms": generation.prefill_time.as_secs_f64() * 1e3,
                "decode_tokens_per_s": decode_tps,
            })
        );
    }
    Ok(())
}
