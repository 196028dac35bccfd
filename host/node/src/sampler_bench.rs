//! `computepool plugin bench`: what a sampler plugin costs per token against native sampling, beside a
//! single-stream decode step of the model, all measured in one run, in alternating rounds (each round
//! times every variant back to back, so a ratio compares moments seconds apart on a shared machine).
//!
//! Variants per vocabulary: native greedy (`sampling::argmax`) and native top-p (the engine's `Sampler`,
//! temperature 0.8, top-p 0.95), the greedy and top-p plugins with the production engine (fuel metered),
//! and the top-p plugin on an engine without fuel metering — the most that any cheaper bound (epoch
//! deadlines) could save. A plugin call's time includes copying the logits into the guest. The decode step
//! is the mean of `--tg` single-token steps from an empty cache (`computepool bench`'s tg). The logits are
//! the model's own after a short prompt (top-p's cost grows with the nucleus: flat rows cost more).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use computepool_engine::DType;
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{LoadOptions, ModelSource, StepInput};
use computepool_engine::sampling::{Rng, Sampler, SamplingParams, argmax};
use computepool_plugin_host::{EngineSettings, HostConfig, PluginHost, RequestRandom, SampleInput, SamplerPlugin};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct SamplerBenchArgs {
    /// The model whose decode step is the yardstick (SmolLM2).
    #[arg(long)]
    model: PathBuf,
    /// Folder holding the greedy and top-p plugins (their ids `greedy` and `top-p`).
    #[arg(long, default_value = "plugins/samplers")]
    plugins: PathBuf,
    /// Vocabulary sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [49_152usize, 128_256])]
    vocab: Vec<usize>,
    /// Compute threads of the decode step.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Decode steps per round.
    #[arg(long, default_value_t = 64)]
    tg: usize,
    /// Sampling calls per variant per round.
    #[arg(long, default_value_t = 100)]
    calls: usize,
    /// Timed rounds (after one warm-up round).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    test: &'static str,
    sampler: String,
    vocab: usize,
    rounds: usize,
    us_per_token_median: f64,
    us_per_token_min: f64,
    us_per_token_max: f64,
    /// Per round: this variant's per-token time over the decode step's, in percent.
    share_of_decode_step_pct_median: f64,
    share_of_decode_step_pct_min: f64,
    share_of_decode_step_pct_max: f64,
    /// Fuel one call burned (metered plugins).
    #[serde(skip_serializing_if = "Option::is_none")]
    fuel_per_call: Option<u64>,
    decode_step_ms_median: f64,
    threads: usize,
    dtype: String,
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    (median, v[0], v[n - 1])
}

fn load(settings: EngineSettings, dir: &std::path::Path) -> anyhow::Result<(Arc<SamplerPlugin>, Arc<SamplerPlugin>)> {
    let host = PluginHost::new(HostConfig { engine: settings, ..HostConfig::default() })?;
    // Others in the folder (say, one needing a grant) do not matter here; the two measured must load.
    let report = host.load_dir(dir);
    for refusal in &report.refused {
        tracing::debug!(dir = %refusal.dir.display(), error = %refusal.error, "plugin refused");
    }
    let get = |id: &str| host.sampler(id).with_context(|| format!("no sampler `{id}` under {}", dir.display()));
    Ok((get("greedy")?, get("top-p")?))
}

const TOP_P: SamplingParams =
    SamplingParams { temperature: 0.8, top_k: 0, top_p: 0.95, min_p: 0.0, repetition_penalty: 1.0, presence_penalty: 0.0, frequency_penalty: 0.0, seed: 7 };

fn plugin_params(p: &SamplingParams) -> computepool_plugin_host::SamplingParams {
    computepool_plugin_host::SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as u32,
        top_p: p.top_p,
        seed: p.seed,
        ..Default::default()
    }
}

pub fn run(args: SamplerBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds > 0 && args.calls > 0 && args.tg > 0, "--rounds, --calls and --tg must be at least 1");
    let (greedy, top_p) = load(EngineSettings::default(), &args.plugins)?;
    let (_, top_p_unmetered) = load(EngineSettings { fuel: false, ..EngineSettings::default() }, &args.plugins)?;

    let dtype: DType = args.dtype.parse()?;
    let backend = Arc::new(CpuBackend::new(args.threads));
    let shard = ModelSource::from_path(&args.model)?
        .load_shard(&LoadOptions { dtype, range: None, progress: false, split_head: false }, backend)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let model_vocab = shard.config().vocab_size;
    let mut rng = Rng::new(99);
    let tokens: Vec<u32> = (0..args.tg).map(|_| (rng.next_u64() % model_vocab as u64) as u32).collect();
    // The logits sampled are the model's own, after a short story prompt: a peaked head and a long tail,
    // as sampling sees them. Another vocabulary size gets the model's logits and then the same values
    // lowered by 10 for the extra entries (more tail, no new head).
    let source = ModelSource::from_path(&args.model)?;
    let prompt = source.tokenizer()?.encode("Once upon a time, in a small village by the sea,", true)?;
    let computepool_engine::model::StepOutput::Logits(out) = shard.forward(StepInput::Tokens(&prompt), &mut shard.new_cache())?
    else {
        anyhow::bail!("the whole model's step gives logits");
    };
    let real = &out[out.len() - model_vocab..];
    let logits: Vec<Vec<f32>> = args
        .vocab
        .iter()
        .map(|&v| (0..v).map(|i| real[i % model_vocab] - if i < model_vocab { 0.0 } else { 10.0 }).collect())
        .collect();

    let variants = ["native greedy", "plugin greedy", "native top-p", "plugin top-p", "plugin top-p (no fuel)"];
    // [variant][vocab] → per-round µs per token; decode → per-round ms per step.
    let mut times = vec![vec![Vec::new(); args.vocab.len()]; variants.len()];
    let mut fuel = vec![vec![None; args.vocab.len()]; variants.len()];
    let mut decode = Vec::new();
    for round in 0..=args.rounds {
        let mut cache = shard.new_cache();
        let start = Instant::now();
        for t in &tokens {
            shard.forward(StepInput::Tokens(std::slice::from_ref(t)), &mut cache)?;
        }
        let step_ms = start.elapsed().as_secs_f64() * 1e3 / args.tg as f64;
        for (vi, logits) in logits.iter().enumerate() {
            let mut sink = 0u64;
            for (k, variant) in variants.iter().enumerate() {
                let history = [1u32, 2, 3];
                let start = Instant::now();
                let mut last_fuel = None;
                match *variant {
                    "native greedy" => (0..args.calls).for_each(|_| sink += u64::from(argmax(logits))),
                    "native top-p" => {
                        let mut sampler = Sampler::new(TOP_P)?;
                        (0..args.calls).for_each(|_| sink += u64::from(sampler.sample(logits)));
                    }
                    _ => {
                        let (plugin, params) = match *variant {
                            "plugin greedy" => (&greedy, SamplingParams::default()),
                            "plugin top-p" => (&top_p, TOP_P),
                            _ => (&top_p_unmetered, TOP_P),
                        };
                        let mut random = RequestRandom::new(params.seed);
                        let input = SampleInput { logits, history: &history, generated: 0, params: plugin_params(&params) };
                        for _ in 0..args.calls {
                            let (token, used) = plugin.sample_metered(&mut random, &input)?;
                            sink += u64::from(token);
                            last_fuel = Some(used).filter(|&f| f > 0);
                        }
                    }
                }
                let us = start.elapsed().as_secs_f64() * 1e6 / args.calls as f64;
                if round > 0 {
                    times[k][vi].push(us);
                    fuel[k][vi] = last_fuel;
                }
            }
            std::hint::black_box(sink);
        }
        if round > 0 {
            decode.push(step_ms);
        }
    }

    let (decode_median, decode_min, decode_max) = stats(decode.clone());
    if !args.json {
        println!(
            "decode step ({} {}, {} threads, tg{}): {decode_median:.2} ms median ({decode_min:.2}–{decode_max:.2}), {} rounds",
            args.model.display(),
            args.dtype,
            args.threads,
            args.tg,
            args.rounds
        );
        println!("| sampler | vocab | µs/token (median) | min–max | % of decode step (median, min–max) | fuel/call |");
        println!("|---|---|---|---|---|---|");
    }
    for (k, variant) in variants.iter().enumerate() {
        for (vi, &vocab) in args.vocab.iter().enumerate() {
            let per_round = &times[k][vi];
            let shares: Vec<f64> = per_round.iter().zip(&decode).map(|(us, ms)| us / (ms * 1e3) * 100.0).collect();
            let (median, min, max) = stats(per_round.clone());
            let (share, share_min, share_max) = stats(shares);
            let row = Row {
                test: "sampler",
                sampler: variant.to_string(),
                vocab,
                rounds: args.rounds,
                us_per_token_median: median,
                us_per_token_min: min,
                us_per_token_max: max,
                share_of_decode_step_pct_median: share,
                share_of_decode_step_pct_min: share_min,
                share_of_decode_step_pct_max: share_max,
                fuel_per_call: fuel[k][vi],
                decode_step_ms_median: decode_median,
                threads: args.threads,
                dtype: args.dtype.clone(),
            };
            if args.json {
                println!("{}", serde_json::to_string(&row)?);
            } else {
                println!(
                    "| {variant} | {vocab} | {median:.1} | {min:.1}–{max:.1} | {share:.2}% ({share_min:.2}–{share_max:.2}) | {} |",
                    row.fuel_per_call.map_or("–".to_string(), |f| f.to_string())
                );
            }
        }
    }
    Ok(())
}
