use arbiter::proto::lease_event::Kind;
use arbiter::proto::{
    AcquireRequest, GetLeaseRequest, ReleaseRequest, RenewRequest, WatchLeaseRequest,
};
use tonic::Code;

use crate::support::{Server, DEADLINE};

fn acquire(name: &str, holder: &str, ttl_ms: u64) -> AcquireRequest {
    AcquireRequest {
        name: name.into(),
        holder: holder.into(),
        ttl_ms,
    }
}

#[tokio::test]
async fn acquire_renew_release_get() {
    let server = Server::start(&[]);
    let mut c = server.leases().await;
    let a = c
        .acquire(acquire("db", "alice", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert!(a.acquired);
    let lease = a.lease.unwrap();
    assert_eq!((lease.holder.as_str(), lease.ttl_ms), ("alice", 60_000));
    assert!(lease.remaining_ms <= 60_000 && lease.remaining_ms > 50_000);

    let b = c
        .acquire(acquire("db", "bob", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert!(!b.acquired);
    assert_eq!(b.lease.unwrap().holder, "alice", "shows the current holder");

    let renewed = c
        .renew(RenewRequest {
            name: "db".into(),
            holder: "alice".into(),
            fencing_token: lease.fencing_token,
            ttl_ms: 90_000,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(
        (renewed.fencing_token, renewed.ttl_ms),
        (lease.fencing_token, 90_000)
    );

    let stale = c
        .renew(RenewRequest {
            name: "db".into(),
            holder: "alice".into(),
            fencing_token: lease.fencing_token + 1,
            ttl_ms: 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let wrong = c
        .release(ReleaseRequest {
            name: "db".into(),
            holder: "bob".into(),
            fencing_token: lease.fencing_token,
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition);

    let got = c
        .get(GetLeaseRequest { name: "db".into() })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(got.holder, "alice");
    c.release(ReleaseRequest {
        name: "db".into(),
        holder: "alice".into(),
        fencing_token: lease.fencing_token,
    })
    .await
    .unwrap();
    assert!(c
        .get(GetLeaseRequest { name: "db".into() })
        .await
        .unwrap()
        .into_inner()
        .lease
        .is_none());

    let next = c
        .acquire(acquire("db", "bob", 60_000))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert!(
        next.fencing_token > lease.fencing_token,
        "a new grant gets a larger token"
    );
}

#[tokio::test]
async fn watch_streams_current_state_then_every_change() {
    let server = Server::start(&[]);
    let mut c = server.leases().await;
    let held = c
        .acquire(acquire("w", "a", 60_000))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let mut stream = c
        .watch(WatchLeaseRequest { name: "w".into() })
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(DEADLINE, stream.message())
            .await
            .expect("an event within the deadline")
            .expect("stream ok")
            .expect("stream open")
    };
    let e = next().await;
    assert_eq!(e.kind(), Kind::Current);
    assert_eq!(e.lease.unwrap().holder, "a");

    c.renew(RenewRequest {
        name: "w".into(),
        holder: "a".into(),
        fencing_token: held.fencing_token,
        ttl_ms: 60_000,
    })
    .await
    .unwrap();
    assert_eq!(next().await.kind(), Kind::Renewed);
    c.release(ReleaseRequest {
        name: "w".into(),
        holder: "a".into(),
        fencing_token: held.fencing_token,
    })
    .await
    .unwrap();
    assert_eq!(next().await.kind(), Kind::Released);
    let b = c
        .acquire(acquire("w", "b", 200))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let e = next().await;
    assert_eq!(e.kind(), Kind::Acquired);
    assert_eq!(e.lease.as_ref().unwrap().fencing_token, b.fencing_token);
    // Nobody renews: the server reports the expiry by itself.
    let e = next().await;
    assert_eq!(e.kind(), Kind::Expired);
    assert_eq!(e.lease.unwrap().holder, "b");
}

#[tokio::test]
async fn watch_of_a_free_lease_starts_empty() {
    let server = Server::start(&[]);
    let mut c = server.leases().await;
    let mut stream = c
        .watch(WatchLeaseRequest {
            name: "free".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let e = stream.message().await.unwrap().unwrap();
    assert_eq!(e.kind(), Kind::Current);
    assert!(e.lease.is_none());
}

/// The README: a watcher that falls more than 256 events behind is sent
/// the current state again (a CURRENT event) rather than the changes it
/// missed, and then follows on. The watcher here reads nothing while
/// 3,000 renewals are made over another connection (with a name and holder
/// of 1,000 bytes, so that the events overflow what the connection
/// buffers).
#[tokio::test]
async fn a_lagging_watcher_is_sent_the_current_state_again() {
    let server = Server::start(&[]);
    let mut c = server.leases().await;
    let (name, holder) = ("l".repeat(1_000), "h".repeat(1_000));
    let held = c
        .acquire(acquire(&name, &holder, 60_000))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let mut stream = server
        .leases()
        .await
        .watch(WatchLeaseRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    const RENEWALS: u64 = 3_000;
    for i in 1..=RENEWALS {
        c.renew(RenewRequest {
            name: name.clone(),
            holder: holder.clone(),
            fencing_token: held.fencing_token,
            ttl_ms: 60_000 + i,
        })
        .await
        .unwrap();
    }
    // Now read: the first CURRENT, some renewals, a CURRENT again where
    // the watcher fell behind, and at last the final renewal's state.
    let (mut current, mut events) = (0, 0);
    loop {
        let e = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .expect("an event within the deadline")
            .expect("stream ok")
            .expect("stream open");
        events += 1;
        if e.kind() == Kind::Current {
            current += 1;
        }
        if e.lease.is_some_and(|l| l.ttl_ms == 60_000 + RENEWALS) {
            break;
        }
    }
    assert!(
        current >= 2,
        "no resynchronisation: {current} CURRENT events in {events}"
    );
    assert!(
        events < RENEWALS,
        "{events} events for {RENEWALS} renewals: nothing was skipped"
    );
}
