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

use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageIOError};

use super::{SnapshotDir, Store};
use crate::engine::{self, Engine, LeaseEvent};
use crate::raft::compat;
use crate::raft::snapshot::{self, MAGIC};
use crate::raft::{
    Entry, LogId, Response, SnapshotFile, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// Told what applying entries did: the lease changes each caused (for
/// watchers), the time each was stamped with and the node that led when it
/// was proposed (for the node's clock; `None` for a snapshot's time), and
/// that the whole state was replaced by an installed snapshot (for
/// watchers: the changes in between are not known).
#[derive(Clone)]
pub struct Observer {
    pub lease_events: LeaseEvents,
    /// The semaphore changes an applied entry caused, for their watchers.
    pub semaphore_events: SemaphoreEvents,
    /// Circuit breakers an applied sync moved to another phase.
    pub breaker_changes: BreakerChanges,
    pub applied_time: Arc<dyn Fn(u64, Option<u64>) + Send + Sync>,
    pub replaced: Arc<dyn Fn() + Send + Sync>,
    /// The slot map's version, each time the map may have changed (a map
    /// applied, a snapshot loaded).
    pub slots: Arc<dyn Fn(u64) + Send + Sync>,
}

/// Receives the lease changes an applied entry caused.
pub type LeaseEvents = Arc<dyn Fn(&[LeaseEvent]) + Send + Sync>;

/// Receives the circuit breakers an applied sync moved to another phase.
pub type BreakerChanges = Arc<dyn Fn(&[engine::BreakerChange]) + Send + Sync>;

/// Receives the semaphore changes an applied entry caused.
pub type SemaphoreEvents = Arc<dyn Fn(&[engine::SemaphoreEvent]) + Send + Sync>;

impl Observer {
    /// One that ignores everything (for tests of storage alone).
    pub fn none() -> Self {
        Self {
            lease_events: Arc::new(|_| {}),
            semaphore_events: Arc::new(|_| {}),
            breaker_changes: Arc::new(|_| {}),
            applied_time: Arc::new(|_, _| {}),
            replaced: Arc::new(|| {}),
            slots: Arc::new(|_| {}),
        }
    }
}

pub struct StateMachine {
    engine: Arc<Engine>,
    store: Store,
    snapshots: SnapshotDir,
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

/// Loads the snapshot in `file` into `engine`: checks that all of it
/// decodes, and only then replaces the engine's state with it, entry by
/// entry. A snapshot in an earlier release's format (JSON) is read whole
/// and rewritten in today's format under `meta` (in `rewrite`) so it can be
/// sent on. Returns the snapshot's last command time. Blocking.
fn load_file(
    engine: &Engine,
    file: &mut std::fs::File,
    rewrite: Option<(&SnapshotDir, &SnapshotMeta)>,
) -> std::io::Result<(
    snapshot::Header,
    Option<(std::fs::File, std::path::PathBuf)>,
)> {
    let mut first = [0u8; 1];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut first)?;
    file.seek(SeekFrom::Start(0))?;
    if first[0] == MAGIC[0] {
        snapshot::read(BufReader::new(&mut *file), None)?;
        file.seek(SeekFrom::Start(0))?;
        engine.clear();
        return Ok((snapshot::read(BufReader::new(file), Some(engine))?, None));
    }
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    let Some((dir, meta)) = rewrite else {
        return Err(std::io::Error::other("a legacy snapshot with no meta"));
    };
    let (header, rewritten) = load_legacy(engine, data, dir, meta)?;
    Ok((header, Some(rewritten)))
}

/// Loads a snapshot in an earlier release's format (one JSON document)
/// into `engine` and writes it again in today's format under `meta` (not
/// yet published).
fn load_legacy(
    engine: &Engine,
    data: Vec<u8>,
    dir: &SnapshotDir,
    meta: &SnapshotMeta,
) -> std::io::Result<(snapshot::Header, (std::fs::File, std::path::PathBuf))> {
    let (last_now, state) = compat::decode_snapshot(&data)?;
    drop(data);
    engine.load(state);
    let header = snapshot::Header {
        meta: meta.clone(),
        last_now_ms: last_now,
    };
    let rewritten = write_snapshot(dir, meta, last_now, engine)?;
    Ok((header, rewritten))
}

impl StateMachine {
    /// Starts from the latest snapshot, if there is one. A data directory
    /// of an earlier release has its snapshot in the store (as JSON): it is
    /// loaded and rewritten as a snapshot file.
    pub fn open(
        engine: Arc<Engine>,
        store: Store,
        snapshots: SnapshotDir,
        observer: Observer,
        boot_id: u64,
    ) -> Result<Self, StorageError> {
        let mut sm = Self {
            engine,
            store,
            snapshots,
            observer,
            last_applied: None,
            membership: StoredMembership::default(),
            snapshot_seq: 0,
            last_now: 0,
            boot_id,
        };
        let read = |e: std::io::Error| sm_err(ErrorVerb::Read, e);
        if let Some(mut file) = sm.snapshots.current().map_err(read)? {
            // The log before it is gone: a node cannot start without it.
            let (header, _) = load_file(&sm.engine, &mut file, None).map_err(|e| {
                read(std::io::Error::new(
                    e.kind(),
                    format!(
                        "snapshot {} is damaged ({e}); the log before it was purged, so this \
                         node cannot start from its data directory: restore it from a backup, \
                         or in a cluster replace this member's volume (README: replacing a lost \
                         volume)",
                        sm.snapshots.current_path().display()
                    ),
                ))
            })?;
            sm.loaded(&header);
        } else if let Some((meta, data)) = sm.store.legacy_snapshot()? {
            let (header, (out, path)) =
                load_legacy(&sm.engine, data, &sm.snapshots, &meta).map_err(read)?;
            sm.snapshots
                .publish(&out, &path)
                .map_err(|e| sm_err(ErrorVerb::Write, e))?;
            sm.store.drop_legacy_snapshot()?;
            sm.loaded(&header);
        }
        Ok(sm)
    }

    fn loaded(&mut self, header: &snapshot::Header) {
        self.last_applied = header.meta.last_log_id;
        self.membership = header.meta.last_membership.clone();
        self.last_now = header.last_now_ms;
        (self.observer.applied_time)(header.last_now_ms, None);
        (self.observer.slots)(self.engine.slots().version);
    }
}

/// A snapshot written when openraft asked for a builder (between two
/// applies, so it matches `last_applied`) and not yet published.
pub struct Builder {
    snapshots: SnapshotDir,
    meta: SnapshotMeta,
    written: Option<std::io::Result<(std::fs::File, std::path::PathBuf)>>,
}

/// Writes the state to a new snapshot file, part by part. This runs on the
/// state machine's task between two applies (the state must not change
/// under it); the file is fsynced and published later, off the runtime.
fn write_snapshot(
    dir: &SnapshotDir,
    meta: &SnapshotMeta,
    last_now: u64,
    engine: &Engine,
) -> std::io::Result<(std::fs::File, std::path::PathBuf)> {
    let (file, path) = dir.create()?;
    let written = snapshot::encode(BufWriter::new(&file), meta, last_now, engine);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok((file, path))
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    /// Fsyncs the written file and makes it the current snapshot, on the
    /// blocking pool (with a large state an fsync takes long enough that,
    /// on a runtime thread, it would hold up heartbeats).
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (mut file, path) = self
            .written
            .take()
            .ok_or_else(|| sm_err(ErrorVerb::Write, "the snapshot builder was used twice"))?
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        let dir = self.snapshots.clone();
        let file = tokio::task::spawn_blocking(move || {
            dir.publish(&file, &path)?;
            file.seek(SeekFrom::Start(0))?;
            Ok::<_, std::io::Error>(file)
        })
        .await
        .map_err(|e| sm_err(ErrorVerb::Write, e))?
        .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        metrics::counter!("arbiter_snapshots_total", "how" => "built").increment(1);
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: Box::new(self.snapshots.wrap(file)),
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
                    // Our own rate-limit sync: memory already holds newer
                    // state. Its time still counts, as on every other
                    // member: lease deadlines are judged by it.
                    self.last_now = self.last_now.max(req.now_ms);
                    Response(vec![Ok(engine::Outcome::SyncCells); req.commands.len()])
                }
                EntryPayload::Normal(req) => {
                    self.last_now = self.last_now.max(req.now_ms);
                    (self.observer.applied_time)(
                        self.last_now,
                        Some(entry.log_id.leader_id.node_id),
                    );
                    let mut outcomes = Vec::with_capacity(req.commands.len());
                    for command in req.commands {
                        outcomes.push(self.engine.apply(command, self.last_now).map(|applied| {
                            if !applied.events.is_empty() {
                                (self.observer.lease_events)(&applied.events);
                            }
                            if !applied.semaphore_events.is_empty() {
                                (self.observer.semaphore_events)(&applied.semaphore_events);
                            }
                            if !applied.breaker_changes.is_empty() {
                                (self.observer.breaker_changes)(&applied.breaker_changes);
                            }
                            if applied.outcome == engine::Outcome::AssignSlots(true) {
                                (self.observer.slots)(self.engine.slots().version);
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
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.snapshot_seq),
            None => format!("none-{}", self.snapshot_seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let write = || write_snapshot(&self.snapshots, &meta, self.last_now, &self.engine);
        // Blocking writes: on a multi-threaded runtime, let this worker's
        // other tasks (heartbeats among them) move to another thread.
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let written = if multi {
            tokio::task::block_in_place(write)
        } else {
            write()
        };
        Builder {
            snapshots: self.snapshots.clone(),
            meta,
            written: Some(written),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        let file = self
            .snapshots
            .create_async()
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        Ok(Box::new(file))
    }

    /// Loads a received snapshot (on the blocking pool) and makes it the
    /// current one.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError> {
        let (mut file, path) = snapshot.into_std().await;
        let (engine, dir, m) = (self.engine.clone(), self.snapshots.clone(), meta.clone());
        let header = tokio::task::spawn_blocking(move || {
            let (header, rewritten) = load_file(&engine, &mut file, Some((&dir, &m)))?;
            match rewritten {
                Some((out, out_path)) => {
                    dir.publish(&out, &out_path)?;
                    std::fs::remove_file(&path)?;
                }
                None => dir.publish(&file, &path)?,
            }
            Ok::<_, std::io::Error>(header)
        })
        .await
        .map_err(|e| sm_err(ErrorVerb::Write, e))?
        .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        self.last_now = header.last_now_ms;
        (self.observer.applied_time)(header.last_now_ms, None);
        // The sender's bookkeeping wins: it is what the snapshot covers.
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        (self.observer.replaced)();
        (self.observer.slots)(self.engine.slots().version);
        metrics::counter!("arbiter_snapshots_total", "how" => "installed").increment(1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let read = |e: std::io::Error| sm_err(ErrorVerb::Read, e);
        let Some(mut file) = self.snapshots.current().map_err(read)? else {
            return Ok(None);
        };
        let header = snapshot::read_header(BufReader::new(&mut file)).map_err(read)?;
        file.seek(SeekFrom::Start(0)).map_err(read)?;
        Ok(Some(Snapshot {
            meta: header.meta,
            snapshot: Box::new(self.snapshots.wrap(file)),
        }))
    }
}
