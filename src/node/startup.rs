//! How a node is put together: [`Node::start`] opens the store and Raft,
//! builds each room with the rooms it needs, then joins or forms the
//! cluster and starts the loops.

use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;
use tokio::sync::watch;

use super::admission::{self, Admission, Gate, GateOptions, Identity};
use super::check_stream::CheckStreams;
use super::coalesce::{Coalescer, FORWARDS_IN_FLIGHT};
use super::election::Elections;
use super::forwarding::Forwarder;
use super::handover::Handover;
use super::leadership::Leadership;
use super::limit_sync::LimitSync;
use super::options::{boot_id, raft_config};
use super::proposer::Proposer;
use super::routing::Router;
use super::slots::Slots;
use super::spanning::Holds;
use super::sweeper::{Deadlines, Sweeper};
use super::tasks::Tasks;
use super::timekeeping::Timekeeper;
use super::view::View;
use super::watch_fanout::Watchers;
use super::{Node, Options, StartError};
use crate::engine::{Engine, LeaseEvent};
use crate::raft::lease::LeaderLease;
use crate::raft::network::{Channels, ClusterId, PeerNetwork};
use crate::raft::seen::SeenWithState;
use crate::raft::{NodeId, TypeConfig};
use crate::storage::state_machine::{Observer, StateMachine};
use crate::storage::{SnapshotDir, Store};

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
            slot_owners,
            max_checks_per_call,
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
        let disk = simulation.as_ref().and_then(|s| s.disk.clone());
        let store = Store::open_with(&data_dir, simulation.is_some(), disk)?;
        let cluster = check_identity(&store, membership.id)?;
        let engine = Arc::new(Engine::new(engine));
        let watchers = Watchers::new(watch_limits);
        let time = Arc::new(Timekeeper::new(clock, max_clock_skew_ms));
        let boot_id = simulation.as_ref().map_or_else(boot_id, |s| s.boot_id);
        let seen = SeenWithState::load(store.clone())?;
        let slot_version = watch::channel(0).0;
        let network = PeerNetwork::new(
            cluster.clone(),
            peer_tls,
            simulation.map(|s| s.dial),
            seen.clone(),
        );
        let channels = network.channels.clone();
        let lease = network.lease.clone();
        let sm = StateMachine::open(
            engine.clone(),
            store.clone(),
            SnapshotDir::open(&data_dir)?,
            observer(&watchers, &time, membership.id, &slot_version),
            boot_id,
        )?;
        let (raft, has_state) =
            open_raft(membership.id, snapshot_logs, network, store.clone(), sm).await?;
        let opened = Opened {
            view: View::new(membership.id, raft, membership.peers),
            store,
            engine,
            watchers,
            time,
            cluster,
            seen,
            channels,
            lease,
            boot_id,
            has_state,
            slot_version,
        };
        let settings = Settings {
            formation_id,
            accept_peers_without_cluster_id,
            leader_wait,
            member_catch_up,
            limit_sync,
            limit_sweep,
            slot_owners,
            max_checks_per_call,
        };
        let (node, loops) = Self::compose(opened, &settings);
        let node = Arc::new(node);
        node.begin(has_state, accept_peers_without_cluster_id, loops)
            .await?;
        Ok(node)
    }

    /// Builds each room with the rooms it needs, and the node over them;
    /// with the loops that belong to no room the node keeps.
    fn compose(o: Opened, s: &Settings) -> (Self, Loops) {
        let tasks = Tasks::default();
        let gate = gate(&o, s);
        let (view, engine, time, channels, cluster) =
            (o.view, o.engine, o.time, o.channels, o.cluster);
        let deadlines = Arc::new(Deadlines::default());
        let proposer = Proposer::start(
            view.raft().clone(),
            time.clone(),
            engine.clone(),
            deadlines.clone(),
            &tasks,
        );
        let leadership = Arc::new(Leadership::new(view.clone(), proposer.clone(), o.lease));
        let slots = Arc::new(Slots::new(
            view.clone(),
            leadership.clone(),
            engine.clone(),
            proposer.clone(),
            time.clone(),
            channels.clone(),
            cluster.clone(),
            s.slot_owners,
        ));
        let elections = Arc::new(Elections::new(
            view.clone(),
            leadership.clone(),
            gate.clone(),
            o.store,
            channels.clone(),
            cluster.clone(),
            o.boot_id,
        ));
        let handover = Handover {
            view: view.clone(),
            leadership: leadership.clone(),
            gate: gate.clone(),
            channels: channels.clone(),
            cluster: cluster.clone(),
        };
        let loops = Loops {
            sweeper: Sweeper {
                view: view.clone(),
                leadership: leadership.clone(),
                proposer: proposer.clone(),
                engine: engine.clone(),
                time: time.clone(),
                watchers: o.watchers.clone(),
                deadlines,
                limit_sweep: s.limit_sweep,
            },
            limit_sync: LimitSync {
                view: view.clone(),
                engine: engine.clone(),
                time: time.clone(),
                boot_id: o.boot_id,
                every: s.limit_sync,
                slots: slots.clone(),
            },
        };
        let router = Router {
            view: view.clone(),
            engine: engine.clone(),
            time: time.clone(),
            proposer,
            leadership: leadership.clone(),
            slots: slots.clone(),
            streams: Arc::new(CheckStreams::new(
                view.clone(),
                channels.clone(),
                cluster.clone(),
            )),
            forwarder: Arc::new(Forwarder {
                view: view.clone(),
                channels,
                cluster,
                forwarded: Default::default(),
            }),
            coalescer: Coalescer::new(s.max_checks_per_call, FORWARDS_IN_FLIGHT),
            leader_wait: s.leader_wait,
            member_catch_up: s.member_catch_up,
            decided: Default::default(),
            rerouted: Default::default(),
            holds: Arc::new(Holds::new(o.boot_id)),
            metrics_text: Default::default(),
            watchers: o.watchers.clone(),
        };
        let node = Self {
            view,
            engine,
            time,
            watchers: o.watchers,
            gate,
            leadership,
            elections,
            handover,
            router,
            slots,
            slot_version: o.slot_version,
            shutdown: watch::channel(false).0,
            tasks,
        };
        (node, loops)
    }

    /// Joins or forms the cluster and starts the background loops.
    async fn begin(
        &self,
        has_state: bool,
        accept_peers_without_cluster_id: bool,
        Loops {
            sweeper,
            limit_sync,
        }: Loops,
    ) -> Result<(), StartError> {
        let raft_err = |e: &dyn std::fmt::Display| StartError::Raft(e.to_string());
        let (gate, tasks) = (&self.gate, &self.tasks);
        if accept_peers_without_cluster_id {
            tracing::warn!(
                "--accept-peers-without-cluster-id: peer messages without a cluster id are \
                 accepted; drop the flag once every member runs this version"
            );
        }
        if has_state && gate.cluster_id().is_none() {
            // A data directory from before cluster ids: its members all
            // derive the same id from the same --peers.
            tracing::warn!(
                cluster = %gate.formation_id(),
                "this data directory has no cluster id: adopting the one derived from --peers"
            );
            gate.adopt_cluster_id(gate.formation_id())
                .map_err(|e| raft_err(&e))?;
        }
        if !has_state {
            if self.view.initial_peers().len() <= 1 {
                // A single node: nobody to ask.
                gate.initialise().await.map_err(|e| raft_err(&e))?;
            } else {
                tasks.spawn("admission", gate.clone().run_admission(tasks.signal()));
            }
        }
        tasks.spawn(
            "voter watch",
            self.leadership.clone().run_voter_watch(tasks.signal()),
        );
        tasks.spawn("elections", self.elections.clone().run(tasks.signal()));
        tasks.spawn(
            "formation seal",
            gate.clone().run_formation_seal(tasks.signal()),
        );
        tasks.spawn("limit sync", limit_sync.run(tasks.signal()));
        tasks.spawn("slots", self.slots.clone().run(tasks.signal()));
        tasks.spawn("sweeper", sweeper.run(tasks.signal()));
        Ok(())
    }
}

/// Checks the data directory's recorded node id against `id` (recording it
/// in a new directory); the cluster id it holds, if any.
/// Admission: whether this node may take part in Raft (at once, with state
/// on disk; otherwise once its peers agree), and its cluster id.
fn gate(o: &Opened, s: &Settings) -> Arc<Gate> {
    Arc::new(Gate::new(
        o.view.clone(),
        GateOptions {
            admission: if o.has_state {
                Admission::Admitted
            } else {
                Admission::Checking
            },
            cluster: o.cluster.clone(),
            formation_id: s.formation_id.clone(),
            accept_unnamed_peers: s.accept_peers_without_cluster_id,
            seen: o.seen.clone(),
            store: o.store.clone(),
            channels: o.channels.clone(),
        },
    ))
}

/// What start-up opened, from which the rooms are built.
struct Opened {
    view: View,
    store: Store,
    engine: Arc<Engine>,
    watchers: Watchers,
    time: Arc<Timekeeper>,
    cluster: ClusterId,
    seen: Arc<SeenWithState>,
    channels: Channels,
    lease: Arc<LeaderLease>,
    boot_id: u64,
    /// Whether the data directory holds any Raft state.
    has_state: bool,
    /// The applied slot map's version, as the state machine reports it.
    slot_version: watch::Sender<u64>,
}

/// The options the rooms are built with.
struct Settings {
    formation_id: String,
    accept_peers_without_cluster_id: bool,
    leader_wait: Duration,
    member_catch_up: Duration,
    limit_sync: Duration,
    limit_sweep: Duration,
    slot_owners: super::SlotOwners,
    max_checks_per_call: usize,
}

/// The loops that belong to no room the node keeps, started by `begin`.
struct Loops {
    sweeper: Sweeper,
    limit_sync: LimitSync,
}

/// Starts Raft over the store and the state machine (which replays the
/// log); whether it has any state (a new data directory has none).
async fn open_raft(
    id: NodeId,
    snapshot_logs: u64,
    network: PeerNetwork,
    store: Store,
    sm: StateMachine,
) -> Result<(Raft<TypeConfig>, bool), StartError> {
    let raft_err = |e: &dyn std::fmt::Display| StartError::Raft(e.to_string());
    let config = raft_config(snapshot_logs).map_err(|e| raft_err(&e))?;
    let raft = Raft::new(id, Arc::new(config), network, store, sm)
        .await
        .map_err(|e| raft_err(&e))?;
    let has_state = raft.is_initialized().await.map_err(|e| raft_err(&e))?;
    Ok((raft, has_state))
}

// openraft's StorageError is large, and the store's calls return it.
#[allow(clippy::result_large_err)]
fn check_identity(store: &Store, id: NodeId) -> Result<admission::ClusterId, StartError> {
    let cluster = admission::ClusterId::default();
    match store.identity()? {
        Some(identity) => {
            admission::check_node_id(&identity, id).map_err(StartError::Identity)?;
            if let Some(c) = identity.cluster_id {
                let _ = cluster.set(c);
            }
        }
        None => store.save_identity(&Identity {
            node_id: id,
            cluster_id: None,
        })?,
    }
    Ok(cluster)
}

/// What the state machine tells the node as it applies: lease events go to
/// the watchers, command times to the timekeeper.
fn observer(
    watchers: &Watchers,
    time: &Arc<Timekeeper>,
    id: NodeId,
    slot_version: &watch::Sender<u64>,
) -> Observer {
    let (events, replaced, time) = (watchers.clone(), watchers.clone(), time.clone());
    let (semaphores, breakers) = (watchers.clone(), watchers.clone());
    let slot_version = slot_version.clone();
    Observer {
        lease_events: Arc::new(move |e: &[LeaseEvent]| events.publish(e)),
        semaphore_events: Arc::new(move |e| semaphores.publish_semaphores(e)),
        breaker_changes: Arc::new(move |c| breakers.publish_breakers(c)),
        applied_time: Arc::new(move |now_ms, by| time.observe(now_ms, by == Some(id))),
        replaced: Arc::new(move || replaced.replaced()),
        slots: Arc::new(move |version| {
            slot_version.send_replace(version);
        }),
    }
}
