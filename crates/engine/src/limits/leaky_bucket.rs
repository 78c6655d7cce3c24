//! Leaky bucket, kept as GCRA (the generic cell rate algorithm): work
//! drains at `rate` units per `interval` ms, and up to `burst` units may
//! be in the bucket at once.
//!
//! The state is one time, the TAT ("theoretical arrival time"): when the
//! bucket is empty again if nothing more comes. Arithmetic is exact in
//! integers: time counts in ticks of 1/rate ms, so one unit of work is
//! `interval` ticks and needs no fractions. A cell keeps the TAT as whole
//! ms plus the ticks past them (fewer than `rate`).
//!
//! A check of `cost` units at `now` would put the TAT at
//! `max(TAT, now) + cost × T` (T: one unit's time). It may start once the
//! bucket holds at most `burst - cost` units, which is `delay` after now;
//! a plain check is allowed only with no delay (exactly a token bucket of
//! `burst` tokens refilled at the same rate), and a check in reserve mode
//! when the delay is at most its `max_delay_ms`. An admitted check
//! consumes at once, so the next one is scheduled behind it; a denied one
//! consumes nothing. A cost of 0 peeks and is always allowed; a cost above
//! `burst` never is.
//!
//! Time going backwards (a new leader's clock behind the old one's) only
//! makes the bucket look fuller: never more is admitted, and nothing is
//! stored about the time itself.
//!
//! A changed definition for an existing key keeps the TAT, rounded up to
//! the millisecond: the bucket empties when it would have, and then drains
//! at the new rate.

use super::{div_ceil_sat, window, Cell, LimitResult, KIND_LEAKY_BUCKET, NEVER};

#[derive(Clone, Copy, Debug)]
pub(super) struct LeakyBucket {
    rate: u64,
    interval: u64,
    burst: u64,
    tag: u32,
}

impl LeakyBucket {
    pub(super) fn new(rate: u64, interval: u64, burst: u64) -> Self {
        let (rate, interval) = (rate.max(1), window(interval));
        // Fingerprint of the definition in the upper 29 bits.
        let mut h = burst.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        h = (h ^ rate).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        h = (h ^ interval).wrapping_mul(0x1656_67B1_9E37_79F9);
        let tag = ((h >> 32) as u32 & !7) | KIND_LEAKY_BUCKET;
        Self {
            rate,
            interval,
            burst,
            tag,
        }
    }

    /// The stored TAT in ticks: 0 (empty long ago) for an absent key or
    /// another algorithm's cell.
    fn load(&self, cell: Option<&Cell>) -> u128 {
        let rate = u128::from(self.rate);
        match cell {
            Some(c) if c.tag & !super::DIRTY == self.tag => {
                u128::from(c.a) * rate + u128::from(c.b)
            }
            Some(c) if c.kind() == KIND_LEAKY_BUCKET => {
                u128::from(c.a.saturating_add(u64::from(c.b > 0))) * rate
            }
            _ => 0,
        }
    }

    /// A TAT in ticks as a cell keeps it; saturated at the last ms a u64
    /// holds, which no valid definition reaches within a human lifetime.
    fn store(&self, tat: u128) -> Cell {
        let rate = u128::from(self.rate);
        let (ms, ticks) = match u64::try_from(tat / rate) {
            Ok(ms) => (ms, (tat % rate) as u64),
            Err(_) => (u64::MAX, 0),
        };
        Cell {
            tag: self.tag,
            aux: 0,
            a: ms,
            b: ticks,
            c: ms.saturating_add(u64::from(ticks > 0)),
        }
    }

    pub(super) fn decide(
        &self,
        cell: Option<&Cell>,
        now_ms: u64,
        cost: u64,
        max_delay_ms: u64,
    ) -> (LimitResult, Option<Cell>) {
        let rate = u128::from(self.rate);
        let unit = u128::from(self.interval);
        let now = u128::from(now_ms) * rate;
        let burst = u128::from(self.burst) * unit;
        let tat = self.load(cell);
        let after = tat.max(now) + u128::from(cost) * unit;
        // How long this check waits for the bucket to have room for it.
        let wait = if cost == 0 {
            0
        } else {
            after.saturating_sub(burst).saturating_sub(now)
        };
        let delay_ms = div_ceil_sat(wait, rate);
        let allowed = cost <= self.burst && delay_ms <= max_delay_ms;
        let retry_after_ms = if allowed {
            0
        } else if cost > self.burst {
            NEVER
        } else {
            // The first ms at which the wait is within max_delay_ms: the
            // TAT is ahead of now, so the wait shrinks ms by ms.
            let late = after - burst - now;
            div_ceil_sat(late - late.min(u128::from(max_delay_ms) * rate), rate)
        };
        let changed = allowed && cost > 0;
        let kept = if changed { after } else { tat };
        let level = kept.saturating_sub(now);
        let result = LimitResult {
            allowed,
            limit: self.burst,
            remaining: u64::try_from(burst.saturating_sub(level) / unit).unwrap_or(u64::MAX),
            retry_after_ms,
            reset_after_ms: div_ceil_sat(level, rate),
            delay_ms: if allowed { delay_ms } else { 0 },
        };
        (result, changed.then(|| self.store(after)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decide_within, LimitDef};
    use super::*;

    fn lb(rate: u64, interval: u64, burst: u64) -> LimitDef {
        LimitDef::LeakyBucket {
            rate,
            interval_ms: interval,
            burst,
        }
    }

    /// Runs `cost` at `now` with `max_delay`, storing what it consumed.
    fn run(def: &LimitDef, cell: &mut Option<Cell>, now: u64, cost: u64, max: u64) -> LimitResult {
        let (r, c) = decide_within(def, cell.as_ref(), now, cost, max);
        if c.is_some() {
            *cell = c;
        }
        r
    }

    #[test]
    fn a_burst_goes_at_once_then_work_is_spaced_by_the_rate() {
        // 10 per second (one per 100 ms), burst 3.
        let def = lb(10, 1000, 3);
        let mut cell = None;
        for left in [2, 1, 0] {
            let r = run(&def, &mut cell, 5_000, 1, 0);
            assert!(r.allowed && r.delay_ms == 0, "{r:?}");
            assert_eq!(r.remaining, left);
        }
        let r = run(&def, &mut cell, 5_000, 1, 0);
        assert!(!r.allowed);
        assert_eq!((r.retry_after_ms, r.reset_after_ms), (100, 300));
        // Reserve mode: scheduled 100, 200, 300 ms out, then past 250 ms.
        for delay in [100, 200] {
            let r = run(&def, &mut cell, 5_000, 1, 250);
            assert!(r.allowed, "{r:?}");
            assert_eq!((r.delay_ms, r.remaining), (delay, 0));
        }
        let r = run(&def, &mut cell, 5_000, 1, 250);
        assert!(!r.allowed && r.delay_ms == 0);
        assert_eq!(r.retry_after_ms, 50, "300 ms wait, 250 allowed");
        assert_eq!(r.reset_after_ms, 500, "two reserved behind the burst");
        // Denied consumed nothing: at +50 it is admitted with 250 ms.
        let r = run(&def, &mut cell, 5_050, 1, 250);
        assert!(r.allowed);
        assert_eq!(r.delay_ms, 250);
    }

    #[test]
    fn fractional_rates_are_exact() {
        // 3 units per 10 ms: one per 3.33 ms; burst 1.
        let def = lb(3, 10, 1);
        let mut cell = None;
        let delays: Vec<u64> = (0..4)
            .map(|_| run(&def, &mut cell, 0, 1, 100).delay_ms)
            .collect();
        // Starts at 0, 3.33, 6.67, 10 ms, each rounded up.
        assert_eq!(delays, [0, 4, 7, 10]);
        let stored = cell.unwrap();
        assert_eq!((stored.a, stored.b), (13, 1), "TAT 13 ms + 1/3 ms");
    }

    #[test]
    fn peeks_costs_above_burst_and_dry_runs_store_nothing() {
        let def = lb(1, 100, 2);
        let mut cell = None;
        run(&def, &mut cell, 0, 2, 0);
        run(&def, &mut cell, 0, 2, 1_000);
        let r = run(&def, &mut cell, 0, 0, 0);
        assert!(
            r.allowed && r.delay_ms == 0,
            "a peek goes even with a queue"
        );
        assert_eq!((r.remaining, r.reset_after_ms), (0, 400));
        let r = run(&def, &mut cell, 0, 3, 1_000_000);
        assert!(!r.allowed);
        assert_eq!(r.retry_after_ms, NEVER);
    }

    #[test]
    fn time_going_back_never_admits_more() {
        let def = lb(1, 100, 1);
        let mut cell = None;
        assert!(run(&def, &mut cell, 10_000, 1, 0).allowed);
        let back = run(&def, &mut cell, 9_000, 1, 0);
        assert!(!back.allowed);
        assert_eq!(back.retry_after_ms, 1_100);
        assert!(run(&def, &mut cell, 10_100, 1, 0).allowed);
    }

    #[test]
    fn a_changed_definition_keeps_when_the_bucket_empties() {
        let mut cell = None;
        run(&lb(3, 10, 1), &mut cell, 0, 1, 0); // TAT 3.33 ms
        let r = run(&lb(1, 1000, 5), &mut cell, 0, 0, 0);
        assert_eq!(r.reset_after_ms, 4, "rounded up to the ms");
        assert_eq!(cell.unwrap().idle_at_ms(), 4);
        // Another algorithm's cell starts the bucket empty.
        let other = decide_within(
            &LimitDef::FixedWindow {
                limit: 1,
                window_ms: 10,
            },
            None,
            0,
            1,
            0,
        )
        .1;
        let (r, _) = decide_within(&lb(1, 10, 1), other.as_ref(), 0, 1, 0);
        assert!(r.allowed);
    }

    #[test]
    fn huge_values_saturate_rather_than_overflow() {
        let max = super::super::MAX_AMOUNT;
        let year = super::super::MAX_WINDOW_MS;
        let def = lb(1, year, max);
        let mut cell = None;
        let r = run(&def, &mut cell, u64::MAX - 1, max, 0);
        assert!(r.allowed);
        assert_eq!(cell.unwrap().a, u64::MAX, "the TAT saturates");
        // The fastest rate at the end of time: a tick is 10^-15 ms.
        let fast = lb(max, 1, max);
        let mut cell = None;
        assert!(run(&fast, &mut cell, u64::MAX / 2, max, 0).allowed);
        let r = run(&fast, &mut cell, u64::MAX / 2, 1, 0);
        assert!(!r.allowed);
        assert_eq!((r.retry_after_ms, r.remaining), (1, 0));
    }
}
