//! The server's heap allocator, counting: every allocation the Rust side makes goes through
//! [`Counting`], so `/v1/stats` can say how many a request costs (`kiln bench` divides two
//! snapshots by the requests between them). libtorch's tensors use its own allocator and are not
//! counted.
//!
//! The count is sharded by thread so that two cores allocating at once do not fight over one
//! cache line: a relaxed add to a line that stays in the allocating core's cache.
//!
//! This is the only module of the crate with `unsafe`: implementing [`GlobalAlloc`] is an unsafe
//! trait, and each method forwards to the wrapped allocator with the caller's own guarantees.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering};

const SHARDS: usize = 16;

/// One counter on its own cache line.
#[repr(align(128))]
struct Shard(AtomicU64);

static COUNTS: [Shard; SHARDS] = [const { Shard(AtomicU64::new(0)) }; SHARDS];

thread_local! {
    /// Only its address is used: it tells threads apart without initialisation or a destructor,
    /// which an allocator's thread-local must not have.
    static HERE: u8 = const { 0 };
}

fn shard() -> &'static AtomicU64 {
    // Each thread's thread-locals sit beside its own stack, pages away from any other thread's:
    // a multiplicative hash of the page number spreads threads over the shards.
    let page = HERE.with(|here| std::ptr::from_ref(here) as usize) >> 12;
    let index = (page as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60;
    &COUNTS[index as usize % SHARDS].0
}

/// Heap allocations (and reallocations) made so far by the process's Rust code, when the binary
/// installs [`Counting`]; 0 otherwise.
pub fn allocations() -> u64 {
    COUNTS.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
}

/// A [`GlobalAlloc`] that counts allocations and forwards everything to `A`. The `kiln` binary
/// installs it around the system allocator.
#[derive(Debug)]
pub struct Counting<A>(pub A);

// SAFETY: every method forwards to `A`'s with the same arguments, so `A`'s guarantees hold; the
// counting itself never allocates (a relaxed add to a static).
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        shard().fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `layout` are `A::alloc`'s.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        shard().fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `A`, with `layout`.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        shard().fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from `A` with `layout`; the caller's guarantees for `new_size` are
        // `A::realloc`'s.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}
