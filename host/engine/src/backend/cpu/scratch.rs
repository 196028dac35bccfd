//! Reusable, cache-line aligned per-thread scratch buffers.
//!
//! Prefill copies activations and weight panels into aligned, zero-padded buffers so that the kernels can
//! use full-width aligned loads. Allocating those per call would cost page faults on every matrix
//! product, so each thread keeps its buffers and only grows them.

use std::cell::RefCell;

/// 64-byte aligned storage unit.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Which buffer of the current thread to use. A thread may hold both at once (the calling thread keeps
/// its activations while it also runs tasks that use a panel).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Slot {
    /// Per-call data shared with the other threads of a region (converted activations).
    Call,
    /// Per-task data (a weight panel, attention tiles).
    Task,
}

thread_local! {
    static CALL: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    static TASK: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// Element types a scratch buffer can be viewed as.
pub(crate) trait ScratchElem: Copy + Default {}
impl ScratchElem for f32 {}
impl ScratchElem for u16 {}

/// Runs `f` with a 64-byte aligned buffer of `len` elements of this thread's `slot`. The contents are
/// unspecified (left from earlier use); callers write before they read.
///
/// # Panics
/// If `f` asks for the same slot again (a kernel bug).
pub(crate) fn with_scratch<T: ScratchElem, R>(slot: Slot, len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let run = |cell: &RefCell<Vec<Line>>| {
        let mut buf = cell.try_borrow_mut().expect("a scratch slot is not re-entered");
        let lines = (len * size_of::<T>()).div_ceil(64);
        if buf.len() < lines {
            buf.resize(lines, Line([0; 64]));
        }
        // SAFETY: the buffer holds at least `len * size_of::<T>()` initialised bytes, aligned to 64 (more
        // than `T` needs); `T` is f32 or u16, for which every bit pattern is valid; the borrow of `buf`
        // outlives the slice.
        let slice = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut T, len) };
        f(slice)
    };
    match slot {
        Slot::Call => CALL.with(run),
        Slot::Task => TASK.with(run),
    }
}
