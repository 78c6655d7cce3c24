//! Time-based behaviour on a server whose clock the test moves: lease
//! expiry, idempotency lock lapse and rate-limit windows, each checked on
//! both sides of its deadline, with no waiting for the wall clock.

use arbiter::proto::idempotency_client::IdempotencyClient;
use arbiter::proto::leases_client::LeasesClient;
use arbiter::proto::limit::Algorithm;
use arbiter::proto::rate_limiter_client::RateLimiterClient;
use arbiter::proto::{
    AcquireRequest, BeginRequest, CheckRequest, CompleteRequest, FixedWindow, GetLeaseRequest,
    Limit, Outcome, RenewRequest, SlidingWindow, TokenBucket,
};
use tonic::Code;

use crate::rate_limiter::lc;
use crate::support::InProcess;

fn acquire(name: &str, holder: &str, ttl_ms: u64) -> AcquireRequest {
    AcquireRequest {
        name: name.into(),
        holder: holder.into(),
        ttl_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expires_at_its_ttl() {
    let server = InProcess::start().await;
    let mut c = LeasesClient::new(server.channel().await);
    let first = c
        .acquire(acquire("short", "a", 10_000))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let get = |mut c: LeasesClient<_>| async move {
        c.get(GetLeaseRequest {
            name: "short".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
    };

    server.advance(9_999);
    let held = get(c.clone()).await.expect("held until its ttl has passed");
    assert_eq!((held.holder.as_str(), held.remaining_ms), ("a", 1));

    server.advance(1);
    assert_eq!(get(c.clone()).await, None, "lapsed at exactly its ttl");
    let renew = c
        .renew(RenewRequest {
            name: "short".into(),
            holder: "a".into(),
            fencing_token: first.fencing_token,
            ttl_ms: 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(
        renew.code(),
        Code::FailedPrecondition,
        "a lapsed lease cannot be renewed"
    );
    let b = c
        .acquire(acquire("short", "b", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert!(b.acquired);
    assert!(b.lease.unwrap().fencing_token > first.fencing_token);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_lock_lets_the_next_attempt_start() {
    let server = InProcess::start().await;
    let mut c = IdempotencyClient::new(server.channel().await);
    let begin = |lock_ttl_ms| BeginRequest {
        key: "lapse".into(),
        fingerprint: vec![],
        lock_ttl_ms,
        retention_ms: 0,
    };
    let a = c.begin(begin(5_000)).await.unwrap().into_inner();
    assert_eq!(a.outcome(), Outcome::Started);

    server.advance(4_999);
    let waiting = c.begin(begin(60_000)).await.unwrap().into_inner();
    assert_eq!(
        (waiting.outcome(), waiting.attempt, waiting.retry_after_ms),
        (Outcome::InProgress, a.attempt, 1),
        "the lock holds until its ttl has passed"
    );

    server.advance(1);
    let b = c.begin(begin(60_000)).await.unwrap().into_inner();
    assert_eq!(b.outcome(), Outcome::Started, "the lock lapsed at its ttl");
    assert!(b.attempt > a.attempt);
    let stale = c
        .complete(CompleteRequest {
            key: "lapse".into(),
            attempt: a.attempt,
            response: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    server.stop().await;
}

/// For each algorithm: a limit of 2 admits two calls and denies the third
/// with a `retry_after_ms`; one ms short of it the call is still denied, at
/// it the call is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_calls_are_admitted_exactly_at_retry_after() {
    let server = InProcess::start().await;
    let c = RateLimiterClient::new(server.channel().await);
    let limits = [
        Algorithm::FixedWindow(FixedWindow {
            limit: 2,
            window_ms: 1_000,
        }),
        Algorithm::SlidingWindow(SlidingWindow {
            limit: 2,
            window_ms: 1_000,
        }),
        Algorithm::TokenBucket(TokenBucket {
            capacity: 2,
            refill_tokens: 1,
            refill_interval_ms: 1_000,
        }),
    ];
    for algorithm in limits {
        let key = format!("{algorithm:?}");
        let limit = Some(Limit {
            algorithm: Some(algorithm),
        });
        let check = || {
            let request = CheckRequest {
                checks: vec![lc(&key, limit, None)],
                all_or_nothing: false,
            };
            let mut c = c.clone();
            async move { c.check(request).await.unwrap().into_inner().results[0] }
        };
        assert!(check().await.allowed && check().await.allowed, "{key}");
        let denied = check().await;
        assert!(!denied.allowed, "{key}: the third call is over the limit");
        assert!(denied.retry_after_ms > 0, "{key}: {denied:?}");

        server.advance(denied.retry_after_ms - 1);
        assert!(!check().await.allowed, "{key}: 1 ms before retry_after_ms");
        server.advance(1);
        assert!(check().await.allowed, "{key}: at retry_after_ms");
        server.advance(10_000); // past every window used here
    }
    server.stop().await;
}

/// The wall clock stepping forward or back under a running node moves no
/// deadline: time advances by the monotonic clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_steps_move_no_lease_deadline() {
    let server = InProcess::start().await;
    let mut c = LeasesClient::new(server.channel().await);
    c.acquire(acquire("steady", "a", 10_000)).await.unwrap();
    let remaining = |mut c: LeasesClient<_>| async move {
        c.get(GetLeaseRequest {
            name: "steady".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .map(|l| l.remaining_ms)
    };
    server.step_wall_clock(3_600_000);
    assert_eq!(
        remaining(c.clone()).await,
        Some(10_000),
        "a step forward ends nothing"
    );
    server.step_wall_clock(-7_200_000);
    server.advance(4_000);
    assert_eq!(
        remaining(c.clone()).await,
        Some(6_000),
        "a step back stops nothing"
    );
    server.advance(6_000);
    assert_eq!(remaining(c.clone()).await, None, "lapsed at its ttl");
}
