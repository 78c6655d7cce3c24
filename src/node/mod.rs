//! The node: where requests meet the replicated state machine.
//!
//! Lease and idempotency writes are stamped with the time and proposed
//! through Raft; the reply waits until the entry is committed (fsynced to
//! the log) and applied. Reads of leases and records are linearizable
//! (read-index). Rate-limit checks are decided at once from the in-memory
//! table. Lease changes reach watchers from the state machine, in apply
//! order. The node also runs the sweeps that keep memory bounded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::{BasicNode, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, Notify};

mod election;
mod limit_sync;

pub use election::{PreVoteRequest, PreVoteResponse};

use crate::clock::Clock;
use crate::engine::{
    Command, Engine, EngineConfig, EngineError, Lease, LeaseEvent, LimitCheck, LimitResult,
    Outcome, Record,
};
use crate::proto::raft_peer_client::RaftPeerClient;
use crate::raft::lease::LeaderLease;
use crate::raft::network::{decode, encode, Channels, PeerNetwork, PEER_MESSAGE_LIMIT};
use crate::raft::state_machine::{Observer, StateMachine};
use crate::raft::{NodeId, Request, TypeConfig};
use crate::storage::Store;

/// Events buffered per watched lease before a slow watcher is resynchronised.
const WATCH_BUFFER: usize = 256;

/// Raft election timeout bounds, in ms. A new leader extends every lease by
/// the upper bound, so no lease lapses early because of a failover.
const ELECTION_TIMEOUT_MIN_MS: u64 = 200;
const ELECTION_TIMEOUT_MAX_MS: u64 = 400;
/// Raft heartbeat interval, in ms.
const HEARTBEAT_MS: u64 = 50;

type Watchers = Arc<Mutex<HashMap<String, broadcast::Sender<LeaseEvent>>>>;

/// Why a call could not be served.
#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
pub enum NodeError {
    /// The state machine refused the command.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// No leader within the deadline, or Raft is shutting down: safe to retry.
    #[error("not available: {0}")]
    Unavailable(String),
    /// This node is not (or no longer) the leader; the call is routed again.
    #[error("not the leader")]
    NotLeader,
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
}

/// A client call as routed to the leader (locally or from a follower).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Call {
    Write(Command),
    Check {
        checks: Vec<LimitCheck>,
        all_or_nothing: bool,
    },
    Lease(String),
    Record(String),
    AddMember {
        id: NodeId,
        peer_addr: String,
    },
    RemoveMember(NodeId),
}

/// The leader's answer to a [`Call`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Answer {
    Written(Outcome, u64),
    Checked(Vec<LimitResult>),
    Lease(Option<Lease>, u64),
    Record(Option<Record>, u64),
    Done,
}

/// Who this node is and whom it starts with.
#[derive(Clone, Debug)]
pub struct Membership {
    pub id: NodeId,
    /// Initial members and their peer addresses, including this node.
    pub peers: BTreeMap<NodeId, String>,
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
    id: NodeId,
    /// Random per process: tags this process's rate-limit syncs.
    boot_id: u64,
    engine: Arc<Engine>,
    raft: Raft<TypeConfig>,
    /// Leadership and membership (changes only with them, not per commit).
    server: watch::Receiver<openraft::metrics::RaftServerMetrics<NodeId, BasicNode>>,
    channels: Channels,
    /// How long a call waits for a leader before answering UNAVAILABLE.
    leader_wait: Duration,
    /// The term in which this node, as leader, caught up with everything
    /// committed (and extended leases): it decides rate limits only then.
    ready_term: AtomicU64,
    /// The term in which this node, as leader, extended every lease.
    extended_term: AtomicU64,
    /// This node's leader lease (see `raft::lease`): it decides rate limits
    /// only while it holds it.
    lease: Arc<LeaderLease>,
    /// The log (read by the pre-vote to compare logs).
    store: Store,
    /// When (the lease's monotonic ms) this node last heard from a leader
    /// (see `election`).
    leader_contact: AtomicU64,
    clock: Arc<dyn Clock>,
    last_now: AtomicU64,
    watchers: Watchers,
    /// Wakes the sweeper when a write set a deadline earlier than the one it
    /// sleeps until (`sweep_at`).
    deadlines_changed: Notify,
    sweep_at: AtomicU64,
    shutdown: watch::Sender<bool>,
    /// Queue of writes for the batching proposer.
    proposals: tokio::sync::mpsc::UnboundedSender<Proposal>,
}

/// A process-unique id (time and pid mixed), distinct across restarts.
fn boot_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

/// Most commands batched into one log entry.
const MAX_BATCH: usize = 1024;
/// Most payload bytes batched into one log entry (a command larger than
/// this is written alone).
const BATCH_BYTES: usize = 256 * 1024;

type Proposal = (
    Command,
    tokio::sync::oneshot::Sender<Result<(Outcome, u64), NodeError>>,
);

fn clone_err(e: &NodeError) -> NodeError {
    match e {
        NodeError::Engine(e) => NodeError::Engine(e.clone()),
        NodeError::Unavailable(m) => NodeError::Unavailable(m.clone()),
        NodeError::NotLeader => NodeError::NotLeader,
        NodeError::Membership(m) => NodeError::Membership(m.clone()),
    }
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
    /// Opens the store under `data_dir`, loads the latest snapshot and starts
    /// Raft (which replays the log). On a new data directory, the member
    /// with the lowest id initialises the cluster, once; the others wait to
    /// be contacted. Restarting any node is safe: an initialised store is
    /// never initialised again.
    pub async fn start(
        engine: EngineConfig,
        data_dir: &Path,
        membership: Membership,
        snapshot_logs: u64,
        leader_wait: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, StartError> {
        let store = Store::open(data_dir)?;
        let engine = Arc::new(Engine::new(engine));
        let watchers: Watchers = Arc::new(Mutex::new(HashMap::new()));
        let observer: Observer = {
            let watchers = watchers.clone();
            Arc::new(move |events: &[LeaseEvent]| publish(&watchers, events))
        };
        let boot_id = boot_id();
        let sm = StateMachine::open(engine.clone(), store.clone(), observer, boot_id)?;
        let raft_err = |e: &dyn std::fmt::Display| StartError::Raft(e.to_string());
        let raft_config = openraft::Config {
            cluster_name: "arbiter".into(),
            heartbeat_interval: HEARTBEAT_MS,
            election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
            // Elections start only after a pre-vote round (`election`).
            enable_elect: false,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_logs.max(1)),
            max_in_snapshot_log_to_keep: snapshot_logs.clamp(1, 1_000),
            ..Default::default()
        }
        .validate()
        .map_err(|e| raft_err(&e))?;
        let network = PeerNetwork::default();
        let channels = network.channels.clone();
        let lease = network.lease.clone();
        let raft = Raft::new(
            membership.id,
            Arc::new(raft_config),
            network,
            store.clone(),
            sm,
        )
        .await
        .map_err(|e| raft_err(&e))?;
        let first = membership.peers.keys().next().copied();
        if first == Some(membership.id) && !raft.is_initialized().await.map_err(|e| raft_err(&e))? {
            let members: BTreeMap<NodeId, BasicNode> = membership
                .peers
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr)))
                .collect();
            tracing::info!(members = members.len(), "initialising a new cluster");
            raft.initialize(members).await.map_err(|e| raft_err(&e))?;
        }
        let (proposals, queue) = tokio::sync::mpsc::unbounded_channel();
        let node = Arc::new(Self {
            id: membership.id,
            boot_id,
            engine,
            server: raft.server_metrics(),
            raft,
            channels,
            leader_wait,
            ready_term: AtomicU64::new(0),
            extended_term: AtomicU64::new(0),
            lease,
            store,
            leader_contact: AtomicU64::new(0),
            clock,
            last_now: AtomicU64::new(0),
            watchers,
            deadlines_changed: Notify::new(),
            sweep_at: AtomicU64::new(u64::MAX),
            shutdown: watch::channel(false).0,
            proposals,
        });
        tokio::spawn(node.clone().run_proposer(queue));
        tokio::spawn(node.clone().run_voter_watch());
        tokio::spawn(node.clone().run_elections());
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// The leader this node knows of, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.server.borrow().current_leader
    }

    /// The current term (from the vote) and whether this node leads in it.
    /// Reads the server metrics, which change only with leadership, never
    /// per commit.
    fn term_and_leading(&self) -> (u64, bool) {
        let m = self.server.borrow();
        let leading = m.state == ServerState::Leader && m.current_leader == Some(self.id);
        (m.vote.leader_id().get_term(), leading)
    }

    fn is_leader(&self) -> bool {
        self.term_and_leading().1
    }

    /// The current voting members.
    fn voters(&self) -> BTreeSet<NodeId> {
        self.server
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Routes a call to the leader: served here when this node leads,
    /// forwarded over the peer channel otherwise. Waits up to `leader_wait`
    /// for a leader; then UNAVAILABLE.
    pub async fn route(&self, call: Call) -> Result<Answer, NodeError> {
        let deadline = Instant::now() + self.leader_wait;
        let mut server = self.server.clone();
        loop {
            let leader = server.borrow_and_update().current_leader;
            let result = match leader {
                Some(l) if l == self.id => self.serve_bounded(call.clone()).await,
                Some(l) => self.forward(l, &call).await,
                None => Err(NodeError::NotLeader),
            };
            match result {
                Err(NodeError::NotLeader) => {}
                other => return other,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NodeError::Unavailable(format!(
                    "no leader within {} ms",
                    self.leader_wait.as_millis()
                )));
            }
            // Wake on the next leadership change, or poll again shortly.
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(100)), server.changed()).await;
        }
    }

    async fn forward(&self, leader: NodeId, call: &Call) -> Result<Answer, NodeError> {
        let addr = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .get_node(&leader)
                .map(|n| n.addr.clone())
        };
        let Some(addr) = addr else {
            return Err(NodeError::NotLeader);
        };
        let channel = self
            .channels
            .get(&addr)
            .map_err(|e| NodeError::Unavailable(format!("leader {leader} at {addr}: {e}")))?;
        let mut request = tonic::Request::new(encode(call));
        request.set_timeout(self.leader_wait);
        let mut client = RaftPeerClient::new(channel)
            .max_decoding_message_size(PEER_MESSAGE_LIMIT)
            .max_encoding_message_size(PEER_MESSAGE_LIMIT);
        match client.forward(request).await {
            Ok(reply) => decode::<Result<Answer, NodeError>>(&reply.into_inner()).map_err(|e| {
                NodeError::Unavailable(format!("bad reply from leader {leader}: {e}"))
            })?,
            Err(status) => Err(NodeError::Unavailable(format!(
                "leader {leader} at {addr} did not answer: {}",
                status.message()
            ))),
        }
    }

    /// [`Node::serve`], answering UNAVAILABLE if it takes longer than the
    /// leader wait: a leader cut off from the majority can neither commit nor
    /// confirm its leadership, and must not keep callers waiting. A write that
    /// times out may still commit later (if this node turns out to have a
    /// majority after all), so the caller is told its outcome is unknown.
    pub async fn serve_bounded(&self, call: Call) -> Result<Answer, NodeError> {
        let write = matches!(call, Call::Write(_));
        match tokio::time::timeout(self.leader_wait, self.serve(call)).await {
            Ok(result) => result,
            Err(_) => Err(NodeError::Unavailable(format!(
                "leader {} could not reach a majority within {} ms{}; retry",
                self.id,
                self.leader_wait.as_millis(),
                if write {
                    " (the write's outcome is unknown)"
                } else {
                    ""
                }
            ))),
        }
    }

    /// Serves a call as the leader; `NotLeader` when this node does not lead.
    pub async fn serve(&self, call: Call) -> Result<Answer, NodeError> {
        if matches!(call, Call::Write(_) | Call::Lease(_)) && self.is_leader() {
            // Leases are extended before this term serves any lease call.
            self.on_leadership().await;
        }
        match call {
            Call::Write(command) => {
                let (outcome, now) = self.propose(command).await?;
                Ok(Answer::Written(outcome, now))
            }
            Call::Check {
                checks,
                all_or_nothing,
            } => {
                self.ready_to_decide().await?;
                Ok(Answer::Checked(self.engine.check(
                    &checks,
                    all_or_nothing,
                    self.now_ms(),
                )?))
            }
            Call::Lease(name) => {
                self.read_barrier().await?;
                let now = self.now_ms();
                Ok(Answer::Lease(self.engine.lease(&name, now), now))
            }
            Call::Record(key) => {
                self.read_barrier().await?;
                let now = self.now_ms();
                Ok(Answer::Record(self.engine.record(&key, now), now))
            }
            Call::AddMember { id, peer_addr } => {
                if !self.is_leader() {
                    return Err(NodeError::NotLeader);
                }
                let refused = |e: &dyn std::fmt::Display| NodeError::Membership(e.to_string());
                self.raft
                    .add_learner(id, BasicNode::new(peer_addr), true)
                    .await
                    .map_err(|e| refused(&e))?;
                let mut voters = self.voters();
                voters.insert(id);
                self.raft
                    .change_membership(voters, false)
                    .await
                    .map_err(|e| refused(&e))?;
                Ok(Answer::Done)
            }
            Call::RemoveMember(id) => {
                if !self.is_leader() {
                    return Err(NodeError::NotLeader);
                }
                let mut voters = self.voters();
                voters.remove(&id);
                if voters.is_empty() {
                    return Err(NodeError::Membership("cannot remove the last voter".into()));
                }
                self.raft
                    .change_membership(voters, false)
                    .await
                    .map_err(|e| NodeError::Membership(e.to_string()))?;
                Ok(Answer::Done)
            }
        }
    }

    /// Commits `command` through the log as the leader. Concurrent
    /// proposals are batched into one entry by [`Node::run_proposer`] (one
    /// log write and fsync for all of them).
    async fn propose(&self, command: Command) -> Result<(Outcome, u64), NodeError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.proposals
            .send((command, reply))
            .map_err(|_| NodeError::Unavailable("shutting down".into()))?;
        let result = answer
            .await
            .map_err(|_| NodeError::Unavailable("shutting down".into()))?;
        let sweep_at = self.sweep_at.load(Ordering::Acquire);
        if self.engine.next_expiry().is_some_and(|t| t < sweep_at) {
            self.deadlines_changed.notify_one();
        }
        result
    }

    /// Writes one entry and maps openraft's answer to one result per command.
    async fn write_entry(
        &self,
        request: Request,
    ) -> Result<Vec<Result<Outcome, EngineError>>, NodeError> {
        match self.raft.client_write(request).await {
            Ok(r) => Ok(r.data.0),
            Err(e) if e.forward_to_leader::<BasicNode>().is_some() => Err(NodeError::NotLeader),
            Err(e) => Err(NodeError::Unavailable(e.to_string())),
        }
    }

    /// Batches proposals: takes every command queued while the previous
    /// entry was being committed (up to [`MAX_BATCH`] commands and
    /// [`BATCH_BYTES`] of payload), stamps them with one time and writes
    /// them as one entry. Ends when the node is dropped.
    async fn run_proposer(
        self: Arc<Self>,
        mut queue: tokio::sync::mpsc::UnboundedReceiver<Proposal>,
    ) {
        // A proposal that did not fit the previous batch starts the next.
        let mut carried: Option<Proposal> = None;
        loop {
            let first = match carried.take() {
                Some(p) => p,
                None => match queue.recv().await {
                    Some(p) => p,
                    None => return,
                },
            };
            let mut bytes = first.0.payload_bytes();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH && bytes < BATCH_BYTES {
                let Ok(next) = queue.try_recv() else { break };
                let b = next.0.payload_bytes();
                if bytes + b > BATCH_BYTES {
                    carried = Some(next);
                    break;
                }
                bytes += b;
                batch.push(next);
            }
            self.write_batch(batch).await;
        }
    }

    /// Writes one batch of proposals as one entry and answers each.
    async fn write_batch(&self, batch: Vec<Proposal>) {
        let now = self.now_ms();
        let (commands, replies): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
        let n = commands.len();
        let request = Request {
            now_ms: now,
            commands,
            sync_origin: None,
        };
        match self.write_entry(request).await {
            Ok(outcomes) if outcomes.len() == n => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome.map(|o| (o, now)).map_err(NodeError::from));
                }
            }
            Ok(outcomes) => {
                let e = format!("{} outcomes for {n} commands", outcomes.len());
                for reply in replies {
                    let _ = reply.send(Err(NodeError::Unavailable(e.clone())));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(clone_err(&e)));
                }
            }
        }
    }

    /// Rate limits are decided only by a leader that has applied everything
    /// committed before its term (checked once per term).
    async fn ready_to_decide(&self) -> Result<(), NodeError> {
        let (term, leading) = self.term_and_leading();
        if self.ready_term.load(Ordering::Acquire) == term && leading && self.lease.holds(term) {
            return Ok(());
        }
        self.read_barrier().await?;
        self.ready_term.store(term, Ordering::Release);
        Ok(())
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

    /// Commits a lease or idempotency command (through the leader); returns
    /// its outcome and the time it was stamped with.
    pub async fn write(&self, command: Command) -> Result<(Outcome, u64), NodeError> {
        match self.route(Call::Write(command)).await? {
            Answer::Written(outcome, now) => Ok((outcome, now)),
            other => Err(NodeError::Unavailable(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Rate-limit decisions, made by the leader from its in-memory table.
    pub async fn check(
        &self,
        checks: Vec<LimitCheck>,
        all_or_nothing: bool,
    ) -> Result<Vec<LimitResult>, NodeError> {
        let (term, leading) = self.term_and_leading();
        if leading && self.ready_term.load(Ordering::Acquire) == term && self.lease.holds(term) {
            // The hot path: no routing, no cloning.
            return Ok(self.engine.check(&checks, all_or_nothing, self.now_ms())?);
        }
        match self
            .route(Call::Check {
                checks,
                all_or_nothing,
            })
            .await?
        {
            Answer::Checked(r) => Ok(r),
            other => Err(NodeError::Unavailable(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Waits until this node, as leader, may serve a linearizable read.
    async fn read_barrier(&self) -> Result<(), NodeError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(e) if e.forward_to_leader::<BasicNode>().is_some() => Err(NodeError::NotLeader),
            Err(e) => Err(NodeError::Unavailable(e.to_string())),
        }
    }

    /// The lease as it stands, linearizable.
    pub async fn lease(&self, name: &str) -> Result<(Option<Lease>, u64), NodeError> {
        match self.route(Call::Lease(name.to_owned())).await? {
            Answer::Lease(l, now) => Ok((l, now)),
            other => Err(NodeError::Unavailable(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// The idempotency record as it stands, linearizable.
    pub async fn record(&self, key: &str) -> Result<(Option<Record>, u64), NodeError> {
        match self.route(Call::Record(key.to_owned())).await? {
            Answer::Record(r, now) => Ok((r, now)),
            other => Err(NodeError::Unavailable(format!(
                "unexpected answer {other:?}"
            ))),
        }
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
    /// Keeps the leader lease's voter set current with the membership.
    async fn run_voter_watch(self: Arc<Self>) {
        let mut shutdown = self.shutdown_signal();
        let mut server = self.server.clone();
        loop {
            self.lease.set_voters(self.id, self.voters());
            tokio::select! {
                r = server.changed() => if r.is_err() { return },
                _ = Node::stopped(&mut shutdown) => return,
            }
        }
    }

    pub async fn run_sweeper(self: Arc<Self>, limit_sweep: Duration) {
        let mut shutdown = self.shutdown_signal();
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
                _ = Self::stopped(&mut shutdown) => return,
            }
            self.forget_idle_watchers();
        }
    }

    /// Once per term as leader: catch up with everything committed, then
    /// extend every lease by one election timeout, so no lease lapses early
    /// because leadership moved (its holder could not renew meanwhile).
    async fn on_leadership(&self) {
        let term = self.term_and_leading().0;
        if self.extended_term.load(Ordering::Acquire) == term {
            return;
        }
        if self.read_barrier().await.is_err() {
            return;
        }
        match self
            .propose(Command::ExtendLeases {
                by_ms: ELECTION_TIMEOUT_MAX_MS,
            })
            .await
        {
            Ok(_) => {
                tracing::info!(term, "leading: leases extended by one election timeout");
                self.extended_term.store(term, Ordering::Release);
            }
            Err(e) => tracing::warn!(error = %e, "could not extend leases"),
        }
    }

    fn forget_idle_watchers(&self) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.retain(|_, tx| tx.receiver_count() > 0);
    }
}
