//! The engine as openraft's state machine.
//!
//! Applying an entry hands its command to [`Engine::apply`] at the time the
//! leader stamped on it. Lease events go to an observer (the node's watch
//! fan-out), so watchers on every replica see every change. Snapshots are
//! the engine's full state plus the Raft bookkeeping, kept in the store so
//! a restart begins from the latest one.

// openraft's storage traits return its (large) `StorageError` by value;
// helpers here return the same type so errors pass through unchanged.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use super::{Entry, LogId, Response, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::engine::{self, Engine, LeaseEvent};
use crate::storage::Store;

/// Receives the lease changes each applied entry caused.
pub type Observer = Arc<dyn Fn(&[LeaseEvent]) + Send + Sync>;

#[derive(Serialize, Deserialize)]
struct SnapshotData {
    last_applied: Option<LogId>,
    last_now: u64,
    membership: StoredMembership,
    engine: engine::Snapshot,
}

pub struct StateMachine {
    engine: Arc<Engine>,
    store: Store,
    observer: Observer,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    snapshot_seq: u64,
    /// The latest command time applied: commands never run at an earlier
    /// time, whatever order concurrent proposals reached the log in.
    last_now: u64,
    /// This process's boot id (see `Request::sync_origin`).
    boot_id: u64,
}

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageError::IO {
        source: StorageIOError::new(
            ErrorSubject::StateMachine,
            verb,
            openraft::AnyError::error(e.to_string()),
        ),
    }
}

impl StateMachine {
    /// Starts from the store's latest snapshot, if there is one.
    pub fn open(
        engine: Arc<Engine>,
        store: Store,
        observer: Observer,
        boot_id: u64,
    ) -> Result<Self, StorageError> {
        let mut sm = Self {
            engine,
            store,
            observer,
            last_applied: None,
            membership: StoredMembership::default(),
            snapshot_seq: 0,
            last_now: 0,
            boot_id,
        };
        if let Some((_, data)) = sm.store.snapshot()? {
            sm.load(&data)?;
        }
        Ok(sm)
    }

    fn load(&mut self, data: &[u8]) -> Result<(), StorageError> {
        let d: SnapshotData =
            serde_json::from_slice(data).map_err(|e| sm_err(ErrorVerb::Read, e))?;
        self.engine.load(d.engine);
        self.last_applied = d.last_applied;
        self.last_now = d.last_now;
        self.membership = d.membership;
        Ok(())
    }
}

/// Captures the state when openraft asks for a builder (between applies),
/// so the snapshot is consistent with `last_applied`.
pub struct Builder {
    store: Store,
    meta: SnapshotMeta,
    data: Option<SnapshotData>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    /// Encodes and stores the captured state on the blocking pool: with a
    /// large state this takes long enough that, on a runtime thread, it
    /// would hold up heartbeats and cost the leader its leadership.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let data = self
            .data
            .take()
            .ok_or_else(|| sm_err(ErrorVerb::Write, "the snapshot builder was used twice"))?;
        let (store, meta) = (self.store.clone(), self.meta.clone());
        let bytes = tokio::task::spawn_blocking(move || {
            let bytes = serde_json::to_vec(&data).expect("engine state serializes to JSON");
            store.save_snapshot(&meta, &bytes).map(|()| bytes)
        })
        .await
        .map_err(|e| sm_err(ErrorVerb::Write, e))??;
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut out = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Response(Vec::new()),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    Response(Vec::new())
                }
                EntryPayload::Normal(req) if req.sync_origin == Some(self.boot_id) => {
                    // Our own rate-limit sync: memory already holds newer state.
                    Response(vec![Ok(engine::Outcome::SyncCells); req.commands.len()])
                }
                EntryPayload::Normal(req) => {
                    self.last_now = self.last_now.max(req.now_ms);
                    let mut outcomes = Vec::with_capacity(req.commands.len());
                    for command in req.commands {
                        outcomes.push(self.engine.apply(command, self.last_now).map(|applied| {
                            if !applied.events.is_empty() {
                                (self.observer)(&applied.events);
                            }
                            applied.outcome
                        }));
                    }
                    Response(outcomes)
                }
            };
            out.push(response);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        let data = SnapshotData {
            last_applied: self.last_applied,
            last_now: self.last_now,
            membership: self.membership.clone(),
            engine: self.engine.snapshot(),
        };
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.snapshot_seq),
            None => format!("none-{}", self.snapshot_seq),
        };
        Builder {
            store: self.store.clone(),
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.membership.clone(),
                snapshot_id,
            },
            data: Some(data),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        self.load(&data)?;
        // The sender's bookkeeping wins: it is what the snapshot covers.
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.store.save_snapshot(meta, &data)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.store.snapshot()?.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
