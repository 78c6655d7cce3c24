//! What a data directory records about itself: its node and cluster ids,
//! and the peers it has seen take part in Raft with state (`raft::seen`).

use std::collections::BTreeSet;

use openraft::ErrorSubject;
use serde::{Deserialize, Serialize};

use super::{Store, IDENTITY, SEEN_WITH_STATE};
use crate::raft::seen::SeenStore;
use crate::raft::{NodeId, StorageError};

/// What a data directory records about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: NodeId,
    #[serde(default)]
    pub cluster_id: Option<String>,
}

impl Store {
    /// What this data directory records about its node and cluster.
    pub fn identity(&self) -> Result<Option<Identity>, StorageError> {
        self.get_meta(IDENTITY, ErrorSubject::Store)
    }

    /// Records this data directory's node and cluster (fsynced).
    pub fn save_identity(&self, identity: &Identity) -> Result<(), StorageError> {
        self.put_meta(
            &[(IDENTITY, Some(Self::json(identity)))],
            ErrorSubject::Store,
            true,
        )
    }
}

impl SeenStore for Store {
    fn seen_with_state(&self) -> Result<BTreeSet<NodeId>, StorageError> {
        Ok(self
            .get_meta(SEEN_WITH_STATE, ErrorSubject::Store)?
            .unwrap_or_default())
    }

    fn save_seen_with_state(&self, seen: &BTreeSet<NodeId>) -> Result<(), StorageError> {
        self.put_meta(
            &[(SEEN_WITH_STATE, Some(Self::json(seen)))],
            ErrorSubject::Store,
            true,
        )
    }
}
