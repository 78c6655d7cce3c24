//! Lease watchers: every applied lease change reaches the watchers of that
//! lease, on every replica, in apply order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::Node;
use crate::engine::{Lease, LeaseEvent};

/// Events buffered per watched lease before a slow watcher is resynchronised.
const WATCH_BUFFER: usize = 256;

/// The watched leases and their channels.
#[derive(Clone, Default)]
pub struct Watchers(Arc<Mutex<HashMap<String, broadcast::Sender<LeaseEvent>>>>);

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<LeaseEvent>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends each event to the lease's watchers (called by the state
    /// machine as it applies).
    pub fn publish(&self, events: &[LeaseEvent]) {
        let mut watchers = self.lock();
        for event in events {
            if let Some(tx) = watchers.get(&event.lease.name) {
                if tx.send(event.clone()).is_err() {
                    watchers.remove(&event.lease.name); // nobody listens any more
                }
            }
        }
    }

    /// Drops the channels nobody listens to any more.
    pub fn forget_idle(&self) {
        self.lock().retain(|_, tx| tx.receiver_count() > 0);
    }
}

impl Node {
    /// The lease's current state and a receiver for every later change.
    ///
    /// The state is read while holding the watcher table, which the state
    /// machine also takes to publish: a change is either in the state read
    /// or delivered as an event (at worst both, never neither).
    pub fn watch(&self, name: &str) -> (Option<Lease>, u64, broadcast::Receiver<LeaseEvent>) {
        let mut watchers = self.watchers.lock();
        let rx = watchers
            .entry(name.to_owned())
            .or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
            .subscribe();
        let now = self.now_ms();
        (self.engine.lease(name, now), now, rx)
    }

    /// The current lease without a read barrier (to resynchronise a watcher
    /// that fell behind).
    pub fn lease_local(&self, name: &str) -> (Option<Lease>, u64) {
        let now = self.now_ms();
        (self.engine.lease(name, now), now)
    }
}
