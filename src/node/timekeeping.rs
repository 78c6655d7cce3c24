//! The replicated clock: what time a node stamps commands with and judges
//! deadlines by.
//!
//! Leases and locks lapse by the time stamped into the log. That time must
//! never run faster than real time, or a lease lapses before its holder's
//! own clock says it should; it should not run much slower either, or dead
//! holders keep their leases. Wall clocks are neither: members' clocks
//! differ, and any of them may step (NTP, an operator, a VM restored).
//!
//! So time advances by each node's monotonic clock only, which no step
//! moves, and follows the log's timeline: every entry a node applies
//! carries the time its leader stamped, and the first one a process applies
//! (from its snapshot, its log, or its leader) sets its time; later ones
//! only ever move it up. A follower that becomes leader therefore goes on
//! from the last time it saw plus the time it has measured since, which is
//! no more than the time that has really passed. The wall clock is read
//! once, at start, for a node that has applied nothing yet (the first
//! leader of a new cluster): it takes `wall - --max-clock-skew-ms`, so a
//! clock ahead by at most the bound does not start the timeline ahead of
//! real time. After a whole-cluster restart the timeline resumes where the
//! log left it: leases keep their remaining time across the outage.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::clock::Clock;

pub struct Timekeeper {
    clock: Arc<dyn Clock>,
    /// Replicated time minus the monotonic reading; set by the first time
    /// applied, then only ever raised.
    offset: AtomicI64,
    /// Whether a time was applied yet (until then `offset` comes from the
    /// wall clock).
    anchored: AtomicBool,
    /// The latest time handed out (so no caller ever sees it go back).
    last: AtomicU64,
}

impl Timekeeper {
    pub fn new(clock: Arc<dyn Clock>, max_skew_ms: u64) -> Self {
        let start = clock.wall_ms().saturating_sub(max_skew_ms);
        let offset = start as i64 - clock.mono_ms() as i64;
        Self {
            clock,
            offset: AtomicI64::new(offset),
            anchored: AtomicBool::new(false),
            last: AtomicU64::new(0),
        }
    }

    /// The time now: monotonic, never behind a time already applied.
    pub fn now_ms(&self) -> u64 {
        let t = (self.clock.mono_ms() as i64)
            .saturating_add(self.offset.load(Ordering::Acquire))
            .max(0) as u64;
        self.last.fetch_max(t, Ordering::AcqRel).max(t)
    }

    /// A time a leader stamped on an entry this node applied (the state
    /// machine's, which never goes back): the first sets time here, later
    /// ones raise it to at least that plus what passes.
    /// The time to stamp a command this node proposes with. A node that
    /// stamps is on the cluster's timeline already (it leads), so from
    /// now on applied stamps, its own among them, only raise its time: its
    /// own stamp, applied a moment later, must not pull the time back to
    /// when it was taken.
    pub fn stamp(&self) -> u64 {
        self.anchored.store(true, Ordering::Release);
        self.now_ms()
    }

    pub fn observe(&self, stamped_ms: u64) {
        let offset = (stamped_ms as i64).saturating_sub(self.clock.mono_ms() as i64);
        if self.anchored.swap(true, Ordering::AcqRel) {
            self.offset.fetch_max(offset, Ordering::AcqRel);
        } else {
            self.offset.store(offset, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn time_starts_behind_the_wall_clock_and_moves_only_with_the_monotonic_one() {
        let clock = Arc::new(ManualClock::new(100_000));
        let t = Timekeeper::new(clock.clone(), 1_000);
        assert_eq!(t.now_ms(), 99_000);
        clock.set(500_000); // a step forward
        assert_eq!(t.now_ms(), 99_000);
        clock.set(0); // and back
        clock.advance(250);
        assert_eq!(t.now_ms(), 99_250);
    }

    /// A leader's own first stamp, applied after its clock has moved on,
    /// leaves its time where it is (seen failing when only an observed
    /// stamp anchored the time: the time then stood still for as long as
    /// the commit took).
    #[test]
    fn a_leaders_own_stamp_applied_later_does_not_hold_its_time_back() {
        let clock = Arc::new(ManualClock::new(100_000));
        let t = Timekeeper::new(clock.clone(), 0);
        let stamped = t.stamp();
        clock.advance(40); // the commit takes a while
        t.observe(stamped);
        clock.advance(10);
        assert_eq!(t.now_ms(), 100_050);
    }

    #[test]
    fn the_first_applied_stamp_sets_it_later_ones_only_raise_it() {
        let clock = Arc::new(ManualClock::new(100_000));
        let t = Timekeeper::new(clock.clone(), 0);
        // This node's wall clock is ahead of the leader's timeline: the
        // first stamp it applies sets its time (`now_ms` never hands out
        // less than it already has, so ask only afterwards).
        t.observe(95_000);
        assert_eq!(t.now_ms(), 95_000);
        clock.advance(100);
        assert_eq!(t.now_ms(), 95_100);
        t.observe(95_300); // the leader a little ahead: follow it
        assert_eq!(t.now_ms(), 95_300);
        t.observe(90_000); // never back
        clock.advance(50);
        assert_eq!(t.now_ms(), 95_350);
    }
}
