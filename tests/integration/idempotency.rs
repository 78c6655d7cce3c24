use arbiter::proto::{
    record, AbortRequest, BeginRequest, CompleteRequest, GetRecordRequest, Outcome,
};
use tonic::Code;

use crate::support::Server;

fn begin(key: &str, fingerprint: &[u8], lock_ttl_ms: u64) -> BeginRequest {
    BeginRequest {
        key: key.into(),
        fingerprint: fingerprint.to_vec(),
        lock_ttl_ms,
        retention_ms: 0,
    }
}

#[tokio::test]
async fn begin_complete_and_retries() {
    let server = Server::start(&[]);
    let mut c = server.idem().await;
    let first = c
        .begin(begin("pay-1", b"sha:abc", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.outcome(), Outcome::Started);
    let retry = c
        .begin(begin("pay-1", b"sha:abc", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.outcome(), Outcome::InProgress);
    assert_eq!(retry.attempt, first.attempt);
    assert!(retry.retry_after_ms > 0 && retry.retry_after_ms <= 60_000);
    let other = c
        .begin(begin("pay-1", b"sha:zzz", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.outcome(), Outcome::FingerprintMismatch);

    c.complete(CompleteRequest {
        key: "pay-1".into(),
        attempt: first.attempt,
        response: b"{\"status\":201}".to_vec(),
    })
    .await
    .unwrap();
    let done = c
        .begin(begin("pay-1", b"sha:abc", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.outcome(), Outcome::Completed);
    assert_eq!(done.response, b"{\"status\":201}");

    let rec = c
        .get(GetRecordRequest {
            key: "pay-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(rec.state(), record::State::Completed);
    assert_eq!(rec.fingerprint, b"sha:abc");
    assert!(
        rec.expires_after_ms > 86_000_000,
        "default retention is a day: {rec:?}"
    );
    let again = c
        .complete(CompleteRequest {
            key: "pay-1".into(),
            attempt: first.attempt,
            response: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn abort_frees_the_key_and_stale_attempts_are_refused() {
    let server = Server::start(&[]);
    let mut c = server.idem().await;
    let a = c
        .begin(begin("job", b"", 60_000))
        .await
        .unwrap()
        .into_inner();
    c.abort(AbortRequest {
        key: "job".into(),
        attempt: a.attempt,
    })
    .await
    .unwrap();
    assert!(c
        .get(GetRecordRequest { key: "job".into() })
        .await
        .unwrap()
        .into_inner()
        .record
        .is_none());
    let b = c
        .begin(begin("job", b"", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.outcome(), Outcome::Started);
    assert!(b.attempt > a.attempt);
    let stale = c
        .abort(AbortRequest {
            key: "job".into(),
            attempt: a.attempt,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
}

/// Concurrent Begins of one key on one node (so they share log entries):
/// exactly one starts an attempt, the others find it in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_begins_of_one_key_start_one_attempt() {
    let s = Server::start(&[]);
    let idem = s.idem().await;
    for round in 0..20 {
        let calls = (0..8).map(|_| {
            let mut idem = idem.clone();
            let request = BeginRequest {
                retention_ms: 60_000,
                ..begin(&format!("together-{round}"), b"fp", 30_000)
            };
            tokio::spawn(async move { idem.begin(request).await.unwrap().into_inner() })
        });
        let mut outcomes = Vec::new();
        for c in calls.collect::<Vec<_>>() {
            outcomes.push(c.await.unwrap());
        }
        let started: Vec<_> = outcomes
            .iter()
            .filter(|r| r.outcome == Outcome::Started as i32)
            .collect();
        assert_eq!(started.len(), 1, "round {round}: {outcomes:?}");
        let attempt = started[0].attempt;
        assert!(
            outcomes.iter().all(|r| r.attempt == attempt),
            "round {round}: {outcomes:?}"
        );
    }
}

/// The README's `arbiter_idempotency_record_bytes`: what the stored
/// records hold, growing with a completed response.
#[tokio::test]
async fn record_bytes_are_reported() {
    let server = Server::start(&[]);
    let bytes = || {
        crate::support::metric(server.metrics, "arbiter_idempotency_record_bytes")
            .expect("the gauge is rendered")
    };
    let empty = bytes();
    let mut c = server.idem().await;
    let started = c
        .begin(begin("pay-bytes", b"sha:1", 60_000))
        .await
        .unwrap()
        .into_inner();
    c.complete(CompleteRequest {
        key: "pay-bytes".into(),
        attempt: started.attempt,
        response: vec![7; 10_000],
    })
    .await
    .unwrap();
    let held = bytes();
    assert!(
        held >= empty + 10_000.0,
        "{held} bytes reported with a 10,000-byte response stored ({empty} before)"
    );
}
