//! openraft's log storage traits, on the [`Store`].

// openraft's storage traits return its (large) `StorageError` by value.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::Ordering;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};

use super::{
    io_err, Held, Job, Purged, Store, APPEND_BYTES, COMMITTED, LAST_PURGED, PURGE_CHUNK, VOTE,
};
use crate::raft::codec::encode_entry;
use crate::raft::{Entry, LogId, NodeId, StorageError, TypeConfig};

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
        let job = Job::Append {
            seq,
            entries: encoded,
            callback,
        };
        if self.submit(job) {
            Ok(())
        } else {
            Err(io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                "the log writer stopped",
            ))
        }
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
            let job = Job::Delete {
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
            };
            if !self.submit(job) {
                return Err(write(&"the log writer stopped"));
            }
            if last {
                return Ok(());
            }
            start = end + 1;
        }
    }
}
