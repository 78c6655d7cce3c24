//! Holds: what an all-or-nothing batch spanning several owners has
//! reserved at this one and not yet confirmed or released.
//!
//! A hold is not consumption: the cell stays as it was, and every decision
//! on the key counts what is held as if it were spent. So a reservation
//! that is released (another owner denied, the coordinator gave up) or
//! lapses gives back exactly what it held, and one that is confirmed
//! consumes at that time from the cell as it then is, which the holds
//! kept able to pay. No check is ever allowed that could not have been
//! allowed with the reservation consumed; the cost of a hold is that
//! other checks may be denied while it lasts.
//!
//! Holds are kept per key hash beside each shard's table; two keys with
//! one 64-bit hash would count each other's holds (denying early, never
//! allowing more).

use std::collections::HashMap;

use super::{KeyQuota, LimitTable};
use crate::limits::{decide_within, Cell, LimitCheck, LimitResult};
use crate::EngineError;

/// What an all-or-nothing decision does when every check passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Atomic {
    /// Consumes at once.
    Consume,
    /// Holds what the checks would consume (a reservation).
    Hold,
    /// Ends a reservation of these checks: drops its holds, then decides
    /// again and consumes.
    Confirm,
}

/// What `check` holds while reserved.
fn amount(check: &LimitCheck) -> u64 {
    if check.dry_run {
        0
    } else {
        check.cost
    }
}

/// What is held of the key with hash `h`.
pub(super) fn held_at(held: &HashMap<u64, u64>, h: u64) -> u64 {
    if held.is_empty() {
        return 0;
    }
    held.get(&h).copied().unwrap_or(0)
}

pub(super) fn hold(held: &mut HashMap<u64, u64>, h: u64, check: &LimitCheck) {
    let n = amount(check);
    if n > 0 {
        let at = held.entry(h).or_default();
        *at = at.saturating_add(n);
    }
}

pub(super) fn unhold(held: &mut HashMap<u64, u64>, h: u64, check: &LimitCheck) {
    let n = amount(check);
    if let Some(at) = held.get_mut(&h) {
        *at = at.saturating_sub(n);
        if *at == 0 {
            held.remove(&h);
        }
    }
}

/// [`decide_within`] for `check` with `held` of the key already spoken
/// for: allowed only if `cost` more than what is held would be, and then
/// consuming `cost` only.
pub(super) fn decide_held(
    check: &LimitCheck,
    cell: Option<&Cell>,
    now_ms: u64,
    held: u64,
) -> (LimitResult, Option<Cell>) {
    let decide = |cost| decide_within(&check.limit, cell, now_ms, cost, check.max_delay_ms);
    if held == 0 {
        return decide(check.cost);
    }
    let (mut result, _) = decide(check.cost.saturating_add(held));
    if !result.allowed {
        result.remaining = result.remaining.saturating_sub(held);
        return (result, None);
    }
    (result, decide(check.cost).1)
}

impl LimitTable {
    /// Reserves `checks` all or nothing: if every one passes (counting what
    /// other reservations hold), what they would consume is held until
    /// [`confirm`](Self::confirm) or [`release`](Self::release) with the
    /// same checks. The results are those a consuming call would give.
    pub fn reserve(
        &self,
        checks: &[LimitCheck],
        now_ms: u64,
        quota: KeyQuota<'_>,
    ) -> Result<Vec<LimitResult>, EngineError> {
        self.check_atomic(checks, now_ms, quota, Atomic::Hold)
    }

    /// Ends the reservation of `checks` by consuming it: its holds are
    /// dropped and the checks decided again all or nothing, which the
    /// holds kept passing (denied only if the clock went back, or if the
    /// holds were lost, as when this node loaded a snapshot meanwhile).
    pub fn confirm(
        &self,
        checks: &[LimitCheck],
        now_ms: u64,
        quota: KeyQuota<'_>,
    ) -> Result<Vec<LimitResult>, EngineError> {
        self.check_atomic(checks, now_ms, quota, Atomic::Confirm)
    }

    /// Ends the reservation of `checks` without consuming: gives back what
    /// it held.
    pub fn release(&self, checks: &[LimitCheck]) {
        for check in checks {
            let (h, s) = self.locate(&check.key);
            unhold(&mut super::lock(&self.shards[s]).held, h, check);
        }
    }

    /// How many keys hold something now.
    pub fn held_keys(&self) -> usize {
        self.shards.iter().map(|s| super::lock(s).held.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::super::LimitTable;
    use super::*;
    use crate::limits::LimitDef;

    const BUCKET: LimitDef = LimitDef::TokenBucket {
        capacity: 10,
        refill_tokens: 1,
        refill_interval_ms: 1000,
    };
    const WINDOW: LimitDef = LimitDef::FixedWindow {
        limit: 10,
        window_ms: 1000,
    };

    fn check(key: &str, limit: LimitDef, cost: u64) -> LimitCheck {
        LimitCheck {
            key: key.into(),
            limit,
            cost,
            dry_run: false,
            max_delay_ms: 0,
        }
    }

    fn allowed(t: &LimitTable, c: &LimitCheck, now: u64) -> bool {
        t.check(std::slice::from_ref(c), false, now).unwrap()[0].allowed
    }

    #[test]
    fn a_hold_counts_as_spent_until_released() {
        for limit in [BUCKET, WINDOW] {
            let t = LimitTable::new(4, 100);
            let held = [check("a", limit, 6), check("b", limit, 1)];
            let r = t.reserve(&held, 0, KeyQuota::default()).unwrap();
            assert!(r.iter().all(|r| r.allowed));
            assert_eq!(r[0].remaining, 4, "reported as if consumed");
            // Nothing is stored; yet only 4 more of `a` pass.
            assert_eq!(t.len(), 0);
            assert!(!allowed(&t, &check("a", limit, 5), 0));
            assert!(allowed(&t, &check("a", limit, 4), 0));
            assert!(!allowed(&t, &check("a", limit, 1), 0));
            // A second reservation sees the first.
            let r = t
                .reserve(&[check("a", limit, 1)], 0, KeyQuota::default())
                .unwrap();
            assert!(!r[0].allowed);
            t.release(&held);
            assert_eq!(t.held_keys(), 0);
            assert!(allowed(&t, &check("a", limit, 6), 0), "given back exactly");
            assert!(!allowed(&t, &check("a", limit, 1), 0));
        }
    }

    #[test]
    fn a_confirm_consumes_what_was_held_from_the_cell_as_it_is_then() {
        let t = LimitTable::new(4, 100);
        let held = [check("a", BUCKET, 5), check("b", BUCKET, 1)];
        assert!(t.reserve(&held, 0, KeyQuota::default()).unwrap()[0].allowed);
        assert!(allowed(&t, &check("a", BUCKET, 5), 0));
        // 3 s later the bucket has refilled by 3, which the hold could not
        // have used: the confirm consumes 5 of 8.
        let r = t.confirm(&held, 3_000, KeyQuota::default()).unwrap();
        assert!(r.iter().all(|r| r.allowed), "{r:?}");
        assert_eq!(r[0].remaining, 3);
        assert_eq!(t.held_keys(), 0);
        assert_eq!(t.len(), 2);
        assert!(allowed(&t, &check("a", BUCKET, 3), 3_000));
        assert!(!allowed(&t, &check("a", BUCKET, 1), 3_000));
    }

    #[test]
    fn a_denied_reservation_holds_nothing() {
        let t = LimitTable::new(4, 100);
        let over = [check("a", BUCKET, 3), check("b", BUCKET, 11)];
        let r = t.reserve(&over, 0, KeyQuota::default()).unwrap();
        assert!(r.iter().all(|r| !r.allowed));
        assert_eq!(t.held_keys(), 0);
        assert!(allowed(&t, &check("a", BUCKET, 10), 0));
    }

    #[test]
    fn holds_of_one_key_twice_in_a_batch_add_up() {
        let t = LimitTable::new(4, 100);
        let twice = [check("a", WINDOW, 4), check("a", WINDOW, 4)];
        let r = t.reserve(&twice, 0, KeyQuota::default()).unwrap();
        assert_eq!(
            r.iter().map(|r| r.remaining).collect::<Vec<_>>(),
            [6, 2],
            "the second sees the first"
        );
        assert!(!allowed(&t, &check("a", WINDOW, 3), 0));
        let r = t.confirm(&twice, 10, KeyQuota::default()).unwrap();
        assert!(r.iter().all(|r| r.allowed));
        assert!(allowed(&t, &check("a", WINDOW, 2), 10));
        assert!(!allowed(&t, &check("a", WINDOW, 1), 10));
    }

    #[test]
    fn a_reservation_past_the_key_cap_is_refused() {
        let t = LimitTable::new(4, 1);
        let two = [check("a", BUCKET, 1), check("b", BUCKET, 1)];
        assert!(matches!(
            t.reserve(&two, 0, KeyQuota::default()),
            Err(EngineError::Exhausted { .. })
        ));
        assert_eq!(t.held_keys(), 0);
    }
}
