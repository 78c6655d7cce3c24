//! A data directory written by the release before the binary log (JSON
//! entries, `tests/fixtures/v1-data`, made by `make-v1-data.sh`) is read by
//! this one as it is: the state it held is all there, new writes (in the
//! binary format) go on from it, and a restart reads the mixed log. Its
//! snapshot (one JSON document in the store) is rewritten as a file.

use std::path::Path;

use arbiter::proto::idempotency_client::IdempotencyClient;
use arbiter::proto::leases_client::LeasesClient;
use arbiter::proto::limit::Algorithm;
use arbiter::proto::rate_limiter_client::RateLimiterClient;
use arbiter::proto::{
    AcquireRequest, BeginRequest, CheckRequest, FixedWindow, GetLeaseRequest, Limit, Outcome,
    TokenBucket,
};

use crate::rate_limiter::lc;
use crate::support::{fresh_dir, InProcess};

/// A copy of the fixture, and the time just after it was written.
fn fixture() -> (std::path::PathBuf, u64) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = fresh_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("v1-data/arbiter.redb"), dir.join("arbiter.redb"))
        .expect("copy the fixture");
    let written: u64 = std::fs::read_to_string(src.join("v1-data.written_ms"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (dir, written)
}

async fn remaining(server: &InProcess, key: &str, algorithm: Algorithm) -> u64 {
    let mut c = RateLimiterClient::new(server.channel().await);
    let limit = Some(Limit {
        algorithm: Some(algorithm),
    });
    let r = c
        .check(CheckRequest {
            checks: vec![lc(key, limit, Some(0))],
            all_or_nothing: false,
        })
        .await
        .unwrap()
        .into_inner();
    r.results[0].remaining
}

async fn holder(server: &InProcess, name: &str) -> Option<(String, u64)> {
    let mut c = LeasesClient::new(server.channel().await);
    let l = c
        .get(GetLeaseRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .lease?;
    Some((l.holder, l.fencing_token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_the_json_format_is_read_as_it_is() {
    let (dir, written_ms) = fixture();
    let server = InProcess::start_in(dir.clone(), written_ms + 1_000).await;
    // The snapshot the store held (JSON) was rewritten as a snapshot file.
    let snapshot = std::fs::read(dir.join("snapshots/current.snap")).unwrap();
    assert!(snapshot.starts_with(arbiter::raft::snapshot::MAGIC));

    // Rate-limit state (from the snapshot and packed sync entries).
    let bucket = Algorithm::TokenBucket(TokenBucket {
        capacity: 100,
        refill_tokens: 1,
        refill_interval_ms: 3_600_000,
    });
    let window = Algorithm::FixedWindow(FixedWindow {
        limit: 10,
        window_ms: 3_600_000,
    });
    assert_eq!(remaining(&server, "fx-bucket", bucket).await, 93);
    assert_eq!(remaining(&server, "fx-window", window).await, 7);

    // The lease and the idempotency records.
    assert_eq!(holder(&server, "fx-lease").await, Some(("pod-a".into(), 1)));
    let mut idem = IdempotencyClient::new(server.channel().await);
    let begin = |key: &str| BeginRequest {
        key: key.into(),
        fingerprint: vec![],
        lock_ttl_ms: 60_000,
        retention_ms: 0,
    };
    for i in 1..=12 {
        let r = idem
            .begin(begin(&format!("fx-{i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.outcome(), r.attempt, r.response),
            (Outcome::Completed, i, format!("done-{i}").into_bytes())
        );
    }
    let open = idem.begin(begin("fx-open")).await.unwrap().into_inner();
    assert_eq!((open.outcome(), open.attempt), (Outcome::InProgress, 13));

    // New writes go on from the old state; a restart reads both formats.
    let mut leases = LeasesClient::new(server.channel().await);
    let new = leases
        .acquire(AcquireRequest {
            name: "after-upgrade".into(),
            holder: "pod-b".into(),
            ttl_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(new.acquired);
    assert_eq!(
        new.lease.unwrap().fencing_token,
        2,
        "the token counter went on"
    );
    let server = server.restart().await;
    assert_eq!(holder(&server, "fx-lease").await, Some(("pod-a".into(), 1)));
    assert_eq!(
        holder(&server, "after-upgrade").await,
        Some(("pod-b".into(), 2))
    );
    server.stop().await;
}
