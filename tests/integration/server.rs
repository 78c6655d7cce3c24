//! Health, reflection, metrics, data directory and graceful shutdown.

use arbiter::proto::{AcquireRequest, RenewRequest, WatchLeaseRequest};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

use crate::rate_limiter::{lc, tb};
use crate::support::{eventually, http_get, Server, DEADLINE};

#[tokio::test]
async fn health_serves_every_service() {
    let server = Server::start(&[]);
    let mut h = HealthClient::new(server.channel().await);
    // Liveness at once; readiness once the node knows a leader and is
    // caught up.
    for service in [
        "",
        "arbiter.v1.RateLimiter",
        "arbiter.v1.Leases",
        "arbiter.v1.Idempotency",
        "envoy.service.ratelimit.v3.RateLimitService",
    ] {
        eventually(&format!("{service:?} to be SERVING"), || {
            let mut h = h.clone();
            async move {
                let r = h
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                (r.status() == ServingStatus::Serving).then_some(())
            }
        })
        .await;
    }
    let unknown = h
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let server = Server::start(&[]);
    let mut r = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = r
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "arbiter.v1.RateLimiter",
        "arbiter.v1.Leases",
        "arbiter.v1.Idempotency",
        "grpc.health.v1.Health",
        "envoy.service.ratelimit.v3.RateLimitService",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }
}

/// One HTTP GET; retried (until the deadline) if the connection fails.
#[tokio::test]
async fn metrics_count_decisions_latency_and_live_keys() {
    let server = Server::start(&[]);
    let mut c = server.limits().await;
    for _ in 0..3 {
        c.check(arbiter::proto::CheckRequest {
            checks: vec![lc("m", tb(2, 1, 3_600_000), None)],
            all_or_nothing: false,
        })
        .await
        .unwrap();
    }
    let mut l = server.leases().await;
    l.acquire(AcquireRequest {
        name: "m".into(),
        holder: "h".into(),
        ttl_ms: 60_000,
    })
    .await
    .unwrap();
    // Failed calls are timed and counted too: one refused by the engine,
    // one by validation.
    let refused = l
        .renew(RenewRequest {
            name: "m".into(),
            holder: "h".into(),
            fencing_token: 99,
            ttl_ms: 60_000,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let invalid = c
        .check(arbiter::proto::CheckRequest {
            checks: vec![],
            all_or_nothing: false,
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    let body = http_get(server.metrics, "/metrics");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for line in [
        "arbiter_decisions_total{result=\"allowed\"} 2",
        "arbiter_decisions_total{result=\"denied\"} 1",
        "arbiter_rpc_duration_seconds_count{rpc=\"Check\"} 4",
        "arbiter_rpc_failures_total{rpc=\"Check\"} 1",
        "arbiter_rpc_duration_seconds_count{rpc=\"Acquire\"} 1",
        "arbiter_rpc_failures_total{rpc=\"Acquire\"} 0",
        "arbiter_rpc_duration_seconds_count{rpc=\"Renew\"} 1",
        "arbiter_rpc_failures_total{rpc=\"Renew\"} 1",
        "arbiter_live_keys{kind=\"rate_limit\"} 1",
        "arbiter_live_keys{kind=\"lease\"} 1",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
    assert!(http_get(server.metrics, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(server.metrics, "/nope").starts_with("HTTP/1.1 404"));
}

#[tokio::test]
async fn connections_are_spread_over_the_serving_threads() {
    let server = Server::start(&["--worker-threads", "3"]);
    // Each client is its own connection; the acceptor hands them out in
    // turn, so six connections land two on each of the three threads.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(server.limits().await);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let r = c
            .check(arbiter::proto::CheckRequest {
                checks: vec![lc("spread", tb(100, 1, 3_600_000), None)],
                all_or_nothing: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.results[0].remaining, 99 - i as u64, "connection {i}");
    }
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .filter(|n| n.starts_with("arbiter-grpc"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["arbiter-grpc-0", "arbiter-grpc-1", "arbiter-grpc-2"]
    );
}

#[tokio::test]
async fn creates_its_data_dir() {
    let server = Server::start(&[]);
    assert!(server.data_dir.is_dir());
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero_even_with_open_watches() {
    let mut server = Server::start(&[]);
    let mut l = server.leases().await;
    let mut watch = l
        .watch(WatchLeaseRequest { name: "x".into() })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap(); // the CURRENT event
                                             // Wait off the runtime so this client keeps answering HTTP/2 frames.
    let (status, server) = tokio::task::spawn_blocking(move || (server.terminate(), server))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    // The watch ended with UNAVAILABLE (the README: clients re-watch),
    // rather than hanging or ending as if the lease were gone.
    let end = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .expect("stream ended");
    match end {
        Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        Ok(other) => panic!("the watch ended with {other:?}, not UNAVAILABLE"),
    }
    // The port is closed.
    assert!(std::net::TcpStream::connect(server.addr).is_err());
}

#[test]
fn cli_talks_to_a_running_server() {
    let server = Server::start(&[]);
    let url = format!("http://{}", server.addr);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_arbiter"))
            .args(args)
            .args(["--server", &url])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["check", "--key", "cli", "--token-bucket", "1:1/1h"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("allowed limit=1 remaining=0"), "{out}");
    let (code, out, _) = run(&["check", "--key", "cli", "--token-bucket", "1:1/1h"]);
    assert_eq!(code, Some(2), "denied exits 2: {out}");
    assert!(out.starts_with("denied"));
    // A leaky bucket in reserve mode: the second waits about 10 minutes.
    let shaped = [
        "check",
        "--key",
        "shaped",
        "--leaky-bucket",
        "6/1h",
        "--burst",
        "1",
        "--max-delay",
        "15m",
    ];
    let (code, out, _) = run(&shaped);
    assert_eq!(code, Some(0));
    assert!(out.trim_end().ends_with(" delay_ms=0"), "{out}");
    let (code, out, _) = run(&shaped);
    assert_eq!(code, Some(0), "{out}");
    let delay: u64 = out
        .trim_end()
        .rsplit("delay_ms=")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(delay > 540_000 && delay <= 600_000, "{out}");
    let (code, out, _) = run(&shaped);
    assert_eq!(code, Some(2), "20 minutes is past 15: {out}");
    let (code, _, err) = run(&[
        "check",
        "--key",
        "k",
        "--burst",
        "2",
        "--token-bucket",
        "1:1/s",
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("--leaky-bucket"), "{err}");
    let (code, out, _) = run(&["lease", "acquire", "svc", "--holder", "me", "--ttl", "1m"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("acquired name=svc holder=me fencing_token="),
        "{out}"
    );
    let (_, out, _) = run(&["lease", "get", "svc"]);
    assert!(out.contains("holder=me"), "{out}");
    let (code, _, err) = run(&[
        "lease", "release", "svc", "--holder", "other", "--token", "1",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("FailedPrecondition"), "{err}");
    let (_, out, _) = run(&["idem", "begin", "order-7", "--fingerprint", "f"]);
    assert!(out.starts_with("STARTED attempt="), "{out}");
    let attempt = out
        .split("attempt=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let (code, _, _) = run(&[
        "idem",
        "complete",
        "order-7",
        "--attempt",
        &attempt,
        "--response",
        "ok",
    ]);
    assert_eq!(code, Some(0));
    let (_, out, _) = run(&["idem", "get", "order-7"]);
    assert!(
        out.starts_with("COMPLETED") && out.contains("response=ok"),
        "{out}"
    );
    let (code, _, err) = run(&["check", "--key", "", "--token-bucket", "1:1/s"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("InvalidArgument") && err.contains("checks[0].key"),
        "{err}"
    );
}

#[tokio::test]
async fn a_data_directory_of_another_node_is_refused() {
    let dir = crate::support::fresh_dir();
    let mut first = Server::start_in(&dir, &[]);
    assert!(first.terminate().success());
    drop(first);
    // The same directory as node 2 of a cluster.
    let (status, stderr) = crate::support::refused_start(
        &dir,
        &["--node-id", "2", "--peers", "1=127.0.0.1:9,2=127.0.0.1:0"],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("the data directory belongs to node 1, not node 2"),
        "{stderr}"
    );
}

/// The README's start-up warning: a client port off loopback with no
/// `--auth-file` says that anyone who reaches it may use every key; on
/// loopback it says nothing.
#[test]
fn a_client_port_off_loopback_without_auth_is_warned_of() {
    const WARNING: &str = "no --auth-file: any client that reaches this port";
    let warned = |s: &Server| s.log().iter().any(|l| l.contains(WARNING));
    let open = Server::start(&["--listen", "0.0.0.0:0"]);
    assert!(
        warned(&open),
        "no warning on 0.0.0.0; the log:\n{}",
        open.log().join("\n")
    );
    let local = Server::start(&[]);
    assert!(!warned(&local), "a warning on loopback");
}
