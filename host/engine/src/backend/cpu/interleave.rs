//! The CPU kernels' layout for Q4_0, Q4_1 and Q8_0 weights: the same blocks as ggml's row-major
//! layout, 16 rows interleaved per block column, so that one vector instruction works on 16 rows at
//! once (one 32-bit lane per row) and the per-block scales of 16 rows load as one vector. Pure byte
//! shuffling, no rounding: [`interleave`] and [`deinterleave_rows`] are exact inverses.
//!
//! Why: in ggml's layout a row product handles one block of one row at a time, and the scale work per
//! block (two f16 conversions, a multiply, an FMA) costs as much as the 32 multiply-adds; decode on a
//! small model is then compute bound at well under the memory bandwidth. With 16 rows side by side,
//! that work is shared by 16 rows, and the input's 4-byte groups are broadcast to every row's lane.
//!
//! Layout: rows are taken 16 at a time (a group; the last group padded with zero blocks, whose products
//! are 0). Group `g` holds, for each block column `b` in order, one tile of 16 blocks:
//!
//! - the blocks' f16 fields, field by field: 16 scales `d` (32 bytes), then for Q4_1 16 minimums `m`;
//! - the value bytes in 4-byte chunks: chunk `k`, row `r` at `64·k + 4·r` holds bytes `4k..4k+4` of
//!   row `r`'s values (4 chunks of nibble bytes for Q4_0/Q4_1, 8 chunks of values for Q8_0). Q8_0's
//!   signed values are stored plus 128 (`v ^ 0x80`), as unsigned bytes: the AVX-512 VNNI instruction
//!   multiplies an unsigned byte by a signed one, and the input side must stay signed.
//!
//! A tile is 16 blocks' bytes (320 for Q4_1), tiles follow each other in block order, groups in row
//! order: one group's tiles are one contiguous run of memory, read front to back.

use crate::tensor::QuantKind;

/// Rows per group: one 32-bit lane per row in a 512-bit vector.
pub(crate) const GROUP_ROWS: usize = 16;

/// Whether `kind` has an interleaved layout (the 32-value kinds whose values are whole nibbles or
/// bytes; Q5_0 and the K-quants keep ggml's layout).
pub(crate) fn interleavable(kind: QuantKind) -> bool {
    matches!(kind, QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q8_0)
}

/// Bytes of the f16 fields at the start of one of `kind`'s blocks (and, times 16, of a tile).
pub(crate) fn header_bytes(kind: QuantKind) -> usize {
    match kind {
        QuantKind::Q4_1 => 4,
        _ => 2,
    }
}

/// Bytes of one tile: 16 blocks of `kind`.
pub(crate) fn tile_bytes(kind: QuantKind) -> usize {
    GROUP_ROWS * kind.block_bytes()
}

/// Bytes of an interleaved `[rows, cols]` matrix (rows rounded up to whole groups).
pub(crate) fn interleaved_bytes(kind: QuantKind, rows: usize, cols: usize) -> usize {
    rows.div_ceil(GROUP_ROWS) * (cols / 32) * tile_bytes(kind)
}

/// What is added to each stored value byte (Q8_0's `+ 128`, see the module docs).
fn value_bias(kind: QuantKind) -> u8 {
    if kind == QuantKind::Q8_0 { 0x80 } else { 0 }
}

/// `blocks` (ggml rows of `kind`, `rows × cols` values) in the interleaved layout.
///
/// # Panics
/// If `kind` is not [`interleavable`] or the shapes disagree (callers check both).
pub(crate) fn interleave(kind: QuantKind, rows: usize, cols: usize, blocks: &[u8]) -> Vec<u8> {
    assert!(interleavable(kind), "{kind:?} has no interleaved layout");
    assert_eq!(cols % 32, 0, "quantized rows are whole blocks");
    let (bb, hb, nb) = (kind.block_bytes(), header_bytes(kind), cols / 32);
    let row_bytes = nb * bb;
    assert_eq!(blocks.len(), rows * row_bytes, "quantized weight shape");
    let bias = value_bias(kind);
    // Padding rows are zero blocks: scale 0, values 0.
    let zero = vec![0u8; bb];
    let mut out = vec![0u8; interleaved_bytes(kind, rows, cols)];
    for (g, group) in out.chunks_exact_mut(nb * tile_bytes(kind)).enumerate() {
        for (b, tile) in group.chunks_exact_mut(tile_bytes(kind)).enumerate() {
            for r in 0..GROUP_ROWS {
                let row = g * GROUP_ROWS + r;
                let block = if row < rows { &blocks[row * row_bytes + b * bb..row * row_bytes + (b + 1) * bb] } else { &zero[..] };
                for f in 0..hb / 2 {
                    tile[f * 32 + 2 * r..f * 32 + 2 * r + 2].copy_from_slice(&block[2 * f..2 * f + 2]);
                }
                for (k, chunk) in block[hb..].chunks_exact(4).enumerate() {
                    let at = GROUP_ROWS * hb + 64 * k + 4 * r;
                    for (o, v) in tile[at..at + 4].iter_mut().zip(chunk) {
                        *o = v ^ bias;
                    }
                }
            }
        }
    }
    out
}

/// ggml's row-major blocks of rows `start..start + out.len() / row_bytes` of an interleaved matrix
/// with `cols` columns (the inverse of [`interleave`] for those rows).
///
/// # Panics
/// If `out` is not whole rows or the rows are not inside `packed`.
pub(crate) fn deinterleave_rows(kind: QuantKind, cols: usize, packed: &[u8], start: usize, out: &mut [u8]) {
    let (bb, hb, nb) = (kind.block_bytes(), header_bytes(kind), cols / 32);
    let row_bytes = nb * bb;
    assert_eq!(out.len() % row_bytes, 0, "whole rows");
    let bias = value_bias(kind);
    let group_bytes = nb * tile_bytes(kind);
    for (i, row) in out.chunks_exact_mut(row_bytes).enumerate() {
        let (g, r) = ((start + i) / GROUP_ROWS, (start + i) % GROUP_ROWS);
        let group = &packed[g * group_bytes..(g + 1) * group_bytes];
        for (tile, block) in group.chunks_exact(tile_bytes(kind)).zip(row.chunks_exact_mut(bb)) {
            for f in 0..hb / 2 {
                block[2 * f..2 * f + 2].copy_from_slice(&tile[f * 32 + 2 * r..f * 32 + 2 * r + 2]);
            }
            for (k, chunk) in block[hb..].chunks_exact_mut(4).enumerate() {
                let at = GROUP_ROWS * hb + 64 * k + 4 * r;
                for (o, v) in chunk.iter_mut().zip(&tile[at..at + 4]) {
                    *o = v ^ bias;
                }
            }
        }
    }
}

/// Every row of an interleaved `[rows, cols]` matrix back in ggml's layout.
pub(crate) fn deinterleave(kind: QuantKind, rows: usize, cols: usize, packed: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; rows * kind.row_bytes(cols)];
    deinterleave_rows(kind, cols, packed, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn interleaving_round_trips_and_pads_with_zeros() {
        for kind in [QuantKind::Q4_0, QuantKind::Q4_1, QuantKind::Q8_0] {
            for rows in [1, 16, 37] {
                let cols = 96;
                let blocks = bytes(rows * kind.row_bytes(cols), rows as u64);
                let packed = interleave(kind, rows, cols, &blocks);
                assert_eq!(packed.len(), interleaved_bytes(kind, rows, cols));
                assert_eq!(deinterleave(kind, rows, cols, &packed), blocks, "{kind:?} {rows} rows");
                // One row alone, from the middle.
                let rb = kind.row_bytes(cols);
                let mut one = vec![0u8; rb];
                deinterleave_rows(kind, cols, &packed, rows / 2, &mut one);
                assert_eq!(one, blocks[rows / 2 * rb..(rows / 2 + 1) * rb]);
                // The padding rows of the last group read back as zero blocks (values 0 after the bias).
                let padded = rows.next_multiple_of(GROUP_ROWS);
                let all = deinterleave(kind, padded, cols, &packed);
                assert!(all[rows * rb..].chunks_exact(kind.block_bytes()).all(|b| {
                    b[..header_bytes(kind)].iter().all(|&v| v == 0) && b[header_bytes(kind)..].iter().all(|&v| v == 0)
                }));
            }
        }
    }

    /// The documented positions: row 5's scale, Q4_1's minimum, and value bytes 4..8 (chunk 1).
    #[test]
    fn tiles_hold_fields_and_chunks_where_documented() {
        let (rows, cols) = (16, 64);
        for kind in [QuantKind::Q4_1, QuantKind::Q8_0] {
            let blocks = bytes(rows * kind.row_bytes(cols), 7);
            let packed = interleave(kind, rows, cols, &blocks);
            let (bb, hb) = (kind.block_bytes(), header_bytes(kind));
            // Row 5, block 1: its bytes in ggml's layout and in the second tile.
            let block = &blocks[5 * kind.row_bytes(cols) + bb..5 * kind.row_bytes(cols) + 2 * bb];
            let tile = &packed[tile_bytes(kind)..2 * tile_bytes(kind)];
            assert_eq!(tile[10..12], block[0..2]);
            if kind == QuantKind::Q4_1 {
                assert_eq!(tile[32 + 10..32 + 12], block[2..4]);
            }
            let chunk1 = &tile[16 * hb + 64 + 20..16 * hb + 64 + 24];
            let want: Vec<u8> = block[hb + 4..hb + 8].iter().map(|v| v ^ value_bias(kind)).collect();
            assert_eq!(chunk1, &want[..]);
        }
    }
}
