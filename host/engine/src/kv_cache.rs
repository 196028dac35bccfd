//! The per-request KV cache of one shard: keys and values of every position seen so far, for the
//! shard's layers only, in f32.

/// Keys and values of one request on one shard. Layout per layer: `[n_kv_heads][capacity][head_dim]`, so
/// one head's keys are contiguous for attention. Grows by doubling; never shrinks except by `truncate`.
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
        let new_cap = needed.max(self.capacity * 2).max(64).min(self.max_len.max(needed));
        let (hd, old_cap, len) = (self.head_dim, self.capacity, self.len);
        for layer in &mut self.layers {
            for buf in [&mut layer.k, &mut layer.v] {
                let mut grown = vec![0f32; self.n_kv_heads * new_cap * hd];
                for h in 0..self.n_kv_heads {
                    grown[h * new_cap * hd..][..len * hd].copy_from_slice(&buf[h * old_cap * hd..][..len * hd]);
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
                l.k[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                l.v[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
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
