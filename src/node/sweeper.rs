//! The sweeper: purges lapsed leases and records as their deadlines pass
//! (so watchers hear of expiry promptly), and idle rate-limit cells every
//! `--sweep-interval-ms`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Node;
use crate::engine::Command;

/// The shortest wait between two turns of the sweeper.
const MIN_WAIT: Duration = Duration::from_millis(1);
/// The wait after a sweep could not be proposed (no majority, say).
const RETRY_WAIT: Duration = Duration::from_millis(50);

impl Node {
    /// Sleeps until the next deadline (or a write that set an earlier one,
    /// or a leadership change), then sweeps. The lease and record sweep is
    /// a command the leader proposes; idle rate-limit cells are dropped by
    /// each node on its own. Ends when the node stops.
    pub(super) async fn run_sweeper(self: Arc<Self>, limit_sweep: Duration) {
        // One receiver for the whole loop, so a leadership change wakes it
        // once (a fresh clone would report every past change again).
        let mut server = self.server.clone();
        server.mark_unchanged();
        let mut next_limit_sweep = self.now_ms() + limit_sweep.as_millis() as u64;
        loop {
            let now = self.now_ms();
            let leading = self.is_leader();
            // The least wait before looking again: never none, so a
            // deadline that has passed but is not swept yet (the sweep's
            // stamp fell just before it) cannot make this loop spin.
            let mut at_least = MIN_WAIT;
            if leading {
                self.on_leadership().await;
                if self.engine.sweep_due(now) {
                    if let Err(e) = self.propose(Command::Sweep).await {
                        tracing::warn!(error = %e, "sweep failed");
                        at_least = RETRY_WAIT;
                    }
                }
            }
            if now >= next_limit_sweep {
                let dropped = self.engine.sweep_limits(now);
                tracing::debug!(dropped, "swept idle rate-limit keys");
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
            self.sweep_at.store(wake_at, Ordering::Release);
            let wait = Duration::from_millis(wake_at.saturating_sub(self.now_ms())).max(at_least);
            tokio::select! {
                biased;
                _ = tokio::time::sleep(wait) => {}
                _ = self.deadlines_changed.notified() => {}
                _ = server.changed() => {}
                _ = self.tasks.stopping() => return,
            }
            self.watchers.forget_idle();
        }
    }
}
