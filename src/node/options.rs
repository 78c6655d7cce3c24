//! What a node starts from, and why it may fail to.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::SnapshotPolicy;

use super::WatchLimits;
use crate::clock::Clock;
use crate::engine::EngineConfig;
use crate::raft::network::{Dialer, SNAPSHOT_CHUNK_BYTES, SNAPSHOT_RPC_CAP};
use crate::raft::NodeId;
use crate::timing::{ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS, HEARTBEAT_MS};

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
    /// Who decides rate limits (`--slot-owners`).
    pub slot_owners: super::SlotOwners,
    /// Most checks in one call (`--max-checks-per-request`): forwarded
    /// checks joined into one call keep within it.
    pub max_checks_per_call: usize,
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
/// is in flight elsewhere), and the store's disk (one that can lose
/// power). Peers' calls reach the node through a `api::PeerService`
/// served over the dialled streams.
#[derive(Clone)]
pub struct Simulation {
    pub dial: Dialer,
    pub boot_id: u64,
    /// Where the store keeps its file instead of `data_dir`.
    pub disk: Option<Arc<dyn redb::StorageBackend>>,
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

/// A process-unique id (time and pid mixed), distinct across restarts.
pub(super) fn boot_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

/// openraft's configuration: its timing from `timing`, its own election
/// timer off (see `election`), snapshots every `snapshot_logs` entries.
pub(super) fn raft_config(snapshot_logs: u64) -> Result<openraft::Config, String> {
    openraft::Config {
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
    .map_err(|e| e.to_string())
}
