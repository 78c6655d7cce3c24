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
//! carries the time its leader stamped, and each one another leader
//! stamped (or a snapshot's time) sets this node's time, down as well as
//! up; only the entries this node stamped itself, as leader, never move it
//! back (its own stamp, applied a moment later, is behind its clock). A
//! follower that becomes leader therefore goes on from the last time it
//! saw plus the time it has measured since, which is no more than the time
//! that has really passed, whatever its own time had been before: a leader
//! that restarts and resumes from its log stamps times as far behind as it
//! was down, and the others follow it there rather than judge its leases
//! by their own, later, time. The wall clock is read
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
    /// Replicated time minus the monotonic reading: set by each time
    /// applied from another leader, raised by this node's own.
    offset: AtomicI64,
    /// Whether a time was applied yet (until then `offset` comes from the
    /// wall clock).
    anchored: AtomicBool,
    /// The latest time handed out (so no caller sees it go back while this
    /// node leads; following another leader's time may move it back).
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

    /// The time to stamp a command this node proposes with (as leader).
    pub fn stamp(&self) -> u64 {
        self.anchored.store(true, Ordering::Release);
        self.now_ms()
    }

    /// A time applied from the log (the state machine's, which never goes
    /// back): `own` when this node stamped the entry as leader. Another
    /// leader's time (or a snapshot's) sets the time here, down as well as
    /// up; this node's own only raises it, as its own stamp, applied a
    /// moment later, must not pull the time back to when it was taken. The
    /// first time applied sets it either way.
    pub fn observe(&self, applied_ms: u64, own: bool) {
        let offset = (applied_ms as i64).saturating_sub(self.clock.mono_ms() as i64);
        if own && self.anchored.swap(true, Ordering::AcqRel) {
            self.offset.fetch_max(offset, Ordering::AcqRel);
        } else {
            self.anchored.store(true, Ordering::Release);
            self.offset.store(offset, Ordering::Release);
            self.last.store(applied_ms, Ordering::Release);
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
        t.observe(stamped, true);
        clock.advance(10);
        assert_eq!(t.now_ms(), 100_050);
    }

    #[test]
    fn the_first_applied_stamp_sets_it_and_a_leaders_stamps_move_it_either_way() {
        let clock = Arc::new(ManualClock::new(100_000));
        let t = Timekeeper::new(clock.clone(), 0);
        // This node's wall clock is ahead of the leader's timeline: the
        // first stamp it applies sets its time.
        t.observe(95_000, false);
        assert_eq!(t.now_ms(), 95_000);
        clock.advance(100);
        assert_eq!(t.now_ms(), 95_100);
        t.observe(95_300, false); // the leader a little ahead: follow it
        assert_eq!(t.now_ms(), 95_300);
        t.observe(95_200, false); // and a little behind: follow it too
        clock.advance(50);
        assert_eq!(t.now_ms(), 95_250);
        // Once it leads, its own stamps never move it back.
        let stamped = t.stamp();
        clock.advance(30);
        t.observe(stamped, true);
        assert_eq!(t.now_ms(), 95_280);
    }

    /// Seen in the simulated cluster (seed 44, by a watcher told of an
    /// expiry 760 ms before the holder's call + TTL): a leader whose Raft
    /// stopped on a full disk restarted and resumed leading from its own
    /// log, its time as far behind as it had been down, while the others'
    /// time had run on. A follower that then took over judged that
    /// leader's leases by its own, later, time. A follower follows the
    /// leader's time down as well as up.
    #[test]
    fn a_follower_follows_a_leader_whose_time_is_behind_its_own() {
        let clock = Arc::new(ManualClock::new(100_000));
        let t = Timekeeper::new(clock.clone(), 0);
        t.observe(50_000, false);
        clock.advance(5_000);
        assert_eq!(t.now_ms(), 55_000);
        // The leader, back after 4 s down, stamps 51,000: a lease it grants
        // then for 2 s may be relied on until 2 s from now.
        t.observe(51_000, false);
        clock.advance(1_500);
        assert_eq!(t.now_ms(), 52_500);
    }
}
