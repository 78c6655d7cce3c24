//! `arbiter.v1.Semaphores` from the outside: permits under a caller's
//! limit, tokens, renewals and releases, lapses, bounds and the holder
//! cap; and through a follower of a 3-node cluster across a failover.

use std::time::Duration;

use arbiter::proto::semaphores_client::SemaphoresClient;
use arbiter::proto::{
    GetSemaphoreRequest, GetSemaphoreResponse, SemaphoreAcquireRequest, SemaphoreAcquireResponse,
    SemaphoreReleaseRequest, SemaphoreRenewRequest,
};
use tonic::transport::Channel;
use tonic::Code;

use crate::cluster::Cluster;
use crate::support::{eventually, eventually_within, Server};

fn ask(name: &str, holder: &str, limit: u64, permits: u64, ttl_ms: u64) -> SemaphoreAcquireRequest {
    SemaphoreAcquireRequest {
        name: name.into(),
        holder: holder.into(),
        limit,
        permits: Some(permits),
        ttl_ms,
    }
}

async fn acquire(
    c: &mut SemaphoresClient<Channel>,
    r: SemaphoreAcquireRequest,
) -> SemaphoreAcquireResponse {
    c.acquire(r).await.unwrap().into_inner()
}

async fn get(c: &mut SemaphoresClient<Channel>, name: &str) -> GetSemaphoreResponse {
    c.get(GetSemaphoreRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

const MINUTE: u64 = 60_000;

#[tokio::test]
async fn permits_fit_under_the_callers_limit_with_tokens_that_increase() {
    let server = Server::start(&[]);
    let mut c = SemaphoresClient::new(server.channel().await);
    let a = acquire(&mut c, ask("db", "a", 3, 2, MINUTE)).await;
    assert!(a.granted && a.held == 2, "{a:?}");
    let a_token = a.permit.as_ref().unwrap().fencing_token;
    // Two more do not fit beside a's two: refused, with when a lapses.
    let b = acquire(&mut c, ask("db", "b", 3, 2, MINUTE)).await;
    assert!(!b.granted && b.held == 2 && b.permit.is_none(), "{b:?}");
    assert!(
        b.retry_after_ms > MINUTE - 5_000 && b.retry_after_ms <= MINUTE,
        "{b:?}"
    );
    let b = acquire(&mut c, ask("db", "b", 3, 1, MINUTE)).await;
    let b_token = b.permit.as_ref().unwrap().fencing_token;
    assert!(b.granted && b.held == 3 && b_token > a_token, "{b:?}");
    // A retried acquire renews: same token, nothing taken twice.
    let again = acquire(&mut c, ask("db", "a", 3, 2, MINUTE)).await;
    assert_eq!(
        (
            again.granted,
            again.held,
            again.permit.unwrap().fencing_token
        ),
        (true, 3, a_token)
    );
    // Counted among the live entries a scrape shows.
    let live = crate::support::metric(
        server.metrics,
        "arbiter_live_keys{kind=\"semaphore_holder\"}",
    );
    assert_eq!(live, Some(2.0));
    let st = get(&mut c, "db").await;
    let holders: Vec<_> = st
        .permits
        .iter()
        .map(|p| (p.holder.as_str(), p.permits))
        .collect();
    assert_eq!((st.held, holders), (3, vec![("a", 2), ("b", 1)]));
    // A lower limit takes back nothing: both renew; nobody new gets in.
    assert!(acquire(&mut c, ask("db", "b", 1, 1, MINUTE)).await.granted);
    assert!(!acquire(&mut c, ask("db", "c", 1, 1, MINUTE)).await.granted);
    // Renew and release prove the token.
    let renew = |token| SemaphoreRenewRequest {
        name: "db".into(),
        holder: "b".into(),
        fencing_token: token,
        ttl_ms: MINUTE,
    };
    c.renew(renew(b_token)).await.unwrap();
    let stale = c.renew(renew(a_token)).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    let release = |holder: &str, token| SemaphoreReleaseRequest {
        name: "db".into(),
        holder: holder.into(),
        fencing_token: token,
    };
    c.release(release("b", b_token)).await.unwrap();
    let twice = c.release(release("b", b_token)).await.unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
    let c_grant = acquire(&mut c, ask("db", "c", 3, 1, MINUTE)).await;
    assert!(c_grant.permit.unwrap().fencing_token > b_token);
}

#[tokio::test]
async fn permits_lapse_at_their_ttl_and_free_the_room() {
    let server = Server::start(&[]);
    let mut c = SemaphoresClient::new(server.channel().await);
    assert!(
        acquire(&mut c, ask("jobs", "short", 1, 1, 300))
            .await
            .granted
    );
    assert!(
        !acquire(&mut c, ask("jobs", "next", 1, 1, MINUTE))
            .await
            .granted
    );
    eventually("the short permit to lapse and room to be made", || {
        let mut c = c.clone();
        async move {
            let r = c.acquire(ask("jobs", "next", 1, 1, MINUTE)).await.ok()?;
            r.into_inner().granted.then_some(())
        }
    })
    .await;
    let st = get(&mut c, "jobs").await;
    assert_eq!(st.permits.len(), 1);
    assert_eq!(st.permits[0].holder, "next");
}

#[tokio::test]
async fn bad_input_names_the_field_and_the_holder_cap_holds() {
    let server = Server::start(&["--max-leases", "2"]);
    let mut c = SemaphoresClient::new(server.channel().await);
    let cases = [
        (
            ask("s", "h", 0, 1, MINUTE),
            "limit: must be 1 to 1000000000000000, got 0",
        ),
        (
            ask("s", "h", 2, 3, MINUTE),
            "permits: must be 1 to limit (2), got 3",
        ),
        (
            ask("s", "h", 2, 0, MINUTE),
            "permits: must be 1 to limit (2), got 0",
        ),
        (ask("s", "h", 2, 1, 0), "ttl_ms: must be 1 to"),
        (ask("", "h", 2, 1, MINUTE), "name: must be 1 to 1024 bytes"),
        (
            ask("s", "", 2, 1, MINUTE),
            "holder: must be 1 to 1024 bytes",
        ),
    ];
    for (request, message) in cases {
        let err = c.acquire(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(message), "{}", err.message());
    }
    // Holder entries are capped (with --max-leases here): the third is
    // refused and the server stays up for the others.
    for holder in ["a", "b"] {
        assert!(
            acquire(&mut c, ask("s", holder, 10, 1, MINUTE))
                .await
                .granted
        );
    }
    let full = c.acquire(ask("t", "c", 10, 1, MINUTE)).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(
        full.message().contains("semaphore holders"),
        "{}",
        full.message()
    );
    assert!(acquire(&mut c, ask("s", "a", 10, 1, MINUTE)).await.granted);
}

/// Through a follower, then across the leader's death: the permits are in
/// the log, the survivors keep them (a failover shortens no permit), and
/// the limit still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_survive_a_failover_and_the_limit_still_holds() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let mut c = SemaphoresClient::new(cluster.node(follower).channel().await);
    let held = acquire(&mut c, ask("pool", "a", 2, 2, MINUTE)).await;
    assert!(held.granted, "{held:?}");
    let token = held.permit.unwrap().fencing_token;
    cluster.kill9(leader);
    let st = eventually_within(Duration::from_secs(20), "a new leader to serve", || {
        let mut c = c.clone();
        async move {
            c.get(GetSemaphoreRequest {
                name: "pool".into(),
            })
            .await
            .ok()
        }
    })
    .await
    .into_inner();
    assert_eq!(st.held, 2);
    assert_eq!(st.permits[0].fencing_token, token);
    assert!(st.permits[0].remaining_ms > MINUTE - 20_000, "{st:?}");
    let other = acquire(&mut c, ask("pool", "b", 2, 1, MINUTE)).await;
    assert!(!other.granted && other.held == 2, "{other:?}");
    let mine = acquire(&mut c, ask("pool", "a", 2, 2, MINUTE)).await;
    assert_eq!(mine.permit.unwrap().fencing_token, token);
}

/// A watch sees the holders first, then each change with what is held
/// after it; a lapse comes as EXPIRED, so a waiter wakes when room is made.
#[tokio::test]
async fn a_watch_streams_the_holders_then_every_change() {
    use arbiter::proto::semaphore_event::Kind;
    use arbiter::proto::WatchSemaphoreRequest;
    let server = Server::start(&[]);
    let mut c = SemaphoresClient::new(server.channel().await);
    let first = acquire(&mut c, ask("w", "a", 2, 1, MINUTE)).await;
    let token = first.permit.unwrap().fencing_token;
    let mut stream = c
        .watch(WatchSemaphoreRequest { name: "w".into() })
        .await
        .unwrap()
        .into_inner();
    async fn next(
        stream: &mut tonic::Streaming<arbiter::proto::SemaphoreEvent>,
    ) -> (Kind, String, u64, usize) {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream goes on");
        let holder = e.permit.map(|p| p.holder).unwrap_or_default();
        (
            Kind::try_from(e.kind).unwrap(),
            holder,
            e.held,
            e.permits.len(),
        )
    }
    assert_eq!(
        next(&mut stream).await,
        (Kind::Current, String::new(), 1, 1)
    );
    acquire(&mut c, ask("w", "b", 2, 1, 300)).await;
    assert_eq!(next(&mut stream).await, (Kind::Acquired, "b".into(), 2, 0));
    c.release(SemaphoreReleaseRequest {
        name: "w".into(),
        holder: "a".into(),
        fencing_token: token,
    })
    .await
    .unwrap();
    assert_eq!(next(&mut stream).await, (Kind::Released, "a".into(), 1, 0));
    // b's 300 ms lapse: swept by the leader, told to the watcher.
    assert_eq!(next(&mut stream).await, (Kind::Expired, "b".into(), 0, 0));
}

/// A semaphore watch counts against the same watcher cap as a lease
/// watch: at the cap the next is refused, and the server serves on.
#[tokio::test]
async fn semaphore_watches_count_against_the_watcher_cap() {
    use arbiter::proto::leases_client::LeasesClient;
    use arbiter::proto::{WatchLeaseRequest, WatchSemaphoreRequest};
    let server = Server::start(&["--max-watchers", "1"]);
    let mut c = SemaphoresClient::new(server.channel().await);
    let mut open = c
        .watch(WatchSemaphoreRequest { name: "w".into() })
        .await
        .unwrap()
        .into_inner();
    open.message().await.unwrap().expect("the holders first");
    let full = c
        .watch(WatchSemaphoreRequest { name: "x".into() })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    let mut leases = LeasesClient::new(server.channel().await);
    let lease = leases
        .watch(WatchLeaseRequest { name: "w".into() })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(lease.code(), Code::ResourceExhausted, "{lease:?}");
    drop(open);
    eventually("the watch's place to be given back", || {
        let mut c = c.clone();
        async move {
            c.watch(WatchSemaphoreRequest { name: "x".into() })
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
}
