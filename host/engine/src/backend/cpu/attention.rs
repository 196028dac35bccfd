//! Causal (optionally sliding-window) attention over a KV cache, with grouped-query heads.
//!
//! Keys are processed in chunks of [`CHUNK`] absolute positions (chunk `c` is `c·CHUNK..(c+1)·CHUNK`).
//! For one query head and one chunk, the kernel computes a partial softmax: scores
//! `s_j = (q·k_j) · scale` (each dot product one fused multiply-add chain in increasing dimension), their
//! maximum `m_c`,
//! `p_j = e^(s_j − m_c)`, `l_c = Σ p_j` (lane-wise over 16/8-key blocks, then the fixed tree) and
//! `o_c = Σ p_j v_j` (in increasing `j`). Partials are merged in chunk order,
//! `m = max(m, m_c)`, `l = l·e^(m_old − m) + l_c·e^(m_c − m)`, `o` likewise, and `out = o / l`. Softmax
//! runs in f32 throughout.
//!
//! Because chunk boundaries are absolute and the merge order is fixed, a query's output depends only on
//! its own position and the cache, never on how many queries share the call or how work is split
//! between threads. Two schedules use that freedom:
//!
//! - **Query blocks** (prefill): tasks are (block of [`QUERY_BLOCK`] tokens, KV head); a task scores all
//!   of its query heads against a chunk at once (register tiles of 6 query rows × 64 keys, straight from
//!   the cache's transposed key block) and merges chunk after chunk. Blocks with more keys go first.
//! - **Key split** (decode, few queries): tasks are (KV head, chunk), so a long cache is spread over all
//!   threads even with one query; partials go to scratch and are merged afterwards in chunk order.
//!
//! A chunk is one of the cache's key blocks ([`KEY_BLOCK`]), stored `[head_dim][KEY_BLOCK]`: the score
//! tiles read it as it lies. Its positions past the valid keys (the cache's unwritten tail, or keys
//! outside a sliding window) are scored too, and masked before the softmax reads them.

use super::pool::ThreadPool;
use super::scratch::{Slot, with_scratch};
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::simd::{Isa, Scalar, Simd};
use super::{AttentionShape, KEY_BLOCK, KvView};

/// Keys per chunk: one key block of the cache (a multiple of every instruction set's lane count).
pub(crate) const CHUNK: usize = KEY_BLOCK;
/// Query tokens per task in the query-block schedule.
const QUERY_BLOCK: usize = 16;

/// Everything a task needs, as raw pointers (tasks write disjoint outputs).
#[derive(Clone, Copy)]
struct Job {
    q: *const f32,
    n: usize,
    first_pos: usize,
    k: *const f32,
    v: *const f32,
    capacity: usize,
    n_heads: usize,
    group: usize,
    head_dim: usize,
    window: Option<usize>,
    scale: f32,
}

// SAFETY: the pointers are only read, except where a task is handed its own output rows.
unsafe impl Sync for Job {}

impl Job {
    /// Valid key positions of query token `t`: `lo..hi` (absolute).
    fn keys(&self, t: usize) -> (usize, usize) {
        let pos = self.first_pos + t;
        let lo = match self.window {
            Some(w) if pos + 1 > w => pos + 1 - w,
            _ => 0,
        };
        (lo, pos + 1)
    }

    /// Floats per stored partial: `m`, `l`, then `o[head_dim]`.
    fn partial_len(&self) -> usize {
        self.head_dim + 2
    }
}

/// Attention for `n` query tokens; see [`super::CpuBackend::attention`] for the layout.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    pool: &ThreadPool,
    isa: Isa,
    q: &[f32],
    n: usize,
    first_pos: usize,
    kv: KvView<'_>,
    shape: AttentionShape,
    out: &mut [f32],
) {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        sliding_window,
    } = shape;
    assert!(
        n_kv_heads > 0 && n_heads % n_kv_heads == 0,
        "query heads must be a multiple of KV heads"
    );
    assert_eq!(q.len(), n * n_heads * head_dim, "attention query shape");
    assert_eq!(out.len(), q.len(), "attention output shape");
    assert!(kv.len >= first_pos + n, "KV cache shorter than the queries");
    assert!(kv.capacity >= kv.len, "KV cache length beyond its capacity");
    assert!(kv.capacity.is_multiple_of(KEY_BLOCK), "KV cache capacity {} is not a multiple of {KEY_BLOCK}", kv.capacity);
    assert!(kv.k.len() >= n_kv_heads * kv.capacity * head_dim, "key cache shape");
    assert!(kv.v.len() >= n_kv_heads * kv.capacity * head_dim, "value cache shape");
    if n == 0 || head_dim == 0 {
        return;
    }
    let job = Job {
        q: q.as_ptr(),
        n,
        first_pos,
        k: kv.k.as_ptr(),
        v: kv.v.as_ptr(),
        capacity: kv.capacity,
        n_heads,
        group: n_heads / n_kv_heads,
        head_dim,
        // A zero window would leave a query nothing to attend to; the smallest meaningful one is itself.
        window: sliding_window.map(|w| w.max(1)),
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    let out_ptr = OutPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(QUERY_BLOCK);
    if blocks * n_kv_heads >= 2 * pool.threads() || n > QUERY_BLOCK {
        // Query blocks, heaviest (latest) first.
        pool.run(blocks * n_kv_heads, &|i| {
            let block_index = blocks - 1 - i / n_kv_heads;
            let kv_head = i % n_kv_heads;
            let tokens = block_index * QUERY_BLOCK..((block_index + 1) * QUERY_BLOCK).min(n);
            let queries = tokens.len() * job.group;
            let partial = job.partial_len();
            let len = queries * (job.head_dim + CHUNK + partial) + job.group * job.head_dim;
            with_scratch::<f32, _>(Slot::Task, len, |buf| {
                let out_ptr = &out_ptr;
                // SAFETY: `isa` is detected; this task writes only the outputs of its tokens × heads.
                unsafe { query_block_for(isa, &job, kv_head, tokens, buf, out_ptr.0) };
            });
        });
        return;
    }
    // Key split: few queries, possibly many keys.
    let first_chunk = job.keys(0).0 / CHUNK;
    let chunks = (job.keys(n - 1).1 - 1) / CHUNK + 1 - first_chunk;
    let partial = job.partial_len();
    let per_query = chunks * partial;
    with_scratch::<f32, _>(Slot::Call, n * n_heads * per_query, |partials| {
        let parts = OutPtr(partials.as_mut_ptr());
        pool.run(chunks * n_kv_heads, &|i| {
            let chunk = first_chunk + i / n_kv_heads;
            let kv_head = i % n_kv_heads;
            let queries = n * job.group;
            let len = queries * (job.head_dim + CHUNK) + job.group * job.head_dim;
            with_scratch::<f32, _>(Slot::Task, len, |buf| {
                let parts = &parts;
                // SAFETY: `isa` is detected; this task writes only the partials of (its chunk, its heads).
                unsafe { key_split_for(isa, &job, kv_head, chunk, first_chunk, chunks, buf, parts.0) };
            });
        });
        // SAFETY: `isa` is detected; `partials` holds every partial, `out` has the full output shape.
        unsafe { merge_for(isa, &job, chunks, partials, out) };
    });
}

struct OutPtr(*mut f32);
// SAFETY: only used to hand disjoint output regions to parallel tasks.
unsafe impl Sync for OutPtr {}

macro_rules! isa_dispatch {
    ($isa:expr, $generic:ident, $avx512:ident, $avx2:ident, ($($arg:expr),*)) => {
        match $isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 => $avx512($($arg),*),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => $avx2($($arg),*),
            _ => $generic(Scalar, $($arg),*),
        }
    };
}

/// # Safety
/// `isa` supported; `buf` large enough (see the caller); `out` the full output.
unsafe fn query_block_for(
    isa: Isa,
    job: &Job,
    kv_head: usize,
    tokens: std::ops::Range<usize>,
    buf: &mut [f32],
    out: *mut f32,
) {
    // SAFETY: forwarded.
    unsafe {
        isa_dispatch!(
            isa,
            query_block,
            query_block_avx512,
            query_block_avx2,
            (job, kv_head, tokens, buf, out)
        )
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn query_block_avx512(
    job: &Job,
    kv_head: usize,
    tokens: std::ops::Range<usize>,
    buf: &mut [f32],
    out: *mut f32,
) {
    // SAFETY: only reached on CPUs with these features.
    unsafe { query_block(Avx512::new_unchecked(), job, kv_head, tokens, buf, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn query_block_avx2(job: &Job, kv_head: usize, tokens: std::ops::Range<usize>, buf: &mut [f32], out: *mut f32) {
    // SAFETY: only reached on CPUs with these features.
    unsafe { query_block(Avx2::new_unchecked(), job, kv_head, tokens, buf, out) }
}

/// Copies the query heads of `kv_head` for `tokens` into `qbuf` (`[token][group head][head_dim]`).
#[inline(always)]
fn gather_queries(job: &Job, kv_head: usize, tokens: std::ops::Range<usize>, qbuf: &mut [f32]) {
    let hd = job.head_dim;
    let width = job.group * hd;
    for (i, t) in tokens.enumerate() {
        let src = (t * job.n_heads + kv_head * job.group) * hd;
        // SAFETY: `t < n` and the heads of `kv_head` lie inside token `t`'s `n_heads * hd` queries.
        let src = unsafe { std::slice::from_raw_parts(job.q.add(src), width) };
        qbuf[i * width..(i + 1) * width].copy_from_slice(src);
    }
}

/// Scores of all `queries` rows of `qbuf` against the key block that starts at position `c0`, written
/// to `scores[query * CHUNK + (j - c0)]` as `Σ_d q[d] · k_j[d]`, accumulated in increasing `d` (one fused
/// multiply-add chain per score, so the value does not depend on which other queries or keys share the
/// tile). Every position of the block is scored; the caller masks those outside its valid keys.
///
/// # Safety
/// The block must be inside the cache (`c0 + CHUNK <= capacity`); `scores` must hold
/// `queries * CHUNK` values.
#[inline(always)]
unsafe fn score_chunk<S: Simd>(s: S, job: &Job, kv_head: usize, qbuf: &[f32], queries: usize, c0: usize, scores: &mut [f32]) {
    let hd = job.head_dim;
    let lanes = S::LANES;
    // SAFETY: the block lies in the cache (caller's contract): `hd` rows of CHUNK keys.
    let kt = unsafe { job.k.add((kv_head * job.capacity + c0) * hd) };
    let height = qk_tile_height::<S>();
    let blocks = CHUNK / lanes;
    let mut r = 0;
    while r < queries {
        let rows = height.min(queries - r);
        let mut b = 0;
        while b < blocks {
            // SAFETY: rows `r..r + rows` of `qbuf` (`hd` values each) and of `scores` (`CHUNK` each) exist;
            // columns `b * lanes..(b + 4) * lanes` lie inside the CHUNK-wide rows of the block and `scores`.
            unsafe {
                let q = qbuf.as_ptr().add(r * hd);
                let k = kt.add(b * lanes);
                let out = scores.as_mut_ptr().add(r * CHUNK + b * lanes);
                match rows {
                    1 => qk_tile::<S, 1>(s, q, hd, k, out),
                    2 => qk_tile::<S, 2>(s, q, hd, k, out),
                    3 if height >= 3 => qk_tile::<S, 3>(s, q, hd, k, out),
                    4 if height >= 4 => qk_tile::<S, 4>(s, q, hd, k, out),
                    5 if height >= 5 => qk_tile::<S, 5>(s, q, hd, k, out),
                    6 if height >= 6 => qk_tile::<S, 6>(s, q, hd, k, out),
                    _ => unreachable!("score tile height {rows} is never requested"),
                }
            }
            b += QK_TILE_BLOCKS;
        }
        r += rows;
    }
}

/// Key vectors per score tile.
const QK_TILE_BLOCKS: usize = 4;

/// Query rows per score tile: `rows × 4` accumulators plus 4 key vectors must fit the register file.
const fn qk_tile_height<S: Simd>() -> usize {
    if S::LANES >= 16 { 6 } else { 2 }
}

/// Scores of `R` query rows against `4 · LANES` transposed keys.
///
/// # Safety
/// `q` has `R` rows of `hd` values; `kt` has `hd` rows (stride CHUNK) of `4 · LANES` readable values;
/// `out` has `R` rows (stride CHUNK) of `4 · LANES` writable values.
#[inline(always)]
unsafe fn qk_tile<S: Simd, const R: usize>(s: S, q: *const f32, hd: usize, kt: *const f32, out: *mut f32) {
    let mut acc = [[s.zero(); QK_TILE_BLOCKS]; R];
    // SAFETY: per the contract.
    unsafe {
        for d in 0..hd {
            let mut kv = [s.zero(); QK_TILE_BLOCKS];
            for (b, k) in kv.iter_mut().enumerate() {
                *k = s.load(kt.add(d * CHUNK + b * S::LANES));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let qv = s.splat(*q.add(r * hd + d));
                for b in 0..QK_TILE_BLOCKS {
                    acc_r[b] = s.fma(qv, kv[b], acc_r[b]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (b, a) in acc_r.iter().enumerate() {
                s.store(out.add(r * CHUNK + b * S::LANES), *a);
            }
        }
    }
}

/// The softmax part of a partial for one query head over the valid keys `lo..hi` of chunk
/// `c0..c0 + CHUNK`. `scores` is that query's row (raw dot products, index `j - c0`); entries `lo..hi` are
/// overwritten with `p_j = e^(s_j − m_c)`. Returns `(m_c, l_c)`.
#[inline(always)]
fn chunk_softmax<S: Simd>(s: S, job: &Job, c0: usize, lo: usize, hi: usize, scores: &mut [f32]) -> (f32, f32) {
    let lanes = S::LANES;
    let scale = s.splat(job.scale);
    let (rel_lo, rel_hi) = (lo - c0, hi - c0);
    let first_block = rel_lo / lanes;
    let end_block = rel_hi.div_ceil(lanes);
    debug_assert!(end_block * lanes <= scores.len());
    let mut maxv = s.splat(f32::NEG_INFINITY);
    // SAFETY (loads and stores of `scores`): blocks lie inside the CHUNK-long row (`rel_hi <= CHUNK`,
    // a multiple of LANES).
    for b in first_block..end_block {
        let base = b * lanes;
        let v = s.mul(unsafe { s.load(scores.as_ptr().add(base)) }, scale);
        let v = s.fill_outside(v, rel_lo.saturating_sub(base), rel_hi - base, f32::NEG_INFINITY);
        maxv = s.max(maxv, v);
    }
    let m = s.reduce_max(maxv);
    let mv = s.splat(m);
    let mut lv = s.zero();
    for b in first_block..end_block {
        let base = b * lanes;
        let v = s.mul(unsafe { s.load(scores.as_ptr().add(base)) }, scale);
        let p = s.fill_outside(s.exp(s.sub(v, mv)), rel_lo.saturating_sub(base), rel_hi - base, 0.0);
        lv = s.add(lv, p);
        unsafe { s.store(scores.as_mut_ptr().add(base), p) };
    }
    (m, s.reduce_sum(lv))
}

/// `o[r] = Σ_{j in lo..hi} p[r][j − c0] · v_j` for `rows` query heads that share the valid range (the
/// heads of one token and one KV head), each in increasing `j`, vectorised over the head dimension;
/// the value rows are loaded once for all of them. `p` rows have stride CHUNK, `o` rows stride `head_dim`.
///
/// # Safety
/// Values `lo..hi` of `kv_head` lie in the cache; `p` holds `rows` rows with entries `lo - c0..hi - c0`;
/// `o` has `rows * head_dim` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_values<S: Simd>(
    s: S,
    job: &Job,
    kv_head: usize,
    c0: usize,
    lo: usize,
    hi: usize,
    p: &[f32],
    rows: usize,
    o: &mut [f32],
) {
    let hd = job.head_dim;
    // SAFETY (whole body): forwarded contract; row offsets stay below `rows`.
    unsafe {
        let v = job.v.add((kv_head * job.capacity + lo) * hd);
        let count = hi - lo;
        let dv = hd.div_ceil(S::LANES);
        let most = if dv <= 6 { 3 } else { 2 };
        let mut r = 0;
        while r < rows {
            let rr = (rows - r).min(most);
            let pr = p.as_ptr().add(r * CHUNK + lo - c0);
            let or = o.as_mut_ptr().add(r * hd);
            macro_rules! tile {
                ($($d:literal),*) => {
                    match (dv, rr) {
                        $(
                            ($d, 1) => pv_tile::<S, $d, 1>(s, v, hd, count, pr, or),
                            ($d, 2) => pv_tile::<S, $d, 2>(s, v, hd, count, pr, or),
                            ($d, 3) if $d <= 6 => pv_tile::<S, $d, 3>(s, v, hd, count, pr, or),
                        )*
                        _ => pv_rows_in_memory(s, v, hd, count, pr, rr, or),
                    }
                };
            }
            tile!(1, 2, 3, 4, 5, 6, 7, 8);
            r += rr;
        }
    }
}

/// [`weighted_values`] for `R` rows with `D` vectors per head (`head_dim <= D * LANES`), accumulators in
/// registers.
///
/// # Safety
/// `count` value rows of `hd` values at `v`; `p` rows (stride CHUNK) of `count` values; `o` rows
/// (stride `hd`) of `hd` values, `R` of each.
#[inline(always)]
unsafe fn pv_tile<S: Simd, const D: usize, const R: usize>(
    s: S,
    v: *const f32,
    hd: usize,
    count: usize,
    p: *const f32,
    o: *mut f32,
) {
    let mut acc = [[s.zero(); D]; R];
    let tail = hd - (D - 1) * S::LANES;
    // SAFETY: every load stays within value row `j` (`hd` values; the last vector is partial) and within
    // the `p` rows; stores write `hd` values per output row.
    unsafe {
        for j in 0..count {
            let row = v.add(j * hd);
            let mut vv = [s.zero(); D];
            for (d, x) in vv.iter_mut().enumerate().take(D - 1) {
                *x = s.load(row.add(d * S::LANES));
            }
            vv[D - 1] = s.load_partial(row.add((D - 1) * S::LANES), tail);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let pj = s.splat(*p.add(r * CHUNK + j));
                for d in 0..D {
                    acc_r[d] = s.fma(pj, vv[d], acc_r[d]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (d, a) in acc_r.iter().enumerate() {
                s.store_partial(o.add(r * hd + d * S::LANES), *a, (hd - d * S::LANES).min(S::LANES));
            }
        }
    }
}

/// [`weighted_values`] for head sizes beyond the register tiles: accumulators in `o` itself.
///
/// # Safety
/// As [`pv_tile`], for `rows` rows.
#[inline(always)]
unsafe fn pv_rows_in_memory<S: Simd>(
    s: S,
    v: *const f32,
    hd: usize,
    count: usize,
    p: *const f32,
    rows: usize,
    o: *mut f32,
) {
    // SAFETY: as in `pv_tile`; `d + len <= hd` on every access.
    unsafe {
        for r in 0..rows {
            let or = o.add(r * hd);
            for d in 0..hd {
                *or.add(d) = 0.0;
            }
            for j in 0..count {
                let pj = s.splat(*p.add(r * CHUNK + j));
                let row = v.add(j * hd);
                let mut d = 0;
                while d < hd {
                    let len = (hd - d).min(S::LANES);
                    let acc = s.load_partial(or.add(d), len);
                    s.store_partial(or.add(d), s.fma(pj, s.load_partial(row.add(d), len), acc), len);
                    d += S::LANES;
                }
            }
        }
    }
}

/// Merges the partial `(m_c, l_c, o_c)` into the running state `(m, l, o)` (`state[0]` = m, `state[1]` = l,
/// `state[2..]` = o). `first` initialises the state instead.
#[inline(always)]
fn merge<S: Simd>(s: S, state: &mut [f32], m_c: f32, l_c: f32, o_c: &[f32], first: bool) {
    let hd = o_c.len();
    if first {
        state[0] = m_c;
        state[1] = l_c;
        state[2..].copy_from_slice(o_c);
        return;
    }
    let m = state[0];
    let m_new = m.max(m_c);
    let a = s.lane(s.exp(s.splat(m - m_new)), 0);
    let b = s.lane(s.exp(s.splat(m_c - m_new)), 0);
    state[0] = m_new;
    state[1] = state[1] * a + l_c * b;
    let (av, bv) = (s.splat(a), s.splat(b));
    let o = &mut state[2..];
    let mut d = 0;
    // SAFETY: `d..d + len` is inside both `o` and `o_c` (`hd` values each).
    unsafe {
        while d < hd {
            let len = (hd - d).min(S::LANES);
            let ov = s.load_partial(o.as_ptr().add(d), len);
            let cv = s.load_partial(o_c.as_ptr().add(d), len);
            s.store_partial(o.as_mut_ptr().add(d), s.fma(cv, bv, s.mul(ov, av)), len);
            d += S::LANES;
        }
    }
}

/// Writes `o / l` of a final state to `out` (`head_dim` values).
#[inline(always)]
fn finish(state: &[f32], out: &mut [f32]) {
    let inv = 1.0 / state[1];
    for (o, v) in out.iter_mut().zip(&state[2..]) {
        *o = v * inv;
    }
}

/// One query-block task: all chunks for `tokens` × the query heads of `kv_head`.
///
/// # Safety
/// `buf` holds `queries * (head_dim + CHUNK + 2 * partial_len)` values; `out` is the full output.
#[inline(always)]
unsafe fn query_block<S: Simd>(
    s: S,
    job: &Job,
    kv_head: usize,
    tokens: std::ops::Range<usize>,
    buf: &mut [f32],
    out: *mut f32,
) {
    let hd = job.head_dim;
    let queries = tokens.len() * job.group;
    let partial = job.partial_len();
    let (qbuf, rest) = buf.split_at_mut(queries * hd);
    let (scores, rest) = rest.split_at_mut(queries * CHUNK);
    let (states, rest) = rest.split_at_mut(queries * partial);
    let o_c = &mut rest[..job.group * hd];
    let mut ml = vec![0f32; 2 * job.group];
    gather_queries(job, kv_head, tokens.clone(), qbuf);
    let lo_all = job.keys(tokens.start).0;
    let hi_all = job.keys(tokens.end - 1).1;
    let mut started = vec![false; queries];
    for chunk in lo_all / CHUNK..hi_all.div_ceil(CHUNK) {
        let c0 = chunk * CHUNK;
        // SAFETY: the block starts below `kv.len` and the capacity is a whole number of blocks (both
        // checked by the caller); `scores` is big enough.
        unsafe { score_chunk(s, job, kv_head, qbuf, queries, c0, scores) };
        for (ti, t) in tokens.clone().enumerate() {
            let (lo, hi) = job.keys(t);
            let (lo, hi) = (lo.max(c0), hi.min(c0 + CHUNK));
            if lo >= hi {
                continue;
            }
            let rows = ti * job.group..(ti + 1) * job.group;
            for qi in rows.clone() {
                let (m_c, l_c) = chunk_softmax(s, job, c0, lo, hi, &mut scores[qi * CHUNK..(qi + 1) * CHUNK]);
                ml[2 * (qi - rows.start)] = m_c;
                ml[2 * (qi - rows.start) + 1] = l_c;
            }
            // SAFETY: `lo..hi` is non-empty, inside this chunk and below `kv.len`; the rows exist.
            unsafe {
                weighted_values(
                    s,
                    job,
                    kv_head,
                    c0,
                    lo,
                    hi,
                    &scores[rows.start * CHUNK..],
                    job.group,
                    o_c,
                )
            };
            for qi in rows.clone() {
                let g = qi - rows.start;
                let o_g = &o_c[g * hd..(g + 1) * hd];
                merge(
                    s,
                    &mut states[qi * partial..(qi + 1) * partial],
                    ml[2 * g],
                    ml[2 * g + 1],
                    o_g,
                    !started[qi],
                );
                started[qi] = true;
            }
        }
    }
    for (ti, t) in tokens.enumerate() {
        for g in 0..job.group {
            let qi = ti * job.group + g;
            let head = kv_head * job.group + g;
            // SAFETY: this task owns the outputs of its tokens × the heads of `kv_head`.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.add((t * job.n_heads + head) * hd), hd) };
            finish(&states[qi * partial..(qi + 1) * partial], dst);
        }
    }
}

/// # Safety
/// `isa` supported; `buf` holds `n * group * (head_dim + CHUNK)` values; `parts` all partials.
#[allow(clippy::too_many_arguments)]
unsafe fn key_split_for(
    isa: Isa,
    job: &Job,
    kv_head: usize,
    chunk: usize,
    first_chunk: usize,
    chunks: usize,
    buf: &mut [f32],
    parts: *mut f32,
) {
    // SAFETY: forwarded.
    unsafe {
        isa_dispatch!(
            isa,
            key_split,
            key_split_avx512,
            key_split_avx2,
            (job, kv_head, chunk, first_chunk, chunks, buf, parts)
        )
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn key_split_avx512(
    job: &Job,
    kv_head: usize,
    chunk: usize,
    first_chunk: usize,
    chunks: usize,
    buf: &mut [f32],
    parts: *mut f32,
) {
    // SAFETY: only reached on CPUs with these features.
    unsafe {
        key_split(
            Avx512::new_unchecked(),
            job,
            kv_head,
            chunk,
            first_chunk,
            chunks,
            buf,
            parts,
        )
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn key_split_avx2(
    job: &Job,
    kv_head: usize,
    chunk: usize,
    first_chunk: usize,
    chunks: usize,
    buf: &mut [f32],
    parts: *mut f32,
) {
    // SAFETY: only reached on CPUs with these features.
    unsafe {
        key_split(
            Avx2::new_unchecked(),
            job,
            kv_head,
            chunk,
            first_chunk,
            chunks,
            buf,
            parts,
        )
    }
}

/// One key-split task: the partials of chunk `chunk` for every query token and head of `kv_head`.
/// Partial `(t, head, chunk)` lives at `parts[((t * n_heads + head) * chunks + chunk - first) * len]`;
/// an empty one (no valid key) has `l = 0`.
///
/// # Safety
/// See [`key_split_for`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn key_split<S: Simd>(
    s: S,
    job: &Job,
    kv_head: usize,
    chunk: usize,
    first_chunk: usize,
    chunks: usize,
    buf: &mut [f32],
    parts: *mut f32,
) {
    let hd = job.head_dim;
    let queries = job.n * job.group;
    let partial = job.partial_len();
    let (qbuf, rest) = buf.split_at_mut(queries * hd);
    let (scores, rest) = rest.split_at_mut(queries * CHUNK);
    let o_c = &mut rest[..job.group * hd];
    gather_queries(job, kv_head, 0..job.n, qbuf);
    let c0 = chunk * CHUNK;
    let k0 = c0.max(job.keys(0).0);
    let k1 = (c0 + CHUNK).min(job.keys(job.n - 1).1);
    if k0 < k1 {
        // SAFETY: the block starts below `kv.len` inside a whole-block capacity; `scores` holds
        // `queries * CHUNK` values.
        unsafe { score_chunk(s, job, kv_head, qbuf, queries, c0, scores) };
    }
    for t in 0..job.n {
        let (lo, hi) = job.keys(t);
        let (lo, hi) = (lo.max(c0), hi.min(c0 + CHUNK));
        let slot = |g: usize| {
            let head = kv_head * job.group + g;
            ((t * job.n_heads + head) * chunks + chunk - first_chunk) * partial
        };
        if lo >= hi {
            for g in 0..job.group {
                // SAFETY: this task owns partial slot (t, head, chunk); the buffer holds every slot.
                unsafe { *parts.add(slot(g) + 1) = 0.0 };
            }
            continue;
        }
        let rows = t * job.group..(t + 1) * job.group;
        for qi in rows.clone() {
            let (m_c, l_c) = chunk_softmax(s, job, c0, lo, hi, &mut scores[qi * CHUNK..(qi + 1) * CHUNK]);
            // SAFETY: as above.
            unsafe {
                *parts.add(slot(qi - rows.start)) = m_c;
                *parts.add(slot(qi - rows.start) + 1) = l_c;
            }
        }
        // SAFETY: `lo..hi` is non-empty, inside this chunk and below `kv.len`; `o_c` holds the group.
        unsafe {
            weighted_values(
                s,
                job,
                kv_head,
                c0,
                lo,
                hi,
                &scores[rows.start * CHUNK..],
                job.group,
                o_c,
            )
        };
        for g in 0..job.group {
            // SAFETY: as above; a slot has `partial = head_dim + 2` values.
            let dst = unsafe { std::slice::from_raw_parts_mut(parts.add(slot(g) + 2), hd) };
            dst.copy_from_slice(&o_c[g * hd..(g + 1) * hd]);
        }
    }
}

/// # Safety
/// `isa` supported.
unsafe fn merge_for(isa: Isa, job: &Job, chunks: usize, partials: &[f32], out: &mut [f32]) {
    // SAFETY: forwarded.
    unsafe {
        isa_dispatch!(
            isa,
            merge_all,
            merge_all_avx512,
            merge_all_avx2,
            (job, chunks, partials, out)
        )
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn merge_all_avx512(job: &Job, chunks: usize, partials: &[f32], out: &mut [f32]) {
    // SAFETY: only reached on CPUs with these features.
    merge_all(unsafe { Avx512::new_unchecked() }, job, chunks, partials, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn merge_all_avx2(job: &Job, chunks: usize, partials: &[f32], out: &mut [f32]) {
    // SAFETY: only reached on CPUs with these features.
    merge_all(unsafe { Avx2::new_unchecked() }, job, chunks, partials, out)
}

/// Merges the key-split partials of every (token, head) in chunk order and writes the outputs.
#[inline(always)]
fn merge_all<S: Simd>(s: S, job: &Job, chunks: usize, partials: &[f32], out: &mut [f32]) {
    let hd = job.head_dim;
    let partial = job.partial_len();
    let mut state = vec![0f32; partial];
    for (qh, dst) in out.chunks_exact_mut(hd).enumerate() {
        let mut started = false;
        for part in partials[qh * chunks * partial..(qh + 1) * chunks * partial].chunks_exact(partial) {
            if part[1] == 0.0 {
                continue;
            }
            merge(s, &mut state, part[0], part[1], &part[2..], !started);
            started = true;
        }
        finish(&state, dst);
    }
}
