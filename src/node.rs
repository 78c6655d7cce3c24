//! The node: where requests meet the replicated state machine.
//!
//! Lease and idempotency writes are stamped with the time and proposed
//! through Raft; the reply waits until the entry is committed (fsynced to
//! the log) and applied. Reads of leases and records are linearizable
//! (read-index). Rate-limit checks are decided at once from the in-memory
//! table. Lease changes reach watchers from the state machine, in apply
//! order. The node also runs the sweeps that keep memory bounded.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{BasicNode, Raft, SnapshotPolicy};
use tokio::sync::{broadcast, watch, Notify};

use crate::clock::Clock;
use crate::engine::{
    Command, Engine, EngineConfig, EngineError, Lease, LeaseEvent, LimitCheck, LimitResult,
    Outcome, Record,
};
use crate::raft::network::NoPeers;
use crate::raft::state_machine::{Observer, StateMachine};
use crate::raft::{NodeId, Request, Response, TypeConfig};
use crate::storage::Store;

/// Events buffered per watched lease before a slow watcher is resynchronised.
const WATCH_BUFFER: usize = 256;

/// This build's node id: one-member clusters only.
const SELF_ID: NodeId = 1;

type Watchers = Arc<Mutex<HashMap<String, broadcast::Sender<LeaseEvent>>>>;

/// Why a call could not be served.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The state machine refused the command.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// No leader, or Raft is shutting down: safe to retry.
    #[error("not available: {0}")]
    Unavailable(String),
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store: {0}")]
    Store(#[from] redb::DatabaseError),
    #[error("storage: {0}")]
    Storage(#[from] crate::raft::StorageError),
    #[error("raft: {0}")]
    Raft(String),
}

pub struct Node {
    engine: Arc<Engine>,
    raft: Raft<TypeConfig>,
    clock: Arc<dyn Clock>,
    last_now: AtomicU64,
    watchers: Watchers,
    /// Wakes the sweeper when a write set a deadline earlier than the one it
    /// sleeps until (`sweep_at`).
    deadlines_changed: Notify,
    sweep_at: AtomicU64,
    shutdown: watch::Sender<bool>,
}

fn publish(watchers: &Watchers, events: &[LeaseEvent]) {
    let mut watchers = watchers.lock().unwrap_or_else(|e| e.into_inner());
    for event in events {
        if let Some(tx) = watchers.get(&event.lease.name) {
            if tx.send(event.clone()).is_err() {
                watchers.remove(&event.lease.name); // nobody listens any more
            }
        }
    }
}

impl Node {
    /// Opens the store under `data_dir`, loads the latest snapshot, starts
    /// Raft (which replays the log) and, for a new data directory,
    /// initialises a one-member cluster once. Returns when this node leads.
    pub async fn start(
        engine: EngineConfig,
        data_dir: &Path,
        advertise: String,
        snapshot_logs: u64,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, StartError> {
        let store = Store::open(data_dir)?;
        let engine = Arc::new(Engine::new(engine));
        let watchers: Watchers = Arc::new(Mutex::new(HashMap::new()));
        let observer: Observer = {
            let watchers = watchers.clone();
            Arc::new(move |events: &[LeaseEvent]| publish(&watchers, events))
        };
        let sm = StateMachine::open(engine.clone(), store.clone(), observer)?;
        let raft_err = |e: &dyn std::fmt::Display| StartError::Raft(e.to_string());
        let raft_config = openraft::Config {
            cluster_name: "arbiter".into(),
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_logs.max(1)),
            max_in_snapshot_log_to_keep: snapshot_logs.clamp(1, 1_000),
            ..Default::default()
        }
        .validate()
        .map_err(|e| raft_err(&e))?;
        let raft = Raft::new(SELF_ID, Arc::new(raft_config), NoPeers, store, sm)
            .await
            .map_err(|e| raft_err(&e))?;
        if !raft.is_initialized().await.map_err(|e| raft_err(&e))? {
            let members = BTreeMap::from([(SELF_ID, BasicNode::new(advertise))]);
            raft.initialize(members).await.map_err(|e| raft_err(&e))?;
        }
        raft.wait(Some(Duration::from_secs(30)))
            .current_leader(SELF_ID, "this node leads its one-member cluster")
            .await
            .map_err(|e| raft_err(&e))?;
        Ok(Arc::new(Self {
            engine,
            raft,
            clock,
            last_now: AtomicU64::new(0),
            watchers,
            deadlines_changed: Notify::new(),
            sweep_at: AtomicU64::new(u64::MAX),
            shutdown: watch::channel(false).0,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Stops Raft. Call once, after the gRPC server has drained.
    pub async fn stop_raft(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    /// The command time: the clock, but never earlier than a time already
    /// handed out. (The state machine also never lets time run backwards,
    /// whatever order concurrent proposals reach the log in.)
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

    /// Proposes a lease or idempotency command through the log; returns its
    /// outcome once committed and applied, and the time it was stamped with.
    pub async fn write(&self, command: Command) -> Result<(Outcome, u64), NodeError> {
        let now = self.now_ms();
        let reply = self
            .raft
            .client_write(Request {
                now_ms: now,
                command,
            })
            .await
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        let sweep_at = self.sweep_at.load(Ordering::Acquire);
        if self.engine.next_expiry().is_some_and(|t| t < sweep_at) {
            self.deadlines_changed.notify_one();
        }
        let Response(outcome) = reply.data;
        Ok((outcome?, now))
    }

    /// Waits until this node may serve a linearizable read.
    async fn read_barrier(&self) -> Result<(), NodeError> {
        self.raft
            .ensure_linearizable()
            .await
            .map(drop)
            .map_err(|e| NodeError::Unavailable(e.to_string()))
    }

    /// The lease as it stands, linearizable.
    pub async fn lease(&self, name: &str) -> Result<(Option<Lease>, u64), NodeError> {
        self.read_barrier().await?;
        let now = self.now_ms();
        Ok((self.engine.lease(name, now), now))
    }

    /// The idempotency record as it stands, linearizable.
    pub async fn record(&self, key: &str) -> Result<(Option<Record>, u64), NodeError> {
        self.read_barrier().await?;
        let now = self.now_ms();
        Ok((self.engine.record(key, now), now))
    }

    /// The lease's current state and a receiver for every later change.
    ///
    /// The state is read while holding the watcher table, which the state
    /// machine also takes to publish: a change is either in the state read
    /// or delivered as an event (at worst both, never neither).
    pub fn watch(&self, name: &str) -> (Option<Lease>, u64, broadcast::Receiver<LeaseEvent>) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
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
                if let Err(e) = self.write(Command::Sweep).await {
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
