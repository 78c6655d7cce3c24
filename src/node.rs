//! The node: where requests meet the engine.
//!
//! It stamps every command with the time (monotonic within the node), applies
//! lease and idempotency writes one at a time in the order a replicated log
//! would, fans lease changes out to watchers, and runs the sweeps that keep
//! memory bounded. Rate-limit checks skip the write lock: they are decided
//! concurrently from the sharded table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch, Notify};

use crate::clock::Clock;
use crate::engine::{
    Applied, Command, Engine, EngineError, Lease, LeaseEvent, LimitCheck, LimitResult, Record,
};

/// Events buffered per watched lease before a slow watcher is resynchronised.
const WATCH_BUFFER: usize = 256;

pub struct Node {
    engine: Engine,
    clock: Arc<dyn Clock>,
    last_now: AtomicU64,
    /// Serialises writes and their event fan-out: watchers see changes in
    /// apply order, and a new watcher's first state is consistent with the
    /// events that follow it.
    write_lock: Mutex<()>,
    watchers: Mutex<HashMap<String, broadcast::Sender<LeaseEvent>>>,
    /// Wakes the sweeper when a write set a deadline earlier than the one it
    /// sleeps until (`sweep_at`).
    deadlines_changed: Notify,
    sweep_at: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl Node {
    pub fn new(engine: Engine, clock: Arc<dyn Clock>) -> Self {
        Self {
            engine,
            clock,
            last_now: AtomicU64::new(0),
            write_lock: Mutex::new(()),
            watchers: Mutex::new(HashMap::new()),
            deadlines_changed: Notify::new(),
            sweep_at: AtomicU64::new(u64::MAX),
            shutdown: watch::channel(false).0,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The command time: the clock, but never earlier than a time already
    /// handed out, so state machines only ever see time move forward.
    pub fn now_ms(&self) -> u64 {
        let t = self.clock.now_ms();
        self.last_now.fetch_max(t, Ordering::AcqRel).max(t)
    }

    pub fn check(
        &self,
        checks: &[LimitCheck],
        all_or_nothing: bool,
    ) -> Result<Vec<LimitResult>, EngineError> {
        self.engine.check(checks, all_or_nothing, self.now_ms())
    }

    /// Applies a lease or idempotency command; returns its outcome and the
    /// time it was applied at.
    pub fn write(&self, command: Command) -> Result<(Applied, u64), EngineError> {
        let _order = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.now_ms();
        let applied = self.engine.apply(command, now)?;
        self.publish(&applied.events);
        let sweep_at = self.sweep_at.load(Ordering::Acquire);
        if self.engine.next_expiry().is_some_and(|t| t < sweep_at) {
            self.deadlines_changed.notify_one();
        }
        Ok((applied, now))
    }

    fn publish(&self, events: &[LeaseEvent]) {
        if events.is_empty() {
            return;
        }
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for event in events {
            if let Some(tx) = watchers.get(&event.lease.name) {
                if tx.send(event.clone()).is_err() {
                    watchers.remove(&event.lease.name); // nobody listens any more
                }
            }
        }
    }

    pub fn lease(&self, name: &str) -> (Option<Lease>, u64) {
        let now = self.now_ms();
        (self.engine.lease(name, now), now)
    }

    pub fn record(&self, key: &str) -> (Option<Record>, u64) {
        let now = self.now_ms();
        (self.engine.record(key, now), now)
    }

    /// The lease's current state and a receiver for every later change.
    pub fn watch(&self, name: &str) -> (Option<Lease>, u64, broadcast::Receiver<LeaseEvent>) {
        let _order = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let rx = {
            let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
            watchers
                .entry(name.to_owned())
                .or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
                .subscribe()
        };
        let now = self.now_ms();
        (self.engine.lease(name, now), now, rx)
    }

    /// Resolves when the node starts shutting down; long-lived streams end
    /// then so a graceful shutdown can finish.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Resolves once `signal` (from [`Node::shutdown_signal`]) says the node
    /// is shutting down.
    pub async fn stopped(signal: &mut watch::Receiver<bool>) {
        // An error means the node is gone, which is a shutdown too.
        let _ = signal.wait_for(|s| *s).await;
    }

    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Purges lapsed leases and records as their deadlines pass (so watchers
    /// hear of expiry promptly), and idle rate-limit cells every
    /// `limit_sweep`. Ends at shutdown.
    pub async fn run_sweeper(self: Arc<Self>, limit_sweep: Duration) {
        let mut shutdown = self.shutdown_signal();
        let mut next_limit_sweep = self.now_ms() + limit_sweep.as_millis() as u64;
        loop {
            let now = self.now_ms();
            if self.engine.sweep_due(now) {
                if let Err(e) = self.write(Command::Sweep) {
                    tracing::warn!(error = %e, "sweep failed");
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
                _ = Self::stopped(&mut shutdown) => return,
            }
            self.forget_idle_watchers();
        }
    }

    fn forget_idle_watchers(&self) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.retain(|_, tx| tx.receiver_count() > 0);
    }
}
