//! The per-request KV cache of one shard: keys and values of every position seen so far, for the
//! shard's layers only, in f32.

use crate::backend::cpu::{KEY_BLOCK, key_offset};

/// Keys and values of one request on one shard, per layer in the CPU backend's [`KvView`] layout:
/// values `[n_kv_heads][capacity][head_dim]`, keys in transposed blocks of [`KEY_BLOCK`] positions
/// (`[n_kv_heads][capacity / KEY_BLOCK][head_dim][KEY_BLOCK]`), so attention scores a block without
/// rearranging it. The capacity is a whole number of blocks; it grows by doubling and never shrinks
/// except by `truncate`.
///
/// [`KvView`]: crate::backend::cpu::KvView
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    n_kv_heads: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
    max_len: usize,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct LayerKv {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

impl KvCache {
    /// An empty cache for `n_layers` layers; `max_len` is the model's context window.
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, max_len: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); n_layers],
            n_kv_heads,
            head_dim,
            len: 0,
            capacity: 0,
            max_len,
        }
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held (capacity, not length).
    pub fn size_in_bytes(&self) -> usize {
        self.layers.len() * 2 * self.n_kv_heads * self.capacity * self.head_dim * 4
    }

    /// Makes room for `extra` more positions.
    pub(crate) fn reserve(&mut self, extra: usize) {
        let needed = self.len + extra;
        if needed <= self.capacity {
            return;
        }
        let new_cap = needed.max(self.capacity * 2).max(KEY_BLOCK).min(self.max_len.max(needed)).next_multiple_of(KEY_BLOCK);
        let (hd, old_cap, len) = (self.head_dim, self.capacity, self.len);
        // A head's positions `0..len` are its first `len` value rows and its first key blocks, whole.
        let key_len = len.next_multiple_of(KEY_BLOCK);
        for layer in &mut self.layers {
            for (buf, used) in [(&mut layer.k, key_len), (&mut layer.v, len)] {
                let mut grown = vec![0f32; self.n_kv_heads * new_cap * hd];
                for h in 0..self.n_kv_heads {
                    grown[h * new_cap * hd..][..used * hd].copy_from_slice(&buf[h * old_cap * hd..][..used * hd]);
                }
                *buf = grown;
            }
        }
        self.capacity = new_cap;
    }

    /// Writes keys and values for positions `len..len + n` of layer `layer` (`k`, `v` are
    /// `[n, n_kv_heads * head_dim]`). Call [`KvCache::advance`] once every layer has been written.
    pub(crate) fn write(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) {
        let (hd, cap, len, heads) = (self.head_dim, self.capacity, self.len, self.n_kv_heads);
        debug_assert!(len + n <= cap, "reserve before write");
        let l = &mut self.layers[layer];
        for t in 0..n {
            for h in 0..heads {
                let src = (t * heads + h) * hd;
                let dst = (h * cap + len + t) * hd;
                l.v[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
                // One lane of each of the block's `hd` key rows.
                let first = key_offset(cap, hd, h, len + t, 0);
                for (d, &x) in k[src..src + hd].iter().enumerate() {
                    l.k[first + d * KEY_BLOCK] = x;
                }
            }
        }
    }

    pub(crate) fn layer(&self, layer: usize) -> &LayerKv {
        &self.layers[layer]
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets every position from `len` on (to roll back a failed step or rewind a conversation).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Forgets everything, keeping the allocation.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key and value of (layer, head, position) as written: `k = 1000·pos + 10·head + d/100`,
    /// `v` its negation.
    fn key(pos: usize, head: usize, d: usize) -> f32 {
        1000.0 * pos as f32 + 10.0 * head as f32 + d as f32 / 100.0
    }

    /// Writes `n` positions from `cache.len()` on, every layer, and advances.
    fn write_positions(cache: &mut KvCache, n: usize) {
        let (heads, hd) = (cache.n_kv_heads, cache.head_dim);
        let first = cache.len();
        cache.reserve(n);
        let k: Vec<f32> = (0..n).flat_map(|t| (0..heads).flat_map(move |h| (0..hd).map(move |d| key(first + t, h, d)))).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        for layer in 0..cache.n_layers() {
            cache.write(layer, &k, &v, n);
        }
        cache.advance(n);
    }

    #[test]
    fn keys_and_values_land_where_attention_reads_them_across_blocks_and_growth() {
        let (heads, hd) = (3, 5);
        let mut cache = KvCache::new(2, heads, hd, 1000);
        // A prefill that ends inside the second block, then decode steps across the next boundary and
        // past a growth (128 -> 256 positions: the prefill reserves 70, rounded up to whole blocks).
        write_positions(&mut cache, 70);
        for _ in 0..70 {
            write_positions(&mut cache, 1);
        }
        assert_eq!(cache.len(), 140);
        assert_eq!(cache.capacity() % KEY_BLOCK, 0);
        assert!(cache.capacity() >= 140);
        let cap = cache.capacity();
        for layer in 0..2 {
            let l = cache.layer(layer);
            for h in 0..heads {
                for pos in 0..140 {
                    for d in 0..hd {
                        assert_eq!(l.k[key_offset(cap, hd, h, pos, d)], key(pos, h, d), "key of layer {layer} head {h} pos {pos} d {d}");
                        assert_eq!(l.v[(h * cap + pos) * hd + d], -key(pos, h, d), "value of layer {layer} head {h} pos {pos} d {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn capacity_is_whole_key_blocks_even_past_the_context_window() {
        let mut cache = KvCache::new(1, 1, 4, 100);
        cache.reserve(1);
        assert_eq!(cache.capacity(), KEY_BLOCK);
        cache.reserve(99);
        assert_eq!(cache.capacity(), 128, "a 100-position window still gets whole blocks");
        assert_eq!(cache.size_in_bytes(), 2 * 128 * 4 * 4);
    }
}
