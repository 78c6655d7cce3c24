//! The log writer thread: group commits of appends, and deletions, in the
//! order they were queued.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{mpsc, Arc};

use redb::{Database, ReadableTable};

use super::{Job, Pending, Purged, Store, DURABLE, GROUP, LAST_PURGED, LOG, META, RECENT};
use crate::raft::codec::decode_entry;

pub(super) fn write_thread(db: Arc<Database>, pending: Pending, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        run(&db, &pending, batch);
    }
}

/// Carries out `batch` in order: consecutive appends commit together; a
/// delete ends a group.
pub(super) fn run(db: &Database, pending: &Pending, batch: Vec<Job>) {
    let mut appends = Vec::new();
    for job in batch {
        match job {
            Job::Append { .. } => appends.push(job),
            Job::Delete {
                range,
                purged,
                done,
            } => {
                commit_appends(db, pending, std::mem::take(&mut appends));
                let result = delete(db, range, purged);
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
    commit_appends(db, pending, appends);
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
pub(super) fn keep_recent<E>(tail: &mut BTreeMap<u64, (u64, E)>) {
    let durable = tail.values().take_while(|(s, _)| *s == DURABLE).count();
    for _ in RECENT..durable {
        tail.pop_first();
    }
}

/// The entries in the range, if the in-memory tail reaches back to its start
/// (the tail is a contiguous suffix of the log, so it then holds them all).
pub(super) fn from_tail<E: Clone>(
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
