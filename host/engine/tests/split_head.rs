//! A split output head (`LoadOptions::split_head`): the entry holds lm_head's rows `[0, split)`, the exit
//! rows `[split, vocab)`, the exit's step ends in the normed state, and the two parts' logits, put side
//! by side, are bit for bit the whole lm_head's — for tied and untied heads, bf16 and f32, and the
//! SmolLM2 Q4_1 GGUF (an interleaved head, cut at a group of 16 rows).

mod common;

use std::sync::Arc;

use common::{Family, LAYERS, VOCAB};
use computepool_engine::DType;
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{LoadOptions, Shard, StepInput, StepOutput, head_split};
use computepool_engine::shard::LayerRange;

fn normed(out: StepOutput) -> Vec<f32> {
    match out {
        StepOutput::Normed(n) => n,
        other => panic!("expected the normed state from a split exit, got {other:?}"),
    }
}

/// Runs a prompt and `steps` greedy decode steps through `whole` and through `entry → exit` with a split
/// head, and checks every step's logits are the same bits.
fn check_split_equals_whole(name: &str, whole: &Shard, entry: &Shard, exit: &Shard, prompt: &[u32], steps: usize) {
    let vocab = whole.config().vocab_size;
    let split = head_split(vocab).expect("a splittable vocabulary");
    assert_eq!(entry.head_rows(), Some(0..split), "{name}: the entry's rows");
    assert_eq!(exit.head_rows(), Some(split..vocab), "{name}: the exit's rows");
    let (mut cw, mut ce, mut cx) = (whole.new_cache(), entry.new_cache(), exit.new_cache());
    let mut input = prompt.to_vec();
    for step in 0..=steps {
        let want = common::logits(whole.forward(StepInput::Tokens(&input), &mut cw).unwrap());
        let hidden = common::hidden(entry.forward(StepInput::Tokens(&input), &mut ce).unwrap());
        let state = normed(exit.forward(StepInput::Hidden(&hidden), &mut cx).unwrap());
        let mut got = entry.head_logits(&state).unwrap();
        got.extend(exit.head_logits(&state).unwrap());
        assert_eq!(got.len(), vocab, "{name}: step {step}");
        assert!(common::bits(&got) == common::bits(&want), "{name}: step {step}: the split head's logits differ from the whole head's");
        let next = want.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap();
        input = vec![next];
    }
}

#[test]
fn a_split_head_gives_the_whole_heads_logits_bit_for_bit_on_every_family() {
    for family in Family::ALL {
        let ckpt = common::checkpoint(family);
        for dtype in [DType::Bf16, DType::F32] {
            let backend = Arc::new(CpuBackend::new(2));
            let load = |range: Option<(usize, usize)>, split_head: bool| {
                let range = range.map(|(a, b)| LayerRange::new(a, b, LAYERS).unwrap());
                Shard::load(ckpt.dir(), &LoadOptions { dtype, range, progress: false, split_head }, backend.clone()).unwrap()
            };
            let whole = load(None, false);
            // Both cuts of a three-layer model, and a middle shard between them.
            let name = format!("{} {dtype:?}", family.name());
            check_split_equals_whole(&name, &whole, &load(Some((0, 1)), true), &load(Some((1, LAYERS)), true), &[1, 7, 42, 9], 5);
            check_split_equals_whole(&name, &whole, &load(Some((0, 2)), true), &load(Some((2, LAYERS)), true), &[3, 200, 5], 5);
            let middle = load(Some((1, 2)), true);
            assert_eq!(middle.head_rows(), None, "{name}: a middle shard holds no head");
            assert!(middle.head_logits(&vec![0.0; common::HIDDEN]).is_err(), "{name}: a middle shard has no logits to give");
            // A whole model ignores the flag.
            let whole_split = load(None, true);
            assert_eq!(whole_split.head_rows(), Some(0..VOCAB));
            let mut cache = whole_split.new_cache();
            assert!(matches!(whole_split.forward(StepInput::Tokens(&[1, 2]), &mut cache).unwrap(), StepOutput::Logits(l) if l.len() == VOCAB));
        }
    }
}

#[test]
fn a_split_heads_parts_are_what_each_side_holds_and_bad_states_are_refused() {
    let ckpt = common::checkpoint(Family::Llama3);
    let backend = Arc::new(CpuBackend::new(1));
    let load = |range: (usize, usize), split_head: bool| {
        let range = Some(LayerRange::new(range.0, range.1, LAYERS).unwrap());
        Shard::load(ckpt.dir(), &LoadOptions { dtype: DType::F32, range, progress: false, split_head }, backend.clone()).unwrap()
    };
    let split = head_split(VOCAB).unwrap();
    assert_eq!(split, VOCAB / 2);
    let (exit_whole, exit_part) = (load((1, LAYERS), false), load((1, LAYERS), true));
    let head_bytes = |rows: usize| rows * common::HIDDEN * 4;
    assert_eq!(exit_whole.weight_bytes() - exit_part.weight_bytes(), head_bytes(split), "the exit drops the entry's rows");
    let (entry_plain, entry_part) = (load((0, 1), false), load((0, 1), true));
    assert_eq!(entry_part.weight_bytes() - entry_plain.weight_bytes(), head_bytes(split), "the entry adds its rows");
    assert_eq!(entry_plain.head_rows(), None);
    for bad in [vec![], vec![0.0; common::HIDDEN + 1]] {
        let err = exit_part.head_logits(&bad).unwrap_err().to_string();
        assert!(err.contains("whole states"), "{err}");
    }
    assert_eq!(exit_part.head_logits(&vec![0.5; 2 * common::HIDDEN]).unwrap().len(), 2 * (VOCAB - split), "two states at once");
    assert_eq!(head_split(31), None, "too small to cut at a group of 16 rows");
    assert_eq!(head_split(49_152), Some(24_576));
    assert_eq!(head_split(128_256), Some(64_128));
    assert_eq!(head_split(151_936), Some(75_968));
}

#[test]
fn a_split_head_of_the_quantized_smollm2_gives_the_whole_heads_logits_bit_for_bit() {
    let Some(gguf) = common::smollm2_gguf() else {
        eprintln!("skipping: no SmolLM2 GGUF");
        return;
    };
    let backend = Arc::new(CpuBackend::new(2));
    let load = |range: Option<(usize, usize)>, split_head: bool| {
        let range = range.map(|(a, b)| LayerRange::new(a, b, 30).unwrap());
        Shard::load_gguf(&gguf, &LoadOptions { range, split_head, ..Default::default() }, backend.clone()).unwrap()
    };
    let whole = load(None, false);
    assert_eq!(whole.config().num_layers, 30);
    check_split_equals_whole("smollm2 q4_1", &whole, &load(Some((0, 13)), true), &load(Some((13, 30)), true), &[1, 504, 2988, 314, 4649], 4);
}
