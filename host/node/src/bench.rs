//! `computepool bench`: llama-bench's protocol on our engine. `pp` is one forward pass over `P` prompt
//! tokens from an empty cache; `tg` is `T` single-token decode steps from an empty cache (with `--batch B`,
//! `B` requests step together and the figure is their aggregate tokens/s). With `--depth D` (llama-bench's
//! `-d`), each run's caches first hold `D` prompt tokens, prefilled untimed, so the figures are those of
//! a conversation `D` tokens in (`pp512 @ d2048`). One warm-up, then `repeats` timed runs; the median,
//! minimum and maximum are reported. Token ids are drawn from a fixed seed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{LoadOptions, ModelSource, StepInput, StepItem};
use computepool_engine::sampling::Rng;
use computepool_engine::DType;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long)]
    model: PathBuf,
    /// Prompt tokens per pp run (0 skips pp).
    #[arg(long, default_value_t = 512)]
    pp: usize,
    /// Generated tokens per tg run (0 skips tg).
    #[arg(long, default_value_t = 128)]
    tg: usize,
    /// Requests decoding together in tg.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long)]
    threads: Option<usize>,
    /// Weight dtype(s), comma-separated: f32,bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Tokens already in each run's cache before it is timed (prefilled untimed): decode and prompt
    /// speed that far into a conversation, where attention reads a cache of that length per token.
    /// One process only.
    #[arg(long, default_value_t = 0, conflicts_with = "shards")]
    depth: usize,
    /// Timed runs per test (after one warm-up).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Run the model as a pipeline of N worker processes on loopback (N >= 1; 1 is one worker serving
    /// the whole model) and measure through the entry's request API, as a client sees it. --threads is
    /// then per worker.
    #[arg(long)]
    shards: Option<usize>,
    /// With --shards: each worker's relative speed, entry first, comma-separated (`1,2` gives the
    /// exit twice the layers of the entry: 10 and 20 of 30). Default: all equal, an even split.
    #[arg(long, value_delimiter = ',', requires = "shards", conflicts_with = "api")]
    shard_speeds: Vec<u64>,
    /// With --shards: what the orchestrator's HTTP API adds, measured against the same pipeline reached
    /// directly, in alternating back-to-back requests (time to first token and decode speed of --tg
    /// tokens; JSON lines). See bench_api.rs.
    #[arg(long, requires = "shards")]
    api: bool,
    /// With --shards: each worker's `--busy-poll-us` (its compute thread polls for the next job this
    /// long before sleeping). Only where the workers' threads together fit the cores. Default: the
    /// worker's own (`worker::default_busy_poll_us`: 0, or 1 ms for 1 shard).
    #[arg(long, requires = "shards", conflicts_with = "api")]
    busy_poll_us: Option<u64>,
    /// With --shards: each worker's `--compute-cpus` (`0` puts every shard's compute on CPU 0: the
    /// placement for one stream at a time, see worker/cpus.rs). Default: wherever the OS puts them.
    #[arg(long, requires = "shards", conflicts_with = "api")]
    compute_cpus: Option<crate::worker::cpus::CpuSet>,
    /// With --shards: each worker's `--keep-cpus-awake` (while it has a live request, `SCHED_IDLE`
    /// spinners keep the CPUs from idling; see worker/keep_awake.rs).
    #[arg(long, requires = "shards", conflicts_with = "api")]
    keep_cpus_awake: bool,
    /// With --shards: the entry and the exit split the output head (each worker's `--split-head`: both
    /// compute half the vocabulary's logits at once; see worker/engine_loop.rs).
    #[arg(long, requires = "shards", conflicts_with = "api")]
    split_head: bool,
    /// With --shards: how frames travel between the workers: `iroh` (QUIC), or `axl` (each worker
    /// through a stand-in Gensyn AXL daemon in this process: the bridge's own cost, without a mesh).
    #[arg(long, value_enum, requires = "shards", conflicts_with = "api", default_value_t = crate::worker::FrameTransport::Iroh)]
    transport: crate::worker::FrameTransport,
}

#[derive(Serialize)]
struct BenchResult {
    engine: &'static str,
    model: String,
    dtype: String,
    test: String,
    threads: usize,
    batch: usize,
    repeats: usize,
    tokens_per_s_median: f64,
    tokens_per_s_min: f64,
    tokens_per_s_max: f64,
    weight_bytes: usize,
    bytes_read_per_token: usize,
    /// Pipeline runs: shards, and each worker's resident memory and weight bytes once loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    shards: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    worker_rss_bytes: Vec<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    worker_weight_bytes: Vec<u64>,
    /// Pipeline runs: the workers' `--busy-poll-us` (0: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    busy_poll_us: Option<u64>,
    /// Pipeline runs: the workers' `--compute-cpus`, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    compute_cpus: Option<String>,
    /// Pipeline runs: whether the workers kept their CPUs awake (`--keep-cpus-awake`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    keep_cpus_awake: bool,
    /// Pipeline runs: whether the entry and the exit split the output head (`--split-head`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    split_head: bool,
    /// Pipeline runs: how frames travelled between the workers (`iroh`, or `axl` through stand-in daemons).
    #[serde(skip_serializing_if = "Option::is_none")]
    transport: Option<&'static str>,
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    (median, v[0], v[v.len() - 1])
}

fn random_tokens(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeats > 0, "--repeats must be at least 1");
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    if let (Some(shards), true) = (args.shards, args.api) {
        let threads = args.threads.unwrap_or_else(crate::generate::default_threads);
        return crate::bench_api::run(&args.model, shards, &args.dtype, threads, args.tg, args.repeats);
    }
    if args.shards.is_some() {
        return run_sharded(args);
    }
    let threads = args.threads.unwrap_or_else(crate::generate::default_threads);
    let backend = Arc::new(CpuBackend::new(threads));
    let model_name = args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !args.json {
        println!("| model | dtype | test | threads | batch | t/s (median) | min–max |");
        println!("|---|---|---|---|---|---|---|");
    }
    for dtype in args.dtype.split(',') {
        let dtype: DType = dtype.trim().parse()?;
        let shard = ModelSource::from_path(&args.model)?.load_shard(&LoadOptions { dtype, range: None, progress: !args.json, split_head: false }, backend.clone())?;
        let vocab = shard.config().vocab_size;
        let context = shard.config().max_position_embeddings;
        anyhow::ensure!(
            args.depth + args.pp.max(args.tg) <= context,
            "--depth {} plus {} tokens runs past the model's context of {context} positions",
            args.depth,
            args.pp.max(args.tg)
        );
        let mut rng = Rng::new(1234);
        let history = random_tokens(&mut rng, args.depth, vocab);
        // A fresh cache holding the `--depth` tokens, prefilled in one pass as a prompt is.
        let cache_at_depth = || -> anyhow::Result<_> {
            let mut cache = shard.new_cache();
            if !history.is_empty() {
                shard.forward(StepInput::Tokens(&history), &mut cache)?;
            }
            Ok(cache)
        };
        let at_depth = |test: String| if args.depth > 0 { format!("{test} @ d{}", args.depth) } else { test };
        let mut tests: Vec<(String, usize, Vec<f64>)> = Vec::new();
        if args.pp > 0 {
            let prompt = random_tokens(&mut rng, args.pp, vocab);
            let mut runs = Vec::new();
            for rep in 0..=args.repeats {
                let mut cache = cache_at_depth()?;
                let start = Instant::now();
                shard.forward(StepInput::Tokens(&prompt), &mut cache)?;
                let secs = start.elapsed().as_secs_f64();
                if rep > 0 {
                    runs.push(args.pp as f64 / secs);
                }
            }
            tests.push((at_depth(format!("pp{}", args.pp)), 1, runs));
        }
        if args.tg > 0 {
            let tokens: Vec<Vec<u32>> = (0..args.batch).map(|_| random_tokens(&mut rng, args.tg, vocab)).collect();
            let mut runs = Vec::new();
            for rep in 0..=args.repeats {
                let mut caches = (0..args.batch).map(|_| cache_at_depth()).collect::<anyhow::Result<Vec<_>>>()?;
                let start = Instant::now();
                for step in 0..args.tg {
                    let mut items: Vec<StepItem<'_>> = caches
                        .iter_mut()
                        .zip(&tokens)
                        .map(|(cache, t)| StepItem { input: StepInput::Tokens(&t[step..step + 1]), cache })
                        .collect();
                    shard.forward_batch(&mut items)?;
                }
                let secs = start.elapsed().as_secs_f64();
                if rep > 0 {
                    runs.push((args.tg * args.batch) as f64 / secs);
                }
            }
            tests.push((at_depth(format!("tg{}", args.tg)), args.batch, runs));
        }
        for (test, batch, runs) in tests {
            let (median, min, max) = stats(runs);
            let result = BenchResult {
                engine: "computepool",
                model: model_name.clone(),
                dtype: dtype.to_string(),
                test,
                threads,
                batch,
                repeats: args.repeats,
                tokens_per_s_median: median,
                tokens_per_s_min: min,
                tokens_per_s_max: max,
                weight_bytes: shard.weight_bytes(),
                bytes_read_per_token: shard.bytes_read_per_token(),
                shards: None,
                busy_poll_us: None,
                compute_cpus: None,
                keep_cpus_awake: false,
                split_head: false,
                transport: None,
                worker_rss_bytes: Vec::new(),
                worker_weight_bytes: Vec::new(),
            };
            print_result(&result, args.json)?;
        }
    }
    Ok(())
}

fn print_result(result: &BenchResult, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(result)?);
    } else {
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1}–{:.1} |",
            result.model,
            result.dtype,
            result.test,
            result.threads,
            result.batch,
            result.tokens_per_s_median,
            result.tokens_per_s_min,
            result.tokens_per_s_max
        );
    }
    Ok(())
}

/// The same tests through a local pipeline of worker processes. `pp`: a prompt of P tokens and one
/// generated token, timed from sending the request to the first token (prefill through every shard);
/// `tg`: a one-token prompt and T generated tokens (through EOS), timed from sending to the last
/// token; with `--batch B`, B such requests at once and their aggregate tokens/s.
fn run_sharded(args: BenchArgs) -> anyhow::Result<()> {
    use crate::pipeline::{LocalPipeline, PipelineOptions};
    use computepool_entry_api::GenerateRequest;

    let shards = args.shards.expect("checked by the caller");
    // Each worker's own default, given explicitly so that the JSON says what ran.
    let busy_poll_us = args.busy_poll_us.unwrap_or_else(|| crate::worker::default_busy_poll_us(shards == 1));
    let mut worker_args = vec!["--busy-poll-us".to_string(), busy_poll_us.to_string()];
    if let Some(cpus) = &args.compute_cpus {
        cpus.check_allowed().map_err(|e| anyhow::anyhow!("--compute-cpus {cpus}: {e}"))?;
        worker_args.extend(["--compute-cpus".to_string(), cpus.to_string()]);
    }
    if args.keep_cpus_awake {
        worker_args.push("--keep-cpus-awake".to_string());
    }
    if args.split_head {
        worker_args.push("--split-head".to_string());
    }
    let threads = args.threads.unwrap_or_else(crate::generate::default_threads);
    let model_name = args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let config = ModelSource::from_path(&args.model)?.config()?;
    if !args.json {
        println!("| model | dtype | test | threads/worker | batch | t/s (median) | min–max |");
        println!("|---|---|---|---|---|---|---|");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    for dtype in args.dtype.split(',') {
        let dtype = dtype.trim().to_string();
        let options = PipelineOptions {
            replicas: 1,
            model: args.model.clone(),
            shards,
            speeds: args.shard_speeds.clone(),
            dtype: dtype.clone(),
            threads,
            peer_timeout_ms: 1000,
            devices: Vec::new(),
            orchestrator: None,
            client_key: None,
            samplers: Default::default(),
            transport: args.transport,
            payouts: Vec::new(),
            worker_args: vec![worker_args.clone(); shards],
        };
        let pipeline = LocalPipeline::start(&options)?;
        let mut rng = Rng::new(1234);
        let vocab = config.vocab_size;
        let request = |tokens: Vec<u32>, max_tokens: usize| {
            let mut r = GenerateRequest::text(String::new(), max_tokens);
            r.prompt = None;
            r.prompt_tokens = Some(tokens);
            r.ignore_eos = true;
            r
        };
        let mut tests: Vec<(String, usize, Vec<f64>)> = Vec::new();
        runtime.block_on(async {
            let client = pipeline.client().await?;
            // Wait for the ring to come up (and warm it up) with one short request.
            client
                .generate_when_ready(&request(vec![1], 2), std::time::Duration::from_secs(60), |_| {})
                .await?
                .map_err(|e| anyhow::anyhow!("warm-up request failed: {e}"))?;
            if args.pp > 0 {
                let prompt = random_tokens(&mut rng, args.pp, vocab);
                let mut runs = Vec::new();
                for rep in 0..=args.repeats {
                    let done = client.generate(&request(prompt.clone(), 1), |_| {}).await?.map_err(anyhow::Error::new)?;
                    if rep > 0 {
                        runs.push(args.pp as f64 / done.time_to_first_token.as_secs_f64());
                    }
                }
                tests.push((format!("pp{}", args.pp), 1, runs));
            }
            if args.tg > 0 {
                let starts: Vec<u32> = random_tokens(&mut rng, args.batch, vocab);
                let mut runs = Vec::new();
                for rep in 0..=args.repeats {
                    let started = Instant::now();
                    let all = starts.iter().map(|&t| {
                        let req = request(vec![t], args.tg);
                        let client = &client;
                        async move { client.generate(&req, |_| {}).await }
                    });
                    for outcome in futures_join_all(all).await {
                        let done = outcome?.map_err(anyhow::Error::new)?;
                        anyhow::ensure!(done.tokens.len() == args.tg, "a tg request stopped early");
                    }
                    if rep > 0 {
                        runs.push((args.tg * args.batch) as f64 / started.elapsed().as_secs_f64());
                    }
                }
                tests.push((format!("tg{}", args.tg), args.batch, runs));
            }
            client.close().await;
            anyhow::Ok(())
        })?;
        let weight_bytes: u64 = pipeline.ready.iter().map(|r| r.weight_bytes).sum();
        for (test, batch, runs) in tests {
            let (median, min, max) = stats(runs);
            let result = BenchResult {
                engine: "computepool-pipeline",
                model: model_name.clone(),
                dtype: dtype.clone(),
                test,
                threads,
                batch,
                repeats: args.repeats,
                tokens_per_s_median: median,
                tokens_per_s_min: min,
                tokens_per_s_max: max,
                weight_bytes: weight_bytes as usize,
                bytes_read_per_token: 0,
                shards: Some(shards),
                busy_poll_us: Some(busy_poll_us),
                compute_cpus: args.compute_cpus.as_ref().map(|c| c.to_string()),
                keep_cpus_awake: args.keep_cpus_awake,
                split_head: args.split_head,
                transport: Some(args.transport.name()),
                worker_rss_bytes: pipeline.ready.iter().map(|r| r.rss_bytes.unwrap_or(0)).collect(),
                worker_weight_bytes: pipeline.ready.iter().map(|r| r.weight_bytes).collect(),
            };
            print_result(&result, args.json)?;
        }
    }
    Ok(())
}

/// Runs futures concurrently on the current task and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut outputs: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if outputs[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => outputs[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("every future finished")).collect()
}
