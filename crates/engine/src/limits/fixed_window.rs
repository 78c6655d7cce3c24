//! Fixed window: at most `limit` units per window, windows aligned to
//! multiples of `window_ms` since the Unix epoch.
//!
//! A changed definition keeps the current window's count while that window
//! (under the old alignment) is still current at the time of the check.

use super::{pack_window, unpacked_window, window, Cell, LimitResult, KIND_FIXED_WINDOW, NEVER};

#[derive(Clone, Copy, Debug)]
pub(super) struct FixedWindow {
    limit: u64,
    window: u64,
}

pub(super) fn idle_at(cell: &Cell) -> u64 {
    cell.b.saturating_add(unpacked_window(cell))
}

impl FixedWindow {
    pub(super) fn new(limit: u64, window_ms: u64) -> Self {
        Self {
            limit,
            window: window(window_ms),
        }
    }

    pub(super) fn decide(
        &self,
        cell: Option<&Cell>,
        now_ms: u64,
        cost: u64,
    ) -> (LimitResult, Option<Cell>) {
        let aligned = now_ms - now_ms % self.window;
        // A window never goes back: at a time before the stored window (a
        // clock behind the one that made it) the count stays in that window,
        // rather than moving to an earlier one that would end sooner.
        let (count, start) = match cell {
            Some(c) if c.kind() == KIND_FIXED_WINDOW && now_ms < idle_at(c) => {
                let same_windows = unpacked_window(c) == self.window;
                (
                    c.a,
                    if same_windows {
                        aligned.max(c.b)
                    } else {
                        aligned
                    },
                )
            }
            _ => (0, aligned),
        };
        let allowed = u128::from(count) + u128::from(cost) <= u128::from(self.limit);
        let end_in = start + self.window - now_ms;
        let retry_after_ms = if allowed {
            0
        } else if cost > self.limit {
            NEVER
        } else {
            end_in
        };
        let changed = allowed && cost > 0;
        let count = if changed { count + cost } else { count };
        let result = LimitResult {
            allowed,
            limit: self.limit,
            remaining: self.limit.saturating_sub(count),
            retry_after_ms,
            reset_after_ms: if count > 0 { end_in } else { 0 },
            delay_ms: 0,
        };
        let (aux, long) = pack_window(self.window);
        let cell = changed.then_some(Cell {
            tag: KIND_FIXED_WINDOW | long,
            aux,
            a: count,
            b: start,
            c: 0,
        });
        (result, cell)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decide, LimitDef};

    #[test]
    fn windows_align_to_the_epoch() {
        let def = LimitDef::FixedWindow {
            limit: 2,
            window_ms: 1000,
        };
        let mut cell = None;
        for now in [1_999, 1_999] {
            let (r, c) = decide(&def, cell.as_ref(), now, 1);
            assert!(r.allowed);
            cell = c;
        }
        let (r, c) = decide(&def, cell.as_ref(), 1_999, 1);
        assert!(!r.allowed && c.is_none());
        assert_eq!((r.retry_after_ms, r.reset_after_ms), (1, 1));
        // The next aligned window starts at 2000.
        let (r, _) = decide(&def, cell.as_ref(), 2_000, 2);
        assert!(r.allowed);
        assert_eq!(r.reset_after_ms, 1000);
    }
}
