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

/// Step 5 for one block, written the plain way.
fn reference_block_sum(weights: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    for (i, &w) in weights.iter().enumerate() {
        lanes[i % 16] += w;
    }
    for h in [8, 4, 2, 1] {
        for i in 0..h {
            lanes[i] += lanes[i + h];
        }
    }
    lanes[0]
}

fn reference_total(weights: &[f32]) -> f64 {
    weights.chunks(BLOCK).map(reference_block_sum).fold(0.0, |t, s| t + f64::from(s))
}

/// Steps 3–7 written the slow, obvious way: sort everything, weigh every candidate (no block skipped),
/// mask and sum densely, walk the weights one by one. Returns the positive-weight candidates, the total
/// and the token `u` draws.
fn reference(logits: &[f32], params: &Params, u: f64) -> (Vec<(u32, f32)>, f64, u32) {
    let key = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| by_logit(logits, a, b));
    let k = if params.top_k == 0 { order.len() } else { (params.top_k as usize).min(order.len()) };
    let mut candidates: Vec<u32> = order[..k].to_vec();
    candidates.sort();
    let max = key(logits[order[0] as usize]);
    let scale = weight_scale(params.temperature);
    // The min-p comparison always on: with min_p == 0 it must change nothing.
    let weights: Vec<f32> =
        candidates.iter().map(|&t| weight(logits[t as usize], max, scale, params.min_p)).collect();
    let total = reference_total(&weights);
    // Rank: weight descending, earlier first; `before(j)` keeps the candidates ranked before j.
    let before = |j: usize| -> Vec<f32> {
        weights.iter().enumerate().map(|(i, &w)| if w > weights[j] || (w == weights[j] && i < j) { w } else { 0.0 }).collect()
    };
    let walk = |masked: &[f32], total: f64, u: f64| {
        let target = u * total;
        let mut running = 0.0;
        // Sequential: agrees with the block walk unless rounding sits on a boundary.
        for (j, &w) in masked.iter().enumerate() {
            running += f64::from(w);
            if w > 0.0 && running > target {
                return j;
            }
        }
        masked.iter().rposition(|&w| w > 0.0).unwrap()
    };
    let mut chosen = walk(&weights, total, u);
    if params.top_p < 1.0 {
        let goal = f64::from(params.top_p) * total;
        let mut u = u;
        loop {
            let masked = before(chosen);
            let m = reference_total(&masked);
            if m < goal {
                break;
            }
            u = nucleus::next_uniform(u);
            chosen = walk(&masked, m, u);
        }
    }
    let entries = candidates.iter().zip(&weights).filter(|(_, w)| **w > 0.0).map(|(&t, &w)| (t, w)).collect();
    (entries, total, candidates[chosen])
}

/// The nucleus as the spec's "shortest head of the ranking reaching top_p × total", computed by sorting.
fn sorted_nucleus(logits: &[f32], params: &Params) -> Vec<u32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    let scale = weight_scale(params.temperature);
    let weights: Vec<f32> = logits.iter().map(|&l| weight(l, max, scale, params.min_p)).collect();
    let total = reference_total(&weights);
    let mut order: Vec<usize> = (0..weights.len()).filter(|&j| weights[j] > 0.0).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut masked = vec![0.0f32; weights.len()];
    let mut nucleus = Vec::new();
    for &j in &order {
        // The sum of those ranked before j (the same blocks and lanes as the total).
        if reference_total(&masked) >= f64::from(params.top_p) * total {
            break;
        }
        nucleus.push(j as u32);
        masked[j] = weights[j];
    }
    nucleus
}

/// Draws with top-p land only in the nucleus, in proportion to their weights, and the first round is
/// kept about `top_p` of the time (the rejection loop is cheap).
#[test]
fn top_p_draws_stay_in_the_nucleus_in_proportion() {
    let mut rng = TestRng(17);
    let logits = rng.logits(300, 8.0);
    let params = Params { temperature: 1.0, top_p: 0.8, ..Params::default() };
    let nucleus = sorted_nucleus(&logits, &params);
    assert!(nucleus.len() > 20 && nucleus.len() < 300, "nucleus of {}", nucleus.len());
    let mut scratch = Scratch::default();
    let mut counts = vec![0u32; logits.len()];
    let draws = 200_000;
    for _ in 0..draws {
        let t = sample(&logits, &[], &params, &mut scratch, || rng.unit());
        counts[t as usize] += 1;
    }
    let outside: u32 = (0..logits.len() as u32).filter(|t| !nucleus.contains(t)).map(|t| counts[t as usize]).sum();
    assert_eq!(outside, 0, "draws outside the nucleus");
    // Each nucleus token's share against its weight over the nucleus's mass (binomial 5σ).
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    let w = |t: u32| f64::from(weight(logits[t as usize], max, weight_scale(1.0), 0.0));
    let mass: f64 = nucleus.iter().map(|&t| w(t)).sum();
    for &t in &nucleus {
        let p = w(t) / mass;
        let expected = p * f64::from(draws);
        let sigma = (expected * (1.0 - p)).sqrt();
        assert!((f64::from(counts[t as usize]) - expected).abs() <= 5.0 * sigma + 1.0, "token {t}: {} draws, expected {expected:.0}", counts[t as usize]);
    }
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
        Params { temperature: 0.8, top_p: 0.95, ..Params::default() },
        Params { temperature: 0.8, top_p: 0.95, top_k: 5000, ..Params::default() },
    ];
    let mut agree = 0;
    let mut compared = 0;
    let mut skipped_rows = 0;
    for (n, params) in sets.iter().enumerate() {
        // Plain rows, and rows whose groups of 4 blocks but every third sit 200 under the rest: their
        // weights are all under the floor, so those blocks are skipped, and must still agree with weighing
        // everything.
        for tail in [false, true] {
            for &vocab in &[1usize, 7, 64, 65, 5000, 49_152] {
                let mut logits = rng.logits(vocab, 30.0);
                if tail {
                    for (i, l) in logits.iter_mut().enumerate() {
                        if (i / (4 * BLOCK)) % 3 != 0 {
                            *l -= 200.0;
                        }
                    }
                }
                if vocab > 10 {
                    logits[3] = f32::NAN;
                    logits[4] = f32::NEG_INFINITY;
                    logits[5] = logits[6]; // a tie
                }
                let u = rng.unit();
                let (entries, total, chosen) = reference(&logits, params, u);
                let Prepared::Draw(mut d) = prepare(&logits, &[], params, &mut scratch) else {
                    panic!("set {n}: temperature > 0 must draw")
                };
                let bits = |e: &[(u32, f32)]| e.iter().map(|&(t, w)| (t, w.to_bits())).collect::<Vec<_>>();
                let ours: Vec<(u32, f32)> = d.entries().collect();
                assert_eq!(bits(&ours), bits(&entries), "set {n}, tail {tail}, vocab {vocab}: weights");
                assert_eq!(d.total.to_bits(), total.to_bits(), "set {n}, tail {tail}, vocab {vocab}: total");
                agree += usize::from(d.draw(u) == chosen);
                skipped_rows += usize::from(scratch.blocks.live.len() < vocab.div_ceil(BLOCK) && params.top_k == 0);
                compared += 1;
            }
        }
    }
    // The block walk and the sequential one differ only when rounding sits on a boundary.
    assert_eq!(agree, compared);
    assert!(skipped_rows >= 10, "the rows must exercise skipped blocks, {skipped_rows} did");
}

/// The stated accuracy of step 4: within 2e-7 + 1.3e-7·|y| of the exact e^((l - max)/T) over the floor.
#[test]
fn weights_are_within_the_stated_bound_of_the_exact_exponential() {
    let mut rng = TestRng(11);
    let mut worst_excess = f64::NEG_INFINITY;
    let mut checked = 0;
    for i in 0..2_000_000 {
        let temperature = [0.1f32, 0.5, 0.8, 1.0, 1.7, 4.0][i % 6];
        let max = ((rng.unit() - 0.5) * 60.0) as f32;
        let l = max - (rng.unit() * 32.0 * f64::from(temperature)) as f32;
        let scale = weight_scale(temperature);
        let y = (l - max) * scale;
        let w = weight(l, max, scale, 0.0);
        if y < FLOOR_LOG2 {
            assert_eq!(w, 0.0);
            continue;
        }
        let exact = ((f64::from(l) - f64::from(max)) / f64::from(temperature)).exp();
        let relative = (f64::from(w) - exact).abs() / exact;
        let bound = 2e-7 + 1.3e-7 * f64::from(y.abs());
        worst_excess = worst_excess.max(relative - bound);
        checked += 1;
    }
    assert!(checked > 1_000_000);
    assert!(worst_excess <= 0.0, "a weight is {worst_excess:e} past the stated bound");
    assert_eq!(weight(3.5, 3.5, weight_scale(0.8), 0.0), 1.0, "the top token weighs 1 exactly");
}

/// The polynomial alone (k = 0, no rounding of y): within 2e-7 of 2^f on [-½, ½].
#[test]
fn the_base_two_polynomial_is_within_its_stated_error() {
    let scale = 1.0; // y = l - max
    let mut worst = 0.0f64;
    for i in 0..=1_000_000 {
        let f = -0.5 + i as f64 / 1_000_000.0;
        let (l, max) = (f as f32, 0.0f32);
        let w = weight(l, max, scale, 0.0);
        let exact = f64::from(l).exp2();
        worst = worst.max((f64::from(w) - exact).abs() / exact);
    }
    assert!(worst <= 2e-7, "largest relative error of the polynomial: {worst:e}");
}

#[test]
fn argmax_matches_a_scalar_scan_on_awkward_rows() {
    let scalar = |values: &[f32]| {
        let mut best = 0usize;
        let mut best_value = f32::NEG_INFINITY;
        for (i, &v) in values.iter().enumerate() {
            if v > best_value {
                best_value = v;
                best = i;
            }
        }
        best as u32
    };
    let mut rng = TestRng(3);
    for n in [0usize, 1, 15, 16, 17, 63, 64, 65, 1000, 49_152, 128_256] {
        for case in 0..8 {
            let mut row = rng.logits(n, 20.0);
            match case {
                0 => {}
                1 => row.iter_mut().for_each(|v| *v = (*v / 4.0).round()), // many ties
                2 => row.iter_mut().for_each(|v| *v = f32::NAN),
                3 => row.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
                4 => row.iter_mut().enumerate().for_each(|(i, v)| *v = if i % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY }),
                5 => row.iter_mut().enumerate().for_each(|(i, v)| *v = if i % 3 == 0 { -0.0 } else if i % 3 == 1 { 0.0 } else { -1.0 }),
                6 => {
                    if n > 2 {
                        row[n / 2] = f32::INFINITY;
                        row[n - 1] = f32::INFINITY;
                        row[0] = f32::NAN;
                    }
                }
                _ => {
                    if n > 0 {
                        row[n - 1] = 1e30; // the maximum in the remainder past the last whole row of lanes
                    }
                }
            }
            assert_eq!(argmax(&row), scalar(&row), "n {n}, case {case}");
        }
    }
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
    // A temperature whose 1/T overflows f32 is greedy too (the limit of sampling as T → 0).
    let cold = Params { temperature: 1e-40, ..Params::default() };
    assert_eq!(sample(&[1.0, 3.0, 2.0], &[], &cold, &mut s, || unreachable!()), 1);
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
