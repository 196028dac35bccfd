//! Shard plans: which worker runs which contiguous range of a model's layers.
//!
//! Workers declare their free memory and relative speed; the model declares what its parts weigh.
//! [`ShardPlan::new`] gives each worker a share of the layers proportional to its speed, capped by
//! what fits in its memory, at least one layer each, in the order the workers are listed: the first
//! is the entry (it also holds the embedding), the last is the exit (final norm and lm_head).
//!
//! Pure arithmetic on integers, so the same inputs give the same plan on every machine. It knows
//! nothing about tensors: the orchestrator computes plans and must not depend on the engine.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// What one worker offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WorkerCapacity {
    /// Bytes of accelerator (or host) memory the worker can give to the model's weights and caches,
    /// after its own reserve.
    pub free_memory_bytes: u64,
    /// Relative speed, any unit as long as all workers use the same one (e.g. measured layer
    /// forwards per second, or a plain weight like 1 and 2). Must be at least 1.
    pub speed: u64,
}

/// What a model's parts weigh in memory, as a worker holds them.
///
/// Put everything a part needs while serving into its bytes: a layer's weights plus its KV cache
/// budget (2 × kv_heads × head_dim × context × concurrent requests × dtype size) and working memory.
/// The planner adds nothing on top.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelFootprint {
    /// Bytes of each decoder layer, in order; the model has `layer_bytes.len()` layers.
    pub layer_bytes: Vec<u64>,
    /// Bytes the entry shard holds besides its layers: the token embedding.
    pub embedding_bytes: u64,
    /// Bytes the exit shard holds besides its layers: final norm and lm_head (with tied embeddings,
    /// the embedding matrix counts here too, since the exit needs it as lm_head).
    pub head_bytes: u64,
}

impl ModelFootprint {
    /// A model whose `num_layers` layers all weigh `per_layer` bytes.
    pub fn uniform(num_layers: usize, per_layer: u64, embedding_bytes: u64, head_bytes: u64) -> Self {
        ModelFootprint { layer_bytes: vec![per_layer; num_layers], embedding_bytes, head_bytes }
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layer_bytes.len()
    }

    /// Bytes of the whole model.
    pub fn total_bytes(&self) -> u64 {
        self.layer_bytes
            .iter()
            .fold(self.embedding_bytes.saturating_add(self.head_bytes), |sum, b| sum.saturating_add(*b))
    }
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The worker list is empty.
    #[error("no workers to place the model on")]
    NoWorkers,
    /// The model has no layers.
    #[error("the model has no layers")]
    NoLayers,
    /// Every worker must run at least one layer.
    #[error("{workers} workers need at least {workers} layers, the model has {layers}")]
    TooFewLayers { layers: usize, workers: usize },
    /// A worker declared speed 0.
    #[error("worker {worker} declared speed 0; speeds must be at least 1")]
    ZeroSpeed { worker: usize },
    /// A worker cannot hold even its smallest possible shard (one layer, plus the embedding if it is
    /// the entry and the head if it is the exit).
    #[error("worker {worker} has {available} bytes free but its smallest possible shard needs {needed}")]
    WorkerTooSmall { worker: usize, needed: u64, available: u64 },
    /// The workers together cannot hold the model.
    #[error(
        "the model does not fit: the workers can hold {fit_layers} of its {layers} layers \
         ({needed_bytes} bytes needed, {available_bytes} free in total); add a worker or memory"
    )]
    ModelDoesNotFit { layers: usize, fit_layers: usize, needed_bytes: u64, available_bytes: u64 },
}

/// One worker's part of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ShardAssignment {
    /// Index of the worker in the list given to [`ShardPlan::new`].
    pub worker: usize,
    /// Its layers, `[start, end)`.
    pub layers: Range<usize>,
    /// Whether it is the entry (holds the embedding).
    pub entry: bool,
    /// Whether it is the exit (holds the final norm and lm_head).
    pub exit: bool,
    /// Bytes it will hold: its layers plus the embedding and/or head; at most its free memory.
    pub bytes: u64,
}

/// A contiguous cover of a model's layers by workers, in pipeline order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ShardPlan {
    num_layers: usize,
    shards: Vec<ShardAssignment>,
}

impl ShardPlan {
    /// Plans `model` over `workers`, in the order given (the first is the entry, the last the exit).
    ///
    /// Shares follow speed by the Sainte-Laguë (Webster) divisor method: exact when the layers divide
    /// in proportion (30 layers at speeds 1:2 give 10 and 20), otherwise each worker is within a
    /// rounding step of its proportional share, and a faster worker never gets fewer layers than a
    /// slower one unless memory caps it. A worker whose share does not fit its memory is capped and the
    /// rest shared among the others. Ties go to the worker listed first. One worker is allowed: it
    /// gets the whole model as both entry and exit.
    pub fn new(model: &ModelFootprint, workers: &[WorkerCapacity]) -> Result<Self, PlanError> {
        let num_layers = model.num_layers();
        let n = workers.len();
        if n == 0 {
            return Err(PlanError::NoWorkers);
        }
        if num_layers == 0 {
            return Err(PlanError::NoLayers);
        }
        if num_layers < n {
            return Err(PlanError::TooFewLayers { layers: num_layers, workers: n });
        }
        if let Some(worker) = workers.iter().position(|w| w.speed == 0) {
            return Err(PlanError::ZeroSpeed { worker });
        }

        let fixed: Vec<u64> = (0..n)
            .map(|i| {
                let entry = if i == 0 { model.embedding_bytes } else { 0 };
                let exit = if i == n - 1 { model.head_bytes } else { 0 };
                entry.saturating_add(exit)
            })
            .collect();

        // Caps start optimistic (every layer as light as the lightest) and are lowered for any worker
        // whose actual range turns out too heavy, until every range fits. With equal layers the first
        // caps are exact and one round suffices.
        let lightest = model.layer_bytes.iter().copied().min().unwrap_or(0);
        let mut caps = Vec::with_capacity(n);
        for (worker, (w, fixed)) in workers.iter().zip(&fixed).enumerate() {
            let needed = fixed.saturating_add(lightest);
            if w.free_memory_bytes < needed {
                return Err(PlanError::WorkerTooSmall { worker, needed, available: w.free_memory_bytes });
            }
            let room = w.free_memory_bytes - fixed;
            let cap = match room.checked_div(lightest) {
                Some(layers) => usize::try_from(layers).unwrap_or(usize::MAX).min(num_layers),
                None => num_layers, // weightless layers
            };
            caps.push(cap);
        }

        loop {
            let fit_layers = caps.iter().fold(0usize, |sum, c| sum.saturating_add(*c));
            if fit_layers < num_layers {
                return Err(PlanError::ModelDoesNotFit {
                    layers: num_layers,
                    fit_layers,
                    needed_bytes: model.total_bytes(),
                    available_bytes: workers.iter().fold(0u64, |s, w| s.saturating_add(w.free_memory_bytes)),
                });
            }
            let counts = apportion(num_layers, workers, &caps);
            let mut shards = Vec::with_capacity(n);
            let mut too_heavy = false;
            let mut start = 0;
            for (worker, &count) in counts.iter().enumerate() {
                let layers = start..start + count;
                start = layers.end;
                let bytes =
                    model.layer_bytes[layers.clone()].iter().fold(fixed[worker], |sum, b| sum.saturating_add(*b));
                let available = workers[worker].free_memory_bytes;
                if bytes > available {
                    if count == 1 {
                        return Err(PlanError::WorkerTooSmall { worker, needed: bytes, available });
                    }
                    caps[worker] = count - 1;
                    too_heavy = true;
                }
                shards.push(ShardAssignment { worker, layers, entry: worker == 0, exit: worker == n - 1, bytes });
            }
            if !too_heavy {
                return Ok(ShardPlan { num_layers, shards });
            }
        }
    }

    /// The shards in pipeline order (entry first).
    pub fn shards(&self) -> &[ShardAssignment] {
        &self.shards
    }

    /// Layers in the model.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Layers per shard, in pipeline order.
    pub fn layer_counts(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.layers.len()).collect()
    }

    /// The shard that runs `layer`.
    pub fn shard_of_layer(&self, layer: usize) -> Option<&ShardAssignment> {
        self.shards.iter().find(|s| s.layers.contains(&layer))
    }
}

/// Deals `total` layers (`workers.len() <= total <= Σ caps`) one at a time, each to the worker with the
/// highest Sainte-Laguë priority `speed / (count + ½)` among those below their cap, after one layer
/// each. Compared exactly by cross-multiplying in u128; ties go to the lower index.
fn apportion(total: usize, workers: &[WorkerCapacity], caps: &[usize]) -> Vec<usize> {
    let mut counts = vec![1usize; workers.len()];
    // priority(i) > priority(j)  ⇔  speed_i · (2·count_j + 1) > speed_j · (2·count_i + 1)
    let outranks = |i: usize, j: usize, counts: &[usize]| {
        u128::from(workers[i].speed) * (2 * counts[j] as u128 + 1)
            > u128::from(workers[j].speed) * (2 * counts[i] as u128 + 1)
    };
    for _ in workers.len()..total {
        let mut best: Option<usize> = None;
        for i in (0..workers.len()).filter(|&i| counts[i] < caps[i]) {
            if best.is_none_or(|b| outranks(i, b, &counts)) {
                best = Some(i);
            }
        }
        match best {
            Some(i) => counts[i] += 1,
            None => break, // unreachable while total <= Σ caps, which the caller checks
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const GIB: u64 = 1 << 30;

    fn workers(spec: &[(u64, u64)]) -> Vec<WorkerCapacity> {
        spec.iter().map(|&(free_memory_bytes, speed)| WorkerCapacity { free_memory_bytes, speed }).collect()
    }

    fn plenty(speeds: &[u64]) -> Vec<WorkerCapacity> {
        speeds.iter().map(|&speed| WorkerCapacity { free_memory_bytes: 1 << 50, speed }).collect()
    }

    #[test]
    fn shares_follow_speed_not_only_halves() {
        let model = ModelFootprint::uniform(30, GIB, GIB, GIB);
        assert_eq!(ShardPlan::new(&model, &plenty(&[1, 2])).unwrap().layer_counts(), vec![10, 20]);
        assert_eq!(ShardPlan::new(&model, &plenty(&[2, 1])).unwrap().layer_counts(), vec![20, 10]);
        assert_eq!(ShardPlan::new(&model, &plenty(&[1, 1, 1])).unwrap().layer_counts(), vec![10, 10, 10]);
        assert_eq!(ShardPlan::new(&model, &plenty(&[1, 2, 3])).unwrap().layer_counts(), vec![5, 10, 15]);
        // 80 layers (Llama-3 70B) over 3:1 — exact.
        let llama = ModelFootprint::uniform(80, GIB, GIB, GIB);
        assert_eq!(ShardPlan::new(&llama, &plenty(&[300, 100])).unwrap().layer_counts(), vec![60, 20]);
    }

    #[test]
    fn rounding_is_deterministic_and_ties_go_first() {
        let model = ModelFootprint::uniform(32, 1, 0, 0);
        let plan = ShardPlan::new(&model, &plenty(&[1, 1, 1])).unwrap();
        assert_eq!(plan.layer_counts(), vec![11, 11, 10]);
        assert_eq!(plan, ShardPlan::new(&model, &plenty(&[1, 1, 1])).unwrap());
        // 30 over 1:1:5 → quotas 4.29/4.29/21.43 → 4/4/22 or 5/4/21 — Sainte-Laguë gives 4/4/22.
        let model = ModelFootprint::uniform(30, 1, 0, 0);
        assert_eq!(ShardPlan::new(&model, &plenty(&[1, 1, 5])).unwrap().layer_counts(), vec![4, 4, 22]);
    }

    #[test]
    fn every_worker_gets_at_least_one_layer() {
        let model = ModelFootprint::uniform(4, 1, 0, 0);
        assert_eq!(ShardPlan::new(&model, &plenty(&[1000, 1, 1])).unwrap().layer_counts(), vec![2, 1, 1]);
        let model = ModelFootprint::uniform(3, 1, 0, 0);
        assert_eq!(ShardPlan::new(&model, &plenty(&[1, 1000, 1])).unwrap().layer_counts(), vec![1, 1, 1]);
    }

    #[test]
    fn ranges_are_contiguous_with_entry_and_exit_parts() {
        let model = ModelFootprint::uniform(30, 100, 7, 9);
        let plan = ShardPlan::new(&model, &plenty(&[1, 2, 3])).unwrap();
        let shards = plan.shards();
        assert_eq!(shards[0].layers, 0..5);
        assert_eq!(shards[1].layers, 5..15);
        assert_eq!(shards[2].layers, 15..30);
        assert_eq!((shards[0].entry, shards[0].exit), (true, false));
        assert_eq!((shards[1].entry, shards[1].exit), (false, false));
        assert_eq!((shards[2].entry, shards[2].exit), (false, true));
        assert_eq!(shards.iter().map(|s| s.bytes).collect::<Vec<_>>(), vec![507, 1000, 1509]);
        assert_eq!(plan.shard_of_layer(14).map(|s| s.worker), Some(1));
        assert_eq!(plan.shard_of_layer(30), None);
    }

    #[test]
    fn memory_caps_a_fast_worker_and_the_rest_moves() {
        // Worker 1 is twice as fast but can hold only 15 layers (+ the head).
        let model = ModelFootprint::uniform(30, GIB, 2 * GIB, 3 * GIB);
        let ws = workers(&[(100 * GIB, 1), (18 * GIB, 2)]);
        let plan = ShardPlan::new(&model, &ws).unwrap();
        assert_eq!(plan.layer_counts(), vec![15, 15]);
        assert!(plan.shards().iter().all(|s| s.bytes <= ws[s.worker].free_memory_bytes));
        assert_eq!(plan.shards()[1].bytes, 18 * GIB);

        // The entry's embedding counts against the entry only.
        let ws = workers(&[(12 * GIB, 1), (100 * GIB, 1)]);
        assert_eq!(ShardPlan::new(&model, &ws).unwrap().layer_counts(), vec![10, 20]);
    }

    #[test]
    fn a_model_that_does_not_fit_is_an_error() {
        let model = ModelFootprint::uniform(30, GIB, GIB, GIB);
        let ws = workers(&[(10 * GIB, 1), (10 * GIB, 1)]);
        assert_eq!(
            ShardPlan::new(&model, &ws),
            Err(PlanError::ModelDoesNotFit {
                layers: 30,
                fit_layers: 18,
                needed_bytes: 32 * GIB,
                available_bytes: 20 * GIB
            })
        );
        let ws = workers(&[(GIB, 1), (100 * GIB, 1)]);
        assert_eq!(
            ShardPlan::new(&model, &ws),
            Err(PlanError::WorkerTooSmall { worker: 0, needed: 2 * GIB, available: GIB })
        );
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let model = ModelFootprint::uniform(2, 1, 0, 0);
        assert_eq!(ShardPlan::new(&model, &[]), Err(PlanError::NoWorkers));
        assert_eq!(ShardPlan::new(&ModelFootprint::uniform(0, 1, 0, 0), &plenty(&[1])), Err(PlanError::NoLayers));
        assert_eq!(ShardPlan::new(&model, &plenty(&[1, 1, 1])), Err(PlanError::TooFewLayers { layers: 2, workers: 3 }));
        assert_eq!(ShardPlan::new(&model, &plenty(&[1, 0])), Err(PlanError::ZeroSpeed { worker: 1 }));
    }

    #[test]
    fn one_worker_holds_everything() {
        let model = ModelFootprint::uniform(30, 10, 5, 5);
        let plan = ShardPlan::new(&model, &workers(&[(310, 1)])).unwrap();
        assert_eq!(plan.shards(), &[ShardAssignment { worker: 0, layers: 0..30, entry: true, exit: true, bytes: 310 }]);
    }

    #[test]
    fn uneven_layers_are_placed_by_their_actual_bytes() {
        // Layers 0..4 weigh 10, layers 4..8 weigh 1. Speeds say 4/4, but the entry cannot hold four
        // heavy layers, so it takes fewer and worker 1 takes the rest.
        let model = ModelFootprint { layer_bytes: vec![10, 10, 10, 10, 1, 1, 1, 1], embedding_bytes: 0, head_bytes: 0 };
        let ws = workers(&[(25, 1), (100, 1)]);
        let plan = ShardPlan::new(&model, &ws).unwrap();
        assert_eq!(plan.layer_counts(), vec![2, 6]);
        assert_eq!(plan.shards()[0].bytes, 20);
        // Nothing can fit the entry if even one heavy layer is too much.
        let ws = workers(&[(9, 1), (100, 1)]);
        assert_eq!(ShardPlan::new(&model, &ws), Err(PlanError::WorkerTooSmall { worker: 0, needed: 10, available: 9 }));
    }

    proptest! {
        #[test]
        fn plans_are_valid_covers_or_errors(
            num_layers in 1usize..120,
            per_layer in 1u64..1000,
            embedding in 0u64..5000,
            head in 0u64..5000,
            spec in proptest::collection::vec((0u64..200_000, 1u64..50), 1..6),
        ) {
            let model = ModelFootprint::uniform(num_layers, per_layer, embedding, head);
            let ws = workers(&spec);
            let result = ShardPlan::new(&model, &ws);
            prop_assert_eq!(&result, &ShardPlan::new(&model, &ws), "deterministic");
            if let Ok(plan) = result {
                let shards = plan.shards();
                prop_assert_eq!(shards.len(), ws.len());
                prop_assert_eq!(shards[0].layers.start, 0);
                prop_assert_eq!(shards[shards.len() - 1].layers.end, num_layers);
                for pair in shards.windows(2) {
                    prop_assert_eq!(pair[0].layers.end, pair[1].layers.start);
                }
                for s in shards {
                    prop_assert!(!s.layers.is_empty());
                    prop_assert!(s.bytes <= ws[s.worker].free_memory_bytes);
                }
                // A strictly faster worker below its memory cap never gets fewer layers.
                let cap = |i: usize| {
                    let fixed = if i == 0 { embedding } else { 0 } + if i == ws.len() - 1 { head } else { 0 };
                    ((ws[i].free_memory_bytes - fixed) / per_layer) as usize
                };
                for i in 0..ws.len() {
                    for j in 0..ws.len() {
                        if ws[i].speed > ws[j].speed && shards[i].layers.len() < cap(i) {
                            prop_assert!(shards[i].layers.len() >= shards[j].layers.len(), "{:?}", plan.layer_counts());
                        }
                    }
                }
            } else if let Err(PlanError::ModelDoesNotFit { .. }) = result {
                // Then no cover exists: even the per-worker maxima fall short.
                let most: u64 = ws.iter().enumerate().map(|(i, w)| {
                    let fixed = if i == 0 { embedding } else { 0 } + if i == ws.len() - 1 { head } else { 0 };
                    w.free_memory_bytes.saturating_sub(fixed) / per_layer
                }).sum();
                prop_assert!(most < num_layers as u64);
            }
        }
    }
}
