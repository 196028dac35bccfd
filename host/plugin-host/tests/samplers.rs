//! The sampler plugins give exactly the tokens of the engine's native sampling
//! (`computepool_engine::sampling`) on many random logit vectors of a 49,152 and a 128,256 vocabulary,
//! and the probabilities the shared algorithm computes in WebAssembly are bit for bit the native ones.

mod support;

use computepool_engine::sampling::{Rng, Sampler, SamplingParams as NativeParams, argmax};
use computepool_plugin_host::{RequestRandom, SampleInput, SamplingParams};
use support::{host, plugin, random_logits};

/// SmolLM2's vocabulary and Llama 3's.
const VOCABS: [usize; 2] = [49_152, 128_256];

#[test]
fn greedy_plugin_matches_native_argmax() {
    let host = host();
    host.load_plugin(&plugin("samplers/greedy")).expect("greedy loads");
    let greedy = host.sampler("greedy").expect("greedy is a sampler");
    let mut rng = Rng::new(2024);
    for vocab in VOCABS {
        let mut random = RequestRandom::new(0);
        for row in 0..60 {
            let logits = random_logits(&mut rng, vocab, row);
            let history = [1, 2, 3];
            let input = SampleInput { logits: &logits, history: &history, generated: 0, params: SamplingParams::default() };
            let token = greedy.sample(&mut random, &input).expect("greedy samples");
            assert_eq!(token, argmax(&logits), "vocab {vocab}, row {row}");
        }
        assert_eq!(random.draws(), 0, "greedy draws no random number");
    }
}

/// One request per parameter set: the plugin and the native sampler each keep their own stream from the
/// same seed across the whole sequence, so a missing or extra draw would shift every later token.
#[test]
fn top_p_plugin_matches_native_seeded_sampling() {
    let host = host();
    host.load_plugin(&plugin("samplers/top-p")).expect("top-p loads");
    let top_p = host.sampler("top-p").expect("top-p is a sampler");
    // (temperature, top-k, top-p, seed, min-p, repetition, presence, frequency)
    let cases = [
        (0.7f32, 0usize, 0.9f32, 42u64, 0.0f32, 1.0f32, 0.0f32, 0.0f32),
        (1.0, 50, 0.95, 7, 0.0, 1.0, 0.0, 0.0),
        (1.3, 0, 1.0, 1234, 0.05, 1.0, 0.0, 0.0),
        (0.5, 0, 0.5, 99, 0.0, 1.3, 0.0, 0.0),
        (0.0, 0, 1.0, 5, 0.0, 1.0, 1.5, 0.5),
        (2.0, 1000, 0.8, u64::MAX, 0.01, 1.1, 0.4, 0.3),
    ];
    let mut rng = Rng::new(77);
    let mut compared = 0;
    let mut distinct = std::collections::BTreeSet::new();
    for vocab in VOCABS {
        for &(temperature, top_k, p, seed, min_p, repetition_penalty, presence_penalty, frequency_penalty) in &cases {
            let native_params = NativeParams {
                temperature,
                top_k,
                top_p: p,
                seed,
                min_p,
                repetition_penalty,
                presence_penalty,
                frequency_penalty,
            };
            let mut native = Sampler::new(native_params).expect("valid parameters");
            let params = SamplingParams {
                temperature,
                top_k: top_k as u32,
                top_p: p,
                seed,
                min_p,
                repetition_penalty,
                presence_penalty,
                frequency_penalty,
            };
            let mut random = RequestRandom::new(seed);
            let mut history = vec![11u32, 12, 13];
            let steps = 12;
            for step in 0..steps {
                let logits = random_logits(&mut rng, vocab, step);
                let expected = native.sample(&logits);
                let input = SampleInput { logits: &logits, history: &history, generated: step as u32, params };
                let token = top_p.sample(&mut random, &input).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(token, expected, "vocab {vocab}, T {temperature}, k {top_k}, p {p}, seed {seed}, step {step}");
                history.push(token);
                distinct.insert(token);
                compared += 1;
            }
            let expected_draws = if temperature == 0.0 { 0 } else { steps as u64 };
            assert_eq!(random.draws(), expected_draws, "one draw per sampled token, none when greedy");
        }
    }
    assert_eq!(compared, 2 * 6 * 12);
    assert!(distinct.len() > 100, "the cases must exercise real sampling, got {} distinct tokens", distinct.len());
}

#[test]
fn invalid_parameters_are_refused_before_the_plugin_runs() {
    let host = host();
    host.load_plugin(&plugin("samplers/top-p")).unwrap();
    let top_p = host.sampler("top-p").unwrap();
    let logits = [1.0f32, 2.0, 3.0];
    let mut random = RequestRandom::new(1);
    for params in [
        SamplingParams { top_p: 0.0, ..SamplingParams::default() },
        SamplingParams { temperature: f32::NAN, ..SamplingParams::default() },
        SamplingParams { repetition_penalty: 0.0, ..SamplingParams::default() },
    ] {
        let input = SampleInput { logits: &logits, history: &[], generated: 0, params };
        let err = top_p.sample(&mut random, &input).unwrap_err();
        assert!(err.to_string().contains("invalid input for plugin `top-p`"), "{err}");
    }
    let input = SampleInput { logits: &[], history: &[], generated: 0, params: SamplingParams::default() };
    assert!(top_p.sample(&mut random, &input).unwrap_err().to_string().contains("logits are empty"));
    assert_eq!(random.draws(), 0);
}

/// The fuel limits in the samplers' plugin.toml leave at least 4x headroom over a 128,256-entry call.
#[test]
fn sampler_fuel_fits_the_manifest_limits_with_headroom() {
    let host = host();
    host.load_plugin(&plugin("samplers/greedy")).unwrap();
    host.load_plugin(&plugin("samplers/top-p")).unwrap();
    let mut rng = Rng::new(3);
    let logits = random_logits(&mut rng, 128_256, 1);
    for (id, params) in [
        ("greedy", SamplingParams::default()),
        ("top-p", SamplingParams { temperature: 1.0, top_p: 0.9, seed: 1, ..SamplingParams::default() }),
    ] {
        let plugin = host.sampler(id).unwrap();
        let limit = host.get(id).unwrap().manifest.limits.fuel_per_call;
        let input = SampleInput { logits: &logits, history: &[], generated: 0, params };
        let (_, fuel) = plugin.sample_metered(&mut RequestRandom::new(1), &input).unwrap();
        println!("{id}: {fuel} fuel for a 128,256-entry call (limit {limit})");
        // A 128-bit load takes 4 logits: reading them all costs at least a quarter of the vocabulary.
        assert!(fuel > 128_256 / 4, "{id} must at least read every logit, burned {fuel}");
        assert!(fuel * 4 <= limit, "{id} burned {fuel}, more than a quarter of its limit {limit}");
    }
}

/// The distribution a draw is made from (candidates, weights, total), computed natively and by the same
/// code compiled to WebAssembly (plugins/test/distribution-probe), compared bit for bit: the exp, the
/// penalties, the selections and the sums agree exactly, not just the tokens they lead to.
#[test]
fn probabilities_are_bit_identical_in_webassembly_and_native() {
    use computepool_sampling_core::{Params, Prepared, Scratch, prepare};
    let config = computepool_plugin_host::HostConfig::from_toml(
        "[grants]\ndefault = [\"log\", \"clock\", \"random\"]\n[grants.plugins]\ntest-distribution-probe = [\"kv-store\"]\n",
    )
    .unwrap();
    let host = computepool_plugin_host::PluginHost::new(config).unwrap();
    host.load_plugin(&plugin("test/distribution-probe")).expect("the probe loads");
    let probe = host.sampler("test-distribution-probe").unwrap();
    let kv = host.kv_scope("test-distribution-probe");
    let sets = [
        Params { temperature: 1.0, ..Params::default() },
        Params { temperature: 0.7, top_p: 0.9, ..Params::default() },
        Params { temperature: 1.3, top_k: 40, top_p: 0.95, min_p: 0.02, ..Params::default() },
        Params { temperature: 0.8, min_p: 0.05, repetition_penalty: 1.2, presence_penalty: 0.5, frequency_penalty: 0.25, ..Params::default() },
        Params { temperature: 3.0, top_p: 0.999, ..Params::default() },
    ];
    let mut rng = Rng::new(5);
    let mut weights_compared = 0usize;
    for vocab in VOCABS {
        for (n, params) in sets.iter().enumerate() {
            let logits = random_logits(&mut rng, vocab, n);
            let history: Vec<u32> = (0..64).map(|i| (i * 7919 % vocab) as u32).collect();
            let mut native = Vec::new();
            let mut scratch = Scratch::default();
            match prepare(&logits, &history, params, &mut scratch) {
                Prepared::Greedy(t) => native.extend_from_slice(&(t as f64).to_le_bytes()),
                Prepared::Draw(d) => {
                    native.extend_from_slice(&d.total.to_le_bytes());
                    for (token, w) in d.entries() {
                        native.extend_from_slice(&(token as f64).to_le_bytes());
                        native.extend_from_slice(&f64::from(w).to_le_bytes());
                        weights_compared += 1;
                    }
                }
            }
            let p = SamplingParams {
                temperature: params.temperature,
                top_k: params.top_k,
                top_p: params.top_p,
                min_p: params.min_p,
                repetition_penalty: params.repetition_penalty,
                presence_penalty: params.presence_penalty,
                frequency_penalty: params.frequency_penalty,
                seed: 0,
            };
            let input = SampleInput { logits: &logits, history: &history, generated: history.len() as u32, params: p };
            probe.sample(&mut RequestRandom::new(0), &input).unwrap_or_else(|e| panic!("{e}"));
            let wasm = kv.get("distribution").unwrap().expect("the probe stored its distribution");
            assert_eq!(wasm.len(), native.len(), "vocab {vocab}, set {n}: candidate count");
            let first_difference = wasm.iter().zip(&native).position(|(a, b)| a != b);
            assert_eq!(first_difference, None, "vocab {vocab}, set {n}: bits differ at byte {first_difference:?}");
        }
    }
    assert!(weights_compared > 200_000, "the sets must compare real distributions, got {weights_compared} weights");
}

/// Mirostat 2.0 keeps one state entry per request in its kv-store scope and holds the sampled tokens'
/// surprise near its 5-bit target where plain sampling of the same distribution averages ~5.8 bits.
#[test]
fn mirostat_tracks_its_surprise_target_with_state_in_the_kv_store() {
    let config = computepool_plugin_host::HostConfig::from_toml(
        "[grants]\ndefault = [\"log\", \"clock\", \"random\"]\n[grants.plugins]\nmirostat = [\"kv-store\"]\n",
    )
    .unwrap();
    let host = computepool_plugin_host::PluginHost::new(config).unwrap();
    host.load_plugin(&plugin("samplers/mirostat")).expect("mirostat loads with kv-store granted");
    let mirostat = host.sampler("mirostat").unwrap();
    // p_i ∝ e^(-0.05 i): entropy ≈ 5.77 bits, above the target, so mirostat must truncate.
    let logits: Vec<f32> = (0..1000).map(|i| -0.05 * i as f32).collect();
    let ln_z = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
    let surprise = |t: u32| (ln_z - logits[t as usize] as f64) / std::f64::consts::LN_2;
    let params = SamplingParams { temperature: 1.0, seed: 21, ..SamplingParams::default() };
    let run = |seed: u64| {
        let mut random = RequestRandom::new(seed);
        let mut history = Vec::new();
        for _ in 0..400 {
            let input = SampleInput {
                logits: &logits,
                history: &history,
                generated: history.len() as u32,
                params: SamplingParams { seed, ..params },
            };
            history.push(mirostat.sample(&mut random, &input).unwrap_or_else(|e| panic!("{e}")));
        }
        history
    };
    let tokens = run(21);
    let mean = tokens[100..].iter().map(|&t| surprise(t)).sum::<f64>() / 300.0;
    assert!((4.5..=5.5).contains(&mean), "mean surprise {mean:.2} bits, target 5");
    // Plain sampling of the same distribution (the native sampler at temperature 1) averages more.
    let mut native = Sampler::new(NativeParams { temperature: 1.0, seed: 21, ..NativeParams::default() }).unwrap();
    let plain = (0..300).map(|_| surprise(native.sample(&logits))).sum::<f64>() / 300.0;
    assert!(plain > 5.5, "plain sampling's mean surprise {plain:.2} bits");
    // One request holds one entry (the state moves along with the history), and a repeat is identical.
    let scope = host.kv_scope("mirostat");
    assert!(scope.bytes() < 64, "{} bytes of state for one request", scope.bytes());
    assert_eq!(run(21), tokens, "the same seed gives the same tokens");
    assert!(scope.bytes() < 64);
}
