//! The runtime of a `no_std` ComputePool plugin. Plugins are `no_std` so that the component imports only
//! the host capabilities the plugin calls (std on wasm32-wasip2 would import WASI, which the host refuses
//! as extra imports). Call [`guest_runtime!`] once at the crate root, next to `wit_bindgen::generate!`.
#![no_std]

#[doc(hidden)]
pub use dlmalloc;

/// Declares the plugin's global allocator (dlmalloc over linear memory; the host's memory limit bounds
/// it), a panic handler that traps (the host reports the trap and replaces the instance), and the
/// canonical ABI's `cabi_realloc` export, through which the host copies arguments into the plugin.
#[macro_export]
macro_rules! guest_runtime {
    () => {
        extern crate alloc;

        #[global_allocator]
        static COMPUTEPOOL_GUEST_ALLOCATOR: $crate::dlmalloc::GlobalDlmalloc = $crate::dlmalloc::GlobalDlmalloc;

        #[panic_handler]
        fn computepool_guest_panic(_: &core::panic::PanicInfo) -> ! {
            core::arch::wasm32::unreachable()
        }

        /// The canonical ABI's allocator entry point (the host calls it to pass lists and strings in).
        ///
        /// # Safety
        /// Called only by the component model's lifting code with a valid layout.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn cabi_realloc(
            old_ptr: *mut u8,
            old_len: usize,
            align: usize,
            new_len: usize,
        ) -> *mut u8 {
            use alloc::alloc::{Layout, alloc as allocate, realloc};
            let ptr = unsafe {
                if old_len == 0 {
                    if new_len == 0 {
                        return align as *mut u8;
                    }
                    allocate(Layout::from_size_align_unchecked(new_len, align))
                } else {
                    realloc(old_ptr, Layout::from_size_align_unchecked(old_len, align), new_len)
                }
            };
            if ptr.is_null() {
                // Out of memory under the host's limit: trap rather than hand back null.
                core::arch::wasm32::unreachable();
            }
            ptr
        }
    };
}

/// A value kept by one plugin instance between calls. A component instance runs one call at a time on
/// one thread (wasm32 without threads), so handing out `&mut` to one closure at a time is sound.
pub struct InstanceCell<T>(core::cell::RefCell<T>);

// SAFETY: wasm32-wasip2 guests have no threads; the host never enters an instance twice at once.
unsafe impl<T> Sync for InstanceCell<T> {}

impl<T> InstanceCell<T> {
    pub const fn new(value: T) -> Self {
        Self(core::cell::RefCell::new(value))
    }

    /// Runs `f` with the value. Re-entering (impossible for a sampler) would panic, which traps.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.0.borrow_mut())
    }
}
