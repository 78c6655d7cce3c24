use arbiter::proto::{
    limit::Algorithm, CheckRequest, FixedWindow, LeakyBucket, Limit, LimitCheck, LimitResult,
    SlidingWindow, TokenBucket,
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
        max_delay_ms: 0,
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

pub fn lb(rate: u64, interval_ms: u64, burst: u64) -> Option<Limit> {
    Some(Limit {
        algorithm: Some(Algorithm::LeakyBucket(LeakyBucket {
            rate,
            interval_ms,
            burst,
        })),
    })
}

/// A check in reserve mode: admitted if it can start within `max_delay_ms`.
pub fn reserve(key: &str, limit: Option<Limit>, max_delay_ms: u64) -> LimitCheck {
    LimitCheck {
        max_delay_ms,
        ..lc(key, limit, None)
    }
}

async fn checked(
    c: &mut arbiter::proto::rate_limiter_client::RateLimiterClient<tonic::transport::Channel>,
    checks: Vec<LimitCheck>,
    all_or_nothing: bool,
) -> Vec<LimitResult> {
    c.check(req(checks, all_or_nothing))
        .await
        .unwrap()
        .into_inner()
        .results
}

/// Within a minute under `ms` (the test's calls take some of the wait).
fn about(got: u64, ms: u64) -> bool {
    got <= ms && got > ms - 60_000
}

#[tokio::test]
async fn a_leaky_bucket_schedules_work_in_reserve_mode() {
    let server = Server::start(&[]);
    let mut c = server.limits().await;
    // One unit per 20 minutes, burst 2: the waits are that long, so the
    // test's own time does not matter.
    let unit = 1_200_000;
    let slow = || lb(1, unit, 2);
    for left in [1, 0] {
        let r = checked(&mut c, vec![lc("q", slow(), None)], false).await[0];
        assert!(r.allowed && r.delay_ms == 0, "{r:?}");
        assert_eq!((r.limit, r.remaining), (2, left));
    }
    // A plain check is refused; reserve mode queues it a unit out.
    let r = checked(&mut c, vec![lc("q", slow(), None)], false).await[0];
    assert!(!r.allowed && about(r.retry_after_ms, unit), "{r:?}");
    let r = checked(&mut c, vec![reserve("q", slow(), unit)], false).await[0];
    assert!(r.allowed && about(r.delay_ms, unit), "{r:?}");
    assert_eq!(r.remaining, 0);
    // The next would wait two units: refused, consuming nothing.
    let r = checked(&mut c, vec![reserve("q", slow(), unit)], false).await[0];
    assert!(!r.allowed && r.delay_ms == 0, "{r:?}");
    assert!(about(r.retry_after_ms, unit), "{r:?}");
    assert!(about(r.reset_after_ms, 3 * unit), "{r:?}");
    let r = checked(&mut c, vec![reserve("q", slow(), 2 * unit)], false).await[0];
    assert!(r.allowed && about(r.delay_ms, 2 * unit), "{r:?}");

    // All or nothing: one check over its wait and nothing is reserved.
    checked(&mut c, vec![lc("a", slow(), Some(2))], false).await;
    let both = vec![reserve("a", slow(), unit), reserve("b", slow(), 0)];
    let r = checked(&mut c, both.clone(), true).await;
    assert!(r.iter().all(|r| r.allowed && r.delay_ms <= unit), "{r:?}");
    let over = vec![reserve("a", slow(), 2 * unit), lc("b", slow(), Some(3))];
    let r = checked(&mut c, over, true).await;
    assert!(r.iter().all(|r| !r.allowed && r.delay_ms == 0), "{r:?}");
    let r = checked(&mut c, vec![reserve("a", slow(), 3 * unit)], false).await[0];
    let counted = |result: &str| {
        let name = format!("arbiter_reserve_mode_checks_total{{result=\"{result}\"}}");
        crate::support::metric(server.metrics, &name).unwrap_or(-1.0)
    };
    assert_eq!(
        (counted("now"), counted("delayed"), counted("refused")),
        (0.0, 4.0, 2.0),
        "plain checks are not counted"
    );
    assert!(
        about(r.delay_ms, 2 * unit),
        "one reserved before, none after: {r:?}"
    );
}

#[tokio::test]
async fn reserve_mode_bounds_name_the_field() {
    let server = Server::start(&[]);
    let mut c = server.limits().await;
    let cases = [
        (
            reserve("k", lb(1, 1000, 1), 3_600_001),
            "checks[0].max_delay_ms: must be 0 to 3600000 ms, got 3600001",
        ),
        (
            reserve("k", tb(1, 1, 1000), 10),
            "checks[0].max_delay_ms: reserve mode needs a leaky_bucket limit",
        ),
        (
            lc("k", lb(1, 1000, 0), None),
            "checks[0].limit.leaky_bucket.burst: must be 1 to 1000000000000000, got 0",
        ),
        (
            lc("k", lb(0, 1000, 1), None),
            "checks[0].limit.leaky_bucket.rate: must be 1 to",
        ),
    ];
    for (check, message) in cases {
        let err = c.check(req(vec![check], false)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with(message), "{}", err.message());
    }
}
