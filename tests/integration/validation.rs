//! Every INVALID_ARGUMENT path: the message names the field and the bound.

use arbiter::proto::{
    limit::Algorithm, AcquireRequest, BeginRequest, CheckRequest, CompleteRequest, FixedWindow,
    GetLeaseRequest, Limit, LimitCheck, RenewRequest, SlidingWindow, WatchLeaseRequest,
};
use tonic::Code;

use crate::rate_limiter::{lc, tb};
use crate::support::Server;

fn expect_invalid<T: std::fmt::Debug>(r: Result<T, tonic::Status>, needles: &[&str]) {
    let err = r.expect_err("expected INVALID_ARGUMENT");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    for n in needles {
        assert!(
            err.message().contains(n),
            "{:?} does not mention {n:?}",
            err.message()
        );
    }
}

fn limit(a: Algorithm) -> Option<Limit> {
    Some(Limit { algorithm: Some(a) })
}

#[tokio::test]
async fn check_inputs() {
    let server = Server::start(&["--max-checks-per-request", "3"]);
    let mut c = server.limits().await;
    let one = |check: LimitCheck| CheckRequest {
        checks: vec![check],
        all_or_nothing: false,
    };
    let long = "k".repeat(1025);
    expect_invalid(
        c.check(one(lc("", tb(1, 1, 1), None))).await,
        &["checks[0].key", "1 to 1024 bytes", "got 0"],
    );
    expect_invalid(
        c.check(one(lc(&long, tb(1, 1, 1), None))).await,
        &["checks[0].key", "1025"],
    );
    // Exactly 1 KiB is fine.
    c.check(one(lc(&long[..1024], tb(1, 1, 1), None)))
        .await
        .unwrap();
    expect_invalid(
        c.check(one(lc("k", tb(0, 1, 1), None))).await,
        &["token_bucket.capacity", "1 to"],
    );
    expect_invalid(
        c.check(one(lc("k", tb(1, 0, 1), None))).await,
        &["token_bucket.refill_tokens"],
    );
    expect_invalid(
        c.check(one(lc("k", tb(1, 1, 0), None))).await,
        &["token_bucket.refill_interval_ms"],
    );
    expect_invalid(
        c.check(one(lc("k", tb(1, 1, 1 << 35), None))).await,
        &["refill_interval_ms", "31622400000"],
    );
    let sw = |limit_, window_ms| {
        limit(Algorithm::SlidingWindow(SlidingWindow {
            limit: limit_,
            window_ms,
        }))
    };
    let fw = |limit_, window_ms| {
        limit(Algorithm::FixedWindow(FixedWindow {
            limit: limit_,
            window_ms,
        }))
    };
    expect_invalid(
        c.check(one(lc("k", sw(0, 10), None))).await,
        &["sliding_window.limit"],
    );
    expect_invalid(
        c.check(one(lc("k", sw(1, 0), None))).await,
        &["sliding_window.window_ms"],
    );
    expect_invalid(
        c.check(one(lc("k", fw(0, 10), None))).await,
        &["fixed_window.limit"],
    );
    expect_invalid(
        c.check(one(lc("k", fw(1, 0), None))).await,
        &["fixed_window.window_ms"],
    );
    expect_invalid(
        c.check(one(lc("k", None, None))).await,
        &["checks[0].limit", "required"],
    );
    expect_invalid(
        c.check(one(lc("k", Some(Limit { algorithm: None }), None)))
            .await,
        &["checks[0].limit"],
    );
    expect_invalid(
        c.check(CheckRequest {
            checks: vec![],
            all_or_nothing: false,
        })
        .await,
        &["checks", "1 to 3"],
    );
    expect_invalid(
        c.check(CheckRequest {
            checks: vec![lc("k", tb(1, 1, 1), None); 4],
            all_or_nothing: false,
        })
        .await,
        &["checks", "got 4"],
    );
    // The second check is named by its index.
    expect_invalid(
        c.check(CheckRequest {
            checks: vec![lc("k", tb(1, 1, 1), None), lc("", tb(1, 1, 1), None)],
            all_or_nothing: true,
        })
        .await,
        &["checks[1].key"],
    );
}

#[tokio::test]
async fn lease_inputs() {
    let server = Server::start(&["--max-ttl-ms", "60000"]);
    let mut c = server.leases().await;
    let acq = |name: &str, holder: &str, ttl_ms| AcquireRequest {
        name: name.into(),
        holder: holder.into(),
        ttl_ms,
    };
    expect_invalid(
        c.acquire(acq("", "h", 10)).await,
        &["name", "1 to 1024 bytes"],
    );
    expect_invalid(c.acquire(acq("n", "", 10)).await, &["holder"]);
    expect_invalid(
        c.acquire(acq("n", &"h".repeat(1025), 10)).await,
        &["holder", "1025"],
    );
    expect_invalid(
        c.acquire(acq("n", "h", 0)).await,
        &["ttl_ms", "1 to 60000 ms", "got 0"],
    );
    expect_invalid(c.acquire(acq("n", "h", 60_001)).await, &["ttl_ms", "60001"]);
    expect_invalid(
        c.renew(RenewRequest {
            name: "n".into(),
            holder: "h".into(),
            fencing_token: 1,
            ttl_ms: 0,
        })
        .await,
        &["ttl_ms"],
    );
    expect_invalid(
        c.get(GetLeaseRequest {
            name: String::new(),
        })
        .await,
        &["name"],
    );
    expect_invalid(
        c.watch(WatchLeaseRequest {
            name: String::new(),
        })
        .await,
        &["name"],
    );
}

#[tokio::test]
async fn idempotency_inputs() {
    let server = Server::start(&["--max-response-bytes", "16", "--max-retention-ms", "1000"]);
    let mut c = server.idem().await;
    let b = |key: &str, fp: usize, lock_ttl_ms, retention_ms| BeginRequest {
        key: key.into(),
        fingerprint: vec![0; fp],
        lock_ttl_ms,
        retention_ms,
    };
    expect_invalid(c.begin(b("", 0, 10, 0)).await, &["key", "1 to 1024 bytes"]);
    expect_invalid(
        c.begin(b("k", 1025, 10, 0)).await,
        &["fingerprint", "at most 1024 bytes"],
    );
    expect_invalid(c.begin(b("k", 0, 0, 0)).await, &["lock_ttl_ms", "got 0"]);
    expect_invalid(
        c.begin(b("k", 0, 10, 1001)).await,
        &["retention_ms", "1 to 1000 ms"],
    );
    let started = c.begin(b("k", 0, 10_000, 1000)).await.unwrap().into_inner();
    expect_invalid(
        c.complete(CompleteRequest {
            key: "k".into(),
            attempt: started.attempt,
            response: vec![0; 17],
        })
        .await,
        &["response", "at most 16 bytes", "17 bytes"],
    );
    // The refused Complete left the attempt in place.
    c.complete(CompleteRequest {
        key: "k".into(),
        attempt: started.attempt,
        response: vec![0; 16],
    })
    .await
    .unwrap();
}

/// Every committed fuzz seed and every input that once made a fuzz target
/// fail (`fuzz/seeds/<target>/`, `fuzz/regressions/<target>/`) runs
/// through the target's body here too, so a fixed crash stays fixed without
/// the fuzzer.
#[test]
fn fuzz_seeds_and_regressions_run_clean() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut ran = 0;
    for (name, body) in arbiter::fuzzing::TARGETS {
        for dir in ["seeds", "regressions"] {
            let Ok(files) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for file in files.flatten() {
                let data = std::fs::read(file.path()).unwrap();
                let outcome = std::panic::catch_unwind(|| body(&data));
                assert!(outcome.is_ok(), "{name} fails on {}", file.path().display());
                ran += 1;
            }
        }
    }
    assert!(
        ran >= arbiter::fuzzing::TARGETS.len(),
        "only {ran} inputs found"
    );
}
