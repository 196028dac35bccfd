//! Decode and prompt speed of GGUF files loaded natively (weights kept quantized), llama-bench style:
//! `pp` prompt tokens in one forward pass, then `tg` greedy decode steps, per file, repeated.
//!
//! ```text
//! cargo run --release -p computepool-engine --example gguf_speed -- FILE.gguf [FILE.gguf...] \
//!     [--threads 2] [--pp 128] [--tg 64] [--reps 3]
//! ```
//! Files are run in turn within each repetition (ABAB…), so a change in the machine's load falls on
//! all of them alike. Reported: median [min–max] tokens per second over the repetitions. Indicative
//! only on a shared machine: compare files within one run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{LoadOptions, Shard, StepInput, StepOutput};
use computepool_engine::sampling::argmax;

fn logits(out: StepOutput) -> Result<Vec<f32>> {
    match out {
        StepOutput::Logits(l) => Ok(l),
        StepOutput::Hidden(_) | StepOutput::Normed(_) => bail!("a whole model returns logits"),
    }
}

fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!("{:.1} [{:.1}–{:.1}]", v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() -> Result<()> {
    let (mut files, mut threads, mut pp, mut tg, mut reps) = (Vec::new(), 2usize, 128usize, 64usize, 3usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize> { args.next().context(format!("{name} N"))?.parse().context(name.to_string()) };
        match a.as_str() {
            "--threads" => threads = num("--threads")?,
            "--pp" => pp = num("--pp")?,
            "--tg" => tg = num("--tg")?,
            "--reps" => reps = num("--reps")?,
            f if !f.starts_with("--") => files.push(PathBuf::from(f)),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if files.is_empty() {
        bail!("usage: gguf_speed FILE.gguf [FILE.gguf...] [--threads N] [--pp N] [--tg N] [--reps N]");
    }
    let backend = Arc::new(CpuBackend::new(threads));
    let shards: Vec<Shard> = files
        .iter()
        .map(|f| Shard::load_gguf(f, &LoadOptions::default(), backend.clone()).with_context(|| format!("loading {}", f.display())))
        .collect::<Result<_>>()?;
    let vocab = shards[0].config().vocab_size as u32;
    let prompt: Vec<u32> = (0..pp as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let (mut pp_rates, mut tg_rates) = (vec![Vec::new(); files.len()], vec![Vec::new(); files.len()]);
    for _ in 0..reps {
        for (i, shard) in shards.iter().enumerate() {
            let mut cache = shard.new_cache();
            let t = Instant::now();
            let out = shard.forward(StepInput::Tokens(&prompt), &mut cache)?;
            pp_rates[i].push(pp as f64 / t.elapsed().as_secs_f64());
            let mut next = argmax(&logits(out)?);
            let mut cache = shard.new_cache();
            shard.forward(StepInput::Tokens(&prompt[..8]), &mut cache)?;
            let t = Instant::now();
            for _ in 0..tg {
                let out = shard.forward(StepInput::Tokens(&[next]), &mut cache)?;
                next = argmax(&logits(out)?);
            }
            tg_rates[i].push(tg as f64 / t.elapsed().as_secs_f64());
        }
    }
    println!("| file | weights MB | pp{pp} tok/s | tg{tg} tok/s |");
    println!("|---|---|---|---|");
    for (i, f) in files.iter().enumerate() {
        let name = f.file_name().map_or_else(|| f.display().to_string(), |n| n.to_string_lossy().into_owned());
        println!(
            "| {name} | {:.1} | {} | {} |",
            shards[i].weight_bytes() as f64 / 1e6,
            stats(pp_rates[i].clone()),
            stats(tg_rates[i].clone())
        );
    }
    Ok(())
}
