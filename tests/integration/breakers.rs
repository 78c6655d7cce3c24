//! `arbiter.v1.Breakers` from the outside: tripping, failing fast, probes
//! and closing on a server whose clock the test moves; bounds, caps and
//! thresholds from the limits files; a watch; and one breaker shared by
//! every member of a spread 3-node cluster, across the loss of its owner.

use std::time::Duration;

use arbiter::engine::slot_of;
use arbiter::proto::breakers_client::BreakersClient;
use arbiter::proto::cluster_client::ClusterClient;
use arbiter::proto::{
    breaker_event, BreakerAllowRequest, BreakerAllowResponse, BreakerConfig, BreakerPhase,
    BreakerReportRequest, BreakerReportResponse, CallOutcome, ClusterStatusRequest,
    GetBreakerRequest, WatchBreakerRequest,
};
use tonic::transport::Channel;
use tonic::Code;

use crate::cluster::Cluster;
use crate::support::{eventually_within, metric, InProcess, Server};

fn config(min_calls: u32, open_ms: u64, probes: u32, probes_to_close: u32) -> BreakerConfig {
    BreakerConfig {
        window_ms: 10_000,
        min_calls,
        failure_percent: 50,
        open_ms,
        probes,
        probes_to_close,
        probe_ttl_ms: 5_000,
    }
}

async fn allow(
    c: &mut BreakersClient<Channel>,
    name: &str,
    cfg: Option<BreakerConfig>,
) -> BreakerAllowResponse {
    c.allow(BreakerAllowRequest {
        name: name.into(),
        config: cfg,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn report(
    c: &mut BreakersClient<Channel>,
    name: &str,
    outcome: CallOutcome,
    probe_token: u64,
    cfg: Option<BreakerConfig>,
) -> BreakerReportResponse {
    c.report(BreakerReportRequest {
        name: name.into(),
        outcome: outcome as i32,
        probe_token,
        config: cfg,
    })
    .await
    .unwrap()
    .into_inner()
}

fn phase(p: i32) -> BreakerPhase {
    BreakerPhase::try_from(p).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_trip_it_for_everyone_then_probes_close_it() {
    let server = InProcess::start().await;
    let mut c = BreakersClient::new(server.channel().await);
    let cfg = Some(config(4, 2_000, 2, 2));
    let a = allow(&mut c, "pay", cfg).await;
    assert_eq!((phase(a.phase), a.allowed), (BreakerPhase::Closed, true));
    report(&mut c, "pay", CallOutcome::Success, 0, cfg).await;
    report(&mut c, "pay", CallOutcome::Failure, 0, cfg).await;
    report(&mut c, "pay", CallOutcome::Success, 0, cfg).await;
    // The fourth call makes min_calls, with half of them failures.
    let r = report(&mut c, "pay", CallOutcome::Timeout, 0, cfg).await;
    assert_eq!((phase(r.phase), r.counted), (BreakerPhase::Open, true));
    // Every caller now fails fast, with when to look again.
    let mut other = BreakersClient::new(server.channel().await);
    let o = allow(&mut other, "pay", cfg).await;
    assert_eq!((phase(o.phase), o.allowed), (BreakerPhase::Open, false));
    assert_eq!(o.retry_after_ms, 2_000);
    server.advance(1_500);
    assert_eq!(allow(&mut other, "pay", cfg).await.retry_after_ms, 500);
    // A late report of a call made before it tripped does not count.
    let late = report(&mut c, "pay", CallOutcome::Success, 0, cfg).await;
    assert!(!late.counted);
    // Half-open: two probes at once across callers, then none.
    server.advance(500);
    let p1 = allow(&mut c, "pay", cfg).await;
    let p2 = allow(&mut other, "pay", cfg).await;
    let none = allow(&mut c, "pay", cfg).await;
    assert_eq!(phase(p1.phase), BreakerPhase::HalfOpen);
    assert!(p1.allowed && p2.allowed && p2.probe_token > p1.probe_token);
    assert!(!none.allowed && none.retry_after_ms == 5_000, "{none:?}");
    let st = c
        .get(GetBreakerRequest {
            name: "pay".into(),
            config: cfg,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (phase(st.phase), st.probes_out),
        (BreakerPhase::HalfOpen, 2)
    );
    // A report without a permit does not count; two successful probes close it.
    assert!(
        !report(&mut c, "pay", CallOutcome::Failure, 0, cfg)
            .await
            .counted
    );
    report(&mut c, "pay", CallOutcome::Success, p1.probe_token, cfg).await;
    let closed = report(&mut other, "pay", CallOutcome::Success, p2.probe_token, cfg).await;
    assert_eq!(phase(closed.phase), BreakerPhase::Closed);
    assert!(allow(&mut c, "pay", cfg).await.allowed);
    // Tripped again, a failed probe opens it for another open_ms.
    for _ in 0..4 {
        report(&mut c, "pay", CallOutcome::Failure, 0, cfg).await;
    }
    server.advance(2_000);
    let p = allow(&mut c, "pay", cfg).await;
    let again = report(&mut c, "pay", CallOutcome::Failure, p.probe_token, cfg).await;
    assert_eq!(phase(again.phase), BreakerPhase::Open);
    assert_eq!(allow(&mut c, "pay", cfg).await.retry_after_ms, 2_000);
}

#[tokio::test]
async fn bad_input_names_the_field_and_the_breaker_cap_holds() {
    let server = Server::start(&["--max-breakers", "1"]);
    let mut c = BreakersClient::new(server.channel().await);
    let bad = |cfg: BreakerConfig| BreakerAllowRequest {
        name: "b".into(),
        config: Some(cfg),
    };
    let e = c
        .allow(bad(BreakerConfig {
            failure_percent: 101,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "config.failure_percent: must be 1 to 100");
    let e = c
        .allow(bad(BreakerConfig {
            probes: 1_001,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.message(), "config.probes: must be 1 to 1000");
    let e = c
        .allow(BreakerAllowRequest {
            name: String::new(),
            config: None,
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("name"), "{e:?}");
    let e = c
        .report(BreakerReportRequest {
            name: "b".into(),
            outcome: 7,
            probe_token: 0,
            config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.message(),
        "outcome: must be SUCCESS, FAILURE or TIMEOUT (0 to 2), got 7"
    );
    // One breaker fits; a second is refused, and the first still counts.
    report(&mut c, "first", CallOutcome::Success, 0, None).await;
    let full = c
        .report(BreakerReportRequest {
            name: "second".into(),
            outcome: CallOutcome::Failure as i32,
            probe_token: 0,
            config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert!(full.message().contains("circuit breakers"), "{full:?}");
    assert!(
        report(&mut c, "first", CallOutcome::Failure, 0, None)
            .await
            .counted
    );
    // Asking about a breaker that does not exist makes none.
    assert!(allow(&mut c, "third", None).await.allowed);
    let live = metric(server.metrics, "arbiter_live_keys{kind=\"breaker\"}");
    assert_eq!(live, Some(1.0));
    let allowed = metric(
        server.metrics,
        "arbiter_breaker_allow_total{answer=\"closed\"}",
    );
    assert_eq!(allowed, Some(1.0));
}

/// Thresholds a call leaves unset come from a `breakers:` file among the
/// limits files.
#[tokio::test]
async fn the_limits_files_set_a_breakers_thresholds() {
    let dir = crate::support::fresh_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("breakers.yaml"),
        "breakers:\n  pay:\n    min_calls: 1\n    failure_percent: 100\n    open_ms: 60000\n",
    )
    .unwrap();
    let server = Server::start(&["--limits", dir.to_str().unwrap()]);
    let mut c = BreakersClient::new(server.channel().await);
    // The default needs 20 calls; the file's one failure trips it.
    let r = report(&mut c, "pay", CallOutcome::Failure, 0, None).await;
    assert_eq!(phase(r.phase), BreakerPhase::Open);
    let st = c
        .get(GetBreakerRequest {
            name: "pay".into(),
            config: None,
        })
        .await
        .unwrap()
        .into_inner();
    let cfg = st.config.unwrap();
    assert_eq!(
        (cfg.min_calls, cfg.open_ms, cfg.window_ms),
        (1, 60_000, 10_000)
    );
    assert!(st.retry_after_ms > 50_000, "{st:?}");
    // A breaker the file does not name keeps the defaults.
    let other = report(&mut c, "other", CallOutcome::Failure, 0, None).await;
    assert_eq!(phase(other.phase), BreakerPhase::Closed);
}

#[tokio::test]
async fn a_watch_streams_the_state_then_each_phase_change() {
    use breaker_event::Kind;
    let server = Server::start(&[]);
    let mut c = BreakersClient::new(server.channel().await);
    let mut stream = c
        .watch(WatchBreakerRequest { name: "w".into() })
        .await
        .unwrap()
        .into_inner();
    async fn next(
        stream: &mut tonic::Streaming<arbiter::proto::BreakerEvent>,
    ) -> (Kind, BreakerPhase) {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream goes on");
        (
            Kind::try_from(e.kind).unwrap(),
            phase(e.state.unwrap().phase),
        )
    }
    assert_eq!(
        next(&mut stream).await,
        (Kind::Current, BreakerPhase::Closed)
    );
    let cfg = Some(config(1, 60_000, 1, 1));
    report(&mut c, "w", CallOutcome::Failure, 0, cfg).await;
    assert_eq!(next(&mut stream).await, (Kind::Changed, BreakerPhase::Open));
}

/// Spread over three members, one breaker is decided by its slot's owner
/// whichever member is asked; the others hold its state from the sync
/// (and their watchers see it), and it stays tripped when the owner dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_shares_one_breaker_and_it_outlives_its_owner() {
    const LONG: Duration = Duration::from_secs(30);
    let mut cluster = Cluster::start(3, &["--slot-owners", "spread", "--limit-sync-ms", "50"]);
    cluster.leader().await;
    let owners = eventually_within(LONG, "the slots to spread", || async {
        let mut status = ClusterClient::new(cluster.node(0).channel().await);
        let st = status
            .status(ClusterStatusRequest { slot_owners: true })
            .await
            .ok()?
            .into_inner();
        let spread = st.members.iter().all(|m| m.slots > 300);
        (spread && st.slot_owners.len() == arbiter::engine::SLOTS).then_some(st.slot_owners)
    })
    .await;
    let name = "payments";
    let owner = owners[slot_of(name)] as usize - 1;
    let (a, b) = ((owner + 1) % 3, (owner + 2) % 3);
    let cfg = Some(config(3, 600_000, 1, 1));
    let mut via_a = BreakersClient::new(cluster.node(a).channel().await);
    let mut via_b = BreakersClient::new(cluster.node(b).channel().await);
    let mut watch = via_b
        .watch(WatchBreakerRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("the state first");
    // Failures reported through two members, neither of them the owner.
    report(&mut via_a, name, CallOutcome::Failure, 0, cfg).await;
    report(&mut via_b, name, CallOutcome::Failure, 0, cfg).await;
    let r = report(&mut via_a, name, CallOutcome::Failure, 0, cfg).await;
    assert_eq!(phase(r.phase), BreakerPhase::Open);
    for c in [&mut via_a, &mut via_b] {
        let v = allow(c, name, cfg).await;
        assert_eq!((phase(v.phase), v.allowed), (BreakerPhase::Open, false));
    }
    // b's watcher hears of it from the owner's sync.
    let e = tokio::time::timeout(LONG, watch.message())
        .await
        .expect("the change within the sync")
        .unwrap()
        .unwrap();
    assert_eq!(phase(e.state.unwrap().phase), BreakerPhase::Open);
    // The owner dies; its slots move, and the breaker is still open.
    cluster.kill9(owner);
    let v = eventually_within(LONG, "a new owner to decide", || {
        let mut c = via_a.clone();
        async move {
            c.allow(BreakerAllowRequest {
                name: name.into(),
                config: cfg,
            })
            .await
            .ok()
        }
    })
    .await
    .into_inner();
    assert_eq!((phase(v.phase), v.allowed), (BreakerPhase::Open, false));
    assert!(v.retry_after_ms > 500_000, "{v:?}");
}

#[test]
fn the_cli_allows_reports_and_gets() {
    let server = Server::start(&[]);
    let url = format!("http://{}", server.addr);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_arbiter"))
            .arg("breaker")
            .args(args)
            .args(["--server", &url])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(&["allow", "pay"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("allowed phase=CLOSED"), "{out}");
    let trip = ["--min-calls", "1", "--open-for", "1h"];
    let (code, out) = run(&[&["report", "pay", "failure"], &trip[..]].concat());
    assert_eq!(code, Some(0));
    assert_eq!(out.trim_end(), "counted=true phase=OPEN");
    let (code, out) = run(&[&["allow", "pay"], &trip[..]].concat());
    assert_eq!(code, Some(2), "refused exits 2: {out}");
    assert!(out.starts_with("refused phase=OPEN probe_token=0"), "{out}");
    let (_, out) = run(&[&["get", "pay"], &trip[..]].concat());
    assert!(
        out.contains("phase=OPEN") && out.contains("failures=1"),
        "{out}"
    );
}
