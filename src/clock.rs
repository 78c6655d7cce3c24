//! Time as a value you can hold.
//!
//! The engine never reads a clock: every command carries `now_ms`. Only the
//! node stamps commands, through this trait, so tests drive time with
//! [`ManualClock`] instead of sleeping.
//!
//! A clock has two readings. The wall clock (`wall_ms`) is read once, when a
//! node starts, and used only if it has applied no time from the log yet;
//! the node advances time with the monotonic reading (`mono_ms`), which no
//! clock step moves (see `node::timekeeping`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    /// Wall-clock milliseconds since the Unix epoch (fixed windows align to
    /// the epoch). May step forward or back.
    fn wall_ms(&self) -> u64;
    /// Milliseconds on a monotonic clock: never steps, only advances.
    fn mono_ms(&self) -> u64;
}

/// Milliseconds since this process first asked.
fn process_mono_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The system's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        system_ms()
    }

    fn mono_ms(&self) -> u64 {
        process_mono_ms()
    }
}

/// A clock that moves only when told to. [`ManualClock::advance`] moves
/// both readings (time passing); [`ManualClock::set`] moves only the wall
/// clock (a step).
#[derive(Debug, Default)]
pub struct ManualClock {
    wall: AtomicU64,
    mono: AtomicU64,
}

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        Self {
            wall: AtomicU64::new(start_ms),
            mono: AtomicU64::new(0),
        }
    }

    pub fn advance(&self, ms: u64) {
        self.wall.fetch_add(ms, Ordering::SeqCst);
        self.mono.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set(&self, ms: u64) {
        self.wall.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn wall_ms(&self) -> u64 {
        self.wall.load(Ordering::SeqCst)
    }

    fn mono_ms(&self) -> u64 {
        self.mono.load(Ordering::SeqCst)
    }
}

/// The system clock with its wall reading shifted by an offset (signed ms)
/// read from a file, re-read every 10 ms: a test-only way to skew or step
/// one process's wall clock (`ARBITER_TEST_CLOCK_FILE`). A missing or
/// unreadable file means no offset.
#[derive(Debug)]
pub struct FileOffsetClock {
    path: PathBuf,
    offset: AtomicI64,
    read_at: AtomicU64,
}

impl FileOffsetClock {
    pub fn new(path: PathBuf) -> Self {
        let clock = Self {
            path,
            offset: AtomicI64::new(0),
            read_at: AtomicU64::new(0),
        };
        clock.reread();
        clock
    }

    fn reread(&self) {
        let offset = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        self.offset.store(offset, Ordering::Relaxed);
        self.read_at.store(process_mono_ms(), Ordering::Relaxed);
    }
}

impl Clock for FileOffsetClock {
    fn wall_ms(&self) -> u64 {
        if process_mono_ms().saturating_sub(self.read_at.load(Ordering::Relaxed)) >= 10 {
            self.reread();
        }
        system_ms().saturating_add_signed(self.offset.load(Ordering::Relaxed))
    }

    fn mono_ms(&self) -> u64 {
        process_mono_ms()
    }
}

/// The clock a server runs on: the system's, unless the test-only
/// `ARBITER_TEST_CLOCK_FILE` names an offset file (read only in a build
/// with the `test-hooks` feature, which `cargo test` turns on and release
/// builds do not).
pub fn from_env() -> std::sync::Arc<dyn Clock> {
    #[cfg(feature = "test-hooks")]
    if let Some(path) = std::env::var_os("ARBITER_TEST_CLOCK_FILE") {
        return std::sync::Arc::new(FileOffsetClock::new(path.into()));
    }
    std::sync::Arc::new(SystemClock)
}
