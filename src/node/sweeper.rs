//! The sweeper: purges lapsed leases and records as their deadlines pass
//! (so watchers hear of expiry promptly), and idle rate-limit cells every
//! `--sweep-interval-ms`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Node;
use crate::engine::Command;

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
            if self.is_leader() {
                self.on_leadership().await;
                if self.engine.sweep_due(now) {
                    if let Err(e) = self.propose(Command::Sweep).await {
                        tracing::warn!(error = %e, "sweep failed");
                    }
                }
            }
            if now >= next_limit_sweep {
                let dropped = self.engine.sweep_limits(now);
                tracing::debug!(dropped, "swept idle rate-limit keys");
                next_limit_sweep = now + limit_sweep.as_millis() as u64;
            }
            let wake_at = self
                .engine
                .next_expiry()
                .unwrap_or(u64::MAX)
                .min(next_limit_sweep);
            self.sweep_at.store(wake_at, Ordering::Release);
            let wait = Duration::from_millis(wake_at.saturating_sub(self.now_ms()));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.deadlines_changed.notified() => {}
                _ = server.changed() => {}
                _ = self.tasks.stopping() => return,
            }
            self.watchers.forget_idle();
        }
    }
}
