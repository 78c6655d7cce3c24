//! Which peers this node has seen take part in Raft with state of their
//! own, recorded durably before that part is counted.
//!
//! A new cluster's members are all voters from its first log entry (see
//! `node::admission`), so a voter with an empty data directory is either
//! one that never started or one that lost its disk. Only the second may
//! have voted or acknowledged entries that a quorum counted, and every
//! such act reached some peer first: a leader's appends and a candidate's
//! vote requests reach their receivers, a follower's acknowledgements and
//! votes reach the leader or candidate. Each receiver records the sender
//! here (fsynced, once per peer) before it acts on the message, and
//! `Identify` answers with the record, so an empty voter that no peer has
//! seen may start as the member it was meant to be, and one that any peer
//! has seen is refused.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use super::NodeId;
use super::StorageError;

/// Where the record is kept (the node's store).
// Its errors are openraft's (large) `StorageError`, as the store's are.
#[allow(clippy::result_large_err)]
pub trait SeenStore: Send + Sync {
    fn seen_with_state(&self) -> Result<BTreeSet<NodeId>, StorageError>;
    fn save_seen_with_state(&self, seen: &BTreeSet<NodeId>) -> Result<(), StorageError>;
}

pub struct SeenWithState {
    seen: Mutex<BTreeSet<NodeId>>,
    store: Box<dyn SeenStore>,
}

impl SeenWithState {
    // The store's reads return openraft's (large) error by value.
    #[allow(clippy::result_large_err)]
    pub fn load(store: impl SeenStore + 'static) -> Result<Arc<Self>, StorageError> {
        let seen = store.seen_with_state()?;
        Ok(Arc::new(Self {
            seen: Mutex::new(seen),
            store: Box::new(store),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<NodeId>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peers seen so far.
    pub fn all(&self) -> Vec<NodeId> {
        self.lock().iter().copied().collect()
    }

    /// Records `peer` (durably, the first time); an error means the message
    /// must not be acted on.
    pub fn record(&self, peer: NodeId) -> Result<(), String> {
        let mut seen = self.lock();
        if seen.contains(&peer) {
            return Ok(());
        }
        let mut next = seen.clone();
        next.insert(peer);
        self.store
            .save_seen_with_state(&next)
            .map_err(|e| format!("cannot record that node {peer} has Raft state: {e}"))?;
        *seen = next;
        Ok(())
    }
}
