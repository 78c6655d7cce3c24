//! The node: where requests meet the replicated state machine.
//!
//! Lease and idempotency writes are stamped with the time and proposed
//! through Raft; the reply waits until the entry is committed (fsynced to
//! the log) and applied. Reads of leases and records are linearizable
//! (read-index). Rate-limit checks are decided at once from the in-memory
//! table. Lease changes reach watchers from the state machine, in apply
//! order.
//!
//! One file per job:
//! - `routing.rs`: typed operations, sent to the leader (served here, or
//!   forwarded over the peer channel); `peer_service.rs` serves what peers
//!   send (Raft traffic, pre-votes, forwarded calls);
//! - `proposer.rs`: batches writes into log entries;
//! - `leadership.rs`: what a new leader does first (extend leases, catch
//!   up), the voter set of the leader lease, readiness;
//! - `election.rs`: elections behind a pre-vote;
//! - `sweeper.rs`: purges lapsed leases, records and idle rate-limit cells;
//! - `limit_sync.rs`: replicates rate-limit state;
//! - `watch.rs`: lease watchers;
//! - `tasks.rs`: spawns, owns and joins every background loop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

mod admission;
mod election;
mod handover;
mod leadership;
mod limit_sync;
mod peer_service;
mod proposer;
mod routing;
mod sweeper;
mod tasks;
mod timekeeping;
mod watch_fanout;

pub use admission::{Admission, Identified, Identity, CLUSTER_HEADER};
pub use election::{PreVoteRequest, PreVoteResponse};
pub use handover::TakeOver;
pub use leadership::{report_readiness, READY_SERVICES};
pub use peer_service::PeerService;
pub use routing::{
    AddMember, Call, CheckLimits, GetLease, GetRecord, Operation, RemoveMember, Stamped,
};
pub use watch_fanout::{Watch, WatchLimits};

use crate::clock::Clock;
use crate::engine::{Engine, EngineConfig, EngineError, LeaseEvent};
use crate::raft::lease::LeaderLease;
use crate::raft::network::{Channels, Dialer, PeerNetwork, SNAPSHOT_CHUNK_BYTES, SNAPSHOT_RPC_CAP};
use crate::raft::seen::SeenWithState;
use crate::raft::state_machine::{Observer, StateMachine};
use crate::raft::{NodeId, TypeConfig};
use crate::storage::{SnapshotDir, Store};
use proposer::Proposal;
use tasks::Tasks;
use timekeeping::Timekeeper;
use watch_fanout::Watchers;

use crate::timing::{ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS, HEARTBEAT_MS};

/// Why a call could not be served.
#[derive(Clone, Debug, thiserror::Error, Serialize, Deserialize)]
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

/// Who this node is and whom it starts with.
#[derive(Clone, Debug)]
pub struct Membership {
    pub id: NodeId,
    /// Initial members and their peer addresses, including this node.
    pub peers: BTreeMap<NodeId, String>,
}

/// Everything a node starts from.
pub struct Options {
    pub engine: EngineConfig,
    pub data_dir: PathBuf,
    pub membership: Membership,
    /// Log entries between snapshots.
    pub snapshot_logs: u64,
    /// How long a call waits for a leader before answering UNAVAILABLE.
    pub leader_wait: Duration,
    /// How long a member being added has to catch up as a learner.
    pub member_catch_up: Duration,
    /// How often the leader replicates changed rate-limit state.
    pub limit_sync: Duration,
    /// How often idle rate-limit cells are dropped.
    pub limit_sweep: Duration,
    /// The only clock commands are stamped with.
    pub clock: Arc<dyn Clock>,
    /// How many lease watches are served at once.
    pub watch_limits: WatchLimits,
    /// The most the members' wall clocks may differ by.
    pub max_clock_skew_ms: u64,
    /// Mutual TLS towards peers (with `--peer-tls-*`).
    pub peer_tls: Option<crate::security::Connector>,
    /// `--cluster-token`: part of a new cluster's id (see
    /// `admission::formation_id`).
    pub cluster_token: Option<String>,
    /// `--accept-peers-without-cluster-id`: for one rolling upgrade from a
    /// version whose members sent none.
    pub accept_peers_without_cluster_id: bool,
    /// What the simulated cluster replaces (`tests/sim`); `None` in a
    /// server.
    pub simulation: Option<Simulation>,
}

/// What an in-process simulated cluster replaces so that one seed decides
/// a whole run: the network, the boot id (which seeds the election
/// timeouts), and the log writer thread (writes are carried out by the
/// call that makes them, so a paused clock never moves on while a write
/// is in flight elsewhere). Peers' calls reach the node through a
/// [`PeerService`] served over the dialled streams.
#[derive(Clone)]
pub struct Simulation {
    pub dial: Dialer,
    pub boot_id: u64,
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store: {0}")]
    Store(#[from] redb::DatabaseError),
    #[error("storage: {0}")]
    Storage(#[from] crate::raft::StorageError),
    #[error("cannot open the snapshot directory: {0}")]
    Snapshots(#[from] std::io::Error),
    #[error("{0}")]
    Identity(String),
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
    /// How long a member being added has to catch up as a learner.
    member_catch_up: Duration,
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
    /// One more than the highest commit index a current leader has told
    /// this node of (0: none): readiness waits until it is applied.
    leader_commit: AtomicU64,
    /// The replicated clock (see `timekeeping`).
    time: Arc<Timekeeper>,
    watchers: Watchers,
    /// Wakes the sweeper when a write set a deadline earlier than the one it
    /// sleeps until (`sweep_at`).
    deadlines_changed: Notify,
    sweep_at: AtomicU64,
    /// Set when the node starts shutting down: streams end, new work stops.
    shutdown: watch::Sender<bool>,
    /// Queue of writes for the batching proposer.
    proposals: tokio::sync::mpsc::Sender<Proposal>,
    tasks: Tasks,
    /// Whether this node may take part in Raft (see `admission`).
    admission: watch::Sender<Admission>,
    /// This node's cluster id, once known (sent with every peer message).
    cluster: admission::ClusterId,
    /// The id a new cluster of the initial members takes (see
    /// `admission::formation_id`).
    formation_id: String,
    /// Whether peer messages without a cluster id are accepted (one
    /// upgrade's switch).
    accept_unnamed_peers: bool,
    /// Peers seen taking part in Raft with state (see `raft::seen`).
    seen: Arc<SeenWithState>,
    /// The members given at start-up, with their peer addresses.
    initial_peers: BTreeMap<NodeId, String>,
    /// Set by a leader handing over on shutdown: it serves no more calls.
    stepping_down: std::sync::atomic::AtomicBool,
    /// The term this node last led and when (monotonic ms) it began to.
    leading_since: std::sync::Mutex<(u64, u64)>,
}

/// A process-unique id (time and pid mixed), distinct across restarts.
fn boot_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

impl Node {
    /// Opens the store under `data_dir`, loads the latest snapshot, starts
    /// Raft (which replays the log) and the background loops. On a new data
    /// directory, the member with the lowest id initialises the cluster,
    /// once; the others wait to be contacted. Restarting any node is safe:
    /// an initialised store is never initialised again.
    pub async fn start(options: Options) -> Result<Arc<Self>, StartError> {
        let Options {
            engine,
            data_dir,
            membership,
            snapshot_logs,
            leader_wait,
            member_catch_up,
            limit_sync,
            limit_sweep,
            clock,
            watch_limits,
            max_clock_skew_ms,
            peer_tls,
            cluster_token,
            accept_peers_without_cluster_id,
            simulation,
        } = options;
        let formation_id = admission::formation_id(cluster_token.as_deref(), &membership.peers);
        let store = Store::open_with(&data_dir, simulation.is_some())?;
        let snapshots = SnapshotDir::open(&data_dir)?;
        let cluster = admission::ClusterId::default();
        match store.identity()? {
            Some(identity) => {
                admission::check_node_id(&identity, membership.id).map_err(StartError::Identity)?;
                if let Some(c) = identity.cluster_id {
                    let _ = cluster.set(c);
                }
            }
            None => store.save_identity(&Identity {
                node_id: membership.id,
                cluster_id: None,
            })?,
        }
        let engine = Arc::new(Engine::new(engine));
        let watchers = Watchers::new(watch_limits);
        let time = Arc::new(Timekeeper::new(clock, max_clock_skew_ms));
        let observer = {
            let (watchers, time) = (watchers.clone(), time.clone());
            Observer {
                lease_events: Arc::new(move |events: &[LeaseEvent]| watchers.publish(events)),
                applied_time: Arc::new(move |now_ms| time.observe(now_ms)),
            }
        };
        let boot_id = simulation.as_ref().map_or_else(boot_id, |s| s.boot_id);
        let sm = StateMachine::open(engine.clone(), store.clone(), snapshots, observer, boot_id)?;
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
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            install_snapshot_timeout: SNAPSHOT_RPC_CAP.as_millis() as u64,
            ..Default::default()
        }
        .validate()
        .map_err(|e| raft_err(&e))?;
        let seen = SeenWithState::load(store.clone())?;
        let network = PeerNetwork::new(
            cluster.clone(),
            peer_tls,
            simulation.map(|s| s.dial),
            seen.clone(),
        );
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
        let has_state = raft.is_initialized().await.map_err(|e| raft_err(&e))?;
        let admission = if has_state {
            Admission::Admitted
        } else {
            Admission::Checking
        };
        let (proposals, queue) = tokio::sync::mpsc::channel(proposer::QUEUE);
        let node = Arc::new(Self {
            id: membership.id,
            boot_id,
            engine,
            server: raft.server_metrics(),
            raft,
            channels,
            leader_wait,
            member_catch_up,
            ready_term: AtomicU64::new(0),
            extended_term: AtomicU64::new(0),
            lease,
            store,
            leader_contact: AtomicU64::new(0),
            leader_commit: AtomicU64::new(0),
            time,
            watchers,
            deadlines_changed: Notify::new(),
            sweep_at: AtomicU64::new(u64::MAX),
            shutdown: watch::channel(false).0,
            proposals,
            tasks: Tasks::default(),
            admission: watch::channel(admission).0,
            cluster,
            formation_id,
            accept_unnamed_peers: accept_peers_without_cluster_id,
            seen,
            initial_peers: membership.peers.clone(),
            stepping_down: std::sync::atomic::AtomicBool::new(false),
            leading_since: std::sync::Mutex::new((0, 0)),
        });
        if accept_peers_without_cluster_id {
            tracing::warn!(
                "--accept-peers-without-cluster-id: peer messages without a cluster id are \
                 accepted; drop the flag once every member runs this version"
            );
        }
        if has_state && node.cluster.get().is_none() {
            // A data directory from before cluster ids: its members all
            // derive the same id from the same --peers.
            tracing::warn!(
                cluster = %node.formation_id,
                "this data directory has no cluster id: adopting the one derived from --peers"
            );
            node.adopt_cluster_id(&node.formation_id.clone())
                .map_err(|e| raft_err(&e))?;
        }
        if !has_state {
            if node.initial_peers.len() <= 1 {
                // A single node: nobody to ask.
                node.initialise().await.map_err(|e| raft_err(&e))?;
            } else {
                node.tasks.spawn("admission", node.clone().run_admission());
            }
        }
        node.tasks
            .spawn("proposer", node.clone().run_proposer(queue));
        node.tasks
            .spawn("voter watch", node.clone().run_voter_watch());
        node.tasks.spawn("elections", node.clone().run_elections());
        node.tasks
            .spawn("formation seal", node.clone().run_formation_seal());
        node.tasks
            .spawn("limit sync", node.clone().run_limit_sync(limit_sync));
        node.tasks
            .spawn("sweeper", node.clone().run_sweeper(limit_sweep));
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

    /// Live counts: (rate-limit keys, leases, records, record bytes).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        self.engine.counts()
    }

    /// Lease watches being served.
    pub fn watchers(&self) -> usize {
        self.watchers.active()
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

    /// The members a peer may be, with their peer addresses: the latest
    /// membership in the log, or the initial members while there is none
    /// (an empty node, or a new member not yet reached by its leader).
    pub fn peer_members(&self) -> Vec<(NodeId, String)> {
        self.with_peer_members(|members| members.map(|(id, a)| (id, a.to_owned())).collect())
    }

    /// Runs `f` over [`peer_members`](Self::peer_members) without copying
    /// them (every peer message is checked against them).
    pub fn with_peer_members<R>(
        &self,
        f: impl FnOnce(&mut dyn Iterator<Item = (NodeId, &str)>) -> R,
    ) -> R {
        let m = self.server.borrow();
        if m.membership_config.log_id().is_some() {
            f(&mut m
                .membership_config
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.addr.as_str())))
        } else {
            f(&mut self.initial_peers.iter().map(|(id, a)| (*id, a.as_str())))
        }
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

    /// The command time (see `timekeeping`): monotonic, never behind a
    /// time already applied. (The state machine also never lets time run
    /// backwards, whatever order concurrent proposals reach the log in.)
    pub fn now_ms(&self) -> u64 {
        self.time.now_ms()
    }

    /// [`now_ms`](Self::now_ms) for a command this node proposes (see
    /// `Timekeeper::stamp`).
    pub(crate) fn stamp_ms(&self) -> u64 {
        self.time.stamp()
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
        let mut metrics = self.raft.metrics();
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
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}
