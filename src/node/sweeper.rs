//! The sweeper: purges lapsed leases and records as their deadlines pass
//! (so watchers hear of expiry promptly), and idle rate-limit cells every
//! `--sweep-interval-ms`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::leadership::Leadership;
use super::proposer::Proposer;
use super::tasks::Stopping;
use super::timekeeping::Timekeeper;
use super::view::View;
use super::watch_fanout::Watchers;
use crate::engine::{Command, Engine};

/// The shortest wait between two turns of the sweeper.
const MIN_WAIT: Duration = Duration::from_millis(1);
/// The wait after a sweep could not be proposed (no majority, say).
const RETRY_WAIT: Duration = Duration::from_millis(50);
/// How far behind this node's rate-limit decision time idle cells are
/// judged: a cell is dropped only if it was full (or its window over) this
/// long ago, so a decision clock that follows the leader's time down (by
/// at most a slot-lease grant's trip, under 300 ms) never meets a key
/// dropped as full at a time it has not reached; a dropped cell starts
/// full, and one dropped early would refill by the difference.
const SWEEP_BEHIND_MS: u64 = 1_000;

/// When the sweeper next wakes, and the bell a write rings when it sets an
/// earlier deadline. Shared by the sweeper and the proposer.
pub struct Deadlines {
    sweep_at: AtomicU64,
    changed: Notify,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            sweep_at: AtomicU64::new(u64::MAX),
            changed: Notify::new(),
        }
    }
}

impl Deadlines {
    /// Wakes the sweeper if `next` is earlier than the time it sleeps until.
    pub fn note(&self, next: Option<u64>) {
        if next.is_some_and(|t| t < self.sweep_at.load(Ordering::Acquire)) {
            self.changed.notify_one();
        }
    }
}

/// The sweeping loop and what it uses.
pub struct Sweeper {
    pub view: View,
    pub leadership: Arc<Leadership>,
    pub proposer: Proposer,
    pub engine: Arc<Engine>,
    pub time: Arc<Timekeeper>,
    pub watchers: Watchers,
    pub deadlines: Arc<Deadlines>,
    /// How often idle rate-limit cells are dropped.
    pub limit_sweep: Duration,
}

impl Sweeper {
    /// Sleeps until the next deadline (or a write that set an earlier one,
    /// or a leadership change), then sweeps. The lease and record sweep is
    /// a command the leader proposes; idle rate-limit cells are dropped by
    /// each node on its own. Ends when told to stop.
    pub async fn run(self, stop: Stopping) {
        let limit_sweep = self.limit_sweep;
        // One receiver for the whole loop, so a leadership change wakes it
        // once (a fresh clone would report every past change again).
        let mut server = self.view.changes();
        server.mark_unchanged();
        let mut next_limit_sweep = self.time.now_ms() + limit_sweep.as_millis() as u64;
        loop {
            let now = self.time.now_ms();
            let leading = self.view.is_leader();
            // The least wait before looking again: never none, so a
            // deadline that has passed but is not swept yet (the sweep's
            // stamp fell just before it) cannot make this loop spin.
            let mut at_least = MIN_WAIT;
            if leading {
                self.leadership.on_leadership().await;
                if self.engine.sweep_due(now) {
                    if let Err(e) = self.proposer.propose(Command::Sweep).await {
                        tracing::warn!(error = %e, "sweep failed");
                        at_least = RETRY_WAIT;
                    }
                }
            }
            if now >= next_limit_sweep {
                let judged = self.time.decide_ms(leading).saturating_sub(SWEEP_BEHIND_MS);
                let dropped = self.engine.sweep_limits(judged);
                let breakers = self.engine.breakers().sweep(judged);
                tracing::debug!(dropped, breakers, "swept idle rate-limit keys and breakers");
                next_limit_sweep = now + limit_sweep.as_millis() as u64;
            }
            // Only the leader sweeps lapsed leases and records; a follower
            // learns of it from the log, so it wakes for none of their
            // deadlines (which, cut off from its leader, it would find
            // passed and unswept at every turn).
            let expiry = if leading {
                self.engine.next_expiry().unwrap_or(u64::MAX)
            } else {
                u64::MAX
            };
            let wake_at = expiry.min(next_limit_sweep);
            self.deadlines.sweep_at.store(wake_at, Ordering::Release);
            let wait =
                Duration::from_millis(wake_at.saturating_sub(self.time.now_ms())).max(at_least);
            tokio::select! {
                biased;
                _ = tokio::time::sleep(wait) => {}
                _ = self.deadlines.changed.notified() => {}
                // Raft stopped (a fatal error): nothing is left to sweep.
                r = server.changed() => if r.is_err() { return },
                _ = stop.wait() => return,
            }
            self.watchers.forget_idle();
        }
    }
}
