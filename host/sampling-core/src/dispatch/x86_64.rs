//! Native x86-64 with `std`: the build targets the baseline CPU (SSE2, 4 f32 lanes), so the vocabulary
//! loops are compiled twice more, with AVX2 (8 lanes) and AVX-512 (16 lanes) enabled, and the widest the
//! CPU has is picked at run time. It is the same source (`kernels.rs`): lane-wise IEEE operations in the
//! order written there, so every width gives the same bits — the tests below compare them.

extern crate std;

use crate::kernels::{self, BlockWeights};

/// The vector width in use: 0 baseline, 1 AVX2, 2 AVX-512 (std caches the detection).
fn tier() -> u8 {
    if std::is_x86_feature_detected!("avx512f") {
        2
    } else if std::is_x86_feature_detected!("avx2") {
        1
    } else {
        0
    }
}

/// One entry point per loop, and beside it a module of the same name holding the kernel inlined into a
/// copy compiled for each width (the tests call each copy the CPU can run).
macro_rules! dispatched {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $vis mod $name {
            use super::*;

            #[target_feature(enable = "avx512f")]
            pub(crate) fn avx512($($arg: $ty),*) $(-> $ret)? {
                kernels::$name($($arg),*)
            }

            #[target_feature(enable = "avx2")]
            pub(crate) fn avx2($($arg: $ty),*) $(-> $ret)? {
                kernels::$name($($arg),*)
            }
        }

        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            match tier() {
                // SAFETY: `tier` found the feature on this CPU.
                2 => unsafe { $name::avx512($($arg),*) },
                // SAFETY: as above.
                1 => unsafe { $name::avx2($($arg),*) },
                _ => kernels::$name($($arg),*),
            }
        }
    };
}

dispatched! {
    /// Index of the largest value, the lowest index on ties; NaN never wins; 0 when no value is above -∞.
    pub fn argmax(values: &[f32]) -> u32
}

dispatched! {
    /// Each block's largest non-NaN value into `maxima`; returns the largest.
    pub(crate) fn block_maxima(values: &[f32], maxima: &mut alloc::vec::Vec<f32>) -> f32
}

dispatched! {
    /// Steps 4 and 5 over the blocks that can hold a positive weight.
    pub(crate) fn weigh_blocks(logits: &[f32], maxima: &[f32], max: f32, scale: f32, min_p: f32, out: &mut BlockWeights)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::vec::Vec;

    use super::*;
    use crate::kernels::weight_scale;

    /// Every width this CPU has gives the baseline's bits: argmax, block maxima, weights, sums and peaks.
    #[test]
    fn every_vector_width_gives_the_baseline_bits() {
        let mut widths: Vec<(&str, u8)> = Vec::new();
        if std::is_x86_feature_detected!("avx2") {
            widths.push(("avx2", 1));
        }
        if std::is_x86_feature_detected!("avx512f") {
            widths.push(("avx512f", 2));
        }
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut compared = 0;
        for vocab in [1usize, 17, 64, 1000, 49_152, 128_256] {
            for row in 0..4 {
                let mut logits: Vec<f32> = (0..vocab).map(|_| (next() - 0.5) * 40.0).collect();
                if row % 2 == 1 && vocab > 3 {
                    logits[1] = f32::NAN;
                    logits[2] = f32::NEG_INFINITY;
                    logits.iter_mut().enumerate().filter(|(i, _)| (i / 256) % 2 == 1).for_each(|(_, l)| *l -= 300.0);
                }
                let mut base_maxima = Vec::new();
                let max = kernels::block_maxima(&logits, &mut base_maxima);
                let base_argmax = kernels::argmax(&logits);
                for &(name, tier) in &widths {
                    let at = |what: &str| std::format!("{name}, vocab {vocab}, row {row}: {what}");
                    let mut maxima = Vec::new();
                    // SAFETY: the CPU has the feature (detected above).
                    let (m, a) = unsafe {
                        match tier {
                            2 => (block_maxima::avx512(&logits, &mut maxima), argmax::avx512(&logits)),
                            _ => (block_maxima::avx2(&logits, &mut maxima), argmax::avx2(&logits)),
                        }
                    };
                    assert_eq!(m.to_bits(), max.to_bits(), "{}", at("maximum"));
                    assert_eq!(bits(&maxima), bits(&base_maxima), "{}", at("block maxima"));
                    assert_eq!(a, base_argmax, "{}", at("argmax"));
                    for (temperature, min_p) in [(0.8f32, 0.0f32), (1.7, 0.01)] {
                        let scale = weight_scale(temperature);
                        let (mut ours, mut base) = (BlockWeights::new(), BlockWeights::new());
                        kernels::weigh_blocks(&logits, &base_maxima, max, scale, min_p, &mut base);
                        // SAFETY: as above.
                        unsafe {
                            match tier {
                                2 => weigh_blocks::avx512(&logits, &base_maxima, max, scale, min_p, &mut ours),
                                _ => weigh_blocks::avx2(&logits, &base_maxima, max, scale, min_p, &mut ours),
                            }
                        }
                        assert_eq!(ours.live, base.live, "{}", at("live blocks"));
                        assert_eq!(bits(ours.stored()), bits(base.stored()), "{}", at("weights"));
                        assert_eq!(bits(&ours.sums), bits(&base.sums), "{}", at("sums"));
                        assert_eq!(bits(&ours.peaks), bits(&base.peaks), "{}", at("peaks"));
                        compared += ours.stored().len();
                    }
                }
            }
        }
        std::println!("{compared} weights compared across {:?}", widths);
        assert!(widths.is_empty() || compared > 500_000);
    }
}
