//! The sampler plugins give exactly the tokens of the engine's native sampling
//! (`computepool_engine::sampling`) on many random logit vectors of a 49,152 and a 128,256 vocabulary.

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
    let cases = [
        (0.7f32, 0usize, 0.9f32, 42u64),
        (1.0, 50, 0.95, 7),
        (1.3, 0, 1.0, 1234),
        (0.5, 0, 0.5, 99),
        (0.0, 0, 1.0, 5),
        (2.0, 1000, 0.8, u64::MAX),
    ];
    let mut rng = Rng::new(77);
    let mut compared = 0;
    let mut distinct = std::collections::BTreeSet::new();
    for vocab in VOCABS {
        for &(temperature, top_k, p, seed) in &cases {
            let native_params = NativeParams { temperature, top_k, top_p: p, seed };
            let mut native = Sampler::new(native_params).expect("valid parameters");
            let params = SamplingParams { temperature, top_k: top_k as u32, top_p: p, seed, ..SamplingParams::default() };
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
        assert!(fuel > 128_256, "{id} must at least read every logit, burned {fuel}");
        assert!(fuel * 4 <= limit, "{id} burned {fuel}, more than a quarter of its limit {limit}");
    }
}
