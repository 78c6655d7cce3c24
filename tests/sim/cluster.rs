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
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arbiter::api::peer_service::PeerService;
use arbiter::clock::Clock;
use arbiter::engine::EngineConfig;
use arbiter::node::{Membership, Node, NodeError, Operation, Options, Simulation};
use arbiter::proto::raft_peer_server::RaftPeerServer;
use arbiter::raft::network::{Dialer, PEER_MESSAGE_LIMIT};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::net::{Net, NodeId};
use super::rng::Rng;

/// The wall clock every node starts near (2026-01-01T00:00:00Z).
const WALL_START_MS: u64 = 1_767_225_600_000;
/// How far apart the members' wall clocks may be (`--max-clock-skew-ms`).
pub const MAX_SKEW_MS: u64 = 1_000;
/// How long a call waits for a leader (`--leader-wait-ms`).
const LEADER_WAIT: Duration = Duration::from_secs(2);
/// How long a client waits for any answer before calling it unknown.
pub const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// A wall clock on the shared virtual time, with an offset of its own.
pub struct SimClock {
    origin: Instant,
    offset_ms: AtomicI64,
}

impl SimClock {
    fn new(origin: Instant, offset_ms: i64) -> Self {
        Self {
            origin,
            offset_ms: AtomicI64::new(offset_ms),
        }
    }

    /// Steps the wall clock by `ms` (either way).
    pub fn step(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for SimClock {
    fn wall_ms(&self) -> u64 {
        WALL_START_MS
            .saturating_add(self.mono_ms())
            .saturating_add_signed(self.offset_ms.load(Ordering::SeqCst))
    }

    fn mono_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }
}

pub struct SimNode {
    pub node: Arc<Node>,
    pub clock: Arc<SimClock>,
}

pub struct Cluster {
    pub net: Arc<Net>,
    pub nodes: BTreeMap<NodeId, SimNode>,
    origin: Instant,
    dir: PathBuf,
}

fn addr(id: NodeId) -> String {
    format!("node-{id}:7000")
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

impl Cluster {
    /// Starts `n` nodes (ids 1..=n) as one new cluster, with wall clocks
    /// up to `MAX_SKEW_MS` apart.
    pub async fn start(seed: u64, n: u64, rng: &mut Rng) -> Self {
        let origin = Instant::now();
        let net = Net::new(seed);
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let dir = scratch().join(format!("arbiter-sim-{}-{run}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let peers: BTreeMap<NodeId, String> = (1..=n).map(|id| (id, addr(id))).collect();
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let half = (MAX_SKEW_MS / 2) as i64;
            let skew = rng.range(0, MAX_SKEW_MS) as i64 - half;
            let clock = Arc::new(SimClock::new(origin, skew));
            let dial: Dialer = {
                let net = net.clone();
                Arc::new(move |to: String| {
                    Box::pin(net.clone().dial(id, to))
                        as Pin<Box<dyn Future<Output = io::Result<DuplexStream>> + Send>>
                })
            };
            let data_dir = dir.join(format!("node-{id}"));
            std::fs::create_dir_all(&data_dir).expect("create a node's data dir");
            let node = Node::start(Options {
                engine: EngineConfig::default(),
                data_dir,
                membership: Membership {
                    id,
                    peers: peers.clone(),
                },
                snapshot_logs: 500,
                leader_wait: LEADER_WAIT,
                member_catch_up: Duration::from_secs(10),
                limit_sync: Duration::from_millis(100),
                limit_sweep: Duration::from_secs(1),
                clock: clock.clone(),
                watch_limits: Default::default(),
                max_clock_skew_ms: MAX_SKEW_MS,
                peer_tls: None,
                cluster_token: None,
                accept_peers_without_cluster_id: false,
                simulation: Some(Simulation {
                    dial,
                    boot_id: rng.next() | 1,
                }),
            })
            .await
            .expect("a simulated node starts");
            let (tx, rx) = mpsc::channel::<io::Result<DuplexStream>>(16);
            net.listen(&addr(id), id, tx);
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(
                        RaftPeerServer::new(PeerService::new(node.clone(), None, false, None))
                            .max_decoding_message_size(PEER_MESSAGE_LIMIT)
                            .max_encoding_message_size(PEER_MESSAGE_LIMIT),
                    )
                    .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx)),
            );
            nodes.insert(id, SimNode { node, clock });
        }
        Self {
            net,
            nodes,
            origin,
            dir,
        }
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    pub fn node(&self, id: NodeId) -> &Arc<Node> {
        &self.nodes[&id].node
    }

    /// Virtual ms since the cluster started.
    pub fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The leader every node agrees on, once it is ready to serve, within
    /// `within` of virtual time.
    pub async fn leader(&self, within: Duration) -> Option<NodeId> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let leaders: Vec<Option<NodeId>> =
                self.nodes.values().map(|n| n.node.leader()).collect();
            if std::env::var_os("SIM_DEBUG").is_some() {
                eprintln!("{} ms: leaders {leaders:?}", self.now());
            }
            if let Some(Some(l)) = leaders.first() {
                if leaders.iter().all(|x| *x == Some(*l)) && self.node(*l).ready() {
                    return Some(*l);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// The highest term any node has seen.
    pub fn term(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| n.node.raft().metrics().borrow().current_term)
            .max()
            .unwrap_or(0)
    }

    /// Stops every node and removes the stores.
    pub async fn stop(self) {
        for n in self.nodes.values() {
            n.node.stop().await;
        }
        drop(self.nodes);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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

/// Runs `op` on `node`, with the client's deadline.
pub async fn call<O: Operation>(node: &Node, op: O) -> Answer<O::Output> {
    match tokio::time::timeout(CALL_DEADLINE, node.execute(op)).await {
        Err(_) => Answer::Unknown("deadline".into()),
        Ok(Ok(v)) => Answer::Ok(v),
        Ok(Err(NodeError::Engine(e))) => Answer::Refused(e.to_string()),
        Ok(Err(e)) => Answer::Unknown(e.to_string()),
    }
}
