//! Token bucket with continuous refill.
//!
//! Arithmetic is exact in integers: one token is `interval` units and every
//! millisecond adds `refill` units, so "refill_tokens per refill_interval_ms"
//! needs no fractions. The stored state is whole tokens plus the partial token
//! in units (`residual < interval`) plus the time refill was counted up to.
//!
//! A changed definition for an existing key keeps the whole tokens (clamped to
//! the new capacity), drops the partial token, and refills at the new rate
//! from the last accounted time.
//!
//! An interval longer than a cell's 32-bit field holds (about 49.7 days, up
//! to a year) keeps the partial token in thousands of units, rounded down:
//! each check that consumes may forget under 1,000 units, less than a
//! millionth of a token for a yearly refill; it never adds any.

use super::{div_ceil_sat, window, Cell, LimitResult, KIND_TOKEN_BUCKET, MS_FIELD_MAX, NEVER};

#[derive(Clone, Copy, Debug)]
pub(super) struct TokenBucket {
    capacity: u64,
    refill: u64,
    interval: u64,
    tag: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    tokens: u64,
    residual: u64,
    last_ms: u64,
}

impl TokenBucket {
    pub(super) fn new(capacity: u64, refill: u64, interval: u64) -> Self {
        let (refill, interval) = (refill.max(1), window(interval));
        // Fingerprint of the definition in the upper 29 bits.
        let mut h = capacity.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h = (h ^ refill).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        h = (h ^ interval).wrapping_mul(0x1656_67B1_9E37_79F9);
        let tag = ((h >> 32) as u32 & !7) | KIND_TOKEN_BUCKET;
        Self {
            capacity,
            refill,
            interval,
            tag,
        }
    }

    /// Units per stored unit of the partial token: 1, or 1,000 when the
    /// interval (the largest partial token) does not fit 32 bits.
    fn residual_scale(&self) -> u64 {
        if self.interval > MS_FIELD_MAX {
            1000
        } else {
            1
        }
    }

    fn load(&self, cell: Option<&Cell>, now_ms: u64) -> State {
        let mut s = match cell {
            Some(c) if c.tag & !super::DIRTY == self.tag => State {
                tokens: c.a,
                residual: u64::from(c.aux) * self.residual_scale(),
                last_ms: c.b,
            },
            // Same algorithm, changed definition: keep whole tokens.
            Some(c) if c.kind() == KIND_TOKEN_BUCKET => State {
                tokens: c.a.min(self.capacity),
                residual: 0,
                last_ms: c.b,
            },
            // Absent, or another algorithm: a new bucket starts full.
            _ => State {
                tokens: self.capacity,
                residual: 0,
                last_ms: now_ms,
            },
        };
        self.refill_to(&mut s, now_ms);
        s
    }

    fn refill_to(&self, s: &mut State, now_ms: u64) {
        if now_ms <= s.last_ms {
            return; // time never runs backwards for a bucket
        }
        let elapsed = now_ms - s.last_ms;
        s.last_ms = now_ms;
        if s.tokens >= self.capacity {
            s.tokens = self.capacity;
            s.residual = 0;
            return;
        }
        let units = u128::from(elapsed) * u128::from(self.refill) + u128::from(s.residual);
        let interval = u128::from(self.interval);
        let tokens = u128::from(s.tokens) + units / interval;
        if tokens >= u128::from(self.capacity) {
            s.tokens = self.capacity;
            s.residual = 0;
        } else {
            s.tokens = tokens as u64;
            s.residual = (units % interval) as u64;
        }
    }

    /// Milliseconds until `tokens` whole tokens are available.
    fn wait_for(&self, s: &State, tokens: u64) -> u64 {
        if s.tokens >= tokens {
            return 0;
        }
        let need =
            u128::from(tokens - s.tokens) * u128::from(self.interval) - u128::from(s.residual);
        div_ceil_sat(need, u128::from(self.refill))
    }

    pub(super) fn decide(
        &self,
        cell: Option<&Cell>,
        now_ms: u64,
        cost: u64,
    ) -> (LimitResult, Option<Cell>) {
        let mut s = self.load(cell, now_ms);
        let allowed = cost <= s.tokens;
        let retry_after_ms = if allowed {
            0
        } else if cost > self.capacity {
            NEVER
        } else {
            self.wait_for(&s, cost)
        };
        let changed = allowed && cost > 0;
        if changed {
            s.tokens -= cost;
        }
        let reset_after_ms = self.wait_for(&s, self.capacity);
        let result = LimitResult {
            allowed,
            limit: self.capacity,
            remaining: s.tokens,
            retry_after_ms,
            reset_after_ms,
            delay_ms: 0,
        };
        let cell = changed.then(|| Cell {
            tag: self.tag,
            aux: (s.residual / self.residual_scale()) as u32,
            a: s.tokens,
            b: s.last_ms,
            c: s.last_ms.saturating_add(reset_after_ms),
        });
        (result, cell)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decide, LimitDef};
    use super::*;

    fn tb(capacity: u64, refill: u64, interval: u64) -> LimitDef {
        LimitDef::TokenBucket {
            capacity,
            refill_tokens: refill,
            refill_interval_ms: interval,
        }
    }

    /// Runs `cost` at `now` against `cell`, storing what the check consumed.
    fn run(def: &LimitDef, cell: &mut Option<Cell>, now: u64, cost: u64) -> LimitResult {
        let (r, c) = decide(def, cell.as_ref(), now, cost);
        if c.is_some() {
            *cell = c;
        }
        r
    }

    #[test]
    fn new_bucket_starts_full_and_drains() {
        let def = tb(3, 1, 1000);
        let mut cell = None;
        for left in [2, 1, 0] {
            let r = run(&def, &mut cell, 10_000, 1);
            assert!(r.allowed);
            assert_eq!(r.remaining, left);
        }
        let r = run(&def, &mut cell, 10_000, 1);
        assert!(!r.allowed);
        assert_eq!(r.retry_after_ms, 1000);
        assert_eq!(r.reset_after_ms, 3000);
    }

    #[test]
    fn refill_is_exact_for_fractional_rates() {
        // 2 tokens per 3 ms: a token every 1.5 ms.
        let def = tb(10, 2, 3);
        let mut cell = None;
        assert!(run(&def, &mut cell, 0, 10).allowed);
        let r = run(&def, &mut cell, 0, 1);
        assert_eq!(r.retry_after_ms, 2, "1.5 ms rounds up to 2");
        let r = run(&def, &mut cell, 1, 1);
        assert!(!r.allowed);
        assert_eq!(r.retry_after_ms, 1);
        assert!(run(&def, &mut cell, 2, 1).allowed); // 1 token at 1.5 ms, used
                                                     // At 3 ms the second token arrives (3 ms * 2/3 = 2 tokens total).
        assert!(!run(&def, &mut cell, 2, 1).allowed);
        let r = run(&def, &mut cell, 3, 1);
        assert!(r.allowed);
        assert_eq!(r.remaining, 0);
        // Empty at 3 ms: full after 10 tokens = 15 ms.
        assert_eq!(r.reset_after_ms, 15);
    }

    #[test]
    fn peek_and_cost_above_capacity() {
        let def = tb(5, 1, 100);
        let mut cell = None;
        let r = run(&def, &mut cell, 0, 0);
        assert!(r.allowed);
        assert_eq!((r.remaining, r.reset_after_ms), (5, 0));
        assert!(cell.is_none(), "a peek stores nothing");
        let r = run(&def, &mut cell, 0, 6);
        assert!(!r.allowed);
        assert_eq!(r.retry_after_ms, NEVER);
        assert!(cell.is_none());
    }

    #[test]
    fn changed_definition_keeps_whole_tokens_clamped() {
        let mut cell = None;
        run(&tb(10, 1, 1000), &mut cell, 0, 4); // 6 left
        let r = run(&tb(5, 1, 1000), &mut cell, 0, 0);
        assert_eq!(r.remaining, 5, "clamped to the new capacity");
        let r = run(&tb(100, 1, 1000), &mut cell, 0, 0);
        assert_eq!(r.remaining, 6, "a larger capacity keeps the tokens");
        // New rate applies from the last accounted time.
        let r = run(&tb(100, 10, 1000), &mut cell, 1000, 0);
        assert_eq!(r.remaining, 16);
    }

    #[test]
    fn idle_cell_marks_when_full() {
        let def = tb(4, 1, 10);
        let mut cell = None;
        run(&def, &mut cell, 100, 2);
        assert_eq!(cell.unwrap().idle_at_ms(), 120);
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let def = tb(MAX, MAX, u32::MAX as u64);
        let mut cell = None;
        assert!(run(&def, &mut cell, 0, MAX).allowed);
        let r = run(&def, &mut cell, u64::MAX, 1);
        assert!(r.allowed);
        let r = run(&tb(1, 1, 1), &mut None, 0, u64::MAX);
        assert!(!r.allowed);
    }
    const MAX: u64 = super::super::MAX_AMOUNT;
}
