//! The store against openraft's conformance suite, and its own bounds.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use openraft::storage::RaftLogStorage;
use openraft::testing::{StoreBuilder, Suite};

use super::writer::{from_tail, keep_recent};
use super::*;
use crate::engine::{Engine, EngineConfig};
use crate::raft::codec::encode_entry;
use crate::storage::state_machine::{Observer, StateMachine};

/// Removes the store's directory when the suite is done with it.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

static N: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty directory, removed when the guard is dropped.
fn temp_dir() -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "arbiter-store-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    TempDir(dir)
}

struct Builder;

impl StoreBuilder<TypeConfig, Store, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, Store, StateMachine), StorageError> {
        let dir = temp_dir();
        let store = Store::open(&dir.0).expect("open store");
        let engine = Arc::new(Engine::new(EngineConfig::default()));
        let snapshots = SnapshotDir::open(&dir.0).expect("open snapshot directory");
        let sm = StateMachine::open(engine, store.clone(), snapshots, Observer::none(), 1)?;
        Ok((dir, store, sm))
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
            quota: Default::default(),
            principal: String::new(),
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
    let dir = temp_dir();
    let store = Store::open(&dir.0).unwrap();
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
    let dir = temp_dir();
    let mut store = Store::open(&dir.0).unwrap();
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

#[test]
fn both_legacy_snapshot_forms_are_read() {
    let dir = temp_dir();
    let store = Store::open(&dir.0).unwrap();
    let meta = SnapshotMeta {
        last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), 7)),
        last_membership: Default::default(),
        snapshot_id: "1-1-7-1".into(),
    };
    // The release before snapshot files stored the JSON document's bytes.
    let data = br#"{"state":"of the engine"}"#.to_vec();
    store.save_legacy_snapshot(&meta, &data).unwrap();
    assert_eq!(
        store.legacy_snapshot().unwrap(),
        Some((meta.clone(), data.clone()))
    );

    // The first releases stored a JSON array of the byte values.
    store
        .put_meta(
            &[(SNAPSHOT_DATA, Some(Store::json(&data)))],
            ErrorSubject::Snapshot(None),
            true,
        )
        .unwrap();
    assert_eq!(store.legacy_snapshot().unwrap(), Some((meta, data)));
}

/// A leader of an earlier release sends its snapshot as one JSON document:
/// it is installed, and rewritten in today's format so it can be sent on.
#[tokio::test]
async fn a_json_snapshot_from_an_earlier_leader_is_installed_and_rewritten() {
    use openraft::storage::RaftStateMachine;
    use tokio::io::AsyncWriteExt;

    let source = Engine::new(EngineConfig::default());
    let acquire = crate::engine::Acquire {
        quota: Default::default(),
        principal: String::new(),
        name: "old-lease".into(),
        holder: "h".into(),
        ttl_ms: 60_000,
    };
    source.execute(acquire, 1_000).unwrap();
    let json = serde_json::json!({
        "last_applied": null,
        "last_now": 1_000,
        "membership": crate::raft::StoredMembership::default(),
        "engine": source.snapshot(),
    });
    let meta = SnapshotMeta {
        last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(2, 1), 9)),
        last_membership: Default::default(),
        snapshot_id: "2-1-9-1".into(),
    };

    let dir = temp_dir();
    let store = Store::open(&dir.0).unwrap();
    let engine = Arc::new(Engine::new(EngineConfig::default()));
    let snapshots = SnapshotDir::open(&dir.0).unwrap();
    let mut sm = StateMachine::open(engine.clone(), store, snapshots, Observer::none(), 1).unwrap();
    let mut file = sm.begin_receiving_snapshot().await.unwrap();
    file.write_all(&serde_json::to_vec(&json).unwrap())
        .await
        .unwrap();
    file.flush().await.unwrap();
    sm.install_snapshot(&meta, file).await.unwrap();

    assert_eq!(engine.lease("old-lease", 1_500).unwrap().holder, "h");
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, meta);
    let bytes = std::fs::read(dir.0.join("snapshots/current.snap")).unwrap();
    assert!(bytes.starts_with(crate::raft::snapshot::MAGIC));
    // No piece of the received file is left behind.
    let files = std::fs::read_dir(dir.0.join("snapshots")).unwrap().count();
    assert_eq!(files, 1);
}

/// A node skips the cells of its own rate-limit syncs when applying them
/// (memory holds newer state), but not the time they carry: the lease
/// clock must be the same on every member, or one member sees a lease
/// lapse that another extends (seen in the simulated cluster, seed 82:
/// two members applied an acquire the leader refused).
#[tokio::test]
async fn every_member_applies_the_same_lease_time_whoever_sent_the_sync() {
    use openraft::storage::RaftStateMachine;

    let entry = |index: u64, now_ms: u64, command, sync_origin| Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: openraft::EntryPayload::Normal(crate::raft::Request {
            now_ms,
            commands: vec![command],
            sync_origin,
        }),
    };
    let acquire = |holder: &str| {
        crate::engine::Command::Acquire(crate::engine::Acquire {
            quota: Default::default(),
            principal: String::new(),
            name: "billing".into(),
            holder: holder.into(),
            ttl_ms: 100,
        })
    };
    // The owner that sent the sync (boot 7) stamped it a little ahead of
    // the leader's next stamp.
    let log = vec![
        entry(1, 1_000, acquire("a"), None),
        entry(
            2,
            1_150,
            crate::engine::Command::SyncCells {
                cells: Vec::new(),
                decider: Some(2),
            },
            Some(7),
        ),
        entry(3, 1_080, acquire("b"), None),
    ];
    let mut holders = Vec::new();
    for boot_id in [7, 8] {
        let dir = temp_dir();
        let store = Store::open(&dir.0).unwrap();
        let engine = Arc::new(Engine::new(EngineConfig::default()));
        let snapshots = SnapshotDir::open(&dir.0).unwrap();
        let mut sm =
            StateMachine::open(engine.clone(), store, snapshots, Observer::none(), boot_id)
                .unwrap();
        sm.apply(log.clone()).await.unwrap();
        let lease = engine.lease("billing", 1_090).map(|l| l.holder);
        holders.push((boot_id, lease));
    }
    assert_eq!(
        holders,
        [(7, Some("b".to_string())), (8, Some("b".to_string()))],
        "the lease lapsed at 1,100 on the sync's time, 1,150, on both"
    );
}
