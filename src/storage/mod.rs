//! The embedded store: Raft log, vote and snapshots in one redb file.
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
//! purge markers and the snapshot's meta are JSON.

// openraft's storage traits return its (large) `StorageError` by value;
// helpers here return the same type so errors pass through unchanged.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::raft::codec::{decode_entry, encode_entry};
use crate::raft::{Entry, LogId, NodeId, SnapshotMeta, StorageError, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

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

/// The file and the typed operations on it. Cloning shares the file and the
/// writer thread (which ends when the last clone is dropped).
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    pending: Pending,
    writer: mpsc::Sender<Job>,
    next_seq: Arc<AtomicU64>,
    /// The last purged log id as openraft was told, ahead of the writer
    /// (purges are carried out in the background): reads never return
    /// entries at or below it, and the log state reports it.
    purged: Arc<Mutex<Option<LogId>>>,
}

fn write_thread(db: Arc<Database>, pending: Pending, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        // Consecutive appends commit together; a delete ends a group.
        let mut appends = Vec::new();
        for job in batch {
            match job {
                Job::Append { .. } => appends.push(job),
                Job::Delete {
                    range,
                    purged,
                    done,
                } => {
                    commit_appends(&db, &pending, std::mem::take(&mut appends));
                    let result = delete(&db, range, purged);
                    match done {
                        Some(done) => drop(done.send(result)),
                        None => {
                            if let Err(e) = result {
                                tracing::error!(error = %e, "purging the log failed");
                            }
                        }
                    }
                }
            }
        }
        commit_appends(&db, &pending, appends);
    }
}

fn commit_appends(db: &Database, pending: &Pending, appends: Vec<Job>) {
    if appends.is_empty() {
        return;
    }
    tracing::trace!(appends = appends.len(), "committing a group of log appends");
    let result = (|| -> Result<(), String> {
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = tx.open_table(LOG).map_err(|e| e.to_string())?;
            for job in &appends {
                if let Job::Append { entries, .. } = job {
                    for (index, bytes) in entries {
                        table
                            .insert(*index, bytes.as_slice())
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| e.to_string())
    })();
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    for job in appends {
        if let Job::Append {
            seq,
            entries,
            callback,
        } = job
        {
            if result.is_ok() {
                for (index, _) in &entries {
                    if let Some((s, _)) = p.get_mut(index).filter(|(s, _)| *s == seq) {
                        *s = DURABLE;
                    }
                }
            }
            callback.log_io_completed(result.clone().map_err(std::io::Error::other));
        }
    }
    keep_recent(&mut p);
}

/// Drops the oldest committed entries of the in-memory tail beyond
/// [`RECENT`]; entries not yet committed always stay.
fn keep_recent<E>(tail: &mut BTreeMap<u64, (u64, E)>) {
    let durable = tail.values().take_while(|(s, _)| *s == DURABLE).count();
    for _ in RECENT..durable {
        tail.pop_first();
    }
}

/// The entries in the range, if the in-memory tail reaches back to its start
/// (the tail is a contiguous suffix of the log, so it then holds them all).
fn from_tail<E: Clone>(
    tail: &BTreeMap<u64, (u64, E)>,
    start: Bound<u64>,
    end: Bound<u64>,
) -> Option<Vec<E>> {
    let from = match start {
        Bound::Included(i) => i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let (first, _) = tail.first_key_value()?;
    (*first <= from).then(|| {
        tail.range((start, end))
            .map(|(_, (_, e))| e.clone())
            .collect()
    })
}

fn delete(
    db: &Database,
    range: (Bound<u64>, Bound<u64>),
    purged: Option<Purged>,
) -> Result<(), String> {
    let tx = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = tx.open_table(LOG).map_err(|e| e.to_string())?;
        // The id recorded as last purged, in the same transaction as the
        // deletion, so a crash between chunks leaves no hole.
        let purged = match purged {
            None => None,
            Some(Purged::Id(id)) => Some(id),
            Some(Purged::Index(i)) => match table.get(i).map_err(|e| e.to_string())? {
                Some(v) => Some(decode_entry(v.value())?.log_id),
                None => None,
            },
        };
        table
            .retain_in::<u64, _>(range, |_, _| false)
            .map_err(|e| e.to_string())?;
        if let Some(p) = purged {
            let mut meta = tx.open_table(META).map_err(|e| e.to_string())?;
            meta.insert(LAST_PURGED, Store::json(&p).as_slice())
                .map_err(|e| e.to_string())?;
        }
    }
    tx.commit().map_err(|e| e.to_string())
}

impl Store {
    /// Opens (or creates) `dir/arbiter.redb` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Self, redb::DatabaseError> {
        // redb's page cache defaults to 1 GiB; the log is written once and
        // read back rarely (replication, restarts), so a small cache keeps
        // the node's memory for state.
        let db = Arc::new(
            Database::builder()
                .set_cache_size(STORE_CACHE_BYTES)
                .create(dir.join("arbiter.redb"))?,
        );
        let pending: Pending = Arc::default();
        let (writer, jobs) = mpsc::channel();
        {
            let (db, pending) = (db.clone(), pending.clone());
            std::thread::Builder::new()
                .name("arbiter-log-writer".into())
                .spawn(move || write_thread(db, pending, jobs))
                .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
        }
        Ok(Self {
            db,
            pending,
            writer,
            next_seq: Arc::default(),
            purged: Arc::default(),
        })
    }

    fn json<T: Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).expect("raft and engine types serialize to JSON")
    }

    fn get_meta<T: DeserializeOwned>(
        &self,
        key: &str,
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, StorageError> {
        let read = |e: &dyn std::fmt::Display| io_err(subject.clone(), ErrorVerb::Read, e);
        let tx = self.db.begin_read().map_err(|e| read(&e))?;
        let table = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(read(&e)),
        };
        let value = table.get(key).map_err(|e| read(&e))?;
        match value {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| read(&e)),
            None => Ok(None),
        }
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

    /// The stored snapshot, if any: its meta and data.
    pub fn snapshot(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
        let meta: Option<SnapshotMeta> =
            self.get_meta(SNAPSHOT_META, ErrorSubject::Snapshot(None))?;
        let data: Option<Vec<u8>> = self.get_meta(SNAPSHOT_DATA, ErrorSubject::Snapshot(None))?;
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
        self.writer
            .send(Job::Delete {
                range,
                purged,
                done: Some(done),
            })
            .map_err(|_| write(&"the log writer stopped"))?;
        result
            .await
            .map_err(|_| write(&"the log writer stopped"))?
            .map_err(|e| write(&e))
    }
}

impl RaftLogReader<TypeConfig> for Store {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.entries(range.start_bound().cloned(), range.end_bound().cloned())
    }

    /// What openraft sends in one AppendEntries: bounded by [`APPEND_BYTES`].
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        self.limited_entries(start, end, APPEND_BYTES)
    }
}

impl RaftLogStorage<TypeConfig> for Store {
    type LogReader = Store;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let stored: Option<LogId> = self.get_meta(LAST_PURGED, ErrorSubject::Logs)?;
        let last_purged_log_id = stored.max(*self.purged.lock().unwrap_or_else(|e| e.into_inner()));
        let last_log_id = self.last_log_id()?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(&[(VOTE, Some(Self::json(vote)))], ErrorSubject::Vote, true)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Only a hint for faster recovery (the log is the truth) and called
        // on every commit, so not fsynced on its own.
        self.put_meta(
            &[(COMMITTED, committed.map(|c| Self::json(&c)))],
            ErrorSubject::Store,
            false,
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
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut encoded = Vec::new();
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for entry in entries {
                let bytes = encode_entry(&entry);
                let len = bytes.len();
                encoded.push((entry.log_id.index, bytes));
                p.insert(entry.log_id.index, (seq, Held { entry, bytes: len }));
            }
        }
        self.writer
            .send(Job::Append {
                seq,
                entries: encoded,
                callback,
            })
            .map_err(|_| {
                io_err(
                    ErrorSubject::Logs,
                    ErrorVerb::Write,
                    "the log writer stopped",
                )
            })
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.delete_logs((Bound::Included(log_id.index), Bound::Unbounded), None)
            .await
    }

    /// Deletes the log up to `log_id` behind every earlier append, in
    /// chunks of `PURGE_CHUNK` entries, and returns without waiting: a
    /// purge after a snapshot can cover thousands of entries, and openraft
    /// awaits this call on its main loop (no heartbeats meanwhile). The
    /// snapshot covering them is already stored; each chunk records its
    /// last id as purged, so the log never has a hole.
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let write = |e: &dyn std::fmt::Display| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        {
            let mut purged = self.purged.lock().unwrap_or_else(|e| e.into_inner());
            *purged = (*purged).max(Some(log_id));
        }
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let doomed: Vec<u64> = p.range(..=log_id.index).map(|(i, _)| *i).collect();
            for i in doomed {
                p.remove(&i);
            }
        }
        let first = self.first_index()?.unwrap_or(log_id.index);
        let mut start = first.min(log_id.index);
        loop {
            let end = start.saturating_add(PURGE_CHUNK - 1).min(log_id.index);
            let last = end == log_id.index;
            self.writer
                .send(Job::Delete {
                    range: (
                        if start == first {
                            Bound::Unbounded
                        } else {
                            Bound::Included(start)
                        },
                        Bound::Included(end),
                    ),
                    purged: Some(if last {
                        Purged::Id(log_id)
                    } else {
                        Purged::Index(end)
                    }),
                    done: None,
                })
                .map_err(|_| write(&"the log writer stopped"))?;
            if last {
                return Ok(());
            }
            start = end + 1;
        }
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

    #[test]
    fn the_tail_keeps_uncommitted_entries_and_the_newest_committed_ones() {
        // Indices 1..=20 committed, 21..=23 still pending.
        let mut tail: BTreeMap<u64, (u64, u64)> = (1..=20).map(|i| (i, (DURABLE, i))).collect();
        tail.extend((21..=23).map(|i| (i, (7, i))));
        keep_recent(&mut tail);
        let kept: Vec<u64> = tail.keys().copied().collect();
        let want: Vec<u64> = (21 - RECENT as u64..=23).collect();
        assert_eq!(kept, want);
        // Reads reaching back before the tail go to the store...
        assert_eq!(from_tail(&tail, Bound::Included(5), Bound::Unbounded), None);
        assert_eq!(
            from_tail(
                &BTreeMap::<u64, (u64, u64)>::new(),
                Bound::Unbounded,
                Bound::Unbounded
            ),
            None
        );
        // ...the rest are served from memory, bounds respected.
        assert_eq!(
            from_tail(&tail, Bound::Included(20), Bound::Excluded(23)),
            Some(vec![20, 21, 22])
        );
        assert_eq!(
            from_tail(&tail, Bound::Excluded(21), Bound::Unbounded),
            Some(vec![22, 23])
        );
    }

    /// An entry of about `size` bytes (a lease write with a long holder).
    fn entry_of(index: u64, size: usize) -> Entry {
        let request = crate::raft::Request {
            now_ms: 1,
            commands: vec![crate::engine::Command::Acquire(crate::engine::Acquire {
                name: "n".into(),
                holder: "h".repeat(size),
                ttl_ms: 1,
            })],
            sync_origin: None,
        };
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: openraft::EntryPayload::Normal(request),
        }
    }

    #[test]
    fn appends_are_handed_out_in_pieces_bounded_by_bytes() {
        let dir = std::env::temp_dir().join(format!(
            "arbiter-store-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _guard = TempDir(dir.clone());
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir).unwrap();
        // Entries 1..=10 in the file, 11..=14 in the in-memory tail.
        let tx = store.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(LOG).unwrap();
            for i in 1..=10 {
                t.insert(i, encode_entry(&entry_of(i, 1000)).as_slice())
                    .unwrap();
            }
        }
        tx.commit().unwrap();
        {
            let mut p = store.pending.lock().unwrap();
            for i in 11..=14 {
                let entry = entry_of(i, 1000);
                let bytes = encode_entry(&entry).len();
                p.insert(i, (DURABLE, Held { entry, bytes }));
            }
        }
        // Every entry here encodes to `size` bytes.
        let size = encode_entry(&entry_of(1, 1000)).len();
        assert!((1..=14).all(|i| encode_entry(&entry_of(i, 1000)).len() == size));
        let indices = |start, end, budget| -> Vec<u64> {
            let got = store.limited_entries(start, end, budget).unwrap();
            got.iter().map(|e| e.log_id.index).collect()
        };
        // Unbounded: everything, file then tail, contiguous.
        assert_eq!(indices(1, 15, usize::MAX), (1..=14).collect::<Vec<_>>());
        // As many whole entries as fit the budget...
        assert_eq!(indices(1, 15, 3 * size), vec![1, 2, 3]);
        assert_eq!(indices(9, 15, 4 * size), vec![9, 10, 11, 12]);
        assert_eq!(indices(9, 15, 4 * size - 1), vec![9, 10, 11]);
        assert_eq!(indices(12, 15, 2 * size), vec![12, 13]);
        // ...but always at least one, however small the budget.
        assert_eq!(indices(5, 15, 1), vec![5]);
        assert_eq!(indices(13, 15, 1), vec![13]);
        // The range's end is respected.
        assert_eq!(indices(8, 12, usize::MAX), vec![8, 9, 10, 11]);
    }

    #[test]
    fn a_purge_returns_at_once_and_is_carried_out_in_chunks_behind_it() {
        let dir = std::env::temp_dir().join(format!(
            "arbiter-store-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _guard = TempDir(dir.clone());
        std::fs::create_dir_all(&dir).unwrap();
        let mut store = Store::open(&dir).unwrap();
        let tx = store.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(LOG).unwrap();
            for i in 1..=1000 {
                t.insert(i, encode_entry(&entry_of(i, 10)).as_slice())
                    .unwrap();
            }
        }
        tx.commit().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let upto = entry_of(700, 10).log_id;
        rt.block_on(store.purge(upto)).unwrap();
        // At once: nothing at or below the purged id is handed out, and the
        // log state reports it.
        let got = store
            .entries(Bound::Included(600), Bound::Excluded(705))
            .unwrap();
        let first = got.first().map(|e| e.log_id.index);
        assert_eq!((first, got.len()), (Some(701), 4));
        assert_eq!(
            store.limited_entries(1, 1001, usize::MAX).unwrap().len(),
            300
        );
        let state = rt.block_on(store.get_log_state()).unwrap();
        assert_eq!(state.last_purged_log_id, Some(upto));
        // Behind it (a waited-for deletion queues after the purge's
        // chunks): the file holds 701.. and records the purge.
        rt.block_on(store.delete_logs((Bound::Included(5000), Bound::Unbounded), None))
            .unwrap();
        assert_eq!(store.first_index().unwrap(), Some(701));
        let stored: Option<LogId> = store.get_meta(LAST_PURGED, ErrorSubject::Logs).unwrap();
        assert_eq!(stored, Some(upto));
    }

    /// openraft's conformance suite for log storage and state machines.
    #[test]
    fn openraft_storage_suite() -> Result<(), StorageError> {
        Suite::test_all(Builder)
    }
}
