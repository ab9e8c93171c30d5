//! A global allocator that counts live heap bytes, for the state-size figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The live-byte counter, in shards a cache line each: each thread counts in its own (as
/// threads come), so threads that allocate together do not share a line. A shard may go below
/// zero (a thread frees what another allocated); only the sum means something.
static LIVE: [Shard; SHARDS] = [const { Shard(AtomicUsize::new(0)) }; SHARDS];
const SHARDS: usize = 16;
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(true);

#[repr(align(64))]
struct Shard(AtomicUsize);

thread_local! {
    /// This thread's shard, taken on its first allocation (a constant initialiser: no
    /// allocation, no destructor).
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's shard of the counter (the first one while thread-locals are gone).
fn shard() -> &'static AtomicUsize {
    let i = SHARD
        .try_with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS);
            }
            s.get()
        })
        .unwrap_or(0);
    &LIVE[i].0
}

/// An allocator (the system's by default) counting live bytes (while [`set_counting`] leaves
/// it on, as it is from the start).
pub struct Counting<A = System>(pub A);

impl Counting {
    /// The system allocator, counted.
    pub const fn system() -> Self {
        Self(System)
    }
}

/// Turns the counting on or off. The counter's shards are shared once there are more threads
/// than shards, and even a thread's own shard is an atomic add per allocation: throughput
/// benchmarks run with it off and memory measurements turn it on around what they measure. A difference of two [`live_bytes`] read
/// while it is on is the heap's change between them, whatever was counted before.
pub fn set_counting(on: bool) {
    COUNTING.store(on, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the inner allocator; the counter is a side effect.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
            shard().fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { self.0.dealloc(ptr, layout) };
        if COUNTING.load(Ordering::Relaxed) {
            shard().fetch_sub(layout.size(), Ordering::Relaxed);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
            let shard = shard();
            shard.fetch_add(new_size, Ordering::Relaxed);
            shard.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

/// Bytes currently allocated on the heap (counted while counting is on; compare two readings
/// with `wrapping_sub` if counting was ever off).
pub fn live_bytes() -> usize {
    LIVE.iter().fold(0usize, |sum, s| {
        sum.wrapping_add(s.0.load(Ordering::Relaxed))
    })
}

/// The process's peak resident set (VmHWM), in bytes; 0 where /proc is not available.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
