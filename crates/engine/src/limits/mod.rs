//! Rate-limit algorithms and the sharded table that holds their state.
//!
//! Every algorithm is a pure function of (definition, stored cell, now, cost).
//! State lives in a 32-byte [`Cell`] per key; the caller sends the definition
//! with every check, so the cell stores only what the definition cannot give.

mod fixed_window;
mod leaky_bucket;
mod sliding_window;
mod table;
mod token_bucket;

use serde::{Deserialize, Serialize};

pub use table::{none_consumed, KeyQuota, LimitTable};

/// Largest capacity / limit / refill amount accepted (10^15).
pub const MAX_AMOUNT: u64 = 1_000_000_000_000_000;
/// Largest interval or window accepted, in ms (366 days, so a limit per
/// year fits). Past [`MS_FIELD_MAX`] they count in whole seconds.
pub const MAX_WINDOW_MS: u64 = 366 * 86_400_000;
/// The longest window a cell's 32-bit field holds in ms (about 49.7 days);
/// a longer one is stored in seconds, flagged by [`LONG`].
const MS_FIELD_MAX: u64 = u32::MAX as u64;
/// Set in a window cell's `tag` when its `aux` counts seconds, not ms.
const LONG: u32 = 8;
/// `retry_after_ms` when the cost can never be allowed (cost above the limit).
pub const NEVER: u64 = u64::MAX;
/// Longest wait a check in reserve mode may accept (`max_delay_ms`): an hour.
pub const MAX_DELAY_MS: u64 = 3_600_000;

/// A limit definition, as the caller sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LimitDef {
    TokenBucket {
        capacity: u64,
        refill_tokens: u64,
        refill_interval_ms: u64,
    },
    SlidingWindow {
        limit: u64,
        window_ms: u64,
    },
    FixedWindow {
        limit: u64,
        window_ms: u64,
    },
    /// Drains `rate` units per `interval_ms`; at most `burst` at once (GCRA).
    LeakyBucket {
        rate: u64,
        interval_ms: u64,
        burst: u64,
    },
}

/// Why a definition is out of range: the field (relative to the algorithm
/// message) and its bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: must be 1 to {max}, got {got}")]
pub struct InvalidLimit {
    pub field: &'static str,
    pub max: u64,
    pub got: u64,
}

impl LimitDef {
    /// Checks every field against its bound. The engine stays safe (no
    /// division by zero, no overflow) even for unchecked definitions, but its
    /// answers are only meaningful for valid ones.
    pub fn validate(&self) -> Result<(), InvalidLimit> {
        let check = |field, got, max| {
            if got == 0 || got > max {
                Err(InvalidLimit { field, max, got })
            } else {
                Ok(())
            }
        };
        match *self {
            LimitDef::TokenBucket {
                capacity,
                refill_tokens,
                refill_interval_ms,
            } => {
                check("token_bucket.capacity", capacity, MAX_AMOUNT)?;
                check("token_bucket.refill_tokens", refill_tokens, MAX_AMOUNT)?;
                check(
                    "token_bucket.refill_interval_ms",
                    refill_interval_ms,
                    MAX_WINDOW_MS,
                )
            }
            LimitDef::SlidingWindow { limit, window_ms } => {
                check("sliding_window.limit", limit, MAX_AMOUNT)?;
                check("sliding_window.window_ms", window_ms, MAX_WINDOW_MS)
            }
            LimitDef::FixedWindow { limit, window_ms } => {
                check("fixed_window.limit", limit, MAX_AMOUNT)?;
                check("fixed_window.window_ms", window_ms, MAX_WINDOW_MS)
            }
            LimitDef::LeakyBucket {
                rate,
                interval_ms,
                burst,
            } => {
                check("leaky_bucket.rate", rate, MAX_AMOUNT)?;
                check("leaky_bucket.interval_ms", interval_ms, MAX_WINDOW_MS)?;
                check("leaky_bucket.burst", burst, MAX_AMOUNT)
            }
        }
    }

    /// The full allowance: capacity, burst or limit.
    pub fn allowance(&self) -> u64 {
        match *self {
            LimitDef::TokenBucket { capacity, .. } => capacity,
            LimitDef::LeakyBucket { burst, .. } => burst,
            LimitDef::SlidingWindow { limit, .. } | LimitDef::FixedWindow { limit, .. } => limit,
        }
    }
}

/// One check of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitCheck {
    pub key: String,
    pub limit: LimitDef,
    /// Units to consume; 0 is a peek.
    pub cost: u64,
    /// Decide without consuming.
    pub dry_run: bool,
    /// Reserve mode (leaky buckets): admit the check if it can start within
    /// this many ms, telling the caller how long to wait; 0 = only now.
    #[serde(default)]
    pub max_delay_ms: u64,
}

/// The decision for one check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitResult {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    pub retry_after_ms: u64,
    pub reset_after_ms: u64,
    /// When allowed, how long the caller waits before starting (reserve
    /// mode); otherwise 0.
    #[serde(default)]
    pub delay_ms: u64,
}

/// The stored state of one key: 32 bytes whatever the algorithm, so a live
/// key costs the key's bytes plus a small constant (see BENCHMARKS.md).
///
/// Field use by algorithm (`tag` low two bits):
/// Bit 2 of `tag` marks a cell changed since the last sync (see `DIRTY`).
/// - token bucket (1): `a` whole tokens, `b` ms refill is accounted up to,
///   `c` ms at which the bucket is full again, `aux` partial token in units of
///   1/interval token; `tag`'s upper bits fingerprint the definition so a
///   changed one is noticed.
/// - sliding window (2): `a` previous window's count, `b` current window's
///   count, `c` current window's start, `aux` window_ms.
/// - fixed window (3): `a` count, `b` window start, `aux` window_ms.
/// - leaky bucket (0): `a` the TAT in ms, `b` ticks past it (1/rate ms
///   each), `c` the ms it is empty from; `tag`'s upper bits fingerprint
///   the definition.
/// - for both windows, `tag` bit 3 ([`LONG`]): `aux` counts seconds (a
///   window longer than 32 bits of ms, up to a year).
///
/// Serialized as a five-element array `[tag, aux, a, b, c]`: a sync entry
/// carries thousands of cells, and field names would double its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "CellRepr", into = "CellRepr")]
pub struct Cell {
    pub(crate) tag: u32,
    pub(crate) aux: u32,
    pub(crate) a: u64,
    pub(crate) b: u64,
    pub(crate) c: u64,
}

#[derive(Serialize, Deserialize)]
struct CellRepr(u32, u32, u64, u64, u64);

impl From<CellRepr> for Cell {
    fn from(CellRepr(tag, aux, a, b, c): CellRepr) -> Self {
        Cell { tag, aux, a, b, c }
    }
}

impl From<Cell> for CellRepr {
    fn from(c: Cell) -> Self {
        CellRepr(c.tag, c.aux, c.a, c.b, c.c)
    }
}

/// Set on a cell changed since the last [`LimitTable::drain_dirty`]; never
/// stored by followers or shipped in syncs and snapshots.
const DIRTY: u32 = 4;

const KIND_LEAKY_BUCKET: u32 = 0;
const KIND_TOKEN_BUCKET: u32 = 1;
const KIND_SLIDING_WINDOW: u32 = 2;
const KIND_FIXED_WINDOW: u32 = 3;

/// About what one cell adds to an encoded sync entry besides its key: the
/// figure sync entries are bounded by.
pub const CELL_BYTES: usize = 24;

impl Cell {
    /// The stored words, for encoders outside the engine: (tag, aux, a, b, c).
    pub fn to_parts(&self) -> (u32, u32, u64, u64, u64) {
        (self.tag, self.aux, self.a, self.b, self.c)
    }

    /// A cell from [`Cell::to_parts`]' words.
    pub fn from_parts((tag, aux, a, b, c): (u32, u32, u64, u64, u64)) -> Self {
        Cell { tag, aux, a, b, c }
    }

    fn kind(&self) -> u32 {
        self.tag & 3
    }

    fn is_dirty(&self) -> bool {
        self.tag & DIRTY != 0
    }

    fn dirty(mut self) -> Self {
        self.tag |= DIRTY;
        self
    }

    fn clean(mut self) -> Self {
        self.tag &= !DIRTY;
        self
    }

    /// The time from which this cell is equivalent to an absent key (a full
    /// bucket, lapsed windows), so a sweep may drop it.
    pub fn idle_at_ms(&self) -> u64 {
        match self.kind() {
            KIND_TOKEN_BUCKET | KIND_LEAKY_BUCKET => self.c,
            KIND_SLIDING_WINDOW => sliding_window::idle_at(self),
            _ => fixed_window::idle_at(self),
        }
    }
}

/// Decides `cost` against `def` given the stored cell (None = absent key).
/// Returns the result and, when the check consumed something, the cell to
/// store. Pure: same inputs, same outputs.
pub fn decide(
    def: &LimitDef,
    cell: Option<&Cell>,
    now_ms: u64,
    cost: u64,
) -> (LimitResult, Option<Cell>) {
    decide_within(def, cell, now_ms, cost, 0)
}

/// [`decide`] in reserve mode: a leaky bucket admits a check that can
/// start within `max_delay_ms` (other algorithms ignore it; the API refuses
/// it for them).
pub fn decide_within(
    def: &LimitDef,
    cell: Option<&Cell>,
    now_ms: u64,
    cost: u64,
    max_delay_ms: u64,
) -> (LimitResult, Option<Cell>) {
    match *def {
        LimitDef::LeakyBucket {
            rate,
            interval_ms,
            burst,
        } => leaky_bucket::LeakyBucket::new(rate, interval_ms, burst).decide(
            cell,
            now_ms,
            cost,
            max_delay_ms,
        ),
        LimitDef::TokenBucket {
            capacity,
            refill_tokens,
            refill_interval_ms,
        } => token_bucket::TokenBucket::new(capacity, refill_tokens, refill_interval_ms)
            .decide(cell, now_ms, cost),
        LimitDef::SlidingWindow { limit, window_ms } => {
            sliding_window::SlidingWindow::new(limit, window_ms).decide(cell, now_ms, cost)
        }
        LimitDef::FixedWindow { limit, window_ms } => {
            fixed_window::FixedWindow::new(limit, window_ms).decide(cell, now_ms, cost)
        }
    }
}

/// `ceil(n / d)` saturated to u64; `d` must be non-zero.
fn div_ceil_sat(n: u128, d: u128) -> u64 {
    u64::try_from(n.div_ceil(d)).unwrap_or(u64::MAX)
}

/// Bounds an arbitrary u64 to 1..=MAX_WINDOW_MS so the engine never divides
/// by zero or truncates, whatever it is handed; a window longer than
/// [`MS_FIELD_MAX`] is rounded down to whole seconds (what a cell keeps).
fn window(ms: u64) -> u64 {
    let w = ms.clamp(1, MAX_WINDOW_MS);
    if w > MS_FIELD_MAX {
        w - w % 1000
    } else {
        w
    }
}

/// A window (from [`window`]) as a cell stores it: its `aux` and the bits
/// to set in its `tag`.
fn pack_window(w: u64) -> (u32, u32) {
    if w > MS_FIELD_MAX {
        ((w / 1000) as u32, LONG)
    } else {
        (w as u32, 0)
    }
}

/// The window a fixed- or sliding-window cell was made with, in ms.
fn unpacked_window(c: &Cell) -> u64 {
    if c.tag & LONG != 0 {
        u64::from(c.aux) * 1000
    } else {
        u64::from(c.aux)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YEAR: u64 = 365 * 86_400_000;
    /// 2027-01-01 plus a little, in ms since the epoch (a year window is
    /// aligned to multiples of 365 days since the epoch, not calendar years).
    const NOW: u64 = 1_798_761_600_123;

    /// Passes a cell through its stored words, as a sync or snapshot does.
    fn stored(cell: Option<Cell>) -> Option<Cell> {
        cell.map(|c| Cell::from_parts(c.to_parts()))
    }

    #[test]
    fn windows_and_refills_of_a_year_are_kept_exactly() {
        for def in [
            LimitDef::FixedWindow {
                limit: 2,
                window_ms: YEAR,
            },
            LimitDef::SlidingWindow {
                limit: 2,
                window_ms: YEAR,
            },
        ] {
            assert_eq!(def.validate(), Ok(()));
            let (first, cell) = decide(&def, None, NOW, 1);
            let cell = stored(cell);
            assert_eq!(cell.unwrap().tag & LONG, LONG, "{def:?}: kept in seconds");
            let (second, cell) = decide(&def, cell.as_ref(), NOW + 1, 1);
            let (third, _) = decide(&def, stored(cell).as_ref(), NOW + 2, 1);
            assert!(first.allowed && second.allowed && !third.allowed, "{def:?}");
            let window_start = NOW - NOW % YEAR;
            let idle = stored(cell).unwrap().idle_at_ms();
            assert!(
                idle >= window_start + YEAR && idle > NOW + 86_400_000,
                "{def:?}: idle at {idle}"
            );
            if let LimitDef::FixedWindow { .. } = def {
                assert_eq!(third.retry_after_ms, window_start + YEAR - (NOW + 2));
                let next_year = window_start + YEAR;
                let (after, _) = decide(&def, stored(cell).as_ref(), next_year, 1);
                assert!(after.allowed && after.remaining == 1, "a new year");
            }
        }
        // Two tokens a year: one comes back half a year after it was spent.
        let bucket = LimitDef::TokenBucket {
            capacity: 2,
            refill_tokens: 2,
            refill_interval_ms: YEAR,
        };
        assert_eq!(bucket.validate(), Ok(()));
        let (_, cell) = decide(&bucket, None, NOW, 2);
        let (early, _) = decide(&bucket, stored(cell).as_ref(), NOW + YEAR / 2 - 1, 1);
        assert!(!early.allowed);
        assert_eq!(early.retry_after_ms, 1);
        let (due, _) = decide(&bucket, stored(cell).as_ref(), NOW + YEAR / 2, 1);
        assert!(due.allowed);
    }

    #[test]
    fn windows_that_fit_32_bits_are_stored_as_before() {
        let month = 30 * 86_400_000;
        let def = LimitDef::FixedWindow {
            limit: 5,
            window_ms: month,
        };
        let (_, cell) = decide(&def, None, NOW, 1);
        let cell = cell.unwrap();
        assert_eq!((cell.tag, u64::from(cell.aux)), (KIND_FIXED_WINDOW, month));
        // Past a year is refused; a long window counts whole seconds.
        let too_long = LimitDef::SlidingWindow {
            limit: 1,
            window_ms: MAX_WINDOW_MS + 1,
        };
        assert!(too_long.validate().is_err());
        assert_eq!(window(YEAR + 999), YEAR);
    }
}
