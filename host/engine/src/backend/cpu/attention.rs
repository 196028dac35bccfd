//! Causal (optionally sliding-window) attention over a KV cache, with grouped-query heads.
//!
//! Keys are processed in chunks of [`CHUNK`] absolute positions (chunk `c` is `c·CHUNK..(c+1)·CHUNK`).
//! For one query head and one chunk, the kernel computes a partial softmax: scores
//! `s_j = (q·k_j) · scale` (dot products in the order of [`super::dot`]), their maximum `m_c`,
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
//!   of its query heads against a chunk at once with the 4×6 register tiles of the matrix products and
//!   merges chunk after chunk. Blocks with more keys go first.
//! - **Key split** (decode, few queries): tasks are (KV head, chunk), so a long cache is spread over all
//!   threads even with one query; partials go to scratch and are merged afterwards in chunk order.

use super::dot::{TileArgs, block};
use super::pool::ThreadPool;
use super::scratch::{Slot, with_scratch};
use super::simd::{Isa, Scalar, Simd};
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::{AttentionShape, KvView};

/// Keys per chunk (a multiple of every instruction set's lane count).
pub(crate) const CHUNK: usize = 64;
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
    let AttentionShape { n_heads, n_kv_heads, head_dim, sliding_window } = shape;
    assert!(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "query heads must be a multiple of KV heads");
    assert_eq!(q.len(), n * n_heads * head_dim, "attention query shape");
    assert_eq!(out.len(), q.len(), "attention output shape");
    assert!(kv.len >= first_pos + n, "KV cache shorter than the queries");
    assert!(kv.capacity >= kv.len, "KV cache length beyond its capacity");
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
            with_scratch::<f32, _>(Slot::Task, queries * (job.head_dim + CHUNK + 2 * partial), |buf| {
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
            with_scratch::<f32, _>(Slot::Task, queries * (job.head_dim + CHUNK), |buf| {
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
    unsafe { isa_dispatch!(isa, query_block, query_block_avx512, query_block_avx2, (job, kv_head, tokens, buf, out)) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn query_block_avx512(job: &Job, kv_head: usize, tokens: std::ops::Range<usize>, buf: &mut [f32], out: *mut f32) {
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

/// Scores of all `queries` rows of `qbuf` against keys `k0..k1` (absolute, inside chunk `c0..`), written
/// to `scores[query * CHUNK + (j - c0)]`.
///
/// # Safety
/// Keys `k0..k1` must be inside the cache; `scores` must hold `queries * CHUNK` values.
#[inline(always)]
unsafe fn score_chunk<S: Simd>(
    s: S,
    job: &Job,
    kv_head: usize,
    qbuf: &[f32],
    queries: usize,
    c0: usize,
    k0: usize,
    k1: usize,
    scores: &mut [f32],
) {
    let hd = job.head_dim;
    let args = TileArgs {
        // SAFETY: keys `k0..k1` of this head lie in the cache (caller's contract).
        w: unsafe { job.k.add((kv_head * job.capacity + k0) * hd) },
        w_stride: hd,
        x: qbuf.as_ptr(),
        x_stride: hd,
        cols: hd,
        // SAFETY: `k0 - c0 < CHUNK`.
        y: unsafe { scores.as_mut_ptr().add(k0 - c0) },
        y_stride: CHUNK,
        y_row_step: 1,
        prefetch: 0,
    };
    // SAFETY: rows `0..k1-k0` of keys and `0..queries` of `qbuf` are valid; outputs inside `scores`.
    unsafe { block(s, args, 0..k1 - k0, 0..queries) };
}

/// The partial softmax of one query head over the valid keys `lo..hi` of chunk `c0..c0 + CHUNK`.
/// `scores` is that query's row (raw dot products, index `j - c0`); it is overwritten with `p_j`.
/// Writes `o_c` to `o` and returns `(m_c, l_c)`.
///
/// # Safety
/// `lo..hi` non-empty, inside the chunk and the cache; `o` has `head_dim` values.
#[inline(always)]
unsafe fn chunk_partial<S: Simd>(
    s: S,
    job: &Job,
    kv_head: usize,
    c0: usize,
    lo: usize,
    hi: usize,
    scores: &mut [f32],
    o: &mut [f32],
) -> (f32, f32) {
    let lanes = S::LANES;
    let scale = s.splat(job.scale);
    let (rel_lo, rel_hi) = (lo - c0, hi - c0);
    let first_block = rel_lo / lanes;
    let end_block = rel_hi.div_ceil(lanes);
    let mut maxv = s.splat(f32::NEG_INFINITY);
    // SAFETY (loads and stores of `scores`): blocks are inside the CHUNK-long row.
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
    let l = s.reduce_sum(lv);
    // SAFETY: values `lo..hi` of this head lie in the cache; `o` has `head_dim` values.
    unsafe { weighted_values(s, job, kv_head, lo, hi, &scores[rel_lo..rel_hi], o) };
    (m, l)
}

/// `o = Σ_{j in lo..hi} p[j - lo] · v_j`, in increasing `j`, vectorised over the head dimension.
///
/// # Safety
/// Values `lo..hi` of `kv_head` lie in the cache; `o` has `head_dim` values.
#[inline(always)]
unsafe fn weighted_values<S: Simd>(s: S, job: &Job, kv_head: usize, lo: usize, hi: usize, p: &[f32], o: &mut [f32]) {
    let hd = job.head_dim;
    // SAFETY: forwarded.
    let v = unsafe { job.v.add((kv_head * job.capacity + lo) * hd) };
    let count = hi - lo;
    // Register-resident accumulators for the common head sizes; memory-resident otherwise.
    // SAFETY (all arms): forwarded contract.
    unsafe {
        match hd.div_ceil(S::LANES) {
            1 => weighted_values_n::<S, 1>(s, v, hd, count, p, o),
            2 => weighted_values_n::<S, 2>(s, v, hd, count, p, o),
            3 => weighted_values_n::<S, 3>(s, v, hd, count, p, o),
            4 => weighted_values_n::<S, 4>(s, v, hd, count, p, o),
            5 => weighted_values_n::<S, 5>(s, v, hd, count, p, o),
            6 => weighted_values_n::<S, 6>(s, v, hd, count, p, o),
            7 => weighted_values_n::<S, 7>(s, v, hd, count, p, o),
            8 => weighted_values_n::<S, 8>(s, v, hd, count, p, o),
            _ => {
                o.fill(0.0);
                for j in 0..count {
                    let pj = s.splat(p[j]);
                    let row = v.add(j * hd);
                    let mut d = 0;
                    while d < hd {
                        let len = (hd - d).min(S::LANES);
                        let vv = if len == S::LANES { s.load(row.add(d)) } else { s.load_partial(row.add(d), len) };
                        let acc = if len == S::LANES {
                            s.load(o.as_ptr().add(d))
                        } else {
                            s.load_partial(o.as_ptr().add(d), len)
                        };
                        s.store_partial(o.as_mut_ptr().add(d), s.fma(pj, vv, acc), len);
                        d += S::LANES;
                    }
                }
            }
        }
    }
}

/// [`weighted_values`] with `D` vectors per head (`head_dim <= D * LANES`).
///
/// # Safety
/// `count` rows of `hd` values at `v`; `o` has `hd` values.
#[inline(always)]
unsafe fn weighted_values_n<S: Simd, const D: usize>(s: S, v: *const f32, hd: usize, count: usize, p: &[f32], o: &mut [f32]) {
    let mut acc = [s.zero(); D];
    let tail = hd - (D - 1) * S::LANES;
    // SAFETY: every load stays within row `j` (`hd` values; the last vector is partial if needed).
    unsafe {
        for j in 0..count {
            let pj = s.splat(p[j]);
            let row = v.add(j * hd);
            for (d, a) in acc.iter_mut().enumerate().take(D - 1) {
                *a = s.fma(pj, s.load(row.add(d * S::LANES)), *a);
            }
            let last = if tail == S::LANES {
                s.load(row.add((D - 1) * S::LANES))
            } else {
                s.load_partial(row.add((D - 1) * S::LANES), tail)
            };
            acc[D - 1] = s.fma(pj, last, acc[D - 1]);
        }
        for (d, a) in acc.iter().enumerate() {
            s.store_partial(o.as_mut_ptr().add(d * S::LANES), *a, (hd - d * S::LANES).min(S::LANES));
        }
    }
}

/// Merges the partial `(m_c, l_c, o_c)` into the running state `(m, l, o)` (state[0] = m, state[1] = l,
/// state[2..] = o). `first` initialises the state instead.
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
    let o_c = &mut rest[..hd];
    gather_queries(job, kv_head, tokens.clone(), qbuf);
    let lo_all = job.keys(tokens.start).0;
    let hi_all = job.keys(tokens.end - 1).1;
    let mut started = vec![false; queries];
    for chunk in lo_all / CHUNK..hi_all.div_ceil(CHUNK) {
        let c0 = chunk * CHUNK;
        let k0 = c0.max(lo_all);
        let k1 = (c0 + CHUNK).min(hi_all);
        // SAFETY: keys `k0..k1` are below `kv.len` (checked by the caller); `scores` is big enough.
        unsafe { score_chunk(s, job, kv_head, qbuf, queries, c0, k0, k1, scores) };
        for (ti, t) in tokens.clone().enumerate() {
            let (lo, hi) = job.keys(t);
            let (lo, hi) = (lo.max(c0), hi.min(c0 + CHUNK));
            if lo >= hi {
                continue;
            }
            for g in 0..job.group {
                let qi = ti * job.group + g;
                let row = &mut scores[qi * CHUNK..(qi + 1) * CHUNK];
                // SAFETY: `lo..hi` is non-empty, inside this chunk and below `kv.len`.
                let (m_c, l_c) = unsafe { chunk_partial(s, job, kv_head, c0, lo, hi, row, o_c) };
                merge(s, &mut states[qi * partial..(qi + 1) * partial], m_c, l_c, o_c, !started[qi]);
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
        isa_dispatch!(isa, key_split, key_split_avx512, key_split_avx2, (job, kv_head, chunk, first_chunk, chunks, buf, parts))
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
    unsafe { key_split(Avx512::new_unchecked(), job, kv_head, chunk, first_chunk, chunks, buf, parts) }
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
    unsafe { key_split(Avx2::new_unchecked(), job, kv_head, chunk, first_chunk, chunks, buf, parts) }
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
    let (qbuf, scores) = buf.split_at_mut(queries * hd);
    gather_queries(job, kv_head, 0..job.n, qbuf);
    let c0 = chunk * CHUNK;
    let k0 = c0.max(job.keys(0).0);
    let k1 = (c0 + CHUNK).min(job.keys(job.n - 1).1);
    if k0 < k1 {
        // SAFETY: keys `k0..k1` are below `kv.len`; `scores` holds `queries * CHUNK` values.
        unsafe { score_chunk(s, job, kv_head, qbuf, queries, c0, k0, k1, scores) };
    }
    for t in 0..job.n {
        let (lo, hi) = job.keys(t);
        let (lo, hi) = (lo.max(c0), hi.min(c0 + CHUNK));
        for g in 0..job.group {
            let head = kv_head * job.group + g;
            let at = ((t * job.n_heads + head) * chunks + chunk - first_chunk) * partial;
            // SAFETY: this task owns partial slot (t, head, chunk); the buffer holds every slot.
            let slot = unsafe { std::slice::from_raw_parts_mut(parts.add(at), partial) };
            if lo >= hi {
                slot[1] = 0.0;
                continue;
            }
            let qi = t * job.group + g;
            let row = &mut scores[qi * CHUNK..(qi + 1) * CHUNK];
            let (m_head, o) = slot.split_at_mut(2);
            // SAFETY: `lo..hi` is non-empty, inside this chunk and below `kv.len`.
            let (m_c, l_c) = unsafe { chunk_partial(s, job, kv_head, c0, lo, hi, row, o) };
            m_head[0] = m_c;
            m_head[1] = l_c;
        }
    }
}

/// # Safety
/// `isa` supported.
unsafe fn merge_for(isa: Isa, job: &Job, chunks: usize, partials: &[f32], out: &mut [f32]) {
    // SAFETY: forwarded.
    unsafe { isa_dispatch!(isa, merge_all, merge_all_avx512, merge_all_avx2, (job, chunks, partials, out)) }
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
