//! `computepool generate`: one prompt through the whole model in this process, or through a pipeline:
//! a local one of `--shards N` worker processes, or a running one given by `--topology` and `--key`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::generate::{self, GenerateRequest};
use computepool_engine::model::{LoadOptions, ModelSource};
use computepool_engine::sampling::SamplingParams;
use computepool_engine::tokenizer::ChatMessage;
use computepool_axl::transport::{Topology, read_secret_key};
use computepool_engine::DType;
use std::time::Duration;

use computepool_entry_api as api;
use computepool_entry_api::client::EntryClient;

use crate::pipeline::{LocalPipeline, PipelineOptions};
use crate::worker::FrameTransport;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face layout model directory (for a running pipeline: only needed with --shards).
    #[arg(long, required_unless_present = "topology")]
    model: Option<PathBuf>,
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
    /// Keep generating through end-of-sequence tokens (exactly --max-tokens tokens).
    #[arg(long)]
    ignore_eos: bool,
    /// Print the token ids and timings as JSON on stderr at the end.
    #[arg(long)]
    json: bool,
    /// Run the model as a pipeline of N worker processes on this machine (N >= 1; 1 is one worker
    /// serving the whole model), split evenly by layers (or by --shard-speeds).
    #[arg(long, conflicts_with = "topology")]
    shards: Option<usize>,
    /// With --shards: each worker's relative speed, entry first, comma-separated (`1,2` gives the
    /// exit twice the layers of the entry: 10 and 20 of 30). Default: all equal, an even split.
    #[arg(long, value_delimiter = ',', requires = "shards")]
    shard_speeds: Vec<u64>,
    /// Submit to a running pipeline: its topology file (this client's key must be listed in `clients`).
    #[arg(long, requires = "key")]
    topology: Option<PathBuf>,
    /// This client's secret key file (with --topology).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The request's id (1–128 of `A-Z a-z 0-9 . _ : -`), which every shard's log names; default: the
    /// entry makes one. An id may be used again once its request is over, not while it runs.
    #[arg(long, requires = "topology")]
    request_id: Option<String>,
    /// How long to retry while the pipeline reports it is not ready (workers still connecting), in
    /// seconds; 0 fails at once.
    #[arg(long, default_value_t = 30)]
    wait_ready_s: u64,
    /// A neighbour silent for this long is gone, in ms (with --shards).
    #[arg(long, default_value_t = 1000)]
    peer_timeout_ms: u64,
    /// With --shards: where each worker computes, in shard order, comma-separated (`cuda,cpu` puts the
    /// entry on the GPU and the exit on the CPU). One entry applies to every shard. Default: cpu.
    #[arg(long, value_delimiter = ',', requires = "shards")]
    devices: Vec<String>,
    /// With --shards: how frames travel between the workers: `iroh` (QUIC), or `axl` (each worker
    /// through a stand-in Gensyn AXL daemon this process runs, which speaks the daemon's HTTP API).
    #[arg(long, value_enum, default_value_t = FrameTransport::Iroh, requires = "shards")]
    transport: FrameTransport,
    /// With --shards: the entry and the exit split the output head (`worker --split-head`).
    #[arg(long, requires = "shards")]
    split_head: bool,
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.shards.is_some() || args.topology.is_some() {
        return run_pipeline(args);
    }
    let dtype: DType = args.dtype.parse()?;
    let model = args.model.clone().context("--model is required")?;
    let backend = Arc::new(CpuBackend::new(args.threads.unwrap_or_else(default_threads)));
    let source = ModelSource::from_path(&model)?;
    let tokenizer = source.tokenizer()?;
    let shard = source
        .load_shard(&LoadOptions { dtype, range: None, progress: true, split_head: false }, backend)
        .with_context(|| format!("loading {}", model.display()))?;
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
        params: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            ..Default::default()
        },
        max_new_tokens: args.max_tokens,
        stop_strings: args.stop.clone(),
        stop_token_ids: Vec::new(),
        ignore_eos: args.ignore_eos,
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

/// The request this command's flags describe, for the entry shard's API.
fn pipeline_request(args: &GenerateArgs) -> api::GenerateRequest {
    let mut req = api::GenerateRequest::text(args.prompt.clone(), args.max_tokens);
    if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(api::Message { role: "system".into(), content: system.clone() });
        }
        messages.push(api::Message { role: "user".into(), content: args.prompt.clone() });
        req.prompt = None;
        req.messages = Some(messages);
    }
    req.temperature = args.temperature;
    req.top_p = args.top_p;
    req.top_k = u32::try_from(args.top_k).unwrap_or(u32::MAX);
    req.seed = args.seed;
    req.stop = args.stop.clone();
    req.ignore_eos = args.ignore_eos;
    req.id = args.request_id.clone();
    req
}

fn run_pipeline(args: GenerateArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    // The local pipeline (if any) lives until the end of this function, so its workers are stopped
    // on every path out of it.
    let pipeline = match args.shards {
        Some(n) => {
            let model = args.model.clone().context("--model is required with --shards")?;
            let threads = args.threads.unwrap_or_else(default_threads);
            let options = PipelineOptions {
                replicas: 1,
                model,
                shards: n,
                speeds: args.shard_speeds.clone(),
                dtype: args.dtype.clone(),
                threads,
                peer_timeout_ms: args.peer_timeout_ms,
                devices: args.devices.clone(),
                orchestrator: None,
                client_key: None,
                samplers: Default::default(),
                transport: args.transport,
                payouts: Vec::new(),
                worker_args: if args.split_head { vec![vec!["--split-head".to_string()]; n] } else { Vec::new() },
            };
            Some(LocalPipeline::start(&options)?)
        }
        None => None,
    };
    runtime.block_on(async {
        let client = match (&pipeline, &args.topology, &args.key) {
            (Some(p), _, _) => p.client().await?,
            (None, Some(topology), Some(key)) => {
                let topology = Topology::from_file(topology)?;
                let key = read_secret_key(key)?;
                EntryClient::connect(key, topology.entry()).await?
            }
            _ => anyhow::bail!("give --shards N, or --topology and --key"),
        };
        let req = pipeline_request(&args);
        let mut stdout = std::io::stdout().lock();
        let outcome = client
            .generate_when_ready(&req, Duration::from_secs(args.wait_ready_s), |event| {
                if let api::Event::Token { text, .. } = event {
                    let _ = stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush());
                }
            })
            .await;
        let _ = writeln!(stdout);
        client.close().await;
        let completion = outcome?.map_err(|e| anyhow::anyhow!("the request failed: {e}"))?;
        if args.json {
            let decode_tps =
                completion.tokens.len().saturating_sub(1) as f64 / completion.decode_time.as_secs_f64().max(1e-9);
            let mut report = serde_json::json!({
                "id": completion.id,
                "text": completion.text,
                "prompt_tokens": completion.prompt_tokens,
                "tokens": completion.tokens,
                "finish_reason": completion.finish_reason,
                "time_to_first_token_ms": completion.time_to_first_token.as_secs_f64() * 1e3,
                "decode_tokens_per_s": decode_tps,
            });
            if let Some(pipeline) = &pipeline {
                // Each local worker's layers, entry first, as it reported them when ready.
                report["layers"] = pipeline.ready.iter().map(|w| w.layers.clone()).collect::<Vec<_>>().into();
                if let Some(messages) = pipeline.axl_messages() {
                    report["axl_messages"] = messages.into();
                }
            }
            eprintln!("{report}");
        }
        Ok(())
    })
}
