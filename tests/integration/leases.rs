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

/// The README's `arbiter lease watch NAME`: `CURRENT` first, then one line
/// per change, each naming the kind and the lease as `arbiter lease get`
/// prints it; `arbiter lease acquire` prints the token the others take.
#[test]
fn the_cli_watch_prints_the_state_then_each_change() {
    use std::io::BufRead;
    let server = Server::start(&[]);
    let url = format!("http://{}", server.addr);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_arbiter"))
            .args(args)
            .args(["--server", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(["lease", "watch", "cli-watched", "--server", &url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let next = || {
        lines
            .recv_timeout(DEADLINE)
            .expect("a line from lease watch in time")
    };
    assert_eq!(next(), "CURRENT free");

    let acquired = cli(&[
        "lease",
        "acquire",
        "cli-watched",
        "--holder",
        "pod-a",
        "--ttl",
        "10s",
    ]);
    let token = acquired
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fencing_token="))
        .unwrap_or_else(|| panic!("no fencing_token= in {acquired:?}"))
        .to_owned();
    let line = next();
    let want = format!(
        "ACQUIRED name=cli-watched holder=pod-a fencing_token={token} ttl_ms=10000 remaining_ms="
    );
    assert!(
        line.starts_with(&want),
        "{line:?} does not start with {want:?}"
    );

    cli(&[
        "lease",
        "renew",
        "cli-watched",
        "--holder",
        "pod-a",
        "--token",
        &token,
        "--ttl",
        "20s",
    ]);
    let line = next();
    let want = format!(
        "RENEWED name=cli-watched holder=pod-a fencing_token={token} ttl_ms=20000 remaining_ms="
    );
    assert!(
        line.starts_with(&want),
        "{line:?} does not start with {want:?}"
    );

    cli(&[
        "lease",
        "release",
        "cli-watched",
        "--holder",
        "pod-a",
        "--token",
        &token,
    ]);
    let line = next();
    let want = format!("RELEASED name=cli-watched holder=pod-a fencing_token={token}");
    assert!(
        line.starts_with(&want),
        "{line:?} does not start with {want:?}"
    );
    watch.kill().unwrap();
    let _ = watch.wait();
}
