//! Memory per live rate-limit key: heap bytes held by the engine for N
//! recently consumed (not yet full) token buckets, minus the keys' own bytes.
//! Counted by a wrapping global allocator, so it includes allocator-visible
//! overhead (table slack, boxed keys) but not malloc's per-chunk headers.
//!
//! cargo bench --bench memory [-- N]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use arbiter_engine::{Engine, EngineConfig, LimitCheck, LimitDef};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Resident set size in bytes (Linux), or 0 where unavailable.
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let limit = LimitDef::TokenBucket {
        capacity: 100,
        refill_tokens: 1,
        refill_interval_ms: 1000,
    };
    let engine = Engine::new(EngineConfig::default());
    let keys: Vec<String> = (0..n).map(|i| format!("user:{i:010}")).collect();
    let key_bytes: usize = keys.iter().map(String::len).sum();
    let before = LIVE.load(Ordering::Relaxed);
    let rss_before = rss();
    for (i, key) in keys.iter().enumerate() {
        let check = [LimitCheck {
            key: key.clone(),
            limit,
            cost: 1,
            dry_run: false,
            max_delay_ms: 0,
        }];
        // Drop the request's own allocations before counting.
        let r = engine
            .check(&check, false, 1_000 + i as u64 / 1000)
            .expect("decided");
        assert!(r[0].allowed);
    }
    let held = LIVE.load(Ordering::Relaxed) - before;
    let rss_grown = rss().saturating_sub(rss_before);
    let live = engine.counts().limit_keys;
    assert_eq!(live, n);
    let per_key = held as f64 / n as f64;
    let beyond = (held as f64 - key_bytes as f64) / n as f64;
    println!("keys: {n}, key bytes each: {}", key_bytes / n);
    println!("heap held by the engine: {held} bytes = {per_key:.1} bytes/key");
    println!("beyond the key's own bytes: {beyond:.1} bytes/key (target <= 128)");
    println!(
        "resident set grew by {rss_grown} bytes = {:.1} bytes/key (includes malloc chunk headers)",
        rss_grown as f64 / n as f64
    );
}
