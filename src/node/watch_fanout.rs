//! Lease and semaphore watchers: every applied change reaches the watchers
//! of that lease or semaphore, on every replica, in apply order. The two
//! kinds have their own channels (a lease and a semaphore may share a
//! name) and share the watch caps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::NodeError;
use crate::engine::{
    Breaker, BreakerChange, EngineError, Lease, LeaseEvent, Permit, SemaphoreEvent,
};

/// Events buffered per watched lease before a slow watcher is resynchronised.
const WATCH_BUFFER: usize = 256;

/// How many watches a node serves at once.
#[derive(Clone, Copy, Debug)]
pub struct WatchLimits {
    /// In total (`--max-watchers`).
    pub total: usize,
    /// On one lease (`--max-watchers-per-lease`).
    pub per_lease: usize,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            total: 10_000,
            per_lease: 1_000,
        }
    }
}

/// What a watch channel carries.
#[derive(Clone, Debug)]
pub enum Change {
    /// A change to the lease, as this node applied it.
    Event(LeaseEvent),
    /// A change under the semaphore, as this node applied it.
    Semaphore(SemaphoreEvent),
    /// A circuit breaker moved to another phase (decided here, or applied
    /// from its decider's sync).
    Breaker(BreakerChange),
    /// This node's whole state was replaced (it installed a snapshot):
    /// changes may have been skipped, so read the lease again.
    Replaced,
}

type Channels = HashMap<String, broadcast::Sender<Change>>;

/// The watched leases and their channels.
#[derive(Clone, Default)]
pub struct Watchers(Arc<Inner>);

#[derive(Default)]
struct Inner {
    channels: Mutex<Channels>,
    /// The semaphores' channels, by name.
    semaphores: Mutex<Channels>,
    /// The circuit breakers' channels, by name.
    breakers: Mutex<Channels>,
    /// Watches being served (each holds a [`WatchSlot`]).
    active: AtomicUsize,
    /// Watches being served per principal, for quotas (only principals
    /// with one open).
    by_principal: Mutex<HashMap<String, u64>>,
    limits: WatchLimits,
}

/// One watch's place in the total (and its principal's count); given back
/// when dropped (when the stream serving it ends).
pub struct WatchSlot {
    inner: Arc<Inner>,
    principal: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.inner.active.fetch_sub(1, Ordering::AcqRel);
        if !self.principal.is_empty() {
            let mut by = self.inner.principals();
            if let Some(n) = by.get_mut(&self.principal) {
                *n -= 1;
                if *n == 0 {
                    by.remove(&self.principal);
                }
            }
        }
    }
}

impl Inner {
    fn principals(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.by_principal.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A new watch: the lease (or, generally, the state `S`) as it stands,
/// the time it was read at, every later change, and the watch's slot.
pub struct Watch<S = Option<Lease>> {
    pub lease: S,
    pub now_ms: u64,
    pub events: broadcast::Receiver<Change>,
    pub slot: WatchSlot,
}

/// A semaphore watch: its live holders first.
pub type SemaphoreWatch = Watch<Vec<Permit>>;

/// A circuit breaker watch: its state first (`None`: closed, unknown here).
pub type BreakerWatch = Watch<Option<Breaker>>;

impl Watchers {
    pub fn new(limits: WatchLimits) -> Self {
        Self(Arc::new(Inner {
            limits,
            ..Inner::default()
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.0.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_semaphores(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.0.semaphores.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends each semaphore event to that semaphore's watchers.
    pub fn publish_semaphores(&self, events: &[SemaphoreEvent]) {
        let mut watchers = self.lock_semaphores();
        for event in events {
            if let Some(tx) = watchers.get(&event.permit.name) {
                if tx.send(Change::Semaphore(event.clone())).is_err() {
                    watchers.remove(&event.permit.name);
                }
            }
        }
    }

    fn lock_breakers(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.0.breakers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends each breaker's phase change to its watchers.
    pub fn publish_breakers(&self, changes: &[BreakerChange]) {
        let mut watchers = self.lock_breakers();
        for change in changes {
            if let Some(tx) = watchers.get(&change.name) {
                if tx.send(Change::Breaker(change.clone())).is_err() {
                    watchers.remove(&change.name);
                }
            }
        }
    }

    /// [`watch`](Self::watch) for a circuit breaker.
    pub fn watch_breaker(
        &self,
        name: &str,
        principal: &str,
        quota: Option<u64>,
        current: impl FnOnce() -> (Option<Breaker>, u64),
    ) -> Result<BreakerWatch, NodeError> {
        let mut channels = self.lock_breakers();
        self.subscribe(&mut channels, name, principal, quota, current)
    }

    /// [`watch`](Self::watch) for a semaphore: its holders as they stand
    /// (`current`) and every later change.
    pub fn watch_semaphore(
        &self,
        name: &str,
        principal: &str,
        quota: Option<u64>,
        current: impl FnOnce() -> (Vec<Permit>, u64),
    ) -> Result<SemaphoreWatch, NodeError> {
        let mut channels = self.lock_semaphores();
        self.subscribe(&mut channels, name, principal, quota, current)
    }

    /// Watches being served now.
    pub fn active(&self) -> usize {
        self.0.active.load(Ordering::Acquire)
    }

    /// Sends each event to the lease's watchers (called by the state
    /// machine as it applies).
    pub fn publish(&self, events: &[LeaseEvent]) {
        let mut watchers = self.lock();
        for event in events {
            if let Some(tx) = watchers.get(&event.lease.name) {
                if tx.send(Change::Event(event.clone())).is_err() {
                    watchers.remove(&event.lease.name); // nobody listens any more
                }
            }
        }
    }

    /// Tells every watcher that the state was replaced (called once a
    /// snapshot is installed); drops the channels nobody listens to.
    pub fn replaced(&self) {
        self.lock()
            .retain(|_, tx| tx.send(Change::Replaced).is_ok());
        self.lock_semaphores()
            .retain(|_, tx| tx.send(Change::Replaced).is_ok());
        self.lock_breakers()
            .retain(|_, tx| tx.send(Change::Replaced).is_ok());
    }

    /// Drops the channels nobody listens to any more.
    pub fn forget_idle(&self) {
        self.lock().retain(|_, tx| tx.receiver_count() > 0);
        self.lock_semaphores()
            .retain(|_, tx| tx.receiver_count() > 0);
        self.lock_breakers().retain(|_, tx| tx.receiver_count() > 0);
    }
}

impl Watchers {
    /// The lease's current state (`current`: the lease and the time it was
    /// read at) and a receiver for every later change;
    /// `RESOURCE_EXHAUSTED` once the node serves `--max-watchers` watches,
    /// the lease has `--max-watchers-per-lease`, or `principal` has
    /// `quota` watches open on this node.
    ///
    /// The state is read while holding the watcher table, which the state
    /// machine also takes to publish: a change is either in the state read
    /// or delivered as an event (at worst both, never neither).
    pub fn watch(
        &self,
        name: &str,
        principal: &str,
        quota: Option<u64>,
        current: impl FnOnce() -> (Option<Lease>, u64),
    ) -> Result<Watch, NodeError> {
        let mut channels = self.lock();
        self.subscribe(&mut channels, name, principal, quota, current)
    }

    /// Admits a watch of `name` in `channels` (held locked) within the
    /// caps, then reads its current state.
    fn subscribe<S>(
        &self,
        channels: &mut Channels,
        name: &str,
        principal: &str,
        quota: Option<u64>,
        current: impl FnOnce() -> (S, u64),
    ) -> Result<Watch<S>, NodeError> {
        let inner = &self.0;
        let limits = inner.limits;
        let exhausted = |what: &'static str, max| {
            NodeError::Engine(EngineError::Exhausted {
                what: what.into(),
                max,
            })
        };
        if channels
            .get(name)
            .is_some_and(|tx| tx.receiver_count() >= limits.per_lease)
        {
            return Err(exhausted(
                "watchers of one lease (--max-watchers-per-lease)",
                limits.per_lease,
            ));
        }
        // Taken under the table's lock, so two watches cannot both take
        // the last place.
        if inner.active.load(Ordering::Acquire) >= limits.total {
            return Err(exhausted("watchers (--max-watchers)", limits.total));
        }
        if !principal.is_empty() {
            let mut by = inner.principals();
            let open = by.get(principal).copied().unwrap_or(0);
            if let Some(quota) = quota.filter(|q| open >= *q) {
                return Err(NodeError::Engine(EngineError::OverQuota {
                    principal: principal.to_owned(),
                    what: "watch streams on this node".into(),
                    quota,
                }));
            }
            by.insert(principal.to_owned(), open + 1);
        }
        inner.active.fetch_add(1, Ordering::AcqRel);
        let slot = WatchSlot {
            inner: inner.clone(),
            principal: principal.to_owned(),
        };
        let events = channels
            .entry(name.to_owned())
            .or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
            .subscribe();
        let (lease, now_ms) = current();
        Ok(Watch {
            lease,
            now_ms,
            events,
            slot,
        })
    }
}
