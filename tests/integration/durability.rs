//! Acknowledged writes survive `kill -9` and restarts, through the log and
//! through snapshots.

use arbiter::proto::{
    record, AcquireRequest, BeginRequest, CompleteRequest, GetLeaseRequest, GetRecordRequest,
    Outcome, ReleaseRequest,
};

use crate::support::{fresh_dir, Server};

fn acquire(name: &str, holder: &str) -> AcquireRequest {
    AcquireRequest {
        name: name.into(),
        holder: holder.into(),
        ttl_ms: 600_000,
    }
}

fn begin(key: &str) -> BeginRequest {
    BeginRequest {
        key: key.into(),
        fingerprint: b"fp".to_vec(),
        lock_ttl_ms: 600_000,
        retention_ms: 0,
    }
}

/// Writes `n` leases and completed records, kills the server with SIGKILL,
/// restarts it on the same directory and checks every one is back.
async fn survives_kill9(extra: &[&str], n: usize) {
    let dir = fresh_dir();
    let mut first = Server::start_in(&dir, extra);
    let mut leases = first.leases().await;
    let mut idem = first.idem().await;
    let mut tokens = Vec::new();
    let mut attempts = Vec::new();
    for i in 0..n {
        let l = leases
            .acquire(acquire(&format!("lease-{i}"), "a"))
            .await
            .unwrap()
            .into_inner();
        tokens.push(l.lease.unwrap().fencing_token);
        let b = idem
            .begin(begin(&format!("pay-{i}")))
            .await
            .unwrap()
            .into_inner();
        idem.complete(CompleteRequest {
            key: format!("pay-{i}"),
            attempt: b.attempt,
            response: format!("receipt-{i}").into_bytes(),
        })
        .await
        .unwrap();
        attempts.push(b.attempt);
    }
    // A released lease: its token must never be handed out again.
    let gone = leases
        .acquire(acquire("released", "a"))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    leases
        .release(ReleaseRequest {
            name: "released".into(),
            holder: "a".into(),
            fencing_token: gone.fencing_token,
        })
        .await
        .unwrap();
    let pending = idem.begin(begin("pending")).await.unwrap().into_inner();
    first.kill9();

    let second = Server::start_in(&dir, extra);
    let mut leases = second.leases().await;
    let mut idem = second.idem().await;
    for (i, token) in tokens.iter().enumerate() {
        let l = leases
            .get(GetLeaseRequest {
                name: format!("lease-{i}"),
            })
            .await
            .unwrap()
            .into_inner()
            .lease
            .unwrap_or_else(|| panic!("lease-{i} lost"));
        assert_eq!((l.holder.as_str(), l.fencing_token), ("a", *token));
        let r = idem
            .get(GetRecordRequest {
                key: format!("pay-{i}"),
            })
            .await
            .unwrap()
            .into_inner()
            .record
            .unwrap_or_else(|| panic!("pay-{i} lost"));
        assert_eq!(r.state(), record::State::Completed);
        assert_eq!(r.response, format!("receipt-{i}").into_bytes());
        assert_eq!(r.attempt, attempts[i]);
    }
    let retry = idem.begin(begin("pending")).await.unwrap().into_inner();
    assert_eq!(
        retry.outcome(),
        Outcome::InProgress,
        "the lock survives too"
    );
    assert_eq!(retry.attempt, pending.attempt);
    // Counters continue past everything granted before the crash.
    let next = leases
        .acquire(acquire("new", "b"))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert!(next.fencing_token > gone.fencing_token);
    let fresh = idem.begin(begin("fresh")).await.unwrap().into_inner();
    assert!(fresh.attempt > pending.attempt);
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn acknowledged_writes_survive_kill9_from_the_log() {
    survives_kill9(&[], 5).await;
}

#[tokio::test]
async fn acknowledged_writes_survive_kill9_across_snapshots() {
    // A snapshot every 8 entries: most state comes back from snapshots and
    // the purged log, the tail from the log.
    survives_kill9(&["--snapshot-logs", "8"], 30).await;
}

/// Group commit under a crash: sixteen writers acquire leases as fast as
/// the node commits them (so entries carry many writes each, and one fsync
/// covers them), and the node is killed with SIGKILL while they are in
/// flight. Every acknowledged grant is back after the restart with its
/// holder and token, no token was handed out twice, and the log holds
/// fewer entries than grants (the writes were batched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_killed_mid_flight_lose_no_acknowledged_write() {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    use arbiter::proto::cluster_client::ClusterClient;
    use arbiter::proto::ClusterStatusRequest;

    use crate::support::eventually;

    const WRITERS: usize = 16;
    const BEFORE_KILL: usize = 600;
    let dir = fresh_dir();
    let mut first = Server::start_in(&dir, &[]);
    let acked: Arc<Mutex<BTreeMap<String, (String, u64)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut leases = first.leases().await;
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            // Bounded: the kill ends every writer long before this.
            for i in 0..100_000 {
                let name = format!("w{w}-{i}");
                let holder = format!("h{w}");
                match leases.acquire(acquire(&name, &holder)).await {
                    Ok(r) => {
                        let token = r.into_inner().lease.expect("a grant").fencing_token;
                        acked.lock().unwrap().insert(name, (holder, token));
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    eventually("writes to be acknowledged", || async {
        (acked.lock().unwrap().len() >= BEFORE_KILL).then_some(())
    })
    .await;
    first.kill9();
    for w in writers {
        w.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.len() >= BEFORE_KILL);

    let second = Server::start_in(&dir, &[]);
    let mut leases = second.leases().await;
    let mut tokens = BTreeSet::new();
    for (name, (holder, token)) in &acked {
        let l = leases
            .get(GetLeaseRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner()
            .lease
            .unwrap_or_else(|| panic!("acknowledged {name} lost"));
        assert_eq!(
            (&l.holder, l.fencing_token),
            (holder, *token),
            "{name} came back changed"
        );
        assert!(
            tokens.insert(l.fencing_token),
            "token {token} granted twice"
        );
    }
    let entries = ClusterClient::new(second.channel().await)
        .status(ClusterStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .applied_index;
    assert!(
        entries < acked.len() as u64,
        "{} grants in {entries} log entries: no write was batched",
        acked.len()
    );
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn synced_rate_limit_state_survives_a_restart() {
    use arbiter::proto::cluster_client::ClusterClient;
    use arbiter::proto::{CheckRequest, ClusterStatusRequest};

    use crate::rate_limiter::{lc, tb};
    use crate::support::eventually;

    let dir = fresh_dir();
    let mut first = Server::start_in(&dir, &["--limit-sync-ms", "50"]);
    // A lease write first, so the start-of-term entries are behind us and
    // the next entry after the check is its sync.
    first
        .leases()
        .await
        .acquire(acquire("warm-up", "h"))
        .await
        .unwrap();
    let mut c = first.limits().await;
    let check = |cost| CheckRequest {
        checks: vec![lc("kept", tb(100, 1, 3_600_000), Some(cost))],
        all_or_nothing: false,
    };
    assert_eq!(
        c.check(check(40)).await.unwrap().into_inner().results[0].remaining,
        60
    );
    let mut admin = ClusterClient::new(first.channel().await);
    let before = admin
        .status(ClusterStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .applied_index;
    eventually("the sync entry", || {
        let mut admin = admin.clone();
        async move {
            (admin
                .status(ClusterStatusRequest::default())
                .await
                .ok()?
                .into_inner()
                .applied_index
                > before)
                .then_some(())
        }
    })
    .await;
    first.kill9();
    let second = Server::start_in(&dir, &[]);
    let mut c = second.limits().await;
    let r = c.check(check(0)).await.unwrap().into_inner().results[0];
    assert_eq!(
        r.remaining, 60,
        "the node replays its own syncs after a restart"
    );
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A damaged data directory stops the server at start with an error that
/// says what is damaged; it never panics and never serves part of the
/// state: the store cut short or overwritten at its start, the snapshot
/// cut short or with one byte changed.
// Multi-threaded: the client's connection must answer the server's
// GOAWAY while this thread waits for the server to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_or_snapshot_is_refused_with_a_clear_error() {
    let dir = fresh_dir();
    let mut first = Server::start_in(&dir, &["--snapshot-logs", "5"]);
    let mut leases = first.leases().await;
    for i in 0..20 {
        leases
            .acquire(acquire(&format!("lease-{i:04}"), "h"))
            .await
            .unwrap();
    }
    let snap = dir.join("snapshots").join("current.snap");
    crate::support::eventually("a snapshot on disk", || async {
        snap.exists().then_some(())
    })
    .await;
    assert!(first.terminate().success());
    drop(first);
    type Damage = fn(&std::path::Path);
    let cases: [(&str, Damage, &str); 4] = [
        (
            "arbiter.redb",
            |p| truncate_to_half(p),
            "cannot open the store",
        ),
        ("arbiter.redb", |p| overwrite(p, 0), "cannot open the store"),
        (
            "snapshots/current.snap",
            |p| truncate_to_half(p),
            "is damaged",
        ),
        (
            "snapshots/current.snap",
            |p| change_key_byte(p),
            "do not match its SHA-256",
        ),
    ];
    for (file, damage, want) in cases {
        let copy = fresh_dir();
        crate::cluster::copy_dir(&dir, &copy);
        damage(&copy.join(file));
        let (status, err) = crate::support::refused_start(&copy, &[]);
        let _ = std::fs::remove_dir_all(&copy);
        assert!(!status.success(), "{file}: started on a damaged file");
        assert!(!err.contains("panicked"), "{file}: panicked: {err}");
        assert!(
            err.contains(want),
            "{file}: the error should say {want:?}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn truncate_to_half(p: &std::path::Path) {
    let len = std::fs::metadata(p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
}

fn overwrite(p: &std::path::Path, at: usize) {
    let mut bytes = std::fs::read(p).unwrap();
    let end = (at + 4096).min(bytes.len());
    bytes[at..end].fill(0xff);
    std::fs::write(p, bytes).unwrap();
}

/// Changes one letter of a lease name: the file still decodes.
fn change_key_byte(p: &std::path::Path) {
    let mut bytes = std::fs::read(p).unwrap();
    let at = bytes
        .windows(10)
        .position(|w| w == b"lease-0003")
        .expect("a lease name in the snapshot");
    bytes[at] = b'L';
    std::fs::write(p, bytes).unwrap();
}

/// A node whose disk refuses writes (full, or here a file size limit) must
/// not run on with its Raft core stopped, answering every call UNAVAILABLE
/// and never recovering: it exits non-zero naming the error, so its
/// supervisor (a StatefulSet, a container restart policy) starts it again
/// once the disk has room. The nemesis suite's disk-full fault found this.
#[tokio::test]
async fn a_node_whose_writes_fail_exits_with_an_error() {
    let mut server = Server::start_with_file_size_limit(&[], 4 << 20);
    let mut idem = server.idem().await;
    let response = vec![7u8; 64 << 10];
    let mut refused = None;
    for i in 0..1_000 {
        let key = format!("big-{i}");
        let started = idem.begin(begin(&key)).await;
        let done = match started {
            Ok(b) => {
                idem.complete(CompleteRequest {
                    key,
                    attempt: b.into_inner().attempt,
                    response: response.clone(),
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("writes past the file size limit failed");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let status = server.wait_exit();
    assert!(!status.success(), "exited {status:?}");
    let log = server.log().join("\n");
    assert!(
        log.contains("storage failed") && log.contains("File too large"),
        "the log does not name the failure: {}",
        &log[log.len().saturating_sub(2000)..]
    );
}
