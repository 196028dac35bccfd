//! `computepool bench`: llama-bench's protocol on our engine. `pp` is one forward pass over `P` prompt
//! tokens from an empty cache; `tg` is `T` single-token decode steps from an empty cache (with `--batch B`,
//! `B` requests step together and the figure is their aggregate tokens/s). One warm-up, then `repeats`
//! timed runs; the median, minimum and maximum are reported. Token ids are drawn from a fixed seed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{LoadOptions, Shard, StepInput, StepItem};
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
    /// Timed runs per test (after one warm-up).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
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
    let threads = args.threads.unwrap_or_else(crate::generate::default_threads);
    let backend = Arc::new(CpuBackend::new(threads));
    let model_name = args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !args.json {
        println!("| model | dtype | test | threads | batch | t/s (median) | min–max |");
        println!("|---|---|---|---|---|---|---|");
    }
    for dtype in args.dtype.split(',') {
        let dtype: DType = dtype.trim().parse()?;
        let shard = Shard::load(&args.model, &LoadOptions { dtype, range: None, progress: !args.json }, backend.clone())?;
        let vocab = shard.config().vocab_size;
        let mut rng = Rng::new(1234);
        let mut tests: Vec<(String, usize, Vec<f64>)> = Vec::new();
        if args.pp > 0 {
            let prompt = random_tokens(&mut rng, args.pp, vocab);
            let mut runs = Vec::new();
            for rep in 0..=args.repeats {
                let mut cache = shard.new_cache();
                let start = Instant::now();
                shard.forward(StepInput::Tokens(&prompt), &mut cache)?;
                let secs = start.elapsed().as_secs_f64();
                if rep > 0 {
                    runs.push(args.pp as f64 / secs);
                }
            }
            tests.push((format!("pp{}", args.pp), 1, runs));
        }
        if args.tg > 0 {
            let tokens: Vec<Vec<u32>> = (0..args.batch).map(|_| random_tokens(&mut rng, args.tg, vocab)).collect();
            let mut runs = Vec::new();
            for rep in 0..=args.repeats {
                let mut caches: Vec<_> = (0..args.batch).map(|_| shard.new_cache()).collect();
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
            tests.push((format!("tg{}", args.tg), args.batch, runs));
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
            };
            if args.json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                println!(
                    "| {} | {} | {} | {} | {} | {:.1} | {:.1}–{:.1} |",
                    result.model, result.dtype, result.test, threads, batch, median, min, max
                );
            }
        }
    }
    Ok(())
}
