//! The KV cache and layer-range sharding against recomputation, on the engine alone.
//!
//! - Cached decode: every one of 20 single-token steps, then a multi-token "second turn" appended to the
//!   cached conversation, then a rewind (`KvCache::truncate`) and a different second turn, each give the
//!   last-position logits of a full recompute of the whole sequence from an empty cache.
//! - Sharding: the model cut into two or three layer ranges, chained through `StepOutput::Hidden`, gives
//!   bit-identical logits to the whole model at prefill, decode and a second turn (invariant 2).
//! - Thread count: the backend's thread count does not change a single bit of the logits, since shards of
//!   one pipeline run on workers with different core counts.
//!
//! The Mistral checkpoint's window is 8 and the cached conversations reach 36 positions, so the window is
//! crossed both by single-token steps and inside multi-token chunks.

mod common;

use common::*;
use computepool_engine::DType;
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{Shard, StepInput};

/// Cached decode against full recompute, max abs over the vocabulary (f32 weights and activations).
const CACHE_TOL: f32 = 1e-4;

fn step(shard: &Shard, tokens: &[u32], cache: &mut computepool_engine::kv_cache::KvCache) -> Vec<f32> {
    logits(shard.forward(StepInput::Tokens(tokens), cache).expect("forward"))
}

/// Token counts of one conversation: prompt, 20 decode steps, second turn, 3 more steps; then a rewind to
/// the end of the first turn and a different second turn.
struct Conversation {
    prompt: usize,
    second_turn: usize,
    rewound_turn: usize,
}

/// 7 + 20 + 6 + 3 = 36 positions: past Mistral's window of 8 several times.
const LONG: Conversation = Conversation {
    prompt: 7,
    second_turn: 6,
    rewound_turn: 9,
};
/// 3 + 20 + 5 + 3 = 31 positions, and 23 + 9 = 32 after the rewind: every full recompute stays within
/// `CpuBackend::BF16_EXACT_MAX_ROWS`, above which the default backend's bf16 prefill may round
/// activations to bf16 (by design, on AVX-512 BF16 CPUs) and so only matches a cached decode to about
/// bf16 precision.
const BF16_EXACT: Conversation = Conversation {
    prompt: 3,
    second_turn: 5,
    rewound_turn: 9,
};

fn cached_decode_matches_recompute(family: Family, load: impl Fn(&Checkpoint) -> Shard, conv: &Conversation) -> f32 {
    let ck = checkpoint(family);
    let shard = load(&ck);
    let dtype = shard.dtype();
    let mut rng = TestRng::new(0xCAC4E);
    let mut seq = rng.tokens(conv.prompt);
    let mut cache = shard.new_cache();
    let mut worst = 0f32;
    let mut check = |what: &str, cached: &[f32], seq: &[u32]| {
        let full = recompute(&shard, seq);
        let d = max_abs_diff(cached, &full);
        assert!(
            d <= CACHE_TOL,
            "{} {dtype}: {what} at length {}: cached logits differ from a full recompute by {d:e}",
            family.name(),
            seq.len()
        );
        worst = worst.max(d);
    };

    let l = step(&shard, &seq, &mut cache);
    check("prefill", &l, &seq);
    // 20 decode steps on seeded random tokens (not greedy ones, so a model that loops cannot hide a bug).
    for i in 0..20 {
        let t = rng.tokens(1);
        seq.extend(&t);
        let l = step(&shard, &t, &mut cache);
        check(&format!("decode step {i}"), &l, &seq);
    }
    assert_eq!(cache.len(), seq.len());
    let first_turn_len = seq.len();

    // A second turn: the user's next message arrives as one multi-token chunk on the cached conversation.
    let turn = rng.tokens(conv.second_turn);
    seq.extend(&turn);
    let l = step(&shard, &turn, &mut cache);
    check("second turn", &l, &seq);
    for i in 0..3 {
        let t = rng.tokens(1);
        seq.extend(&t);
        let l = step(&shard, &t, &mut cache);
        check(&format!("second-turn decode step {i}"), &l, &seq);
    }

    // Rewind to the end of the first turn and take a different second turn.
    cache.truncate(first_turn_len);
    seq.truncate(first_turn_len);
    let other = rng.tokens(conv.rewound_turn);
    seq.extend(&other);
    let l = step(&shard, &other, &mut cache);
    check("rewound second turn", &l, &seq);
    worst
}

#[test]
fn llama3_cached_decode_equals_full_recompute() {
    let d = cached_decode_matches_recompute(Family::Llama3, Checkpoint::load_f32, &LONG);
    eprintln!("llama3 f32: worst cached-vs-recompute max abs diff {d:e}");
}

#[test]
fn qwen2_cached_decode_equals_full_recompute() {
    let d = cached_decode_matches_recompute(Family::Qwen2, Checkpoint::load_f32, &LONG);
    eprintln!("qwen2 f32: worst cached-vs-recompute max abs diff {d:e}");
}

#[test]
fn mistral_sliding_window_cached_decode_equals_full_recompute() {
    let d = cached_decode_matches_recompute(Family::Mistral, Checkpoint::load_f32, &LONG);
    eprintln!("mistral f32: worst cached-vs-recompute max abs diff {d:e}");
}

#[test]
fn bf16_cached_decode_equals_full_recompute() {
    // bf16 only changes how weights are stored; activations and the cache stay f32, so the same bound
    // holds: on the default backend while every recompute stays on the exact path (`BF16_EXACT`), and on
    // a backend without bf16 dot products for the long conversation too.
    let longest =
        (BF16_EXACT.prompt + 20 + BF16_EXACT.second_turn + 3).max(BF16_EXACT.prompt + 20 + BF16_EXACT.rewound_turn);
    assert!(
        longest <= CpuBackend::BF16_EXACT_MAX_ROWS,
        "BF16_EXACT must stay on the exact bf16 path"
    );
    for family in Family::ALL {
        let d = cached_decode_matches_recompute(family, |ck| ck.load(DType::Bf16, None, 2), &BF16_EXACT);
        let e = cached_decode_matches_recompute(family, Checkpoint::load_bf16_exact, &LONG);
        eprintln!(
            "{} bf16: worst cached-vs-recompute max abs diff {d:e} (default backend), {e:e} (exact backend, 36 positions)",
            family.name()
        );
    }
}

/// Runs `inputs` (one token chunk per step) through a chain of shards, each with its own cache.
fn run_chain(shards: &[Shard], inputs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let mut caches: Vec<_> = shards.iter().map(Shard::new_cache).collect();
    inputs
        .iter()
        .map(|chunk| {
            let mut h = hidden(
                shards[0]
                    .forward(StepInput::Tokens(chunk), &mut caches[0])
                    .expect("entry shard"),
            );
            for (s, c) in shards[1..shards.len() - 1].iter().zip(&mut caches[1..]) {
                let out = hidden(s.forward(StepInput::Hidden(&h), c).expect("middle shard"));
                assert_eq!(out.len(), chunk.len() * HIDDEN, "a middle shard returns [n, hidden]");
                h = out;
            }
            let last = shards.len() - 1;
            logits(
                shards[last]
                    .forward(StepInput::Hidden(&h), &mut caches[last])
                    .expect("exit shard"),
            )
        })
        .collect()
}

#[test]
fn sharded_runs_give_bit_identical_logits() {
    for family in Family::ALL {
        let ck = checkpoint(family);
        let whole = ck.load_f32();
        let mut rng = TestRng::new(0x5A4D);
        // Prefill, 12 decode steps (past Mistral's window), then a second-turn chunk.
        let mut inputs = vec![rng.tokens(5)];
        inputs.extend((0..12).map(|_| rng.tokens(1)));
        inputs.push(rng.tokens(4));
        let mut cache = whole.new_cache();
        let expected: Vec<Vec<f32>> = inputs.iter().map(|c| step(&whole, c, &mut cache)).collect();
        for split in [&[(0, 1), (1, 3)][..], &[(0, 2), (2, 3)], &[(0, 1), (1, 2), (2, 3)]] {
            let shards: Vec<Shard> = split.iter().map(|&r| ck.load(DType::F32, Some(r), 2)).collect();
            let got = run_chain(&shards, &inputs);
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    bits(g) == bits(e),
                    "{}: shards {split:?} differ from the whole model at step {i} (max abs diff {:e})",
                    family.name(),
                    max_abs_diff(g, e)
                );
            }
        }
    }
}

#[test]
fn sharded_bf16_runs_give_bit_identical_logits() {
    // Tied Qwen2 with an exit-only shard keeps its own bf16 copy of the embedding as lm_head.
    for family in Family::ALL {
        let ck = checkpoint(family);
        let whole = ck.load(DType::Bf16, None, 2);
        let mut rng = TestRng::new(0xBF16);
        let inputs = vec![rng.tokens(6), rng.tokens(1), rng.tokens(1), rng.tokens(3)];
        let mut cache = whole.new_cache();
        let expected: Vec<Vec<f32>> = inputs.iter().map(|c| step(&whole, c, &mut cache)).collect();
        let shards: Vec<Shard> = [(0, 1), (1, 3)]
            .iter()
            .map(|&r| ck.load(DType::Bf16, Some(r), 2))
            .collect();
        let got = run_chain(&shards, &inputs);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(
                bits(g) == bits(e),
                "{} bf16: sharded run differs at step {i} by {:e}",
                family.name(),
                max_abs_diff(g, e)
            );
        }
    }
}

#[test]
fn thread_count_does_not_change_logits() {
    // A 40-token prefill takes the backend's prefill paths (f32 gemm; bf16 dot products on AVX-512 BF16
    // CPUs), the single token and the 5-token chunk its decode path.
    const THREADS: [usize; 4] = [1, 2, 3, 8];
    for family in Family::ALL {
        for dtype in [DType::F32, DType::Bf16] {
            let ck = checkpoint(family);
            let mut rng = TestRng::new(0x7D);
            let inputs = [rng.tokens(40), rng.tokens(1), rng.tokens(5)];
            let runs: Vec<Vec<Vec<f32>>> = THREADS
                .iter()
                .map(|&threads| {
                    let shard = ck.load(dtype, None, threads);
                    let mut cache = shard.new_cache();
                    inputs.iter().map(|c| step(&shard, c, &mut cache)).collect()
                })
                .collect();
            for (t, run) in runs.iter().enumerate().skip(1) {
                for (i, (a, b)) in run.iter().zip(&runs[0]).enumerate() {
                    assert!(
                        bits(a) == bits(b),
                        "{} {dtype}: {} threads change step {i}'s logits against 1 thread (max abs diff {:e})",
                        family.name(),
                        THREADS[t],
                        max_abs_diff(a, b)
                    );
                }
            }
        }
    }
}

#[test]
fn sliding_window_changes_what_mistral_attends_to() {
    // Guards the test itself: if the window were ignored, the Mistral cache tests would not exercise it.
    // Changing a token that has left every later position's window (and every layer's receptive field:
    // 3 layers × 7 back = 21 positions) must not change the last logits; changing one inside it must.
    let ck = checkpoint(Family::Mistral);
    let shard = ck.load_f32();
    let mut rng = TestRng::new(0x51);
    let base = rng.tokens(30);
    let reference = recompute(&shard, &base);
    let mut far = base.clone();
    far[2] = if far[2] == 100 { 101 } else { 100 };
    let d = max_abs_diff(&recompute(&shard, &far), &reference);
    assert!(
        d < 1e-6,
        "a token 27 positions back leaked through a window of 8 over 3 layers ({d:e})"
    );
    let mut near = base.clone();
    near[27] = if near[27] == 100 { 101 } else { 100 };
    assert!(
        max_abs_diff(&recompute(&shard, &near), &reference) > 1e-3,
        "a token inside the window had no effect"
    );
}
