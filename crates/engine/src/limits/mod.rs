//! Rate-limit algorithms and the sharded table that holds their state.
//!
//! Every algorithm is a pure function of (definition, stored cell, now, cost).
//! State lives in a 32-byte [`Cell`] per key; the caller sends the definition
//! with every check, so the cell stores only what the definition cannot give.

mod fixed_window;
mod sliding_window;
mod table;
mod token_bucket;

use serde::{Deserialize, Serialize};

pub use table::{KeyQuota, LimitTable};

/// Largest capacity / limit / refill amount accepted (10^15).
pub const MAX_AMOUNT: u64 = 1_000_000_000_000_000;
/// Largest interval or window accepted, in ms (~49.7 days): it must fit the
/// cell's 32-bit field.
pub const MAX_WINDOW_MS: u64 = u32::MAX as u64;
/// `retry_after_ms` when the cost can never be allowed (cost above the limit).
pub const NEVER: u64 = u64::MAX;

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
        }
    }

    /// The full allowance: capacity or limit.
    pub fn allowance(&self) -> u64 {
        match *self {
            LimitDef::TokenBucket { capacity, .. } => capacity,
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
}

/// The decision for one check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitResult {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    pub retry_after_ms: u64,
    pub reset_after_ms: u64,
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
            KIND_TOKEN_BUCKET => self.c,
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
    match *def {
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
/// by zero or truncates, whatever it is handed.
fn window(ms: u64) -> u64 {
    ms.clamp(1, MAX_WINDOW_MS)
}
