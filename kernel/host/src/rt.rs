//! The runtime a `no_std` library needs inside the kernel: the global allocator
//! (`kmalloc`/`kfree`) and the panic handler.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::ffi;
use crate::line::Line;

/// `kmalloc` guarantees this alignment for every size (`ARCH_KMALLOC_MINALIGN` on
/// x86_64), and natural alignment for power-of-two sizes.
const KMALLOC_MINALIGN: usize = 8;

/// The task that runs the core now (under `klp_mutex`, in process context), or null.
/// Set by `api::with_core`.
pub(crate) static CORE_TASK: AtomicPtr<ffi::Task> = AtomicPtr::new(core::ptr::null_mut());

/// The kernel's allocator. Only the task that runs the core (under `klp_mutex`, in
/// process context) may sleep for memory (`GFP_KERNEL`, unless interrupts are off);
/// every other allocation of this object — the shadow store's tables and reader slots,
/// which any context may cause — is `GFP_ATOMIC`. (A shadow variable itself is
/// allocated with its caller's flags, see `api::KernelCx`.) A failure is a null pointer,
/// which the core turns into `-ENOMEM`.
pub(crate) struct Kmalloc;

impl Kmalloc {
    /// The size to ask `kmalloc` for so that the block has `layout`'s alignment: the
    /// size itself up to the minimum alignment, else the next power of two at least
    /// as large as both size and alignment. `None` if that overflows.
    pub(crate) fn size_for(layout: Layout) -> Option<usize> {
        if layout.align() <= KMALLOC_MINALIGN {
            Some(layout.size())
        } else {
            layout
                .size()
                .max(layout.align())
                .checked_next_power_of_two()
        }
    }
}

// SAFETY: `kmalloc` returns blocks of at least the size asked for, aligned as
// `size_for` makes sure, that stay valid until `kfree`; `dealloc` is only called with
// pointers from `alloc`.
unsafe impl GlobalAlloc for Kmalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(size) = Kmalloc::size_for(layout) else {
            return core::ptr::null_mut();
        };
        // SAFETY: `current` is always valid.
        let may_sleep = CORE_TASK.load(Ordering::Acquire) == unsafe { ffi::klp_c_current() };
        // SAFETY: any size may be asked for; null is returned on failure.
        unsafe { ffi::klp_c_alloc(size, may_sleep) }.cast()
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: (GlobalAlloc contract) `ptr` came from `alloc`, i.e. from kmalloc.
        unsafe { ffi::klp_c_free(ptr.cast()) }
    }
}

#[global_allocator]
static ALLOCATOR: Kmalloc = Kmalloc;

/// A panic is a bug in klp: the lints deny every construct that panics, so only the
/// standard library's own checks can get here. The kernel panics with the message.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut line = Line::new();
    let _ = core::fmt::Write::write_fmt(&mut line, format_args!("klp: {info}"));
    let s = line.as_bytes();
    // SAFETY: the pointer and length describe `line`'s bytes, alive for the call.
    unsafe { ffi::klp_c_panic(s.as_ptr().cast(), s.len()) }
}
