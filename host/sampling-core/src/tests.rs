extern crate std;

use std::vec;
use std::vec::Vec;

use super::*;

/// A small xorshift for test data (the request streams live with the callers).
struct TestRng(u64);

impl TestRng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn logits(&mut self, n: usize, spread: f64) -> Vec<f32> {
        (0..n).map(|_| ((self.unit() - 0.5) * spread) as f32).collect()
    }
}

fn ulps(a: f64, b: f64) -> u64 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
}

#[test]
fn exp_is_exact_at_zero_and_within_two_ulp_of_the_platform_exp() {
    assert_eq!(exp(0.0), 1.0);
    assert_eq!(exp(-0.0), 1.0);
    assert_eq!(exp(-1000.0), 0.0);
    assert_eq!(exp(f64::NEG_INFINITY), 0.0);
    assert_eq!(exp(710.0), f64::INFINITY);
    assert!(exp(f64::NAN).is_nan());
    let mut rng = TestRng(0x9E37_79B9_7F4A_7C15);
    let mut worst = 0;
    for i in 0..2_000_000 {
        // Half the points where sampling lives ([-60, 0]), half over the whole normal range.
        let x = if i % 2 == 0 { -60.0 * rng.unit() } else { -708.0 + 1417.0 * rng.unit() };
        let (ours, platform) = (exp(x), x.exp());
        worst = worst.max(ulps(ours, platform));
    }
    // Measured: 1 ulp at most against glibc on x86_64.
    assert!(worst <= 2, "largest difference from the platform exp: {worst} ulp");
}

/// Steps 3–7 written the slow, obvious way: sort everything.
fn reference(logits: &[f32], params: &Params, u: f64) -> (Vec<u32>, Vec<f64>, u32) {
    let key = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| by_logit(logits, a, b));
    let k = if params.top_k == 0 { order.len() } else { (params.top_k as usize).min(order.len()) };
    let mut candidates: Vec<u32> = order[..k].to_vec();
    candidates.sort();
    let max = key(logits[order[0] as usize]) as f64;
    let inv = 1.0 / params.temperature as f64;
    let mut weights: Vec<f64> = candidates
        .iter()
        .map(|&t| {
            let w = exp((key(logits[t as usize]) as f64 - max) * inv);
            if w >= params.min_p as f64 { w } else { 0.0 }
        })
        .collect();
    let mut blocks = Vec::new();
    let mut total = block_sums(&weights, &mut blocks);
    if params.top_p < 1.0 {
        let mut idx: Vec<usize> = (0..weights.len()).filter(|&j| weights[j] > 0.0).collect();
        idx.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        let goal = params.top_p as f64 * total;
        let mut running = 0.0;
        let mut len = idx.len();
        for (n, &j) in idx.iter().enumerate() {
            running += weights[j];
            if running >= goal {
                len = n + 1;
                break;
            }
        }
        idx.truncate(len);
        candidates = idx.iter().map(|&j| candidates[j]).collect();
        weights = idx.iter().map(|&j| weights[j]).collect();
        total = block_sums(&weights, &mut blocks);
    }
    let target = u * total;
    let mut running = 0.0;
    let mut chosen = *candidates.last().unwrap();
    // Sequential walk: agrees with the block walk unless rounding sits on a boundary.
    for (j, &w) in weights.iter().enumerate() {
        running += w;
        if w > 0.0 && running > target {
            chosen = candidates[j];
            break;
        }
    }
    (candidates, weights, chosen)
}

#[test]
fn prepare_matches_a_full_sort_reference_bit_for_bit() {
    let mut rng = TestRng(42);
    let mut scratch = Scratch::default();
    let sets = [
        Params { temperature: 1.0, ..Params::default() },
        Params { temperature: 0.7, top_p: 0.9, ..Params::default() },
        Params { temperature: 1.3, top_k: 40, top_p: 0.95, ..Params::default() },
        Params { temperature: 0.8, min_p: 0.05, ..Params::default() },
        Params { temperature: 0.5, top_p: 0.3, min_p: 0.1, top_k: 1000, ..Params::default() },
        Params { temperature: 2.0, top_p: 0.999, ..Params::default() },
    ];
    let mut agree = 0;
    for (n, params) in sets.iter().enumerate() {
        for &vocab in &[1usize, 7, 64, 65, 5000, 49_152] {
            let mut logits = rng.logits(vocab, 30.0);
            if vocab > 10 {
                logits[3] = f32::NAN;
                logits[4] = f32::NEG_INFINITY;
                logits[5] = logits[6]; // a tie
            }
            let u = rng.unit();
            let (tokens, weights, chosen) = reference(&logits, params, u);
            let Prepared::Draw(d) = prepare(&logits, &[], params, &mut scratch) else {
                panic!("set {n}: temperature > 0 must draw")
            };
            let ours: Vec<u32> = (0..d.weights.len()).map(|j| d.token(j)).collect();
            assert_eq!(ours, tokens, "set {n}, vocab {vocab}: candidates");
            let bits = |w: &[f64]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(d.weights), bits(&weights), "set {n}, vocab {vocab}: weights");
            agree += usize::from(d.draw(u) == chosen);
        }
    }
    // The block walk and the sequential one differ only when rounding sits on a boundary.
    assert_eq!(agree, sets.len() * 6);
}

#[test]
fn greedy_penalties_and_degenerate_rows() {
    let params = Params::default();
    let mut s = Scratch::default();
    assert_eq!(sample(&[1.0, 3.0, 3.0, f32::NAN], &[], &params, &mut s, || unreachable!()), 1);
    // Presence: token 1 loses 1.5 and 2 wins; frequency counts occurrences.
    let p = Params { presence_penalty: 1.5, ..Params::default() };
    assert_eq!(sample(&[0.0, 3.0, 2.0], &[1, 9999], &p, &mut s, || unreachable!()), 2);
    let p = Params { frequency_penalty: 0.6, ..Params::default() };
    let mut logits = [0.0, 3.0, 2.0];
    apply_penalties(&mut logits, &[1, 1, 2], &p, &mut Vec::new());
    assert_eq!(logits, [0.0, 3.0 - 1.2, 2.0 - 0.6]);
    // Repetition divides positive logits and multiplies negative ones.
    let p = Params { repetition_penalty: 2.0, ..Params::default() };
    let mut logits = [4.0, -1.0, 1.0];
    apply_penalties(&mut logits, &[0, 1], &p, &mut Vec::new());
    assert_eq!(logits, [2.0, -2.0, 1.0]);
    // Rows with no finite maximum fall back to argmax, drawing nothing.
    let hot = Params { temperature: 1.0, ..Params::default() };
    assert_eq!(sample(&[f32::NAN, f32::NEG_INFINITY], &[], &hot, &mut s, || unreachable!()), 0);
    assert_eq!(sample(&[1.0, f32::INFINITY], &[], &hot, &mut s, || unreachable!()), 1);
}

#[test]
fn top_k_one_and_tiny_top_p_are_argmax_and_draws_cover_the_tail() {
    let mut rng = TestRng(7);
    let mut s = Scratch::default();
    let logits = rng.logits(1000, 10.0);
    let best = argmax(&logits);
    for u in [0.0, 0.5, 0.999_999] {
        let p = Params { temperature: 1.0, top_k: 1, ..Params::default() };
        assert_eq!(sample(&logits, &[], &p, &mut s, || u), best);
        let p = Params { temperature: 1.0, top_p: 1e-6, ..Params::default() };
        assert_eq!(sample(&logits, &[], &p, &mut s, || u), best);
    }
    // A flat row: u picks proportionally, so u near 1 picks the last token.
    let flat = vec![0.0f32; 100];
    let p = Params { temperature: 1.0, ..Params::default() };
    assert_eq!(sample(&flat, &[], &p, &mut s, || 0.0), 0);
    assert_eq!(sample(&flat, &[], &p, &mut s, || 0.995), 99);
    assert_eq!(sample(&flat, &[], &p, &mut s, || 0.505), 50);
}

#[test]
fn parameters_out_of_range_are_named() {
    let bad = [
        Params { temperature: -1.0, ..Params::default() },
        Params { temperature: f32::NAN, ..Params::default() },
        Params { top_p: 0.0, ..Params::default() },
        Params { min_p: 1.5, ..Params::default() },
        Params { repetition_penalty: 0.0, ..Params::default() },
        Params { presence_penalty: f32::INFINITY, ..Params::default() },
    ];
    let names = ["temperature", "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"];
    for (p, name) in bad.iter().zip(names) {
        assert_eq!(p.validate().unwrap_err().param, name);
    }
    assert!(Params::default().validate().is_ok());
}
