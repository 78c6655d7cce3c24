//! Every stream and buffer a client can grow has a cap, and at the cap the
//! caller gets a defined answer while the node stays up.

use std::time::Duration;

use arbiter::proto::leases_client::LeasesClient;
use arbiter::proto::{GetLeaseRequest, WatchLeaseRequest};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::support::{eventually, Server};

async fn watch(
    c: &mut LeasesClient<Channel>,
    name: &str,
) -> Result<Streaming<arbiter::proto::LeaseEvent>, tonic::Status> {
    let mut s = c
        .watch(WatchLeaseRequest { name: name.into() })
        .await?
        .into_inner();
    // The first event (the current state) proves the watch is served.
    s.message().await?.expect("the current state comes first");
    Ok(s)
}

#[tokio::test]
async fn watchers_are_capped_per_lease_and_in_total() {
    let server = Server::start(&["--max-watchers", "3", "--max-watchers-per-lease", "2"]);
    let mut c = server.leases().await;
    let a1 = watch(&mut c, "a").await.unwrap();
    let _a2 = watch(&mut c, "a").await.unwrap();
    let err = watch(&mut c, "a").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("--max-watchers-per-lease"),
        "{err:?}"
    );
    let _b = watch(&mut c, "b").await.unwrap();
    let err = watch(&mut c, "c").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("(3)"), "{err:?}");
    assert!(err.message().contains("--max-watchers)"), "{err:?}");
    // Unary calls are still served.
    let get = c.get(GetLeaseRequest { name: "a".into() }).await;
    assert!(get.is_ok(), "{get:?}");
    // A watch that ends gives its place back.
    drop(a1);
    eventually("a place freed by the ended watch", || {
        let mut c = c.clone();
        async move { watch(&mut c, "c").await.ok() }
    })
    .await;
}

#[tokio::test]
async fn calls_past_the_streams_per_connection_wait_for_a_free_one() {
    let server = Server::start(&["--max-streams-per-connection", "2"]);
    // One channel is one HTTP/2 connection.
    let channel = server.channel().await;
    let mut c = LeasesClient::new(channel.clone());
    let w1 = watch(&mut c, "x").await.unwrap();
    let _w2 = watch(&mut c, "y").await.unwrap();
    // A third call on the same connection is held back, not failed...
    let mut request = tonic::Request::new(GetLeaseRequest { name: "x".into() });
    request.set_timeout(Duration::from_millis(300));
    let held = c.get(request).await.unwrap_err();
    assert!(
        matches!(held.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{held:?}"
    );
    // ...while another connection is served at once.
    let mut other = server.leases().await;
    let get = other.get(GetLeaseRequest { name: "x".into() }).await;
    assert!(get.is_ok(), "{get:?}");
    // Once a stream ends, the connection takes the call.
    drop(w1);
    eventually("the connection to take a call again", || {
        let mut c = c.clone();
        async move {
            let mut request = tonic::Request::new(GetLeaseRequest { name: "x".into() });
            request.set_timeout(Duration::from_millis(500));
            c.get(request).await.ok()
        }
    })
    .await;
}

/// The lease and record caps answer RESOURCE_EXHAUSTED over gRPC, naming
/// what is full and the bound, and the node serves on (freed room is
/// usable again).
#[tokio::test]
async fn lease_and_record_caps_answer_resource_exhausted() {
    use arbiter::proto::{AcquireRequest, BeginRequest, ReleaseRequest};

    let server = Server::start(&["--max-leases", "2", "--max-records", "1"]);
    let mut l = server.leases().await;
    let acquire = |name: &str| AcquireRequest {
        name: name.into(),
        holder: "h".into(),
        ttl_ms: 60_000,
    };
    let first = l.acquire(acquire("a")).await.unwrap().into_inner();
    l.acquire(acquire("b")).await.unwrap();
    let full = l.acquire(acquire("c")).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(
        full.message().contains("leases limit reached (2)"),
        "{full:?}"
    );
    // Room freed by a release is usable at once.
    l.release(ReleaseRequest {
        name: "a".into(),
        holder: "h".into(),
        fencing_token: first.lease.unwrap().fencing_token,
    })
    .await
    .unwrap();
    assert!(l.acquire(acquire("c")).await.unwrap().into_inner().acquired);

    let mut idem = server.idem().await;
    let begin = |key: &str| BeginRequest {
        key: key.into(),
        fingerprint: vec![],
        lock_ttl_ms: 60_000,
        retention_ms: 0,
    };
    idem.begin(begin("k1")).await.unwrap();
    let full = idem.begin(begin("k2")).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(
        full.message()
            .contains("idempotency records limit reached (1)"),
        "{full:?}"
    );
    // Still serving.
    let get = l.get(GetLeaseRequest { name: "b".into() }).await;
    assert!(get.unwrap().into_inner().lease.is_some());
}
