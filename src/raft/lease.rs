//! The leader lease: how long this node, as leader, may still be sure no
//! other leader exists.
//!
//! Every AppendEntries a follower accepts is an acknowledgement of this
//! leader's term, made no earlier than the moment the request was sent.
//! After receiving it, that follower refuses to help elect anyone else for
//! the leader lease (`timing::LEADER_LEASE_MS`, enforced by the
//! pre-vote and by openraft's vote handler). So once a majority has
//! acknowledged requests sent at `t`, no new leader can exist before
//! `t + LEADER_LEASE_MS`; this node decides rate limits only until
//! `t + LEASE_MS`, a margin earlier. Time here is this process's monotonic
//! clock (tokio's, which is the system's except in the simulated cluster;
//! no wall clock), read at the moment of each decision: a process frozen
//! and resumed sees its lease lapsed at once, however stale anything else
//! it remembers.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::time::Instant;

use super::NodeId;

/// How long after a majority's acknowledgement the leader keeps deciding
/// (`timing::DECIDE_MS`).
pub use crate::timing::DECIDE_MS as LEASE_MS;

#[derive(Default)]
struct Acks {
    me: NodeId,
    voters: BTreeSet<NodeId>,
    term: u64,
    /// Per follower: when (ms on the monotonic clock) the newest request it
    /// acknowledged in `term` was sent.
    sent: HashMap<NodeId, u64>,
}

pub struct LeaderLease {
    origin: Instant,
    acks: Mutex<Acks>,
    /// The term the lease is for, and until when (monotonic ms) it holds.
    term: AtomicU64,
    until_ms: AtomicU64,
    /// This node is the only voter: it needs nobody's acknowledgement.
    lone: AtomicBool,
}

impl Default for LeaderLease {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            acks: Mutex::default(),
            term: AtomicU64::new(0),
            until_ms: AtomicU64::new(0),
            lone: AtomicBool::new(false),
        }
    }
}

impl LeaderLease {
    /// Monotonic ms since this lease was made.
    pub fn mono_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Who votes (from the membership; kept current by the node).
    pub fn set_voters(&self, me: NodeId, voters: BTreeSet<NodeId>) {
        let mut a = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        if a.me != me || a.voters != voters {
            self.lone
                .store(voters.len() == 1 && voters.contains(&me), Ordering::Release);
            a.me = me;
            a.voters = voters;
            self.recompute(&mut a);
        }
    }

    /// `follower` accepted this node's request of `term`, sent at `sent_ms`.
    pub fn acknowledged(&self, follower: NodeId, term: u64, sent_ms: u64) {
        let mut a = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        if term < a.term {
            return;
        }
        if term > a.term {
            a.term = term;
            a.sent.clear();
        }
        let slot = a.sent.entry(follower).or_insert(0);
        *slot = (*slot).max(sent_ms);
        self.recompute(&mut a);
    }

    fn recompute(&self, a: &mut Acks) {
        // This node counts as acknowledging itself at every moment.
        let others_needed = (a.voters.len() / 2 + 1).saturating_sub(1);
        let mut sent: Vec<u64> = a
            .voters
            .iter()
            .filter(|v| **v != a.me)
            .filter_map(|v| a.sent.get(v).copied())
            .collect();
        sent.sort_unstable_by(|x, y| y.cmp(x));
        let until = if others_needed == 0 {
            u64::MAX
        } else {
            sent.get(others_needed - 1)
                .map_or(0, |t| t.saturating_add(LEASE_MS))
        };
        self.until_ms.store(until, Ordering::Release);
        self.term.store(a.term, Ordering::Release);
    }

    /// Whether this node, leading in `term`, still holds the lease now. A
    /// lone voter always does.
    pub fn holds(&self, term: u64) -> bool {
        self.lone.load(Ordering::Acquire)
            || (self.term.load(Ordering::Acquire) == term
                && self.mono_ms() < self.until_ms.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voters(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn the_lease_runs_from_the_majoritys_oldest_needed_acknowledgement() {
        let l = LeaderLease::default();
        l.set_voters(1, voters(&[1, 2, 3, 4, 5]));
        // Five voters: this node and two others make a majority.
        l.acknowledged(2, 7, 1_000);
        assert_eq!(
            l.until_ms.load(Ordering::Relaxed),
            0,
            "one ack is not enough"
        );
        l.acknowledged(3, 7, 900);
        assert_eq!(l.until_ms.load(Ordering::Relaxed), 900 + LEASE_MS);
        l.acknowledged(4, 7, 1_100);
        assert_eq!(l.until_ms.load(Ordering::Relaxed), 1_000 + LEASE_MS);
        // An older request answered late does not move the lease back.
        l.acknowledged(4, 7, 100);
        assert_eq!(l.until_ms.load(Ordering::Relaxed), 1_000 + LEASE_MS);
    }

    #[test]
    fn a_new_term_starts_over_and_old_terms_are_ignored() {
        let l = LeaderLease::default();
        l.set_voters(1, voters(&[1, 2, 3]));
        l.acknowledged(2, 3, 500);
        assert_eq!(l.until_ms.load(Ordering::Relaxed), 500 + LEASE_MS);
        l.acknowledged(3, 4, 600);
        assert_eq!(l.term.load(Ordering::Relaxed), 4);
        assert_eq!(l.until_ms.load(Ordering::Relaxed), 600 + LEASE_MS);
        l.acknowledged(2, 3, 10_000);
        assert_eq!(l.until_ms.load(Ordering::Relaxed), 600 + LEASE_MS);
        assert!(!l.holds(3), "a lease is for one term only");
    }

    #[test]
    fn it_lapses_with_the_monotonic_clock_and_a_lone_voter_always_holds_it() {
        let l = LeaderLease::default();
        l.set_voters(1, voters(&[1, 2, 3]));
        l.acknowledged(2, 1, l.mono_ms());
        assert!(l.holds(1));
        assert!(!l.holds(2), "another term");
        // Acknowledged a second ago: lapsed.
        let l = LeaderLease {
            origin: Instant::now() - std::time::Duration::from_secs(1),
            ..LeaderLease::default()
        };
        l.set_voters(1, voters(&[1, 2, 3]));
        l.acknowledged(2, 1, 0);
        assert!(!l.holds(1));
        l.set_voters(1, voters(&[1]));
        assert!(l.holds(1), "a lone voter needs no acknowledgement");
        // Acknowledgements from non-voters do not count.
        let l = LeaderLease::default();
        l.set_voters(1, voters(&[1, 2, 3]));
        l.acknowledged(9, 1, l.mono_ms());
        assert!(!l.holds(1));
    }
}
