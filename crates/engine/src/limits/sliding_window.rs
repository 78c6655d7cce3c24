//! Sliding window from two aligned counters (the "weighted previous window"
//! estimate).
//!
//! Windows are aligned to multiples of `window_ms` since the Unix epoch. At
//! `e` ms into the current window the usage estimate is
//! `current + ceil(previous * (window - e) / window)`: the previous window's
//! count weighted by how much of it still overlaps the sliding window.
//!
//! Error bound: each aligned window admits at most `limit` (the estimate is
//! never below the current count), so any `window_ms`-long interval, which
//! spans at most two aligned windows, admits at most `2 × limit`. That worst
//! case needs all of the previous window's traffic at its very end; when the
//! offered traffic is evenly spread, what is admitted is spread out too and
//! any window-long interval admits at most `limit + 1` (the one from the
//! whole-millisecond spacing and the rounding up, which otherwise only ever
//! denies earlier).
//!
//! A changed definition keeps the counts; a changed `window_ms` re-aligns them
//! to the new window boundaries (the current count becomes the new current
//! window's count).

use super::{pack_window, unpacked_window, window, Cell, LimitResult, KIND_SLIDING_WINDOW, NEVER};

#[derive(Clone, Copy, Debug)]
pub(super) struct SlidingWindow {
    limit: u64,
    window: u64,
}

#[derive(Clone, Copy, Debug)]
struct State {
    prev: u64,
    cur: u64,
    start: u64,
}

/// Advances counters kept for `window` to the window containing `now_ms`.
fn advance(s: &mut State, window: u64, now_ms: u64) {
    let now = now_ms.max(s.start);
    let start = now - now % window;
    if start == s.start {
        return;
    }
    s.prev = if start == s.start + window { s.cur } else { 0 };
    s.cur = 0;
    s.start = start;
}

pub(super) fn idle_at(cell: &Cell) -> u64 {
    let window = unpacked_window(cell);
    match (cell.a, cell.b) {
        (_, cur) if cur > 0 => cell.c.saturating_add(2 * window),
        (prev, _) if prev > 0 => cell.c.saturating_add(window),
        _ => cell.c,
    }
}

impl SlidingWindow {
    pub(super) fn new(limit: u64, window_ms: u64) -> Self {
        Self {
            limit,
            window: window(window_ms),
        }
    }

    fn load(&self, cell: Option<&Cell>, now_ms: u64) -> State {
        let aligned = now_ms - now_ms % self.window;
        match cell {
            Some(c) if c.kind() == KIND_SLIDING_WINDOW => {
                let old_window = window(unpacked_window(c));
                let mut s = State {
                    prev: c.a,
                    cur: c.b,
                    start: c.c,
                };
                advance(&mut s, old_window, now_ms);
                if old_window != self.window {
                    s.start = aligned; // counts carry over to the new alignment
                }
                s
            }
            _ => State {
                prev: 0,
                cur: 0,
                start: aligned,
            },
        }
    }

    /// `ceil(prev * (window - e) / window)` where `e` = ms into the window.
    fn weighted_prev(&self, s: &State, e: u64) -> u128 {
        let w = u128::from(self.window);
        (u128::from(s.prev) * (w - u128::from(e))).div_ceil(w)
    }

    pub(super) fn decide(
        &self,
        cell: Option<&Cell>,
        now_ms: u64,
        cost: u64,
    ) -> (LimitResult, Option<Cell>) {
        let mut s = self.load(cell, now_ms);
        let w = self.window;
        let e = now_ms.max(s.start) - s.start; // < w
                                               // A time before the latest window (a clock behind the one that made
                                               // it) counts as that window's first millisecond, so waits are
                                               // measured from there: `behind` ms more from `now_ms`.
        let behind = s.start.saturating_sub(now_ms);
        let used = u128::from(s.cur) + self.weighted_prev(&s, e);
        let limit = u128::from(self.limit);
        let allowed = used + u128::from(cost) <= limit;
        let retry_after_ms = if allowed {
            0
        } else if cost > self.limit {
            NEVER
        } else {
            self.retry_after(&s, e, cost).saturating_add(behind)
        };
        let changed = allowed && cost > 0;
        let mut used_after = used;
        if changed {
            s.cur += cost;
            used_after += u128::from(cost);
        }
        let reset_after_ms = if s.cur > 0 {
            2 * w - e + behind
        } else if s.prev > 0 {
            w - e + behind
        } else {
            0
        };
        let result = LimitResult {
            allowed,
            limit: self.limit,
            remaining: limit.saturating_sub(used_after) as u64,
            retry_after_ms,
            reset_after_ms,
            delay_ms: 0,
        };
        let (aux, long) = pack_window(w);
        let cell = changed.then_some(Cell {
            tag: KIND_SLIDING_WINDOW | long,
            aux,
            a: s.prev,
            b: s.cur,
            c: s.start,
        });
        (result, cell)
    }

    /// Earliest wait after which `cost` (<= limit) fits, given it does not now.
    fn retry_after(&self, s: &State, e: u64, cost: u64) -> u64 {
        let w = u128::from(self.window);
        let (limit, cur, prev, cost) = (
            u128::from(self.limit),
            u128::from(s.cur),
            u128::from(s.prev),
            u128::from(cost),
        );
        let e = u128::from(e);
        let at = if cur + cost <= limit && prev > 0 {
            // Later in this window, once enough of the previous one slid out:
            // the first e' with prev * (w - e') <= room * w.
            let room = limit - cur - cost;
            w - (room * w / prev).min(w)
        } else {
            // In the next window, where this window's count is the previous
            // one: the first e'' with cur * (w - e'') <= (limit - cost) * w.
            let room = limit - cost;
            let e2 = (room * w).checked_div(cur).map_or(0, |q| w - q.min(w));
            w + e2
        };
        u64::try_from(at.saturating_sub(e))
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decide, LimitDef};
    use super::*;

    fn sw(limit: u64, window_ms: u64) -> LimitDef {
        LimitDef::SlidingWindow { limit, window_ms }
    }

    fn run(def: &LimitDef, cell: &mut Option<Cell>, now: u64, cost: u64) -> LimitResult {
        let (r, c) = decide(def, cell.as_ref(), now, cost);
        if c.is_some() {
            *cell = c;
        }
        r
    }

    #[test]
    fn fills_then_denies_until_previous_slides_out() {
        let def = sw(10, 1000);
        let mut cell = None;
        let r = run(&def, &mut cell, 5_000, 10);
        assert!(r.allowed);
        assert_eq!((r.remaining, r.reset_after_ms), (0, 2000));
        let r = run(&def, &mut cell, 5_500, 1);
        assert!(!r.allowed);
        // Next window: at e'' the weighted 10 must be <= 9: 10*(1000-e)/1000 <= 9 → e >= 100.
        assert_eq!(r.retry_after_ms, 600);
        assert!(!run(&def, &mut cell, 6_099, 1).allowed);
        let r = run(&def, &mut cell, 6_100, 1);
        assert!(r.allowed, "{r:?}");
        // Halfway through: 10 * 0.5 = 5 weighted + 1 current.
        let r = run(&def, &mut cell, 6_500, 0);
        assert_eq!(r.remaining, 4);
    }

    #[test]
    fn retry_within_current_window() {
        let def = sw(10, 1000);
        let mut cell = None;
        run(&def, &mut cell, 0, 8); // previous window: 8
        run(&def, &mut cell, 1000, 2); // at e=0 weighted 8 + 2 = 10
        let r = run(&def, &mut cell, 1000, 1);
        assert!(!r.allowed);
        // Need 8*(1000-e)/1000 <= 7 → e >= 125.
        assert_eq!(r.retry_after_ms, 125);
        assert!(!run(&def, &mut cell, 1124, 1).allowed);
        assert!(run(&def, &mut cell, 1125, 1).allowed);
    }

    #[test]
    fn lapsed_windows_reset() {
        let def = sw(3, 100);
        let mut cell = None;
        run(&def, &mut cell, 0, 3);
        let r = run(&def, &mut cell, 250, 0);
        assert_eq!((r.remaining, r.reset_after_ms), (3, 0));
        assert_eq!(cell.unwrap().idle_at_ms(), 200);
    }

    #[test]
    fn changed_window_keeps_counts() {
        let mut cell = None;
        run(&sw(10, 1000), &mut cell, 10_100, 7);
        let r = run(&sw(10, 500), &mut cell, 10_200, 0);
        assert_eq!(r.remaining, 3);
        let r = run(&sw(20, 500), &mut cell, 10_200, 0);
        assert_eq!(r.remaining, 13);
    }
}
