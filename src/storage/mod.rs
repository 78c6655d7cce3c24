//! The embedded store: Raft log and vote in one redb file, snapshots in
//! files beside it ([`SnapshotDir`]).
//!
//! Log writes go to one writer thread, in order. It groups every append
//! queued while the previous commit was in flight into one redb write
//! transaction (group commit) and fsyncs it (`Durability::Immediate`, redb's
//! default); only then does it tell openraft the entries are flushed. Until
//! then the entries sit in an in-memory map, so readers see them at once, as
//! openraft requires. Any storage error is returned to openraft, which
//! treats it as fatal for the node: nothing is silently ignored.
//!
//! Log entries are stored in the binary log format (`raft::codec`, which
//! also reads the JSON entries of earlier releases); the vote, commit and
//! purge markers are JSON.

// openraft's storage traits return its (large) `StorageError` by value;
// helpers here return the same type so errors pass through unchanged.
#![allow(clippy::result_large_err)]

mod identity;
mod log_storage;
mod snapshots;
pub mod state_machine;
mod writer;

pub use identity::Identity;
pub use snapshots::SnapshotDir;

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::LogFlushed;
use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};
use redb::{Database, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::raft::codec::decode_entry;
use crate::raft::{Entry, LogId, NodeId, SnapshotMeta, StorageError, TypeConfig};
use writer::{from_tail, write_thread};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";
const IDENTITY: &str = "identity";
/// The peers this node has seen take part in Raft (`raft::seen`).
const SEEN_WITH_STATE: &str = "seen_with_state";

/// redb page cache size.
const STORE_CACHE_BYTES: usize = 8 << 20;

/// Most appends grouped into one transaction.
const GROUP: usize = 1024;

fn log_read_err(e: &dyn std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError {
    StorageError::IO {
        source: StorageIOError::new(subject, verb, AnyError::error(e.to_string())),
    }
}

/// The tail of the log held in memory, by index: entries handed to the
/// writer but not yet committed (with the sequence number of the append that
/// wrote them), then, once committed, the newest [`RECENT`] of them marked
/// [`DURABLE`]. Openraft reads each entry back right after it commits (to
/// apply it, and to send it to followers); serving that from memory saves
/// decoding what was just encoded. The map always holds a contiguous suffix
/// of the log: appends add at the end, and only the oldest durable entries
/// are dropped.
type Pending = Arc<Mutex<BTreeMap<u64, (u64, Held)>>>;

/// An entry of the in-memory tail and the size of its encoding.
#[derive(Clone)]
struct Held {
    entry: Entry,
    bytes: usize,
}

/// The most bytes of entries handed out for one AppendEntries (at least one
/// entry always goes). openraft sends whatever the log reader returns in one
/// RPC, which must reach the follower, be written and fsynced within one
/// heartbeat interval; a follower that fell behind is sent its backlog in
/// pieces of this size instead of one message of every missing entry.
pub const APPEND_BYTES: usize = 512 << 10;

/// Marks a committed entry kept in the in-memory tail.
const DURABLE: u64 = u64::MAX;

/// Committed entries kept in memory. A rate-limit sync entry holds up to
/// 10,000 cells (under a MiB), so this bounds the tail to a few MiB.
const RECENT: usize = 8;

/// What a deletion records as the last purged log id.
enum Purged {
    Id(LogId),
    /// The id of the entry at this index (read before it is deleted).
    Index(u64),
}

/// Entries deleted per transaction when purging, so appends queued behind
/// a purge wait for one small transaction, not for the whole purge.
const PURGE_CHUNK: u64 = 256;

enum Job {
    Append {
        seq: u64,
        entries: Vec<(u64, Vec<u8>)>,
        callback: LogFlushed<TypeConfig>,
    },
    Delete {
        range: (Bound<u64>, Bound<u64>),
        purged: Option<Purged>,
        /// Told the outcome, if anyone waits for it (a purge does not).
        done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    },
}

/// Where log writes are carried out.
#[derive(Clone)]
enum Writer {
    /// On the writer thread, in groups (a server).
    Thread(mpsc::Sender<Job>),
    /// In the caller, one at a time: the simulated cluster, whose paused
    /// clock must not move on while a write is in flight on another thread.
    Inline,
}

/// A storage backend the caller keeps a handle on.
#[derive(Debug)]
struct Shared(Arc<dyn StorageBackend>);

impl StorageBackend for Shared {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
}

/// The file and the typed operations on it. Cloning shares the file and the
/// writer thread (which ends when the last clone is dropped).
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    pending: Pending,
    writer: Writer,
    next_seq: Arc<AtomicU64>,
    /// The last purged log id as openraft was told, ahead of the writer
    /// (purges are carried out in the background): reads never return
    /// entries at or below it, and the log state reports it.
    purged: Arc<Mutex<Option<LogId>>>,
}

impl Store {
    /// Opens (or creates) `dir/arbiter.redb` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Self, redb::DatabaseError> {
        Self::open_with(dir, false, None)
    }

    /// [`open`](Self::open), or with `inline`, without a writer thread:
    /// every log write is carried out by the call that makes it; and with
    /// a `disk`, on it rather than in `dir` (the simulated cluster's disks,
    /// which can lose power).
    pub fn open_with(
        dir: &Path,
        inline: bool,
        disk: Option<Arc<dyn StorageBackend>>,
    ) -> Result<Self, redb::DatabaseError> {
        // redb's page cache defaults to 1 GiB; the log is written once and
        // read back rarely (replication, restarts), so a small cache keeps
        // the node's memory for state.
        let mut builder = Database::builder();
        builder.set_cache_size(STORE_CACHE_BYTES);
        let db = Arc::new(match disk {
            Some(disk) => builder.create_with_backend(Shared(disk))?,
            None => builder.create(dir.join("arbiter.redb"))?,
        });
        let pending: Pending = Arc::default();
        let writer = if inline {
            Writer::Inline
        } else {
            let (writer, jobs) = mpsc::channel();
            let (db, pending) = (db.clone(), pending.clone());
            std::thread::Builder::new()
                .name("arbiter-log-writer".into())
                .spawn(move || write_thread(db, pending, jobs))
                .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
            Writer::Thread(writer)
        };
        Ok(Self {
            db,
            pending,
            writer,
            next_seq: Arc::default(),
            purged: Arc::default(),
        })
    }

    /// Hands `job` to the writer; false if the writer thread has stopped.
    fn submit(&self, job: Job) -> bool {
        match &self.writer {
            Writer::Thread(jobs) => jobs.send(job).is_ok(),
            Writer::Inline => {
                writer::run(&self.db, &self.pending, vec![job]);
                true
            }
        }
    }

    fn json<T: Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).expect("raft and engine types serialize to JSON")
    }

    fn get_meta<T: DeserializeOwned>(
        &self,
        key: &str,
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, StorageError> {
        match self.get_meta_bytes(key, subject.clone())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| io_err(subject, ErrorVerb::Read, e)),
            None => Ok(None),
        }
    }

    fn get_meta_bytes(
        &self,
        key: &str,
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let read = |e: &dyn std::fmt::Display| io_err(subject.clone(), ErrorVerb::Read, e);
        let tx = self.db.begin_read().map_err(|e| read(&e))?;
        let table = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(read(&e)),
        };
        let value = table.get(key).map_err(|e| read(&e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Writes meta values (None deletes) in one transaction, fsynced when
    /// `durable`; otherwise it becomes durable with the next fsynced commit.
    fn put_meta(
        &self,
        values: &[(&str, Option<Vec<u8>>)],
        subject: ErrorSubject<NodeId>,
        durable: bool,
    ) -> Result<(), StorageError> {
        let write = |e: &dyn std::fmt::Display| io_err(subject.clone(), ErrorVerb::Write, e);
        let mut tx = self.db.begin_write().map_err(|e| write(&e))?;
        if !durable {
            tx.set_durability(redb::Durability::None)
                .map_err(|e| write(&e))?;
        }
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

    /// The snapshot as an earlier release stored it (its meta, and the
    /// JSON document), if there is one. Snapshots are files now
    /// ([`SnapshotDir`]).
    pub fn legacy_snapshot(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
        let subject = ErrorSubject::Snapshot(None);
        let meta: Option<SnapshotMeta> = self.get_meta(SNAPSHOT_META, subject.clone())?;
        let data = match self.get_meta_bytes(SNAPSHOT_DATA, subject.clone())? {
            Some(v) => Some(
                crate::raft::compat::snapshot_bytes(v)
                    .map_err(|e| io_err(subject, ErrorVerb::Read, e))?,
            ),
            None => None,
        };
        Ok(meta.zip(data))
    }

    /// Deletes the legacy snapshot once it was rewritten as a file.
    pub fn drop_legacy_snapshot(&self) -> Result<(), StorageError> {
        self.put_meta(
            &[(SNAPSHOT_META, None), (SNAPSHOT_DATA, None)],
            ErrorSubject::Snapshot(None),
            true,
        )
    }

    /// Stores a snapshot as earlier releases did, to test reading it.
    #[cfg(test)]
    pub fn save_legacy_snapshot(
        &self,
        meta: &SnapshotMeta,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.put_meta(
            &[
                (SNAPSHOT_META, Some(Self::json(meta))),
                (SNAPSHOT_DATA, Some(data.to_vec())),
            ],
            ErrorSubject::Snapshot(Some(meta.signature())),
            true,
        )
    }

    /// Runs `f` on the log table in a read transaction; `None` when the
    /// table does not exist yet (nothing was ever appended).
    fn read_log<R>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<u64, &'static [u8]>) -> Result<R, StorageError>,
    ) -> Result<Option<R>, StorageError> {
        let tx = self.db.begin_read().map_err(|e| log_read_err(&e))?;
        match tx.open_table(LOG) {
            Ok(table) => f(&table).map(Some),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(log_read_err(&e)),
        }
    }

    /// Committed entries in the range.
    fn committed_entries(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<BTreeMap<u64, Entry>, StorageError> {
        let entries = self.read_log(|table| {
            let mut out = BTreeMap::new();
            for item in table
                .range::<u64>((start, end))
                .map_err(|e| log_read_err(&e))?
            {
                let (k, v) = item.map_err(|e| log_read_err(&e))?;
                out.insert(
                    k.value(),
                    decode_entry(v.value()).map_err(|e| log_read_err(&e))?,
                );
            }
            Ok(out)
        })?;
        Ok(entries.unwrap_or_default())
    }

    /// Entries in the range: from the in-memory tail alone when it reaches
    /// back to the range's start, else committed ones overlaid with the tail.
    fn entries(&self, start: Bound<u64>, end: Bound<u64>) -> Result<Vec<Entry>, StorageError> {
        let floor = self.first_unpurged();
        let start = match start {
            Bound::Included(i) if i >= floor => Bound::Included(i),
            Bound::Excluded(i) if i.saturating_add(1) >= floor => Bound::Excluded(i),
            _ => Bound::Included(floor),
        };
        let lo = match start {
            Bound::Included(i) => i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let empty = match end {
            Bound::Included(e) => lo > e,
            Bound::Excluded(e) => lo >= e,
            Bound::Unbounded => false,
        };
        if empty {
            return Ok(Vec::new());
        }
        if let Some(hit) = from_tail(
            &self.pending.lock().unwrap_or_else(|e| e.into_inner()),
            start,
            end,
        ) {
            return Ok(hit.into_iter().map(|h| h.entry).collect());
        }
        let mut out = self.committed_entries(start, end)?;
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (i, (_, h)) in p.range((start, end)) {
            out.insert(*i, h.entry.clone());
        }
        Ok(out.into_values().collect())
    }

    /// Entries from `start` (up to `end`, exclusive) whose encodings add up
    /// to at most `budget` bytes, and always at least the first.
    fn limited_entries(
        &self,
        start: u64,
        end: u64,
        budget: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = start.max(self.first_unpurged());
        // The tail first (it is a contiguous suffix of the log, so every
        // index below its first one is in the file).
        let (tail_first, tail) = {
            let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let first = p.first_key_value().map_or(u64::MAX, |(i, _)| *i);
            let mut taken = Vec::new();
            let mut bytes = 0;
            for (_, (_, h)) in p.range(start.max(first)..end.max(start.max(first))) {
                if !taken.is_empty() && bytes + h.bytes > budget {
                    break;
                }
                bytes += h.bytes;
                taken.push(h.clone());
            }
            (first, taken)
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        let file_end = end.min(tail_first);
        if start < file_end {
            let over_budget = self.read_log(|table| {
                for item in table
                    .range::<u64>(start..file_end)
                    .map_err(|e| log_read_err(&e))?
                {
                    let (_, v) = item.map_err(|e| log_read_err(&e))?;
                    let v = v.value();
                    if !out.is_empty() && bytes + v.len() > budget {
                        return Ok(true);
                    }
                    bytes += v.len();
                    out.push(decode_entry(v).map_err(|e| log_read_err(&e))?);
                }
                Ok(false)
            })?;
            if over_budget == Some(true) {
                return Ok(out);
            }
        }
        for h in tail {
            if !out.is_empty() && bytes + h.bytes > budget {
                break;
            }
            bytes += h.bytes;
            out.push(h.entry);
        }
        Ok(out)
    }

    /// The id of the last entry in the log (or the last purged one when
    /// the log is empty): what a vote compares.
    pub fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let pending_last = {
            let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.last_key_value().map(|(_, (_, h))| h.entry.log_id)
        };
        let last = pending_last.max(self.last_committed_id()?);
        let purged = *self.purged.lock().unwrap_or_else(|e| e.into_inner());
        let last = last.filter(|l| Some(*l) > purged);
        match last {
            Some(l) => Ok(Some(l)),
            None => {
                let stored: Option<LogId> = self.get_meta(LAST_PURGED, ErrorSubject::Logs)?;
                Ok(stored.max(purged))
            }
        }
    }

    /// The first index not purged.
    fn first_unpurged(&self) -> u64 {
        let p = self.purged.lock().unwrap_or_else(|e| e.into_inner());
        p.map_or(0, |l| l.index + 1)
    }

    /// The lowest index in the file, if any.
    fn first_index(&self) -> Result<Option<u64>, StorageError> {
        let first = self.read_log(|table| {
            let first = table.first().map_err(|e| log_read_err(&e))?;
            Ok(first.map(|(k, _)| k.value()))
        })?;
        Ok(first.flatten())
    }

    fn last_committed_id(&self) -> Result<Option<LogId>, StorageError> {
        let last = self.read_log(|table| match table.last().map_err(|e| log_read_err(&e))? {
            Some((_, v)) => {
                let entry = decode_entry(v.value()).map_err(|e| log_read_err(&e))?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        })?;
        Ok(last.flatten())
    }

    /// Deletes entries with index in `range`: pending ones at once,
    /// committed ones in order behind every earlier append; optionally
    /// records a new last-purged id in the same fsynced transaction.
    async fn delete_logs(
        &self,
        range: (Bound<u64>, Bound<u64>),
        purged: Option<Purged>,
    ) -> Result<(), StorageError> {
        let write = |e: &dyn std::fmt::Display| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let doomed: Vec<u64> = p.range(range).map(|(i, _)| *i).collect();
            for i in doomed {
                p.remove(&i);
            }
        }
        let (done, result) = tokio::sync::oneshot::channel();
        let job = Job::Delete {
            range,
            purged,
            done: Some(done),
        };
        if !self.submit(job) {
            return Err(write(&"the log writer stopped"));
        }
        result
            .await
            .map_err(|_| write(&"the log writer stopped"))?
            .map_err(|e| write(&e))
    }
}

#[cfg(test)]
mod tests;
