//! Raft plumbing (openraft 0.9): the type configuration and what travels
//! through the log.
//!
//! A log entry carries a [`Command`] and the time the leader stamped on it,
//! so every replica applies the same command at the same `now_ms` and state
//! machines never read a clock.

pub mod codec;
pub mod compat;
pub mod lease;
pub mod network;
pub mod seen;
pub mod snapshot;
mod snapshot_file;

pub use snapshot_file::SnapshotFile;

use serde::{Deserialize, Serialize};

use crate::engine::{Command, EngineError, Outcome};

/// One log entry: the commands the leader batched together (every write
/// that arrived while the previous entry was being committed), all stamped
/// with the same time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub now_ms: u64,
    pub commands: Vec<Command>,
    /// For rate-limit syncs: the boot id of the leader process that made
    /// the decisions. That process skips its own syncs (its memory is newer
    /// than any sync); every other process, including the same node after a
    /// restart, applies them.
    #[serde(default)]
    pub sync_origin: Option<u64>,
}

/// What applying each command of a [`Request`] produced, in order; refusals
/// are part of the deterministic outcome, not storage errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(pub Vec<Result<Outcome, EngineError>>);

openraft::declare_raft_types!(
    /// Arbiter's Raft types: node ids are `u64`, nodes carry their peer address.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = SnapshotFile,
);

pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
