//! A short smoke run of the load generator: it runs, reports, and refuses
//! non-loopback targets. Asserts only that it works, never how fast.

use std::process::Command;
use std::sync::Arc;

use arbiter::clock::SystemClock;
use arbiter::config::Config;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_arbiter-bench"))
        .args(args)
        .output()
        .expect("run arbiter-bench")
}

/// A single-node server in this process, on loopback ports chosen by the
/// system and a data directory removed afterwards.
async fn serve() -> (String, tokio::sync::oneshot::Sender<()>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("arbiter-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let started = arbiter::server::start(Config::for_tests(dir.clone()), Arc::new(SystemClock))
        .await
        .expect("server starts");
    let target = started.addrs.client.to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(started.serve_until(async {
        let _ = stopped.await;
    }));
    (target, stop, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generator_runs_and_reports_json() {
    let (target, stop, dir) = serve().await;
    for workload in ["check", "lease", "idem"] {
        let target = target.clone();
        let run = move || {
            bench(&[
                "--target",
                &target,
                "--workload",
                workload,
                "--duration",
                "0.5",
                "--warmup",
                "0.2",
                "--inflight",
                "4",
                "--connections",
                "1",
                "--keys",
                "100",
                "--batch",
                "3",
                "--requests",
                "2000",
                "--json",
            ])
        };
        let out = tokio::task::spawn_blocking(run).await.expect("bench ran");
        assert!(
            out.status.success(),
            "{workload}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert!(report["requests"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["errors"], 0, "{report}");
        assert!(
            report["requests"].as_u64().unwrap() <= 2000,
            "bounded by --requests: {report}"
        );
        assert!(
            report["latency_us"]["p99"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        if workload == "check" {
            assert_eq!(
                report["decisions"].as_u64(),
                report["requests"].as_u64().map(|r| r * 3)
            );
        }
    }
    let _ = stop.send(());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn load_generator_refuses_non_loopback_targets() {
    let out = bench(&["--target", "192.0.2.1:7070", "--duration", "0.1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}
