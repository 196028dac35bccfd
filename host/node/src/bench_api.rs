//! `computepool bench --shards N --api`: what the orchestrator's HTTP API adds to time to first token
//! and to decode speed, against the same pipeline reached directly through the entry's request API.
//! One pipeline of worker processes and one in-process orchestrator serve every run; each round sends
//! the same prompts three ways back to back — direct (`client::EntryClient`, as `computepool generate
//! --topology` does), `POST /v1/completions` (SSE) and `POST /pools/{id}/infer` (SSE) — so the
//! comparisons are paired moment by moment. Time to first token is measured by the client from sending
//! the request (TCP connect included for HTTP) to the first token arriving; decode speed is
//! (tokens − 1) / (last token − first token). Requests run through EOS (`ignore_eos`) for exactly
//! `--tg` tokens.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use computepool_axl::transport::SecretKey;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use computepool_orchestrator::auth::OperatorToken;
use computepool_orchestrator::pools::PoolSpec;
use computepool_orchestrator::{self as orchestrator, AppState, Settings};
use crate::pipeline::{LocalPipeline, PipelineOptions};
use computepool_entry_api::GenerateRequest;

/// Prompts each round sends (plain English: every token's text is final at once, so an OpenAI chunk
/// is one token).
const PROMPTS: [&str; 3] = [
    "The history of the printing press begins",
    "Here is a short explanation of how rain forms:",
    "A recipe for a simple tomato soup:",
];

/// One request's timings.
#[derive(Debug, Clone, Copy)]
struct Timing {
    ttft_ms: f64,
    decode_tps: f64,
}

/// Runs the comparison and prints one JSON line per route and one for the paired differences.
pub fn run(model: &Path, shards: usize, dtype: &str, threads: usize, tg: usize, repeats: usize) -> anyhow::Result<()> {
    ensure!(tg >= 2, "--tg must be at least 2 (decode speed needs two tokens)");
    let model = std::fs::canonicalize(model).with_context(|| format!("finding {}", model.display()))?;
    let model_name = model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let state_dir = tempfile::Builder::new().prefix("computepool-bench-api-").tempdir()?;
    let key = SecretKey::generate();
    let pipeline = LocalPipeline::start(&PipelineOptions {
        replicas: 1,
        model: model.clone(),
        shards,
        speeds: Vec::new(),
        dtype: dtype.to_string(),
        threads,
        peer_timeout_ms: 1000,
        devices: Vec::new(),
        client_key: Some(key.clone()),
        orchestrator: None,
        samplers: Default::default(),
        transport: crate::worker::FrameTransport::Iroh,
        payouts: Vec::new(),
        worker_args: Vec::new(),
    })?;
    // No audits: the benchmark measures users' requests alone (its one route has no partner anyway).
    let settings =
        Settings { heartbeat: Duration::from_secs(2), token: OperatorToken::new("bench-operator-token")?, audit_rate: 0.0 };
    let state = Arc::new(AppState::open(state_dir.path(), key.clone(), settings)?);
    let spec = PoolSpec {
        id: Some("bench".into()),
        model: model_name.clone(),
        model_dir: model.clone(),
        topology: pipeline.topology().clone(),
        replicas: Vec::new(),
    };
    state.pools.register(&state.store, spec, true).map_err(|e| anyhow::anyhow!("registering the pool: {e}"))?;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (direct, openai, infer) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(orchestrator::serve(
            listener,
            state.clone(),
            async move {
                let _ = stop_rx.await;
            },
            Duration::from_secs(1),
        ));
        let client = pipeline.client().await?;
        let request = |prompt: &str| {
            let mut r = GenerateRequest::text(prompt, tg);
            r.ignore_eos = true;
            r
        };
        // The ring comes up, and every path is warmed once.
        client
            .generate_when_ready(&request("warm up"), Duration::from_secs(120), |_| {})
            .await?
            .map_err(|e| anyhow::anyhow!("warm-up request failed: {e}"))?;
        let (mut direct, mut openai, mut infer) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..=repeats {
            for prompt in PROMPTS {
                let direct_run = async {
                    let done = client.generate(&request(prompt), |_| {}).await?.map_err(anyhow::Error::new)?;
                    ensure!(done.tokens.len() == tg, "a direct request stopped after {} tokens", done.tokens.len());
                    anyhow::Ok(Timing {
                        ttft_ms: done.time_to_first_token.as_secs_f64() * 1e3,
                        decode_tps: (tg - 1) as f64 / done.decode_time.as_secs_f64(),
                    })
                };
                let openai_body = json!({"model": model_name, "prompt": prompt, "max_tokens": tg, "temperature": 0,
                                         "ignore_eos": true, "stream": true});
                let openai_run = sse_timing(&addr, "/v1/completions", &openai_body, tg, |v| {
                    v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty())
                });
                let infer_body = json!({"prompt": prompt, "max_tokens": tg, "temperature": 0, "ignore_eos": true});
                let infer_run = sse_timing(&addr, "/pools/bench/infer", &infer_body, tg, |v| v.get("token").is_some());
                // Alternate the order round by round, so no route always runs first (on a warmer or
                // colder machine).
                let (d, o, i) = if round % 2 == 0 {
                    let d = direct_run.await?;
                    (d, openai_run.await?, infer_run.await?)
                } else {
                    let (o, i) = (openai_run.await?, infer_run.await?);
                    (direct_run.await?, o, i)
                };
                // Round 0 warms the HTTP paths and the prompts' first runs.
                if round > 0 {
                    direct.push(d);
                    openai.push(o);
                    infer.push(i);
                }
            }
        }
        client.close().await;
        let _ = stop_tx.send(());
        let _ = server.await;
        state.pools.disconnect_all().await;
        anyhow::Ok((direct, openai, infer))
    })?;
    drop(pipeline);

    let base = json!({"engine": "computepool-api", "model": model_name, "dtype": dtype, "shards": shards,
                      "threads": threads, "test": format!("tg{tg}"), "runs": direct.len(), "prompts": PROMPTS.len()});
    for (route, runs) in [("direct", &direct), ("openai", &openai), ("infer", &infer)] {
        let mut line = base.clone();
        line["route"] = json!(route);
        line["ttft_ms"] = spread(runs.iter().map(|t| t.ttft_ms).collect());
        line["decode_tokens_per_s"] = spread(runs.iter().map(|t| t.decode_tps).collect());
        println!("{line}");
    }
    for (route, runs) in [("openai", &openai), ("infer", &infer)] {
        let mut line = base.clone();
        line["route"] = json!(format!("{route}-vs-direct"));
        line["ttft_added_ms"] = spread(runs.iter().zip(&direct).map(|(a, d)| a.ttft_ms - d.ttft_ms).collect());
        line["decode_ratio"] = spread(runs.iter().zip(&direct).map(|(a, d)| a.decode_tps / d.decode_tps).collect());
        println!("{line}");
    }
    Ok(())
}

/// Median, minimum and maximum.
fn spread(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    json!({"median": median, "min": v[0], "max": v[n - 1]})
}

/// Posts `body` to an SSE route over a fresh connection and times the events that `is_token` accepts.
async fn sse_timing(addr: &str, path: &str, body: &Value, tg: usize, is_token: impl Fn(&Value) -> bool) -> anyhow::Result<Timing> {
    let body = body.to_string();
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut lines = BufReader::new(stream).lines();
    let status = lines.next_line().await?.unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("{path} answered {status}");
    }
    let (mut first, mut last, mut tokens) = (None, None, 0usize);
    while let Some(line) = lines.next_line().await? {
        let Some(data) = line.strip_prefix("data: ") else { continue };
        let Ok(value) = serde_json::from_str::<Value>(data) else { continue };
        if value.get("error").is_some() {
            bail!("{path} failed midway: {value}");
        }
        if is_token(&value) {
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            tokens += 1;
        }
    }
    let (Some(first), Some(last)) = (first, last) else { bail!("{path} streamed no token") };
    ensure!(tokens == tg, "{path} streamed {tokens} token events, not {tg} (held-back text?)");
    Ok(Timing {
        ttft_ms: (first - started).as_secs_f64() * 1e3,
        decode_tps: (tg - 1) as f64 / (last - first).as_secs_f64(),
    })
}
