//! Dequantization of ggml tensor blocks to f32, following ggml's block layouts (ggml-common.h) and
//! reference dequantizers (ggml-quants.c) exactly, operation for operation, so the values are the
//! ones llama.cpp itself computes.
//!
//! All arithmetic is f32, in ggml's order (`q * d + m`, `(d * sc) * q`, …); Rust never fuses a
//! multiply and an add on its own, so results are bit-identical to ggml's scalar path.

use half::{bf16, f16};

use super::types::{GgmlType, QK_K};
use crate::error::{EngineError, Result};

/// Dequantizes `n_elements` values of type `ty` stored in `data` (exactly the tensor's bytes).
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: u64) -> Result<Vec<f32>> {
    let n = usize::try_from(n_elements)
        .map_err(|_| EngineError::Invalid(format!("{n_elements} elements do not fit in memory")))?;
    let mut out = vec![0f32; n];
    dequantize_into(ty, data, &mut out)?;
    Ok(out)
}

/// Dequantizes `data` (values of type `ty`) into `out`; `data` must hold exactly `out.len()` values.
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let block = ty.block_size();
    let expected = ty.bytes_for(out.len() as u64);
    if expected != Some(data.len() as u64) {
        return Err(EngineError::Invalid(format!(
            "{ty} data of {} bytes does not hold {} values (expected {} bytes in blocks of {block})",
            data.len(),
            out.len(),
            expected.map_or_else(|| "a whole number of blocks".to_string(), |e| e.to_string())
        )));
    }
    let decode: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => f32_block,
        GgmlType::F16 => f16_block,
        GgmlType::BF16 => bf16_block,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        GgmlType::Q8_K => q8_k,
        other => {
            return Err(EngineError::Invalid(format!(
                "cannot dequantize ggml type {other}: supported are f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, \
                 q8_0, q2_K, q3_K, q4_K, q5_K, q6_K and q8_K"
            )));
        }
    };
    // Scalar types decode many values per call; block types one block per call.
    if block == 1 {
        decode(data, out);
    } else {
        for (bytes, values) in data.chunks_exact(ty.type_size()).zip(out.chunks_exact_mut(block)) {
            decode(bytes, values);
        }
    }
    Ok(())
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn f32_block(b: &[u8], y: &mut [f32]) {
    for (v, c) in y.iter_mut().zip(b.chunks_exact(4)) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

fn f16_block(b: &[u8], y: &mut [f32]) {
    for (v, c) in y.iter_mut().zip(b.chunks_exact(2)) {
        *v = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

fn bf16_block(b: &[u8], y: &mut [f32]) {
    for (v, c) in y.iter_mut().zip(b.chunks_exact(2)) {
        *v = bf16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

/// block_q4_0 { f16 d; u8 qs[16] }: y[j] = (lo(qs[j]) - 8)·d, y[j+16] = (hi(qs[j]) - 8)·d.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = i32::from(qs[j] & 0x0F) - 8;
        let x1 = i32::from(qs[j] >> 4) - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// block_q4_1 { f16 d; f16 m; u8 qs[16] }: y[j] = lo(qs[j])·d + m, y[j+16] = hi(qs[j])·d + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = qs[j] & 0x0F;
        let x1 = qs[j] >> 4;
        y[j] = f32::from(x0) * d + m;
        y[j + 16] = f32::from(x1) * d + m;
    }
}

/// The 5th bits of a q5 block: bit j of `qh` belongs to y[j], bit j+16 to y[j+16].
fn q5_high_bits(qh: u32, j: usize) -> (u8, u8) {
    let h0 = (((qh >> j) << 4) & 0x10) as u8;
    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
    (h0, h1)
}

/// block_q5_0 { f16 d; u8 qh[4]; u8 qs[16] }: 5-bit values minus 16, times d.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let (h0, h1) = q5_high_bits(qh, j);
        let x0 = i32::from((qs[j] & 0x0F) | h0) - 16;
        let x1 = i32::from((qs[j] >> 4) | h1) - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16] }: 5-bit values times d plus m.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let (h0, h1) = q5_high_bits(qh, j);
        let x0 = (qs[j] & 0x0F) | h0;
        let x1 = (qs[j] >> 4) | h1;
        y[j] = f32::from(x0) * d + m;
        y[j + 16] = f32::from(x1) * d + m;
    }
}

/// block_q8_0 { f16 d; i8 qs[32] }: y[j] = qs[j]·d.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..34]) {
        *v = f32::from(q as i8) * d;
    }
}

/// block_q2_K { u8 scales[16]; u8 qs[64]; f16 d; f16 dmin }: sixteen 16-value groups, each with a
/// 4-bit scale and 4-bit min; 2-bit values.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = half_at(b, 80);
    let min = half_at(b, 82);
    let mut out = 0;
    let mut is = 0;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0u32, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * f32::from(sc & 0x0F);
                let ml = min * f32::from(sc >> 4);
                for l in 0..16 {
                    let x = (q[part * 16 + l] >> shift) & 3;
                    y[out] = dl * f32::from(x) - ml;
                    out += 1;
                }
            }
        }
    }
}

/// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d }: 2 low bits in qs, the high bit in
/// hmask (set means +0, clear means -4), sixteen 6-bit signed scales (offset 32).
fn q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let packed = &b[96..108];
    let d_all = half_at(b, 108);
    // Scale k: low nibble from packed[k % 8] (low half for k < 8, high half after), top two bits
    // from packed[8 + k % 4] at bit 2·(k / 4).
    let mut scales = [0i32; 16];
    for (k, s) in scales.iter_mut().enumerate() {
        let low = if k < 8 { packed[k] & 0x0F } else { packed[k - 8] >> 4 };
        let high = (packed[8 + k % 4] >> (2 * (k / 4))) & 3;
        *s = i32::from(low | (high << 4)) - 32;
    }
    let mut out = 0;
    let mut is = 0;
    let mut m: u8 = 1;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0u32, 2, 4, 6] {
            for part in 0..2 {
                let dl = d_all * scales[is] as f32;
                is += 1;
                for l in 0..16 {
                    let i = part * 16 + l;
                    let low = i32::from((q[i] >> shift) & 3);
                    let x = low - if hmask[i] & m != 0 { 0 } else { 4 };
                    y[out] = dl * x as f32;
                    out += 1;
                }
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// ggml's `get_scale_min_k4`: the j-th 6-bit scale and min packed in 12 bytes.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let d = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (d, m)
    }
}

/// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }: eight 32-value groups with 6-bit
/// scales and mins; y = (d·sc)·q - (dmin·m).
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let min = half_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, min1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), min * f32::from(m2));
        let base = chunk * 64;
        for l in 0..32 {
            y[base + l] = d1 * f32::from(q[l] & 0x0F) - min1;
            y[base + 32 + l] = d2 * f32::from(q[l] >> 4) - min2;
        }
    }
}

/// block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }: q4_K plus a fifth bit.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let min = half_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let ql = &qs[chunk * 32..chunk * 32 + 32];
        let u1 = 1u8 << (2 * chunk);
        let u2 = 2u8 << (2 * chunk);
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, min1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), min * f32::from(m2));
        let base = chunk * 64;
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[base + l] = d1 * f32::from((ql[l] & 0x0F) + h1) - min1;
            y[base + 32 + l] = d2 * f32::from((ql[l] >> 4) + h2) - min2;
        }
    }
}

/// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }: 6-bit values minus 32, sixteen
/// signed 8-bit scales; y = (d·sc)·q.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[half * 64..half * 64 + 64];
        let qh = &qh_all[half * 32..half * 32 + 32];
        let sc = &sc_all[half * 8..half * 8 + 8];
        let base = half * 128;
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |k: usize| f32::from(sc[k] as i8);
            y[base + l] = d * s(is) * q1 as f32;
            y[base + l + 32] = d * s(is + 2) * q2 as f32;
            y[base + l + 64] = d * s(is + 4) * q3 as f32;
            y[base + l + 96] = d * s(is + 6) * q4 as f32;
        }
    }
}

/// block_q8_K { f32 d; i8 qs[256]; i16 bsums[16] }: y[j] = d·qs[j] (bsums only speed up dot products).
fn q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (v, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *v = d * f32::from(q as i8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn scalar_types() {
        let mut data = Vec::new();
        for v in [1.5f32, -2.25, 0.0] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(dequantize(GgmlType::F32, &data, 3).unwrap(), [1.5, -2.25, 0.0]);
        let data: Vec<u8> = [0.5f32, -3.0].iter().flat_map(|&v| h(v)).collect();
        assert_eq!(dequantize(GgmlType::F16, &data, 2).unwrap(), [0.5, -3.0]);
        let data: Vec<u8> = [1.0f32, -0.15625]
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::BF16, &data, 2).unwrap(), [1.0, -0.15625]);
    }

    #[test]
    fn q4_0_block() {
        let mut b = h(0.5).to_vec();
        // qs[j] = lo j, hi 15 - j → y[j] = (j - 8)/2, y[j+16] = (7 - j)/2.
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
        }
    }

    #[test]
    fn q4_1_block() {
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q4_1_matches_ggml_rounding() {
        // d and m that are not exactly representable products: the result must be the f32 rounding
        // of (q·d) then (+ m), not a fused or f64 computation.
        let d = f16::from_f32(0.0123).to_f32();
        let m = f16::from_f32(-0.0987).to_f32();
        let mut b = h(0.0123).to_vec();
        b.extend(h(-0.0987));
        b.extend([0x7Bu8; 16]);
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(y[0].to_bits(), (11.0f32 * d + m).to_bits());
        assert_eq!(y[16].to_bits(), (7.0f32 * d + m).to_bits());
    }

    #[test]
    fn q5_0_and_q5_1_blocks() {
        // qs all 0x0F (lo 15, hi 0); qh bit j set for even j → y[j] = 31 or 15, y[j+16] = 16 or 0.
        let qh: u32 = 0x5555_5555;
        let mut b = h(1.0).to_vec();
        b.extend(qh.to_le_bytes());
        b.extend([0x0Fu8; 16]);
        let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        for j in 0..16 {
            let even = j % 2 == 0;
            assert_eq!(y[j], if even { 31.0 - 16.0 } else { 15.0 - 16.0 }, "y[{j}]");
            assert_eq!(y[j + 16], if even { 16.0 - 16.0 } else { -16.0 }, "y[{}]", j + 16);
        }
        let mut b = h(2.0).to_vec();
        b.extend(h(0.5));
        b.extend(qh.to_le_bytes());
        b.extend([0x0Fu8; 16]);
        let y = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
        assert_eq!(y[0], 31.0 * 2.0 + 0.5);
        assert_eq!(y[1], 15.0 * 2.0 + 0.5);
        assert_eq!(y[16], 16.0 * 2.0 + 0.5);
        assert_eq!(y[17], 0.5);
    }

    #[test]
    fn q8_0_block() {
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|j: i32| ((j - 16) as i8) as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q8_k_block() {
        let mut b = 0.25f32.to_le_bytes().to_vec();
        b.extend((0..256).map(|j: i32| ((j % 200 - 100) as i8) as u8));
        b.extend([0u8; 32]);
        let y = dequantize(GgmlType::Q8_K, &b, 256).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as i32 % 200 - 100) as f32 * 0.25);
        }
    }

    #[test]
    fn q4_k_block() {
        // Scales 1..=8 and mins 0..8 for the eight groups; every nibble = group index % 16.
        let mut scales = [0u8; 12];
        let (sc, mn): ([u8; 8], [u8; 8]) = ([1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7]);
        scales[..4].copy_from_slice(&sc[..4]);
        scales[4..8].copy_from_slice(&mn[..4]);
        for j in 4..8 {
            // 6-bit values < 16: only the low nibbles in bytes 8..12 are used.
            scales[j + 4] = (sc[j] & 0x0F) | ((mn[j] & 0x0F) << 4);
        }
        let mut b = h(1.0).to_vec();
        b.extend(h(0.5));
        b.extend(scales);
        // Chunk c (64 values): low nibble = 2c+1, high nibble = 2c+2.
        for c in 0..4u8 {
            b.extend([(2 * c + 1) | ((2 * c + 2) << 4); 32]);
        }
        let y = dequantize(GgmlType::Q4_K, &b, 256).unwrap();
        for g in 0..8 {
            let q = (g + 1) as f32;
            let expect = sc[g] as f32 * q - 0.5 * mn[g] as f32;
            for l in 0..32 {
                assert_eq!(y[g * 32 + l], expect, "group {g}");
            }
        }
    }

    #[test]
    fn q4_k_high_scale_bits() {
        // Group 4's scale 0b110101 (53) and min 0b101010 (42) use the top bits in bytes 0 and 4.
        let mut scales = [0u8; 12];
        scales[8] = (53 & 0x0F) | ((42 & 0x0F) << 4);
        scales[0] = (53 >> 4) << 6;
        scales[4] = (42 >> 4) << 6;
        assert_eq!(scale_min_k4(4, &scales), (53, 42));
        assert_eq!(scale_min_k4(0, &scales), (0, 0));
    }

    #[test]
    fn q5_k_block() {
        let mut scales = [0u8; 12];
        for j in 0..4 {
            scales[j] = 2; // scale 2 for groups 0..4
            scales[j + 4] = 1; // min 1
        }
        for j in 4..8 {
            scales[j + 4] = 3; // scale 3 (low nibble), min 0 (high nibble) for groups 4..8
        }
        let mut b = h(1.0).to_vec();
        b.extend(h(1.0));
        b.extend(scales);
        // qh: bit 2c for the low half of chunk c set on even l only; high-half bit never set.
        b.extend((0..32).map(|l| if l % 2 == 0 { 0b0101_0101u8 } else { 0 }));
        b.extend([0x21u8; 128]); // low nibble 1, high nibble 2
        let y = dequantize(GgmlType::Q5_K, &b, 256).unwrap();
        for c in 0..4 {
            for l in 0..32 {
                let g_lo = 2 * c;
                let g_hi = 2 * c + 1;
                let (s_lo, m_lo) = if g_lo < 4 { (2.0, 1.0) } else { (3.0, 0.0) };
                let (s_hi, m_hi) = if g_hi < 4 { (2.0, 1.0) } else { (3.0, 0.0) };
                let q_lo = 1.0 + if l % 2 == 0 { 16.0 } else { 0.0 };
                assert_eq!(y[c * 64 + l], s_lo * q_lo - m_lo, "chunk {c} l {l}");
                assert_eq!(y[c * 64 + 32 + l], s_hi * 2.0 - m_hi, "chunk {c} l {l} hi");
            }
        }
    }

    #[test]
    fn q6_k_block() {
        // ql nibbles 5, qh bits 2 for every slot → q = 5 | (2 << 4) = 37 - 32 = 5; scale k = k - 8.
        let mut b = vec![0x55u8; 128];
        b.extend([0b1010_1010u8; 64]);
        b.extend((0..16).map(|k: i32| ((k - 8) as i8) as u8));
        b.extend(h(0.5));
        let y = dequantize(GgmlType::Q6_K, &b, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            let scale_index = i / 16; // 16 consecutive values share a scale
            let expect = 0.5 * (scale_index as f32 - 8.0) * 5.0;
            assert_eq!(*v, expect, "y[{i}]");
        }
    }

    #[test]
    fn q2_k_block() {
        // Scale nibble = group % 16 (+1), min nibble 1; every 2-bit field = 3 → y = d·sc·3 - dmin.
        let mut b: Vec<u8> = (0..16u8).map(|g| ((g % 15) + 1) | (1 << 4)).collect();
        b.extend([0xFFu8; 64]);
        b.extend(h(0.5));
        b.extend(h(0.25));
        let y = dequantize(GgmlType::Q2_K, &b, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            let g = i / 16;
            assert_eq!(*v, 0.5 * ((g % 15) + 1) as f32 * 3.0 - 0.25, "y[{i}]");
        }
    }

    #[test]
    fn q3_k_block() {
        // All scales 32 + 1 → dl = d; low bits 1; hmask set on even bytes only → x = 1 or 1 - 4.
        let mut b = vec![0u8; 32];
        for (i, m) in b.iter_mut().enumerate() {
            *m = if i % 2 == 0 { 0xFF } else { 0x00 };
        }
        b.extend([0b0101_0101u8; 64]);
        // 6-bit scale 33 = 0b10_0001: low nibble 1 everywhere, high bits 2 in every 2-bit slot.
        b.extend([0x11u8; 8]);
        b.extend([0b1010_1010u8; 4]);
        b.extend(h(2.0));
        let y = dequantize(GgmlType::Q3_K, &b, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            let l = i % 32; // position within the 32-byte q / hmask row
            let x = if l % 2 == 0 { 1.0 } else { -3.0 };
            assert_eq!(*v, 2.0 * x, "y[{i}]");
        }
    }

    #[test]
    fn wrong_sizes_and_unsupported_types_are_errors() {
        assert!(dequantize(GgmlType::Q4_1, &[0u8; 19], 32).is_err());
        assert!(dequantize(GgmlType::Q4_1, &[0u8; 20], 31).is_err());
        let e = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], 256).unwrap_err().to_string();
        assert!(e.contains("cannot dequantize ggml type iq2_xxs"), "{e}");
    }

    /// Q4_K, Q6_K and Q5_0 blocks (seeded random bytes with finite f16 scales: every packed scale, min
    /// and high-bit pattern) dequantize bit for bit as gguf-py's numpy dequantizers do, an implementation
    /// independent of this one that mirrors ggml-quants.c (testdata/make_kquant_dequant_fixture.py).
    #[test]
    fn k_quant_blocks_match_gguf_py() {
        let fixture: serde_json::Value = serde_json::from_str(include_str!("testdata/kquant_dequant.json")).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 3);
        for case in cases {
            let ty = match case["type"].as_str().unwrap() {
                "Q4_K" => GgmlType::Q4_K,
                "Q6_K" => GgmlType::Q6_K,
                "Q5_0" => GgmlType::Q5_0,
                other => panic!("unexpected type {other}"),
            };
            let hex = case["blocks_hex"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            let want: Vec<u32> = case["f32_bits"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let got = dequantize(ty, &bytes, want.len() as u64).unwrap();
            assert!(want.iter().any(|&w| f32::from_bits(w) != 0.0), "{ty}: fixture is not all zeros");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), *w, "{ty} value {i}: {g} vs {}", f32::from_bits(*w));
            }
        }
    }
}
