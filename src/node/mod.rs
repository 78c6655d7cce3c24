//! The node: where requests meet the replicated state machine.
//!
//! Lease and idempotency writes are stamped with the time and proposed
//! through Raft; the reply waits until the entry is committed (fsynced to
//! the log) and applied. Reads of leases and records are linearizable
//! (read-index). Rate-limit checks are decided at once from the in-memory
//! table. Lease changes reach watchers from the state machine, in apply
//! order.
//!
//! One room per job, each a type that owns its state; a room that needs
//! another is handed it when built, and [`Node`] only composes them (and
//! answers for them to the API and the peer service); `startup.rs` builds
//! them (`Node::start`), and `operations.rs` declares the operations:
//! - [`view::View`]: what the node knows of the cluster (id, Raft handle,
//!   leader, term, membership); read by every room, owned by none;
//! - [`routing::Router`]: typed operations, sent to the leader (served
//!   here, or forwarded over the peer channel); `peer_service.rs` serves
//!   what peers send (Raft traffic, pre-votes, forwarded calls);
//! - [`proposer::Proposer`]: batches writes into log entries;
//! - [`leadership::Leadership`]: the leader lease and what a leader may do
//!   under it, what a new leader does first, stepping down;
//! - [`election::Elections`]: contact with the leader, readiness, and
//!   elections behind a pre-vote;
//! - [`handover::Handover`]: handing leadership over on shutdown;
//! - [`admission::Gate`]: whether this node may take part in Raft, and
//!   its cluster id;
//! - [`sweeper::Sweeper`]: purges lapsed leases, records and idle
//!   rate-limit cells;
//! - [`slots::Slots`]: who decides which rate-limit keys (slot owners,
//!   slot leases, spreading the slots);
//! - [`limit_sync::LimitSync`]: replicates rate-limit state;
//! - [`watch_fanout::Watchers`]: lease watchers;
//! - [`timekeeping::Timekeeper`]: the replicated clock;
//! - [`tasks::Tasks`]: spawns, owns and joins every background loop.

use std::sync::Arc;

use openraft::Raft;
use tokio::sync::watch;

mod admission;
mod breakers;
mod check_stream;
mod coalesce;
mod election;
mod error;
mod forwarding;
mod handover;
mod leadership;
mod limit_sync;
mod member_metrics;
mod operations;
mod options;
mod proposer;
mod reads;
mod rebalance;
mod routing;
mod slots;
mod spanning;
mod startup;
mod sweeper;
mod tasks;
mod timekeeping;
mod view;
mod watch_fanout;

pub use admission::{
    Admission, Identified, IdentifyRequest, Identity, CLUSTER_HEADER, REFUSAL_HEADER,
};
pub use breakers::{phase_name, BreakerAction, BreakerAnswer, BreakerCall};
pub use election::{PreVoteRequest, PreVoteResponse};
pub use error::NodeError;
pub use handover::TakeOver;
pub use leadership::{report_readiness, READY_SERVICES};
pub use member_metrics::{MemberMetrics, MetricsText, MEMBER_METRICS_WAIT};
pub(crate) use operations::with_call;
pub use operations::{
    AddMember, Call, CheckLimits, GetLease, GetRecord, GetSemaphore, Operation, RemoveMember,
    Stamped,
};
pub use options::{Membership, Options, Simulation, StartError};
pub use rebalance::Rebalance;
pub use slots::{SlotOwners, SlotReply, SlotRequest};
pub use spanning::{HoldId, Holds, Phase, PhaseHook, SpanningCheck, HOLD, MAX_RESERVATIONS};
pub use view::{MemberInfo, Replication, Standing};
pub use watch_fanout::{BreakerWatch, Change, SemaphoreWatch, Watch, WatchLimits};

use crate::engine::{Counts, Engine, KeyQuota, Lease, LimitCheck, LimitResult};
use crate::raft::seen::SeenWithState;
use crate::raft::{LogId, NodeId, TypeConfig};
use admission::Gate;
use election::Elections;
use handover::Handover;
use leadership::Leadership;
use routing::Router;
use tasks::Tasks;
use timekeeping::Timekeeper;
use view::View;
use watch_fanout::Watchers;

/// The rooms, composed. Each is built with the rooms it needs; none
/// reaches another through the node.
pub struct Node {
    view: View,
    engine: Arc<Engine>,
    /// The replicated clock (see `timekeeping`).
    time: Arc<Timekeeper>,
    watchers: Watchers,
    gate: Arc<Gate>,
    leadership: Arc<Leadership>,
    elections: Arc<Elections>,
    handover: Handover,
    router: Router,
    slots: Arc<slots::Slots>,
    /// The applied slot map's version (see `slot_changes`).
    slot_version: watch::Sender<u64>,
    /// Set when the node starts shutting down: streams end, new work stops.
    shutdown: watch::Sender<bool>,
    tasks: Tasks,
}

impl Node {
    pub fn id(&self) -> NodeId {
        self.view.id()
    }

    pub fn raft(&self) -> &Raft<TypeConfig> {
        self.view.raft()
    }

    /// Where this node stands: leader, term, role, members.
    pub fn standing(&self) -> Standing {
        self.view.standing()
    }

    /// How far this node's log, and as leader each member's, have got.
    pub fn replication(&self) -> Replication {
        self.view.replication()
    }

    /// The leader this node knows of, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.view.leader()
    }

    /// What the engine holds now.
    pub fn counts(&self) -> Counts {
        self.engine.counts()
    }

    /// The engine's caps.
    pub fn engine_config(&self) -> crate::engine::EngineConfig {
        self.engine.config()
    }

    /// Live leases lapsing within `within_ms` from now.
    pub fn leases_expiring(&self, within_ms: u64) -> usize {
        self.engine.leases_expiring(self.now_ms(), within_ms)
    }

    /// Lease watches being served.
    pub fn watchers(&self) -> usize {
        self.watchers.active()
    }

    /// The members a peer may be (see [`View::peer_members`]).
    pub fn peer_members(&self) -> Vec<(NodeId, String)> {
        self.view.peer_members()
    }

    /// [`peer_members`](Self::peer_members) without copying them.
    pub fn with_peer_members<R>(
        &self,
        f: impl FnOnce(&mut dyn Iterator<Item = (NodeId, &str)>) -> R,
    ) -> R {
        self.view.with_peer_members(f)
    }

    /// The command time (see `timekeeping`): monotonic, never behind a
    /// time already applied. (The state machine also never lets time run
    /// backwards, whatever order concurrent proposals reach the log in.)
    pub fn now_ms(&self) -> u64 {
        self.time.now_ms()
    }

    /// Milliseconds on this process's monotonic clock (the one the leader
    /// lease is timed on).
    pub fn mono_ms(&self) -> u64 {
        self.leadership.mono_ms()
    }

    /// Serves `op` at the leader: here when this node leads, forwarded over
    /// the peer channel otherwise. Waits up to `--leader-wait-ms` for a
    /// leader; then UNAVAILABLE.
    pub async fn execute<O: Operation>(&self, op: O) -> Result<O::Output, NodeError> {
        self.router.execute_as(op, "").await
    }

    /// [`execute`](Self::execute) for an authenticated caller: a forwarded
    /// call carries `principal` (unless empty), and the leader authorises
    /// it as that principal.
    pub async fn execute_as<O: Operation>(
        &self,
        op: O,
        principal: &str,
    ) -> Result<O::Output, NodeError> {
        self.router.execute_as(op, principal).await
    }

    /// Rate-limit decisions, made by the leader from its in-memory table.
    pub async fn check(
        &self,
        checks: Vec<LimitCheck>,
        all_or_nothing: bool,
    ) -> Result<Vec<LimitResult>, NodeError> {
        self.router
            .check_as(checks, all_or_nothing, KeyQuota::default())
            .await
    }

    /// [`check`](Self::check) for an authenticated caller, whose new keys
    /// count against its quota.
    pub async fn check_as(
        &self,
        checks: Vec<LimitCheck>,
        all_or_nothing: bool,
        quota: KeyQuota<'_>,
    ) -> Result<Vec<LimitResult>, NodeError> {
        self.router.check_as(checks, all_or_nothing, quota).await
    }

    /// (operation, calls forwarded to the leader, calls served for
    /// followers), for each operation.
    pub fn forwarded(&self) -> Vec<(&'static str, u64, u64)> {
        self.router.forwarder.forwarded.counts()
    }

    /// Serves checks another member sent on its check stream.
    pub(crate) async fn serve_streamed(&self, call: Call) -> Result<Vec<LimitResult>, NodeError> {
        self.router.serve_streamed(call).await
    }

    /// Serves a call a follower forwarded (see `routing`).
    pub(crate) async fn serve_forwarded(&self, call: Call) -> crate::proto::PeerMessage {
        self.router.serve_forwarded(call).await
    }

    /// A lease's current state and its later changes (see
    /// [`Watchers::watch`]).
    pub fn watch(
        &self,
        name: &str,
        principal: &str,
        quota: Option<u64>,
    ) -> Result<Watch, NodeError> {
        self.watchers
            .watch(name, principal, quota, || self.lease_local(name))
    }

    /// A semaphore's holders as they stand and every later change (as
    /// [`watch`](Self::watch) for a lease, within the same caps).
    pub fn watch_semaphore(
        &self,
        name: &str,
        principal: &str,
        quota: Option<u64>,
    ) -> Result<SemaphoreWatch, NodeError> {
        self.watchers
            .watch_semaphore(name, principal, quota, || self.semaphore_local(name))
    }

    /// A circuit breaker call, decided where the name's slot is (see
    /// `breakers`).
    pub async fn breaker(&self, call: BreakerCall) -> Result<BreakerAnswer, NodeError> {
        self.router.breaker(call).await
    }

    /// A circuit breaker's state as it stands here and every later phase
    /// change (as [`watch`](Self::watch) for a lease, within the same caps).
    pub fn watch_breaker(
        &self,
        name: &str,
        principal: &str,
        quota: Option<u64>,
    ) -> Result<BreakerWatch, NodeError> {
        self.watchers
            .watch_breaker(name, principal, quota, || self.breaker_local(name))
    }

    /// A circuit breaker as this node holds it (the decider's state, or
    /// its last sync), and the time.
    pub fn breaker_local(&self, name: &str) -> (Option<crate::engine::Breaker>, u64) {
        (self.engine.breakers().get(name), self.now_ms())
    }

    /// A semaphore's live holders without a read barrier (to resynchronise
    /// a watcher).
    pub fn semaphore_local(&self, name: &str) -> (Vec<crate::engine::Permit>, u64) {
        let now = self.now_ms();
        (self.engine.semaphore(name, now), now)
    }

    /// The current lease without a read barrier (to resynchronise a watcher
    /// that fell behind).
    pub fn lease_local(&self, name: &str) -> (Option<Lease>, u64) {
        let now = self.now_ms();
        (self.engine.lease(name, now), now)
    }

    /// Whether this node may serve (see [`Elections::ready`]).
    pub fn ready(&self) -> bool {
        self.elections.ready()
    }

    /// Notes that a leader (or a candidate this node voted for) was heard
    /// from just now.
    pub fn heard_from_leader(&self) {
        self.elections.heard_from_leader()
    }

    /// Notes an AppendEntries or InstallSnapshot as it arrives (see
    /// [`Elections::heard_from`]).
    pub fn heard_from(&self, vote: &openraft::Vote<NodeId>, committed: Option<LogId>) {
        self.elections.heard_from(vote, committed)
    }

    /// Whether this node is in touch with a leader.
    pub fn in_touch_with_leader(&self) -> bool {
        self.elections.in_touch_with_leader()
    }

    /// Whether this node would vote in an election now.
    pub fn grants_pre_vote(&self, ask: &PreVoteRequest) -> bool {
        self.elections.grants_pre_vote(ask)
    }

    /// Whether this node, shutting down, has stopped serving as leader.
    pub fn stepping_down(&self) -> bool {
        self.leadership.stepping_down()
    }

    /// On shutdown: if this node leads, stop serving and hand leadership to
    /// the most caught-up voter (see `handover`).
    pub async fn hand_over(&self) -> Option<NodeId> {
        self.handover.hand_over().await
    }

    /// (batches, checks) this node sent other members on its check streams.
    pub fn check_stream_counts(&self) -> (u64, u64) {
        self.router.streams.counts()
    }

    /// The owner hint for a call of `checks`: the applied slot map's
    /// version (0: none) and the other members owning any of their keys'
    /// slots, each once, ascending.
    pub fn owner_hint(&self, checks: &[LimitCheck]) -> (u64, Vec<u64>) {
        let map = self.engine.slots();
        if !map.assigned() {
            return (0, Vec::new());
        }
        let me = self.view.id();
        let mut others: Vec<u64> = Vec::new();
        for c in checks {
            if let Some(owner) = map.owner(crate::engine::slot_of(&c.key)) {
                if owner != me && !others.contains(&owner) {
                    others.push(owner);
                }
            }
        }
        others.sort_unstable();
        (map.version, others)
    }

    /// The slot map's version, how many slots this node owns in it, and
    /// how many rate-limit checks this node has decided, and how many it
    /// sent again because the member asked could not decide them then.
    pub fn slot_standing(&self) -> (u64, usize, u64, u64) {
        let map = self.engine.slots();
        let me = self.view.id();
        let owned = map.owners.iter().filter(|o| **o == me).count();
        let decided = self
            .router
            .decided
            .load(std::sync::atomic::Ordering::Relaxed);
        let rerouted = self
            .router
            .rerouted
            .load(std::sync::atomic::Ordering::Relaxed);
        (map.version, owned, decided, rerouted)
    }

    /// The reservations of all-or-nothing calls spanning owners held here,
    /// and their counts.
    pub fn holds(&self) -> &spanning::Holds {
        &self.router.holds
    }

    /// The slot map as this node last applied it.
    pub fn slot_map(&self) -> Arc<crate::engine::SlotMap> {
        self.engine.slots()
    }

    /// A receiver of the applied slot map's version, changed each time
    /// the map may have changed.
    pub fn slot_changes(&self) -> watch::Receiver<u64> {
        self.slot_version.subscribe()
    }

    /// Serves a slot lease request or an owner's sync (see `slots`);
    /// `data` holds the sync's cells.
    pub async fn slots_request(&self, ask: SlotRequest, data: &[u8]) -> SlotReply {
        match ask {
            SlotRequest::Lease { node } => self.slots.grant(node),
            SlotRequest::Sync { node, boot_id } => match crate::raft::codec::decode_command(data) {
                Ok(cells) => self.slots.accept_sync(node, boot_id, cells).await,
                Err(e) => SlotReply::Refused(format!("undecodable sync: {e}")),
            },
        }
    }

    /// Serves a `TakeOver` (see `handover`).
    pub async fn take_over(&self, ask: TakeOver) -> Result<(), String> {
        self.handover.take_over(ask).await
    }

    /// Where this node stands in admission (see `admission`).
    pub fn admission(&self) -> watch::Receiver<Admission> {
        self.gate.admission()
    }

    /// This node's cluster id, once known.
    pub fn cluster_id(&self) -> Option<String> {
        self.gate.cluster_id()
    }

    pub fn admitted(&self) -> bool {
        self.gate.admitted()
    }

    /// This node's answer to a peer's `Identify`.
    pub fn identify(&self) -> Identified {
        self.gate.identify()
    }

    /// Checks a peer message's cluster id (see [`Gate::check_cluster`]).
    pub fn check_cluster(&self, sender: Option<&str>, learn: bool) -> Result<(), String> {
        self.gate.check_cluster(sender, learn)
    }

    /// How an `Identify` from `asker` is refused (see [`Gate::refusal_for`]).
    pub fn refusal_for(&self, asker: NodeId) -> Option<&'static str> {
        self.gate.refusal_for(asker)
    }

    /// Peers seen taking part in Raft with state (see `raft::seen`).
    pub fn seen(&self) -> &SeenWithState {
        self.gate.seen()
    }

    /// Runs `task` until the node stops, which waits for it (see
    /// [`Node::stop`]). For loops outside the node that live as long as it.
    pub fn spawn_task(
        &self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.tasks.spawn(name, task);
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

    /// Resolves when Raft has stopped on a fatal error (a storage write or
    /// read failed, say on a full disk, or its core panicked), with the
    /// error. Such a node can serve nothing again until it is restarted.
    pub async fn raft_failed(&self) -> String {
        let mut metrics = self.raft().metrics();
        let why = match metrics.wait_for(|m| m.running_state.is_err()).await {
            Ok(m) => match &m.running_state {
                Err(openraft::error::Fatal::StorageError(e)) => format!("storage failed: {e}"),
                Err(e) => e.to_string(),
                Ok(()) => String::new(),
            },
            Err(_) => "Raft's core ended".to_string(),
        };
        why
    }

    /// Ends watch streams and other long-lived calls; the node keeps
    /// serving calls in flight until [`Node::stop`].
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Stops the background loops (waiting for each), then Raft. Call once,
    /// after the gRPC server has drained.
    pub async fn stop(&self) {
        self.begin_shutdown();
        self.tasks.stop().await;
        if let Err(e) = self.raft().shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}
