//! Host memory for a shard's weight matrices: read-only regions that start on a 2 MiB boundary and that
//! the kernel is asked to back with transparent huge pages.
//!
//! A decode step reads every weight of its shard once. In 4 KiB pages, SmolLM2-135M's 270 MB of bf16
//! spans ~66 000 pages per token, each a TLB miss (in a VM a walk through both the guest's and the host's
//! tables) and a boundary where the hardware prefetchers stop. `malloc` hands large vectors out in
//! page-aligned `mmap`s, which the common `transparent_hugepage=madvise` setting never backs with huge
//! pages. So a loading shard copies its matrices, a group at a time, into regions of their own
//! ([`pack`]): each an anonymous mapping whose whole 2 MiB pages are advised `MADV_HUGEPAGE` before
//! anything is written, then made read-only. Measured in docs/BENCHMARKS.md ("Weights in huge pages").
//!
//! Only whole huge pages are advised: a region's tail (under 2 MiB) stays in small pages, so a region
//! holds no memory beyond its weights (a huge page is committed whole at its first touch). Where the
//! kernel gives no huge pages (`never`, or not Linux) a region is ordinary memory and nothing changes.
//! `COMPUTEPOOL_HUGE_PAGES=off` in the environment keeps the regions but asks for no huge pages (for
//! hosts whose operators keep THP compaction away from their other work, and to measure the effect).

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use bytemuck::Pod;
use memmap2::{Mmap, MmapMut};

use crate::tensor::{Weight, WeightData};
use crate::{EngineError, Result};

/// A transparent huge page on x86-64 and aarch64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;
/// Where each weight starts inside a region: a cache line, the widest load the kernels make.
const WEIGHT_ALIGN: usize = 64;

/// Whether regions ask for huge pages: yes unless `COMPUTEPOOL_HUGE_PAGES` is `off`, `0` or `false`.
pub fn huge_pages_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| {
        !std::env::var("COMPUTEPOOL_HUGE_PAGES").is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "off" | "0" | "false"))
    })
}

/// The values of one weight matrix: a heap vector (as loaders and tests build them) or a slice of a
/// packed region (as a loaded shard holds them). Reads the same either way; cloning a packed one
/// shares its region.
#[derive(Clone)]
pub struct WeightBuf<T>(Storage<T>);

#[derive(Clone)]
enum Storage<T> {
    Heap(Vec<T>),
    Packed { region: Arc<Region>, offset: usize, len: usize },
}

/// One read-only anonymous mapping; `bytes()` is the part that holds weights, from a 2 MiB boundary
/// where the mapping is large enough to have one.
struct Region {
    map: Mmap,
    start: usize,
    len: usize,
}

impl Region {
    fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

impl<T: Pod> WeightBuf<T> {
    /// Whether the values live in a packed region rather than on the heap.
    pub fn is_packed(&self) -> bool {
        matches!(self.0, Storage::Packed { .. })
    }

    /// The values as bytes, in memory order.
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }

    /// The values as a new heap vector.
    pub fn into_vec(self) -> Vec<T> {
        match self.0 {
            Storage::Heap(v) => v,
            Storage::Packed { .. } => self.to_vec(),
        }
    }
}

impl<T: Pod> Deref for WeightBuf<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.0 {
            Storage::Heap(v) => v,
            // Offsets are multiples of WEIGHT_ALIGN from a page-aligned start, so the cast never fails.
            Storage::Packed { region, offset, len } => {
                bytemuck::cast_slice(&region.bytes()[*offset..*offset + len * size_of::<T>()])
            }
        }
    }
}

impl<T> From<Vec<T>> for WeightBuf<T> {
    fn from(values: Vec<T>) -> Self {
        WeightBuf(Storage::Heap(values))
    }
}

impl<T> FromIterator<T> for WeightBuf<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        WeightBuf(Storage::Heap(iter.into_iter().collect()))
    }
}

impl<T> fmt::Debug for WeightBuf<T> {
    /// The length and where the values live, not the values (millions of them).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Storage::Heap(v) => write!(f, "WeightBuf {{ len: {}, heap }}", v.len()),
            Storage::Packed { offset, len, .. } => write!(f, "WeightBuf {{ len: {len}, packed at {offset} }}"),
        }
    }
}

/// Copies `weights`' values into one new region, in order, each from a 64-byte boundary, and points
/// them at it; each one's heap vector is freed as soon as it is copied, so packing a group costs at most
/// the group's size on top of the shard. Weights already packed are copied again (into the new region).
///
/// Errors: the region cannot be mapped (out of memory or address space). The weights are then lost
/// (emptied), as the load they belong to fails.
pub(crate) fn pack(weights: &mut [&mut Weight]) -> Result<()> {
    let mut offsets = Vec::with_capacity(weights.len());
    let mut total = 0usize;
    for w in weights.iter() {
        total = total.next_multiple_of(WEIGHT_ALIGN);
        offsets.push(total);
        total += w.size_in_bytes();
    }
    if total == 0 {
        return Ok(());
    }
    let host_memory = |source| EngineError::HostMemory { bytes: total, source };
    // A region with room for a huge page is mapped one huge page larger, to start on a boundary; the
    // slack around it is never touched, so it costs address space only.
    let huge = total >= HUGE_PAGE && huge_pages_wanted();
    let mut map = MmapMut::map_anon(if huge { total + HUGE_PAGE } else { total }).map_err(host_memory)?;
    let start = if huge { (map.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - map.as_ptr() as usize } else { 0 };
    #[cfg(target_os = "linux")]
    if huge {
        // Advice, not a requirement: a kernel that cannot or will not use huge pages leaves small ones.
        let _ = map.advise_range(memmap2::Advice::HugePage, start, total / HUGE_PAGE * HUGE_PAGE);
    }
    let mut kinds = Vec::with_capacity(weights.len());
    for (w, &offset) in weights.iter_mut().zip(&offsets) {
        let data = std::mem::replace(&mut w.data, WeightData::F32(Vec::new().into()));
        let bytes = data.as_bytes();
        map[start + offset..start + offset + bytes.len()].copy_from_slice(bytes);
        kinds.push(Kind::of(&data));
    }
    let region = Arc::new(Region { map: map.make_read_only().map_err(host_memory)?, start, len: total });
    for ((w, offset), kind) in weights.iter_mut().zip(offsets).zip(kinds) {
        w.data = kind.packed(&region, offset);
    }
    Ok(())
}

/// A weight's storage kind and length, kept while its values move.
enum Kind {
    F32(usize),
    Bf16(usize),
    Quant(crate::tensor::QuantKind, usize),
    QuantInterleaved(crate::tensor::QuantKind, usize),
}

impl Kind {
    fn of(data: &WeightData) -> Self {
        match data {
            WeightData::F32(d) => Kind::F32(d.len()),
            WeightData::Bf16(d) => Kind::Bf16(d.len()),
            WeightData::Quant { kind, blocks } => Kind::Quant(*kind, blocks.len()),
            WeightData::QuantInterleaved { kind, blocks } => Kind::QuantInterleaved(*kind, blocks.len()),
        }
    }

    fn packed(self, region: &Arc<Region>, offset: usize) -> WeightData {
        fn buf<T>(region: &Arc<Region>, offset: usize, len: usize) -> WeightBuf<T> {
            WeightBuf(Storage::Packed { region: region.clone(), offset, len })
        }
        match self {
            Kind::F32(len) => WeightData::F32(buf(region, offset, len)),
            Kind::Bf16(len) => WeightData::Bf16(buf(region, offset, len)),
            Kind::Quant(kind, len) => WeightData::Quant { kind, blocks: buf(region, offset, len) },
            Kind::QuantInterleaved(kind, len) => WeightData::QuantInterleaved { kind, blocks: buf(region, offset, len) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::QuantKind;
    use half::bf16;

    fn weights() -> Vec<Weight> {
        // Sizes that are not multiples of 64 bytes, so every weight after the first needs padding; the
        // bf16 one alone is past 2 MiB, so the region has whole huge pages.
        let f32s: Vec<f32> = (0..3 * 7).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bf16s: Vec<bf16> = (0..1100 * 1000).map(|i| bf16::from_f32((i % 977) as f32 / 31.0)).collect();
        let blocks: Vec<u8> = (0..2 * QuantKind::Q8_0.row_bytes(64)).map(|i| (i * 37 % 251) as u8).collect();
        vec![
            Weight { rows: 3, cols: 7, data: WeightData::F32(f32s.into()) },
            Weight { rows: 1100, cols: 1000, data: WeightData::Bf16(bf16s.into()) },
            Weight { rows: 2, cols: 64, data: WeightData::Quant { kind: QuantKind::Q8_0, blocks: blocks.into() } },
        ]
    }

    #[test]
    fn packing_keeps_every_value_and_kind_and_aligns_each_weight() {
        let before = weights();
        let mut after = weights();
        pack(&mut after.iter_mut().collect::<Vec<_>>()).expect("packed");
        for (b, a) in before.iter().zip(&after) {
            assert_eq!((a.rows, a.cols, a.storage_name()), (b.rows, b.cols, b.storage_name()));
            assert_eq!(a.data.as_bytes(), b.data.as_bytes(), "{} values", b.storage_name());
            assert_eq!(a.data.as_bytes().as_ptr() as usize % WEIGHT_ALIGN, 0, "{} starts on a cache line", b.storage_name());
        }
        assert!(matches!(&after[1].data, WeightData::Bf16(d) if d.is_packed()));
        // The region starts on a huge page boundary (the first weight is at its start), unless
        // COMPUTEPOOL_HUGE_PAGES turns them off.
        if huge_pages_wanted() {
            assert_eq!(after[0].data.as_bytes().as_ptr() as usize % HUGE_PAGE, 0);
        }
        // A clone shares the region; dropping the originals leaves it readable.
        let kept = after[1].clone();
        drop(after);
        assert_eq!(kept.data.as_bytes(), before[1].data.as_bytes());
    }

    #[test]
    fn small_and_empty_groups_pack_too() {
        let mut w = Weight { rows: 1, cols: 3, data: WeightData::F32(vec![1.0, 2.0, 3.0].into()) };
        pack(&mut [&mut w]).expect("packed");
        assert!(matches!(&w.data, WeightData::F32(d) if d.is_packed() && d[..] == [1.0, 2.0, 3.0]));
        let mut empty = Weight { rows: 0, cols: 3, data: WeightData::F32(Vec::new().into()) };
        pack(&mut [&mut empty]).expect("nothing to pack");
        assert_eq!(empty.size_in_bytes(), 0);
    }

    /// The region's whole 2 MiB pages carry the huge page advice (the kernel's `THPeligible` for the
    /// mapping): whether huge pages then back it is the kernel's call, but asking is ours.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_region_asks_the_kernel_for_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if !thp.contains("[madvise]") && !thp.contains("[always]") {
            eprintln!("skipped: transparent huge pages are off on this kernel ({})", thp.trim());
            return;
        }
        if !huge_pages_wanted() {
            eprintln!("skipped: COMPUTEPOOL_HUGE_PAGES turns huge pages off");
            return;
        }
        let mut ws = weights();
        pack(&mut ws.iter_mut().collect::<Vec<_>>()).expect("packed");
        let at = ws[1].data.as_bytes().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut in_mapping = false;
        let mut eligible = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                in_mapping = (lo..hi).contains(&at);
            } else if in_mapping && let Some(v) = line.strip_prefix("THPeligible:") {
                eligible = Some(v.trim().to_string());
            }
        }
        assert_eq!(eligible.as_deref(), Some("1"), "the mapping holding the weights is not eligible for huge pages");
    }
}
