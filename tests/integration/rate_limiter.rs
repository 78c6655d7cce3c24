use arbiter::proto::{
    limit::Algorithm, CheckRequest, FixedWindow, Limit, LimitCheck, SlidingWindow, TokenBucket,
};

use crate::support::Server;

pub fn tb(capacity: u64, refill_tokens: u64, refill_interval_ms: u64) -> Option<Limit> {
    Some(Limit {
        algorithm: Some(Algorithm::TokenBucket(TokenBucket {
            capacity,
            refill_tokens,
            refill_interval_ms,
        })),
    })
}

pub fn lc(key: &str, limit: Option<Limit>, cost: Option<u64>) -> LimitCheck {
    LimitCheck {
        key: key.into(),
        limit,
        cost,
        dry_run: false,
        named: None,
    }
}

fn req(checks: Vec<LimitCheck>, all_or_nothing: bool) -> CheckRequest {
    CheckRequest {
        checks,
        all_or_nothing,
    }
}

#[tokio::test]
async fn token_bucket_drains_and_reports_waits() {
    let server = Server::start(&[]);
    let mut c = server.limits().await;
    // A slow refill (1 per hour) keeps the test independent of elapsed time.
    let hourly = || tb(3, 1, 3_600_000);
    let r = c
        .check(req(vec![lc("k", hourly(), None)], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 1);
    let r = &r.results[0];
    assert!(r.allowed, "cost unset consumes 1");
    assert_eq!((r.limit, r.remaining), (3, 2));
    let r = c
        .check(req(vec![lc("k", hourly(), Some(2))], false))
        .await
        .unwrap()
        .into_inner()
        .results[0];
    assert!(r.allowed);
    assert_eq!(r.remaining, 0);
    let r = c
        .check(req(vec![lc("k", hourly(), Some(1))], false))
        .await
        .unwrap()
        .into_inner()
        .results[0];
    assert!(!r.allowed);
    assert!(
        r.retry_after_ms > 3_500_000 && r.retry_after_ms <= 3_600_000,
        "{r:?}"
    );
    assert!(r.reset_after_ms > 3 * 3_500_000, "{r:?}");
    // cost above capacity: denied, never an error.
    let r = c
        .check(req(vec![lc("k2", hourly(), Some(4))], false))
        .await
        .unwrap()
        .into_inner()
        .results[0];
    assert!(!r.allowed);
    assert_eq!(r.retry_after_ms, u64::MAX);
}

#[tokio::test]
async fn peek_and_dry_run_consume_nothing() {
    let server = Server::start(&[]);
    let mut c = server.limits().await;
    let hourly = || tb(5, 1, 3_600_000);
    let peek = c
        .check(req(vec![lc("p", hourly(), Some(0))], false))
        .await
        .unwrap()
        .into_inner()
        .results[0];
    assert!(peek.allowed);
    assert_eq!(peek.remaining, 5);
    let mut dry = lc("p", hourly(), Some(4));
    dry.dry_run = true;
    let d = c
        .check(req(vec![dry], false))
        .await
        .unwrap()
        .into_inner()
        .results[0];
    assert!(d.allowed);
    assert_eq!(d.remaining, 1, "a dry run reports what would remain");
    let after = c
        .check(req(vec![lc("p", hourly(), Some(0))], false))
        .await
        .unwrap()
        .into_inner()
        .results[0];
    assert_eq!(after.remaining, 5);
}

#[tokio::test]
async fn all_or_nothing_leaks_no_tokens() {
    let server = Server::start(&[]);
    let mut c = server.limits().await;
    let hourly = || tb(10, 1, 3_600_000);
    c.check(req(vec![lc("tenant", hourly(), Some(10))], false))
        .await
        .unwrap();
    let r = c
        .check(req(
            vec![
                lc("user", hourly(), Some(1)),
                lc("tenant", hourly(), Some(1)),
            ],
            true,
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(r.iter().all(|r| !r.allowed));
    let user = c
        .check(req(vec![lc("user", hourly(), Some(0))], false))
        .await
        .unwrap()
        .into_inner()
        .results[0];
    assert_eq!(user.remaining, 10, "the user's token was not consumed");
    // Results come back in request order.
    let r = c
        .check(req(
            vec![
                lc("a", tb(1, 1, 3_600_000), Some(1)),
                lc("b", tb(7, 1, 3_600_000), Some(1)),
            ],
            true,
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!((r[0].limit, r[1].limit), (1, 7));
    assert!(r[0].allowed && r[1].allowed);
}

#[tokio::test]
async fn windows_over_grpc() {
    let server = Server::start(&[]);
    let mut c = server.limits().await;
    let day = 86_400_000;
    let sliding = Some(Limit {
        algorithm: Some(Algorithm::SlidingWindow(SlidingWindow {
            limit: 2,
            window_ms: day,
        })),
    });
    let fixed = Some(Limit {
        algorithm: Some(Algorithm::FixedWindow(FixedWindow {
            limit: 2,
            window_ms: day,
        })),
    });
    for limit in [sliding, fixed] {
        let key = format!("{limit:?}");
        let mut allowed = Vec::new();
        for _ in 0..3 {
            let r = c
                .check(req(vec![lc(&key, limit, None)], false))
                .await
                .unwrap()
                .into_inner()
                .results[0];
            allowed.push(r.allowed);
        }
        assert_eq!(allowed, [true, true, false]);
    }
}

#[tokio::test]
async fn key_cap_answers_resource_exhausted_and_stays_up() {
    let server = Server::start(&["--max-limit-keys", "2"]);
    let mut c = server.limits().await;
    for key in ["a", "b"] {
        c.check(req(vec![lc(key, tb(5, 1, 3_600_000), None)], false))
            .await
            .unwrap();
    }
    let err = c
        .check(req(vec![lc("c", tb(5, 1, 3_600_000), None)], false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message().contains("rate-limit keys"),
        "{}",
        err.message()
    );
    // Existing keys keep working.
    let r = c
        .check(req(vec![lc("a", tb(5, 1, 3_600_000), None)], false))
        .await
        .unwrap()
        .into_inner()
        .results[0];
    assert!(r.allowed);
}
