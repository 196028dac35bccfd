//! Where a pipeline's decode time goes: the whole model against the same model as two shards in ONE
//! process, token by token, so the split itself (two forwards, a hidden state handed over) is measured
//! without processes, sockets or wake-ups in between.
//!
//! ```text
//! cargo run --release -p computepool-engine --example split_speed -- MODEL_DIR [--threads 2] [--tg 128]
//!     [--rounds 6] [--nap-us 0] [--spin-us 0] [--hand-off | --processes] [--json]
//! ```
//! Before each shard's step the split can wait as a pipeline worker waits for its neighbour's frame:
//! `--nap-us N` sleeps N µs with the backend's threads released (the core idles: on a VM its vCPU
//! halts), `--spin-us N` polls the clock as long (a worker with `--busy-poll-us`: the core never idles).
//! Comparing the two shows what idling between steps costs the next step on this machine
//! (scripts/bench/halt_penalty.py). Reported per round: ms per token of the whole model and of the split
//! (with each shard's share); the waits themselves are not counted. `--json`: one object per round.
//!
//! `--hand-off` runs each shard on a thread of its own (and a backend of its own), handing the hidden
//! state and the token across through channels as a pipeline's workers do through their network
//! threads: each shard waits for the other's step, blocked (the default: woken by the other thread) or,
//! with `--spin-us`, polling its channel for up to that long first. That measures what a cross-thread
//! hand-off costs the steps, still without processes or sockets.
//!
//! `--processes` runs the exit shard in a child process of its own (this example, started again with
//! `--serve-exit`), handing the hidden state and the token across through the child's stdin and stdout
//! pipes, each side blocked in `read` until the other's step is done: a pipeline's workers as separate
//! processes, still without a network stack or network threads. The child times its own steps.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use computepool_engine::DType;
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{LoadOptions, ModelSource, Shard, StepInput, StepOutput};
use computepool_engine::sampling::argmax;
use computepool_engine::shard::LayerRange;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: split_speed MODEL_DIR [--threads N] [--tg N] [--rounds N] [--nap-us N] [--spin-us N] [--hand-off | --processes] [--json]";
    let dir = PathBuf::from(args.next().context(usage)?);
    if dir.as_os_str() == "--serve-exit" {
        let dir = PathBuf::from(args.next().context("--serve-exit MODEL_DIR THREADS")?);
        let threads = args.next().context("--serve-exit MODEL_DIR THREADS")?.parse()?;
        return serve_exit(&dir, threads);
    }
    let (mut threads, mut tg, mut rounds, mut nap_us, mut spin_us, mut json) = (2usize, 128usize, 6usize, 0u64, 0u64, false);
    let (mut hand_off, mut processes) = (false, false);
    while let Some(flag) = args.next() {
        // The two switches take no value.
        match flag.as_str() {
            "--json" => json = true,
            "--hand-off" => hand_off = true,
            "--processes" => processes = true,
            _ => {
                let value: u64 =
                    args.next().with_context(|| format!("{flag} needs a value"))?.parse().with_context(|| flag.clone())?;
                match flag.as_str() {
                    "--threads" => threads = value as usize,
                    "--tg" => tg = value as usize,
                    "--rounds" => rounds = value as usize,
                    "--nap-us" => nap_us = value,
                    "--spin-us" => spin_us = value,
                    other => bail!("unknown flag {other}"),
                }
            }
        }
    }
    if (hand_off || processes) && nap_us > 0 {
        bail!("--nap-us does not apply to --hand-off or --processes: each shard there waits for the other's step");
    }
    if processes && spin_us > 0 {
        bail!("--spin-us does not apply to --processes: each side waits blocked in read");
    }
    if hand_off && processes {
        bail!("--hand-off and --processes are two different ways to hand the steps over; pick one");
    }
    let backend = Arc::new(CpuBackend::new(threads));
    let source = ModelSource::from_path(&dir)?;
    let layers = source.config()?.num_layers;
    let load = |range, backend: &Arc<CpuBackend>| load_bf16(&source, range, backend);
    let whole = load(None, &backend)?;
    // Handed off, each shard computes on a thread (and a backend) of its own, as each worker does.
    let exit_backend = if hand_off { Arc::new(CpuBackend::new(threads)) } else { backend.clone() };
    let entry = load(Some(LayerRange::new(0, layers / 2, layers)?), &backend)?;
    // With --processes the exit shard lives in the child alone.
    let (exit, mut child) = if processes {
        (None, Some(ExitProcess::start(&dir, threads)?))
    } else {
        (Some(load(Some(LayerRange::new(layers / 2, layers, layers)?), &exit_backend)?), None)
    };
    let wait_for_neighbour = || {
        if nap_us > 0 {
            backend.release_idle_threads();
            std::thread::sleep(Duration::from_micros(nap_us));
        }
        let spin_until = Instant::now() + Duration::from_micros(spin_us);
        while Instant::now() < spin_until {
            std::hint::spin_loop();
        }
    };
    let logits = |out: StepOutput| match out {
        StepOutput::Logits(l) => Ok(l),
        StepOutput::Hidden(_) | StepOutput::Normed(_) => bail!("an exit shard (of a whole head) returns logits"),
    };
    let hidden_of = |out: StepOutput| match out {
        StepOutput::Hidden(h) => Ok(h),
        StepOutput::Logits(_) | StepOutput::Normed(_) => bail!("an entry shard returns hidden states"),
    };
    for round in 0..rounds {
        let mut cache = whole.new_cache();
        let mut token = 1u32;
        let started = Instant::now();
        for _ in 0..tg {
            token = argmax(&logits(whole.forward(StepInput::Tokens(&[token]), &mut cache)?)?) as u32;
        }
        let whole_ms = started.elapsed().as_secs_f64() * 1e3 / tg as f64;

        let mut entry_cache = entry.new_cache();
        let (mut entry_s, mut exit_s) = (0.0, 0.0);
        let mut token = 1u32;
        if let Some(child) = &mut child {
            for _ in 0..tg {
                let t = Instant::now();
                let hidden = hidden_of(entry.forward(StepInput::Tokens(&[token]), &mut entry_cache)?)?;
                entry_s += t.elapsed().as_secs_f64();
                let (next, busy) = child.step(&hidden)?;
                token = next;
                exit_s += busy;
            }
            child.reset()?;
        } else if hand_off {
            let exit = exit.as_ref().expect("loaded here unless --processes");
            let mut exit_cache = exit.new_cache();
            let (to_exit, from_entry) = std::sync::mpsc::channel::<Vec<f32>>();
            let (to_entry, from_exit) = std::sync::mpsc::channel::<u32>();
            let spin = Duration::from_micros(spin_us);
            let exit_cache = &mut exit_cache;
            std::thread::scope(|scope| -> Result<()> {
                let exit_thread = scope.spawn(move || -> Result<f64> {
                    let mut busy = 0.0;
                    while let Some(hidden) = receive(&from_entry, spin) {
                        let t = Instant::now();
                        let token = argmax(&logits(exit.forward(StepInput::Hidden(&hidden), exit_cache)?)?) as u32;
                        busy += t.elapsed().as_secs_f64();
                        if to_entry.send(token).is_err() {
                            break;
                        }
                    }
                    Ok(busy)
                });
                let mut feed = || -> Result<()> {
                    for _ in 0..tg {
                        let t = Instant::now();
                        let hidden = hidden_of(entry.forward(StepInput::Tokens(&[token]), &mut entry_cache)?)?;
                        entry_s += t.elapsed().as_secs_f64();
                        to_exit.send(hidden).context("the exit thread stopped")?;
                        token = receive(&from_exit, spin).context("the exit thread stopped")?;
                    }
                    Ok(())
                };
                let fed = feed();
                // Closing the channel ends the exit thread, whether or not the entry's side failed.
                drop(to_exit);
                let exit_busy = exit_thread.join().expect("the exit thread does not panic");
                fed?;
                exit_s = exit_busy?;
                Ok(())
            })?;
        } else {
            let exit = exit.as_ref().expect("loaded here unless --processes");
            let mut exit_cache = exit.new_cache();
            for _ in 0..tg {
                wait_for_neighbour();
                let t0 = Instant::now();
                let hidden = hidden_of(entry.forward(StepInput::Tokens(&[token]), &mut entry_cache)?)?;
                entry_s += t0.elapsed().as_secs_f64();
                wait_for_neighbour();
                let t1 = Instant::now();
                token = argmax(&logits(exit.forward(StepInput::Hidden(&hidden), &mut exit_cache)?)?) as u32;
                exit_s += t1.elapsed().as_secs_f64();
            }
        }
        let per = |s: f64| s * 1e3 / tg as f64;
        if json {
            println!(
                "{{\"round\": {round}, \"threads\": {threads}, \"tg\": {tg}, \"nap_us\": {nap_us}, \"spin_us\": {spin_us}, \
                 \"hand_off\": {hand_off}, \"processes\": {processes}, \"whole_ms\": {whole_ms:.4}, \"split_ms\": {:.4}, \"entry_ms\": {:.4}, \"exit_ms\": {:.4}}}",
                per(entry_s + exit_s),
                per(entry_s),
                per(exit_s)
            );
            continue;
        }
        println!(
            "round {round}: whole {whole_ms:.2} ms/token, split {:.2} (entry {:.2}, exit {:.2})",
            per(entry_s + exit_s),
            per(entry_s),
            per(exit_s)
        );
    }
    Ok(())
}

/// The next message on `from`, polled for up to `spin` first (as a worker's `--busy-poll-us`), then
/// waited for; `None` once the sender is gone.
fn receive<T>(from: &std::sync::mpsc::Receiver<T>, spin: Duration) -> Option<T> {
    let until = Instant::now() + spin;
    while Instant::now() < until {
        match from.try_recv() {
            Ok(message) => return Some(message),
            Err(std::sync::mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
        }
    }
    from.recv().ok()
}

/// Loads `range` of the model (`None`: all of it) in bf16 on `backend`.
fn load_bf16(
    source: &ModelSource,
    range: Option<LayerRange>,
    backend: &Arc<CpuBackend>,
) -> Result<Shard> {
    Ok(source.load_shard(&LoadOptions { dtype: DType::Bf16, range, progress: false, split_head: false }, backend.clone())?)
}

/// The exit shard in a child process: this example again, with `--serve-exit`.
struct ExitProcess {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: std::process::ChildStdout,
}

/// A hidden state's length prefix that asks the child for a fresh cache (a new round) instead of a step.
const RESET: u32 = u32::MAX;

impl ExitProcess {
    fn start(dir: &std::path::Path, threads: usize) -> Result<Self> {
        use std::process::{Command, Stdio};
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve-exit")
            .arg(dir)
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the exit process")?;
        let to = child.stdin.take().expect("stdin was piped");
        let from = child.stdout.take().expect("stdout was piped");
        Ok(ExitProcess { child, to, from })
    }

    /// Sends one hidden state; returns the token and the seconds the child's forward pass took.
    fn step(&mut self, hidden: &[f32]) -> Result<(u32, f64)> {
        use std::io::{Read, Write};
        let mut message = Vec::with_capacity(4 + hidden.len() * 4);
        message.extend_from_slice(&(hidden.len() as u32).to_le_bytes());
        message.extend_from_slice(bytemuck::cast_slice(hidden));
        self.to.write_all(&message).context("the exit process stopped")?;
        let mut answer = [0u8; 12];
        self.from.read_exact(&mut answer).context("the exit process stopped")?;
        let token = u32::from_le_bytes(answer[..4].try_into().expect("4 bytes"));
        let busy = f64::from_le_bytes(answer[4..].try_into().expect("8 bytes"));
        Ok((token, busy))
    }

    fn reset(&mut self) -> Result<()> {
        use std::io::Write;
        self.to.write_all(&RESET.to_le_bytes()).context("the exit process stopped")
    }
}

impl Drop for ExitProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side of `--processes`: the exit half of the model, one step per hidden state read.
fn serve_exit(dir: &std::path::Path, threads: usize) -> Result<()> {
    use std::io::{Read, Write};
    let backend = Arc::new(CpuBackend::new(threads));
    let source = ModelSource::from_path(dir)?;
    let layers = source.config()?.num_layers;
    let exit = load_bf16(&source, Some(LayerRange::new(layers / 2, layers, layers)?), &backend)?;
    let (mut input, mut output) = (std::io::stdin().lock(), std::io::stdout().lock());
    let mut cache = exit.new_cache();
    let mut len = [0u8; 4];
    while input.read_exact(&mut len).is_ok() {
        let n = u32::from_le_bytes(len);
        if n == RESET {
            cache = exit.new_cache();
            continue;
        }
        // Little-endian f32s, as the parent wrote them from memory.
        let mut hidden = vec![0f32; n as usize];
        input.read_exact(bytemuck::cast_slice_mut(&mut hidden))?;
        let t = Instant::now();
        let StepOutput::Logits(logits) = exit.forward(StepInput::Hidden(&hidden), &mut cache)? else {
            bail!("an exit shard returns logits")
        };
        let token = argmax(&logits) as u32;
        let busy = t.elapsed().as_secs_f64();
        let mut answer = [0u8; 12];
        answer[..4].copy_from_slice(&token.to_le_bytes());
        answer[4..].copy_from_slice(&busy.to_le_bytes());
        output.write_all(&answer)?;
        output.flush()?;
    }
    Ok(())
}
