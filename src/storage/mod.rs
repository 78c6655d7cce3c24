//! The embedded store: Raft log, vote and snapshots in one redb file.
//!
//! redb gives one ACID write transaction per call with an fsync on commit
//! (`Durability::Immediate`), so `append` reports the entries flushed only
//! after the fsync returned. Any storage error is returned to openraft, which
//! treats it as fatal for the node: nothing is silently ignored.
//!
//! Values are JSON: the log entries are small and this keeps the file
//! inspectable; the encoding is private to this module.

// openraft's storage traits return its (large) `StorageError` by value;
// helpers here return the same type so errors pass through unchanged.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::raft::{Entry, LogId, NodeId, SnapshotMeta, StorageError, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    StorageError::IO {
        source: StorageIOError::new(subject, verb, AnyError::new(&e)),
    }
}

/// The file and the typed operations on it. Cloning shares the file.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl Store {
    /// Opens (or creates) `dir/arbiter.redb`.
    pub fn open(dir: &Path) -> Result<Self, redb::DatabaseError> {
        let db = Database::create(dir.join("arbiter.redb"))?;
        Ok(Self { db: Arc::new(db) })
    }

    fn get_meta<T: DeserializeOwned>(
        &self,
        key: &str,
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, StorageError> {
        let read = |e: &dyn std::fmt::Display| {
            io_err(
                subject.clone(),
                ErrorVerb::Read,
                std::io::Error::other(e.to_string()),
            )
        };
        let tx = self.db.begin_read().map_err(|e| read(&e))?;
        let table = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(read(&e)),
        };
        match table.get(key).map_err(|e| read(&e))? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| read(&e)),
            None => Ok(None),
        }
    }

    /// Writes meta values (None deletes) in one fsynced transaction.
    fn put_meta(
        &self,
        values: &[(&str, Option<Vec<u8>>)],
        subject: ErrorSubject<NodeId>,
    ) -> Result<(), StorageError> {
        let write = |e: &dyn std::fmt::Display| {
            io_err(
                subject.clone(),
                ErrorVerb::Write,
                std::io::Error::other(e.to_string()),
            )
        };
        let tx = self.db.begin_write().map_err(|e| write(&e))?;
        {
            let mut table = tx.open_table(META).map_err(|e| write(&e))?;
            for (k, v) in values {
                match v {
                    Some(v) => table.insert(*k, v.as_slice()).map(drop),
                    None => table.remove(*k).map(drop),
                }
                .map_err(|e| write(&e))?;
            }
        }
        tx.commit().map_err(|e| write(&e))
    }

    fn json<T: Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).expect("raft and engine types serialize to JSON")
    }

    /// The stored snapshot, if any: its meta and data.
    pub fn snapshot(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
        let subject = || ErrorSubject::Snapshot(None);
        let meta: Option<SnapshotMeta> = self.get_meta(SNAPSHOT_META, subject())?;
        let data: Option<Vec<u8>> = self.get_meta(SNAPSHOT_DATA, subject())?;
        Ok(meta.zip(data))
    }

    /// Replaces the stored snapshot.
    pub fn save_snapshot(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
        self.put_meta(
            &[
                (SNAPSHOT_META, Some(Self::json(meta))),
                (SNAPSHOT_DATA, Some(Self::json(&data))),
            ],
            ErrorSubject::Snapshot(Some(meta.signature())),
        )
    }

    fn read_entries(&self, start: Bound<u64>, end: Bound<u64>) -> Result<Vec<Entry>, StorageError> {
        let read = |e: &dyn std::fmt::Display| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Read,
                std::io::Error::other(e.to_string()),
            )
        };
        let tx = self.db.begin_read().map_err(|e| read(&e))?;
        let table = match tx.open_table(LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(read(&e)),
        };
        let mut out = Vec::new();
        for item in table.range::<u64>((start, end)).map_err(|e| read(&e))? {
            let (_, v) = item.map_err(|e| read(&e))?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| read(&e))?);
        }
        Ok(out)
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let read = |e: &dyn std::fmt::Display| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Read,
                std::io::Error::other(e.to_string()),
            )
        };
        let tx = self.db.begin_read().map_err(|e| read(&e))?;
        let table = match tx.open_table(LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(read(&e)),
        };
        let last = table.last().map_err(|e| read(&e))?;
        let entry: Option<Entry> = match last {
            Some((_, v)) => Some(serde_json::from_slice(v.value()).map_err(|e| read(&e))?),
            None => None,
        };
        Ok(entry.map(|e| e.log_id))
    }

    /// Deletes log entries with index in `range`, and optionally records a
    /// new last-purged id, in one fsynced transaction.
    fn delete_logs(
        &self,
        range: (Bound<u64>, Bound<u64>),
        purged: Option<LogId>,
    ) -> Result<(), StorageError> {
        let write = |e: &dyn std::fmt::Display| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Delete,
                std::io::Error::other(e.to_string()),
            )
        };
        let tx = self.db.begin_write().map_err(|e| write(&e))?;
        {
            let mut table = tx.open_table(LOG).map_err(|e| write(&e))?;
            table
                .retain_in::<u64, _>(range, |_, _| false)
                .map_err(|e| write(&e))?;
            if let Some(p) = purged {
                let mut meta = tx.open_table(META).map_err(|e| write(&e))?;
                meta.insert(LAST_PURGED, Self::json(&p).as_slice())
                    .map_err(|e| write(&e))?;
            }
        }
        tx.commit().map_err(|e| write(&e))
    }
}

impl RaftLogReader<TypeConfig> for Store {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_entries(range.start_bound().cloned(), range.end_bound().cloned())
    }
}

impl RaftLogStorage<TypeConfig> for Store {
    type LogReader = Store;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(LAST_PURGED, ErrorSubject::Logs)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(&[(VOTE, Some(Self::json(vote)))], ErrorSubject::Vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta(
            &[(COMMITTED, committed.map(|c| Self::json(&c)))],
            ErrorSubject::Store,
        )
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.get_meta(COMMITTED, ErrorSubject::Store)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write = |e: &dyn std::fmt::Display| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                std::io::Error::other(e.to_string()),
            )
        };
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, Self::json(&e)))
            .collect();
        let db = self.db.clone();
        // The commit fsyncs: keep it off the async worker threads.
        let result = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut table = tx.open_table(LOG).map_err(|e| e.to_string())?;
                for (index, bytes) in &encoded {
                    table
                        .insert(*index, bytes.as_slice())
                        .map_err(|e| e.to_string())?;
                }
            }
            tx.commit().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| write(&e))?;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.clone())));
                Err(write(&e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.delete_logs((Bound::Included(log_id.index), Bound::Unbounded), None)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.delete_logs(
            (Bound::Unbounded, Bound::Included(log_id.index)),
            Some(log_id),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::engine::{Engine, EngineConfig};
    use crate::raft::state_machine::StateMachine;

    /// Removes the store's directory when the suite is done with it.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    static N: AtomicUsize = AtomicUsize::new(0);

    struct Builder;

    impl StoreBuilder<TypeConfig, Store, StateMachine, TempDir> for Builder {
        async fn build(&self) -> Result<(TempDir, Store, StateMachine), StorageError> {
            let dir = std::env::temp_dir().join(format!(
                "arbiter-store-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create test dir");
            let store = Store::open(&dir).expect("open store");
            let engine = Arc::new(Engine::new(EngineConfig::default()));
            let sm = StateMachine::open(engine, store.clone(), Arc::new(|_: &[_]| {}), 1)?;
            Ok((TempDir(dir), store, sm))
        }
    }

    /// openraft's conformance suite for log storage and state machines.
    #[test]
    fn openraft_storage_suite() -> Result<(), StorageError> {
        Suite::test_all(Builder)
    }
}
