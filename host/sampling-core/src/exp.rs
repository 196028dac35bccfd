//! An f64 `exp` that gives the same bits natively and in WebAssembly (no platform libm), for samplers
//! that need natural-log-space arithmetic in f64 (the mirostat plugin). The shared algorithm's own
//! weights use the f32 base-2 form in `kernels`.

const LN2_HI: f64 = 6.931_471_803_691_238_164_90e-1;
const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;
const INV_LN2: f64 = 1.442_695_040_888_963_387_00;
/// 1.5 · 2⁵²: adding it rounds to an integer (to nearest, ties to even) held in the low mantissa bits.
const ROUND_SHIFT: f64 = 6_755_399_441_055_744.0;

/// Taylor coefficients 1/n! for n = 13 down to 2; each a correctly rounded constant division.
const EXP_COEFFICIENTS: [f64; 12] = [
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    1.0 / 2.0,
];

/// eˣ in f64. Branch-free (so it vectorises): `x = k·ln2 + r` with `|r| ≤ ln2/2` (Cody–Waite, two-part
/// ln2), a degree-13 Taylor polynomial for eʳ (truncation error under 5e-18), and 2ᵏ put into the
/// exponent bits. Within a few ulp of the true value on [-708, 709] (tests measure the largest difference
/// from the platform's `exp`); `exp(0) == 1` exactly; below -708 it is 0 (true values there are
/// subnormal, under 3e-308); above 709 it is +∞; NaN gives NaN.
#[inline(always)]
pub fn exp(x: f64) -> f64 {
    let clamped = if x < -708.0 { -708.0 } else if x > 709.0 { 709.0 } else { x };
    let shifted = clamped * INV_LN2 + ROUND_SHIFT;
    let k = shifted - ROUND_SHIFT;
    let r = (clamped - k * LN2_HI) - k * LN2_LO;
    let mut p = EXP_COEFFICIENTS[0];
    for &c in &EXP_COEFFICIENTS[1..] {
        p = p * r + c;
    }
    let p = (p * r + 1.0) * r + 1.0;
    // `shifted`'s bits minus ROUND_SHIFT's are k exactly (|k| ≤ 1023 < 2⁵¹).
    let k_int = (shifted.to_bits() as i64).wrapping_sub(ROUND_SHIFT.to_bits() as i64);
    let scale = f64::from_bits(((k_int + 1023) as u64) << 52);
    let y = p * scale;
    if x < -708.0 {
        0.0
    } else if x > 709.0 {
        f64::INFINITY
    } else {
        y
    }
}
