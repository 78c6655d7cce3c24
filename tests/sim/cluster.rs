//! A cluster of real `Node`s in one process, on one paused tokio clock.
//!
//! Each node has its own temp-dir store, its own wall clock (an offset on
//! the shared virtual time, which the run skews and steps), and reaches its
//! peers only through [`Net`]. Tokio's paused clock jumps to the next timer
//! whenever every task is waiting, so a run of many seconds of cluster time
//! takes as long as its work, and no test waits on real time.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbiter::api::peer_service::PeerService;
use arbiter::clock::Clock;
use arbiter::engine::EngineConfig;
use arbiter::node::{Membership, Node, NodeError, Operation, Options, Simulation, SlotOwners};
use arbiter::proto::raft_peer_server::RaftPeerServer;
use arbiter::raft::network::{Dialer, PEER_MESSAGE_LIMIT};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::disk::{Disk, Loss};
use super::history::{Role, SlotView};
use super::net::{Net, NodeId};
use super::rng::Rng;

/// The wall clock every node starts near (2026-01-01T00:00:00Z).
const WALL_START_MS: u64 = 1_767_225_600_000;
/// How far apart the members' wall clocks may be (`--max-clock-skew-ms`).
pub const MAX_SKEW_MS: u64 = 1_000;
/// How long a call waits for a leader (`--leader-wait-ms`).
const LEADER_WAIT: Duration = Duration::from_secs(2);
/// How long a connection attempt from a node without power takes to fail.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a client waits for any answer before calling it unknown.
pub const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// A wall clock on the shared virtual time, with an offset of its own, and
/// a rate of its own while it drifts.
pub struct SimClock {
    origin: Instant,
    offset_ms: AtomicI64,
    /// How far off its rate is, in parts per million, and since when
    /// (virtual ms).
    drift_ppm: AtomicI64,
    drift_since: AtomicU64,
}

impl SimClock {
    fn new(origin: Instant, offset_ms: i64) -> Self {
        Self {
            origin,
            offset_ms: AtomicI64::new(offset_ms),
            drift_ppm: AtomicI64::new(0),
            drift_since: AtomicU64::new(0),
        }
    }

    /// Steps the wall clock by `ms` (either way).
    pub fn step(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }

    /// Makes the wall clock run `ppm` parts per million fast (or slow, if
    /// negative) from now; 0 stops the drift, keeping what it drifted.
    pub fn drift(&self, ppm: i64) {
        let drifted = self.drifted_ms();
        self.offset_ms.fetch_add(drifted, Ordering::SeqCst);
        self.drift_since.store(self.mono_ms(), Ordering::SeqCst);
        self.drift_ppm.store(ppm, Ordering::SeqCst);
    }

    /// How far the current drift has moved the clock.
    fn drifted_ms(&self) -> i64 {
        let since = self.drift_since.load(Ordering::SeqCst);
        let elapsed = self.mono_ms().saturating_sub(since) as i64;
        elapsed * self.drift_ppm.load(Ordering::SeqCst) / 1_000_000
    }
}

impl Clock for SimClock {
    fn wall_ms(&self) -> u64 {
        WALL_START_MS
            .saturating_add(self.mono_ms())
            .saturating_add_signed(self.offset_ms.load(Ordering::SeqCst) + self.drifted_ms())
    }

    fn mono_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }
}

/// One member: the running node (none while it is down after a crash),
/// its wall clock and its disk, which outlive any one start.
pub struct SimNode {
    node: Mutex<Option<Arc<Node>>>,
    pub clock: Arc<SimClock>,
    disk: Mutex<Disk>,
    /// Where the running start keeps its snapshot files.
    data_dir: Mutex<PathBuf>,
    /// Bumped by each crash: a call in flight across one has no known
    /// outcome.
    incarnation: AtomicU64,
    /// The power is off (from the loss until the next start).
    off: AtomicBool,
}

impl SimNode {
    /// Whether the start numbered `incarnation` still has power.
    fn powered(&self, incarnation: u64) -> bool {
        self.incarnation.load(Ordering::SeqCst) == incarnation && !self.off.load(Ordering::SeqCst)
    }

    /// What a power loss does at its instant: the node is unplugged from
    /// the network, calls in flight on it lose their answers, its next
    /// start gets the disk the loss `kept` and a data dir of its own with
    /// the snapshot published by then (snapshot files are published with
    /// an fsync of the file and its directory). The node itself goes on
    /// running, unheard, until [`Cluster::reap`] stops it.
    fn power_off(&self, id: NodeId, net: &Net, kept: Disk, scratch: &std::path::Path) {
        if self.off.swap(true, Ordering::SeqCst) {
            return;
        }
        let incarnation = self.incarnation.fetch_add(1, Ordering::SeqCst) + 1;
        net.unplug(id, &addr(id));
        *lock(&self.disk) = kept;
        let next = scratch.join(format!("node-{id}-{incarnation}"));
        let snapshots = next.join("snapshots");
        std::fs::create_dir_all(&snapshots).expect("create a node's data dir");
        let current = lock(&self.data_dir).join("snapshots/current.snap");
        if current.exists() {
            std::fs::copy(&current, snapshots.join("current.snap")).expect("copy a snapshot");
        }
        *lock(&self.data_dir) = next;
    }
}

pub struct Cluster {
    pub net: Arc<Net>,
    pub nodes: BTreeMap<NodeId, Arc<SimNode>>,
    peers: BTreeMap<NodeId, String>,
    origin: Instant,
    dir: PathBuf,
    /// Every node's term and role over the run, from every start's server
    /// metrics (and a crash).
    roles: Arc<Mutex<Vec<Role>>>,
    watchers: Mutex<Vec<JoinHandle<()>>>,
    /// Who decides rate limits (`--slot-owners`).
    slot_owners: SlotOwners,
    /// Every node's applied slot map over the run.
    slots: Arc<Mutex<SlotViews>>,
}

/// The slot maps the nodes applied: when each node applied which version,
/// and each version's owners (as the first node to apply it saw them).
#[derive(Clone, Debug, Default)]
pub struct SlotViews {
    pub applied: Vec<SlotView>,
    pub maps: BTreeMap<u64, Vec<NodeId>>,
    /// Two nodes that applied one version with different owners.
    pub disagreement: Option<String>,
}

fn addr(id: NodeId) -> String {
    format!("node-{id}:7000")
}

/// Node `id`'s peer address (for a membership change).
pub fn peer_addr(id: NodeId) -> String {
    addr(id)
}

/// Where the stores go: memory-backed when the machine has it (fsync is
/// then free), else the temp dir.
fn scratch() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// Starts `n` nodes (ids 1..=n) as one new cluster, with wall clocks
    /// up to `MAX_SKEW_MS` apart.
    pub async fn start(seed: u64, n: u64, rng: &mut Rng) -> Self {
        Self::start_with(seed, n, rng, SlotOwners::Leader).await
    }

    /// [`start`](Self::start), with the rate-limit slots owned as given.
    pub async fn start_with(seed: u64, n: u64, rng: &mut Rng, slot_owners: SlotOwners) -> Self {
        let origin = Instant::now();
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let dir = scratch().join(format!("arbiter-sim-{}-{run}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let half = (MAX_SKEW_MS / 2) as i64;
            let skew = rng.range(0, MAX_SKEW_MS) as i64 - half;
            let data_dir = dir.join(format!("node-{id}-0"));
            std::fs::create_dir_all(&data_dir).expect("create a node's data dir");
            nodes.insert(
                id,
                Arc::new(SimNode {
                    node: Mutex::new(None),
                    clock: Arc::new(SimClock::new(origin, skew)),
                    disk: Mutex::new(Disk::default()),
                    data_dir: Mutex::new(data_dir),
                    incarnation: AtomicU64::new(0),
                    off: AtomicBool::new(false),
                }),
            );
        }
        let c = Self {
            net: Net::new(seed),
            nodes,
            peers: (1..=n).map(|id| (id, addr(id))).collect(),
            origin,
            dir,
            roles: Arc::default(),
            watchers: Mutex::default(),
            slot_owners,
            slots: Arc::default(),
        };
        for id in 1..=n {
            c.boot(id, rng.next() | 1)
                .await
                .expect("a simulated node starts");
        }
        c
    }

    /// Starts node `id` on its disk and data dir, serves its peer port and
    /// watches its role.
    async fn boot(&self, id: NodeId, boot_id: u64) -> Result<(), String> {
        let sim = &self.nodes[&id];
        // This start's connections: once its power goes, what it dials
        // never connects (the next start of the same node dials afresh).
        let incarnation = sim.incarnation.load(Ordering::SeqCst);
        let dial: Dialer = {
            let (net, sim) = (self.net.clone(), Arc::downgrade(sim));
            Arc::new(move |to: String| {
                let (net, sim) = (net.clone(), sim.clone());
                Box::pin(async move {
                    if !sim.upgrade().is_some_and(|s| s.powered(incarnation)) {
                        tokio::time::sleep(CONNECT_TIMEOUT).await;
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no power"));
                    }
                    net.dial(id, to).await
                }) as Pin<Box<dyn Future<Output = io::Result<DuplexStream>> + Send>>
            })
        };
        let disk: Arc<dyn redb::StorageBackend> = Arc::new(lock(&sim.disk).clone());
        let data_dir = lock(&sim.data_dir).clone();
        let node = Node::start(Options {
            engine: EngineConfig::default(),
            data_dir,
            membership: Membership {
                id,
                peers: self.peers.clone(),
            },
            snapshot_logs: 500,
            leader_wait: LEADER_WAIT,
            member_catch_up: Duration::from_secs(10),
            limit_sync: Duration::from_millis(100),
            slot_owners: self.slot_owners,
            max_checks_per_call: 1000,
            limit_sweep: Duration::from_secs(1),
            clock: sim.clock.clone(),
            watch_limits: Default::default(),
            max_clock_skew_ms: MAX_SKEW_MS,
            peer_tls: None,
            cluster_token: None,
            accept_peers_without_cluster_id: false,
            simulation: Some(Simulation {
                dial,
                boot_id,
                disk: Some(disk),
            }),
        })
        .await
        .map_err(|e| format!("node {id} did not start: {e}"))?;
        let (tx, rx) = mpsc::channel::<io::Result<DuplexStream>>(16);
        self.net.listen(&addr(id), id, tx);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    RaftPeerServer::new(PeerService::new(node.clone(), None, false, None))
                        .max_decoding_message_size(PEER_MESSAGE_LIMIT)
                        .max_encoding_message_size(PEER_MESSAGE_LIMIT),
                )
                .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx)),
        );
        let watcher = watch_role(&node, sim, id, self.origin, self.roles.clone());
        lock(&self.watchers).push(watcher);
        let watcher = watch_slots(&node, sim, id, self.origin, self.slots.clone());
        lock(&self.watchers).push(watcher);
        *lock(&sim.node) = Some(node);
        sim.off.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Cuts node `id`'s power now: its disk keeps only what `loss`
    /// leaves, and it is down until [`Cluster::restart`]
    /// ([`SimNode::power_off`]).
    pub fn crash(&self, id: NodeId, loss: Loss, rng: &mut Rng) -> Result<(), String> {
        let sim = &self.nodes[&id];
        if sim.off.load(Ordering::SeqCst) {
            return Err(format!("node {id} is already down"));
        }
        let kept = lock(&sim.disk).lose_power(loss, rng);
        sim.power_off(id, &self.net, kept, &self.dir);
        self.reap(id);
        Ok(())
    }

    /// Cuts node `id`'s power at its `at`-th disk write from now, part-way
    /// through whatever it is committing then.
    pub fn crash_at_write(&self, id: NodeId, at: u64, loss: Loss, rng: &mut Rng) {
        let sim = Arc::downgrade(&self.nodes[&id]);
        let (net, dir) = (self.net.clone(), self.dir.clone());
        lock(&self.nodes[&id].disk).arm(at, loss, rng, move |kept| {
            if let Some(sim) = sim.upgrade() {
                sim.power_off(id, &net, kept, &dir);
            }
        });
    }

    /// Fills node `id`'s disk (its writes fail, and its Raft stops on the
    /// first), or frees it.
    pub fn fill_disk(&self, id: NodeId, full: bool) {
        lock(&self.nodes[&id].disk).set_full(full);
    }

    /// Whether node `id`'s Raft has stopped on a fatal error (as a server
    /// then exits: `Node::raft_failed`).
    pub fn raft_failed(&self, id: NodeId) -> bool {
        self.up(id)
            .is_some_and(|(n, _)| n.raft().metrics().borrow().running_state.is_err())
    }

    /// Whether node `id`'s power is off.
    pub fn is_off(&self, id: NodeId) -> bool {
        self.nodes[&id].off.load(Ordering::SeqCst)
    }

    /// Stops what is left running of a node whose power went: it was
    /// unheard since the loss, and now it stops.
    pub fn reap(&self, id: NodeId) {
        let sim = &self.nodes[&id];
        let Some(node) = lock(&sim.node).take() else {
            return;
        };
        let term = node.raft().metrics().borrow().current_term;
        lock(&self.roles).push(Role {
            at: self.now(),
            node: id,
            term,
            leading: false,
        });
        tokio::spawn(async move { node.stop().await });
    }

    /// Starts a crashed node again from what its disk kept.
    pub async fn restart(&self, id: NodeId, rng: &mut Rng) -> Result<(), String> {
        if !self.is_off(id) {
            return Err(format!("node {id} is already up"));
        }
        self.reap(id);
        self.boot(id, rng.next() | 1).await
    }

    /// Node `id` while it is up, with its incarnation.
    fn up(&self, id: NodeId) -> Option<(Arc<Node>, u64)> {
        let sim = &self.nodes[&id];
        let node = lock(&sim.node).clone()?;
        let incarnation = sim.incarnation.load(Ordering::SeqCst);
        (!sim.off.load(Ordering::SeqCst)).then_some((node, incarnation))
    }

    /// A watch on lease `name` through node `id`, if it is up, with the
    /// node and its incarnation.
    pub fn watch(&self, id: NodeId, name: &str) -> Option<(arbiter::node::Watch, Arc<Node>, u64)> {
        let (node, incarnation) = self.up(id)?;
        let w = node.watch(name, "", None).ok()?;
        Some((w, node, incarnation))
    }

    /// Whether node `id` is still up in the same incarnation.
    pub fn still_up(&self, id: NodeId, incarnation: u64) -> bool {
        self.up(id).is_some_and(|(_, i)| i == incarnation)
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// The nodes that are up.
    pub fn up_ids(&self) -> Vec<NodeId> {
        self.ids()
            .into_iter()
            .filter(|&id| self.up(id).is_some())
            .collect()
    }

    /// A node for a client's call: one that is up (as a load balancer
    /// would choose), or any while all are down (the call then fails).
    pub fn pick(&self, rng: &mut Rng) -> NodeId {
        let up = self.up_ids();
        let from = if up.is_empty() { self.ids() } else { up };
        from[rng.below(from.len() as u64) as usize]
    }

    /// Node `id`, which must be up.
    pub fn node(&self, id: NodeId) -> Arc<Node> {
        self.up(id).unwrap_or_else(|| panic!("node {id} is down")).0
    }

    /// Runs `f` on node `id` within the client's deadline: `Err` if the
    /// node was down, no answer came in time, or the node crashed while
    /// the call was in flight (an answer it gave then was never sent).
    pub async fn on<T, F>(&self, id: NodeId, f: impl FnOnce(Arc<Node>) -> F) -> Result<T, String>
    where
        F: Future<Output = T>,
    {
        let (node, incarnation) = self.up(id).ok_or("the node is down")?;
        let out = tokio::time::timeout(CALL_DEADLINE, f(node))
            .await
            .map_err(|_| "deadline".to_string())?;
        if self.nodes[&id].incarnation.load(Ordering::SeqCst) != incarnation {
            return Err("the node crashed during the call".into());
        }
        Ok(out)
    }

    /// Runs `op` on node `id`, as a client would.
    pub async fn call<O: Operation>(&self, id: NodeId, op: O) -> Answer<O::Output> {
        match self
            .on(id, |node| async move { node.execute(op).await })
            .await
        {
            Err(e) => Answer::Unknown(e),
            Ok(Ok(v)) => Answer::Ok(v),
            Ok(Err(NodeError::Engine(e))) => Answer::Refused(e.to_string()),
            Ok(Err(e)) => Answer::Unknown(e.to_string()),
        }
    }

    /// Virtual ms since the cluster started.
    pub fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The leader every node that is up agrees on, once it is ready to
    /// serve, within `within` of virtual time.
    pub async fn leader(&self, within: Duration) -> Option<NodeId> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let leaders: Vec<Option<NodeId>> = self
                .up_ids()
                .into_iter()
                .map(|id| self.node(id).leader())
                .collect();
            if std::env::var_os("SIM_DEBUG").is_some() {
                eprintln!("{} ms: leaders {leaders:?}", self.now());
            }
            if let Some(Some(l)) = leaders.first() {
                if leaders.iter().all(|x| *x == Some(*l))
                    && self.up(*l).is_some_and(|(n, _)| n.ready())
                {
                    return Some(*l);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// The highest term any node that is up has seen.
    pub fn term(&self) -> u64 {
        self.up_ids()
            .into_iter()
            .map(|id| self.node(id).raft().metrics().borrow().current_term)
            .max()
            .unwrap_or(0)
    }

    /// Every node's roles so far.
    pub fn roles(&self) -> Vec<Role> {
        lock(&self.roles).clone()
    }

    /// The slot maps every node applied so far.
    pub fn slot_views(&self) -> SlotViews {
        lock(&self.slots).clone()
    }

    /// Stops every node and removes the stores.
    pub async fn stop(self) {
        for id in self.up_ids() {
            self.node(id).stop().await;
        }
        for w in lock(&self.watchers).drain(..) {
            w.abort();
        }
        drop(self.nodes);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Records node `id`'s term and role each time its server metrics change,
/// until its power goes (what runs on after that is heard by nobody).
fn watch_role(
    node: &Node,
    sim: &Arc<SimNode>,
    id: NodeId,
    origin: Instant,
    roles: Arc<Mutex<Vec<Role>>>,
) -> JoinHandle<()> {
    let mut metrics = node.raft().server_metrics();
    let incarnation = sim.incarnation.load(Ordering::SeqCst);
    let sim = Arc::downgrade(sim);
    tokio::spawn(async move {
        loop {
            if !sim.upgrade().is_some_and(|s| s.powered(incarnation)) {
                return;
            }
            let role = {
                let m = metrics.borrow_and_update();
                Role {
                    at: origin.elapsed().as_millis() as u64,
                    node: id,
                    term: m.vote.leader_id().get_term(),
                    leading: m.state == openraft::ServerState::Leader,
                }
            };
            lock(&roles).push(role);
            if metrics.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Records which slot map node `id` has applied each time it may have
/// changed, until its power goes.
fn watch_slots(
    node: &Arc<Node>,
    sim: &Arc<SimNode>,
    id: NodeId,
    origin: Instant,
    views: Arc<Mutex<SlotViews>>,
) -> JoinHandle<()> {
    let mut changes = node.slot_changes();
    let incarnation = sim.incarnation.load(Ordering::SeqCst);
    let (sim, node) = (Arc::downgrade(sim), Arc::downgrade(node));
    tokio::spawn(async move {
        loop {
            changes.borrow_and_update();
            let Some(n) = node.upgrade() else { return };
            if !sim.upgrade().is_some_and(|s| s.powered(incarnation)) {
                return;
            }
            let map = n.slot_map();
            drop(n);
            {
                let mut v = lock(&views);
                v.applied.push(SlotView {
                    at: origin.elapsed().as_millis() as u64,
                    node: id,
                    version: map.version,
                });
                let known = v.maps.entry(map.version).or_insert(map.owners.clone());
                if *known != map.owners && v.disagreement.is_none() {
                    v.disagreement = Some(format!(
                        "node {id} applied slot map version {} with other owners than another \
                         node",
                        map.version
                    ));
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
}

/// What became of a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer<T> {
    Ok(T),
    /// Definitely not done (the state machine refused it).
    Refused(String),
    /// Maybe done: no answer in time, or the cluster was unavailable.
    Unknown(String),
}

impl<T> Answer<T> {
    /// Whether the call's outcome is known (done, or certainly not done).
    pub fn definite(&self) -> bool {
        !matches!(self, Answer::Unknown(_))
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Answer<U> {
        match self {
            Answer::Ok(v) => Answer::Ok(f(v)),
            Answer::Refused(e) => Answer::Refused(e),
            Answer::Unknown(e) => Answer::Unknown(e),
        }
    }
}
