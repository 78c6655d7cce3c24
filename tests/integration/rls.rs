//! Envoy's rate limit service (RLS v3) and named limits, against a real
//! server with a `--limits` directory: matching, all-or-nothing, shadow mode,
//! overrides, hits, headers, hot reload (including a ConfigMap-style
//! `..data` symlink swap), metrics, and `LimitCheck.named` in `arbiter.v1`.

use std::path::{Path, PathBuf};

use arbiter::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use arbiter::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use arbiter::envoy::service::ratelimit::v3::rate_limit_response::Code;
use arbiter::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use arbiter::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use arbiter::proto::{named_limit, CheckRequest, LimitCheck, NamedLimit};
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::support::{eventually, fresh_dir, http_get, Server};

const EDGE: &str = r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: path
    value: /login
    rate_limit: {unit: hour, requests_per_unit: 2, algorithm: sliding_window, name: login}
  - key: path
    value: /api/*
    rate_limit: {unit: hour, requests_per_unit: 1000, algorithm: token_bucket, burst: 2}
  - key: client
    value: internal
    rate_limit: {unlimited: true}
  - key: canary
    shadow_mode: true
    rate_limit: {unit: hour, requests_per_unit: 1}
"#;

/// A limits directory laid out as a ConfigMap mounts one: the files are
/// symlinks into `..data`, itself a symlink to a timestamped directory.
struct ConfigMap {
    dir: PathBuf,
    version: usize,
}

impl ConfigMap {
    fn new(files: &[(&str, &str)]) -> ConfigMap {
        let dir = fresh_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let mut cm = ConfigMap { dir, version: 0 };
        cm.swap(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), cm.dir.join(name)).unwrap();
        }
        cm
    }

    /// Writes a new version and swaps `..data` to it atomically (rename of a
    /// fresh symlink), as the kubelet does.
    fn swap(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let v = format!("..v{}", self.version);
        std::fs::create_dir_all(self.dir.join(&v)).unwrap();
        for (name, text) in files {
            std::fs::write(self.dir.join(&v).join(name), text).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&v, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

pub(crate) fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        limit: None,
        hits_addend: None,
    }
}

pub(crate) fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: 0,
    }
}

pub(crate) type Client = RateLimitServiceClient<Channel>;

pub(crate) async fn rls(server: &Server) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::new(server.channel().await)
}

pub(crate) async fn ask(
    c: &mut RateLimitServiceClient<Channel>,
    r: RateLimitRequest,
) -> RateLimitResponse {
    c.should_rate_limit(r).await.expect("answered").into_inner()
}

fn codes(r: &RateLimitResponse) -> Vec<Code> {
    r.statuses
        .iter()
        .map(|s| Code::try_from(s.code).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_descriptors_match_rules_and_are_limited() {
    let cm = ConfigMap::new(&[("edge.yaml", EDGE)]);
    let server = Server::start(&["--limits", cm.path().to_str().unwrap()]);
    let mut c = rls(&server).await;
    // Key-only rule: each address its own counter of 3.
    for _ in 0..3 {
        let r = ask(
            &mut c,
            request("edge", vec![descriptor(&[("remote_address", "10.0.0.1")])]),
        )
        .await;
        assert_eq!(r.overall_code, Code::Ok as i32);
    }
    let r = ask(
        &mut c,
        request("edge", vec![descriptor(&[("remote_address", "10.0.0.1")])]),
    )
    .await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let s = &r.statuses[0];
    assert_eq!(s.limit_remaining, 0);
    let limit = s.current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.name.as_str()),
        (3, ""),
        "an unnamed rule reports no name, as envoyproxy/ratelimit's do"
    );
    let reset = s.duration_until_reset.unwrap();
    assert!(reset.seconds > 0 && reset.seconds <= 3600, "{reset:?}");
    let other = ask(
        &mut c,
        request("edge", vec![descriptor(&[("remote_address", "10.0.0.2")])]),
    )
    .await;
    assert_eq!(
        other.overall_code,
        Code::Ok as i32,
        "another address, another counter"
    );

    // Key + value beats the wildcard; the wildcard rule is a token bucket
    // with a burst of 2.
    let login = descriptor(&[("path", "/login")]);
    let api = descriptor(&[("path", "/api/users")]);
    let r = ask(&mut c, request("edge", vec![login.clone(), api.clone()])).await;
    assert_eq!(codes(&r), [Code::Ok, Code::Ok]);
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().name, "login");
    assert_eq!(r.statuses[1].limit_remaining, 1, "burst 2, one used");

    // Unmatched descriptors, other domains and unlimited rules answer OK.
    let r = ask(
        &mut c,
        request(
            "edge",
            vec![
                descriptor(&[("nothing", "x")]),
                descriptor(&[("client", "internal")]),
            ],
        ),
    )
    .await;
    assert_eq!(codes(&r), [Code::Ok, Code::Ok]);
    assert_eq!(r.statuses[0].current_limit, None);
    let r = ask(
        &mut c,
        request("elsewhere", vec![descriptor(&[("path", "/login")])]),
    )
    .await;
    assert_eq!(r.overall_code, Code::Ok as i32);

    // A shadow-mode rule is counted but never denies.
    for _ in 0..3 {
        let r = ask(
            &mut c,
            request("edge", vec![descriptor(&[("canary", "c1")])]),
        )
        .await;
        assert_eq!(r.overall_code, Code::Ok as i32);
    }
    let metrics = http_get(server.metrics, "/metrics");
    assert!(
        metrics.contains(r#"arbiter_rls_shadow_mode_total{domain="edge",rule="canary"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"arbiter_rls_over_limit_total{domain="edge",rule="remote_address"} 1"#)
    );
    assert!(metrics.contains(r#"arbiter_rls_hits_total{domain="edge",rule="login"} 1"#));
    // The third of 3 left nothing: near the limit (at least 80 % used).
    assert!(
        metrics.contains(r#"arbiter_rls_near_limit_total{domain="edge",rule="remote_address"} 1"#)
    );
    assert!(metrics.contains(r#"arbiter_config_generation{what="limits"} 1"#));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_request_consumes_nothing_unless_asked_to() {
    let cm = ConfigMap::new(&[("edge.yaml", EDGE)]);
    for consume_on_deny in [false, true] {
        let mut args = vec!["--limits", cm.path().to_str().unwrap()];
        if consume_on_deny {
            args.push("--rls-consume-on-deny");
        }
        let server = Server::start(&args);
        let mut c = rls(&server).await;
        let login = || descriptor(&[("path", "/login")]);
        let addr = || descriptor(&[("remote_address", "a")]);
        // Use up /login (2 an hour).
        ask(&mut c, request("edge", vec![login(), login()])).await;
        // Over on /login: the address's counter is untouched by default.
        let r = ask(&mut c, request("edge", vec![addr(), login()])).await;
        assert_eq!(codes(&r), [Code::Ok, Code::OverLimit]);
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        let r = ask(&mut c, request("edge", vec![addr()])).await;
        let left = r.statuses[0].limit_remaining;
        assert_eq!(
            left,
            if consume_on_deny { 1 } else { 2 },
            "consume_on_deny={consume_on_deny}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hits_overrides_and_headers() {
    let cm = ConfigMap::new(&[("edge.yaml", EDGE)]);
    let server = Server::start(&["--limits", cm.path().to_str().unwrap(), "--rls-headers"]);
    let mut c = rls(&server).await;
    // The request's hits_addend, and a descriptor's own.
    let mut r = request("edge", vec![descriptor(&[("remote_address", "h")])]);
    r.hits_addend = 2;
    assert_eq!(ask(&mut c, r.clone()).await.statuses[0].limit_remaining, 1);
    r.descriptors[0].hits_addend = Some(5);
    assert_eq!(ask(&mut c, r).await.overall_code, Code::OverLimit as i32);
    // An override limits even an unmatched descriptor.
    let mut d = descriptor(&[("tenant", "t1")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: 3, // HOUR
    });
    let first = ask(&mut c, request("edge", vec![d.clone()])).await;
    assert_eq!(first.overall_code, Code::Ok as i32);
    let headers: Vec<(String, String)> = first
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    // As envoyproxy/ratelimit sends them: the limit alone, what remains,
    // whole seconds until the window resets.
    assert_eq!(headers[0], ("RateLimit-Limit".into(), "1".into()));
    assert_eq!(headers[1], ("RateLimit-Remaining".into(), "0".into()));
    let reset: u64 = headers[2].1.parse().unwrap();
    assert!(headers[2].0 == "RateLimit-Reset" && reset > 0 && reset <= 3600);
    assert_eq!(
        ask(&mut c, request("edge", vec![d])).await.overall_code,
        Code::OverLimit as i32
    );
    // Bad requests name the field.
    let e = c.should_rate_limit(request("", vec![])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("domain"), "{}", e.message());
    let e = c
        .should_rate_limit(request("edge", vec![]))
        .await
        .unwrap_err();
    assert!(e.message().contains("descriptors"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_configmap_applies_and_a_broken_one_keeps_the_last_good() {
    let mut cm = ConfigMap::new(&[("edge.yaml", EDGE)]);
    let server = Server::start(&["--limits", cm.path().to_str().unwrap()]);
    let mut c = rls(&server).await;
    let limit_of = |r: &RateLimitResponse| {
        r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit)
    };
    let r = ask(
        &mut c,
        request("edge", vec![descriptor(&[("remote_address", "r")])]),
    )
    .await;
    assert_eq!(limit_of(&r), Some(3));
    cm.swap(&[(
        "edge.yaml",
        &EDGE.replace("requests_per_unit: 3", "requests_per_unit: 7"),
    )]);
    eventually("the new limit applies", || async {
        let r = ask(
            &mut rls(&server).await,
            request("edge", vec![descriptor(&[("remote_address", "r")])]),
        )
        .await;
        (limit_of(&r) == Some(7)).then_some(())
    })
    .await;
    // Broken YAML: refused with its line, counted, the last good kept.
    cm.swap(&[("edge.yaml", "domain: edge\ndescriptors:\n  - key: [oops\n")]);
    eventually("the bad change is refused", || async {
        let m = http_get(server.metrics, "/metrics");
        m.contains(r#"arbiter_config_reload_failures_total{what="limits"} 1"#)
            .then_some(())
    })
    .await;
    let logged = server.log().join("\n");
    assert!(
        logged.contains("edge.yaml") && logged.contains("line"),
        "{logged}"
    );
    let r = ask(
        &mut c,
        request("edge", vec![descriptor(&[("remote_address", "s")])]),
    )
    .await;
    assert_eq!(limit_of(&r), Some(7), "the last good limits stay");
    let m = http_get(server.metrics, "/metrics");
    assert!(
        m.contains(r#"arbiter_config_generation{what="limits"} 2"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_checks_name_configured_rules() {
    let cm = ConfigMap::new(&[("edge.yaml", EDGE)]);
    let server = Server::start(&["--limits", cm.path().to_str().unwrap()]);
    let mut c = server.limits().await;
    let named = |entries: &[(&str, &str)]| LimitCheck {
        key: String::new(),
        limit: None,
        cost: None,
        dry_run: false,
        max_delay_ms: 0,
        named: Some(NamedLimit {
            domain: "edge".into(),
            entries: entries
                .iter()
                .map(|(k, v)| named_limit::Entry {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        }),
    };
    let check = |checks: Vec<LimitCheck>| CheckRequest {
        checks,
        all_or_nothing: false,
    };
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = c
            .check(check(vec![named(&[("path", "/login")])]))
            .await
            .unwrap()
            .into_inner();
        seen.push((r.results[0].allowed, r.results[0].limit));
    }
    assert_eq!(seen, [(true, 2), (true, 2), (false, 2)]);
    // The same counter Envoy's requests use.
    let mut e = rls(&server).await;
    let r = ask(
        &mut e,
        request("edge", vec![descriptor(&[("path", "/login")])]),
    )
    .await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let r = c
        .check(check(vec![named(&[("client", "internal")])]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.results[0].allowed && r.results[0].remaining == u64::MAX);
    // Reserve mode is a leaky bucket's, not a named rule's.
    let mut reserve = named(&[("path", "/login")]);
    reserve.max_delay_ms = 1000;
    let err = c.check(check(vec![reserve])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("checks[0].max_delay_ms:"),
        "{}",
        err.message()
    );
    let err = c
        .check(check(vec![named(&[("nothing", "x")])]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("checks[0].named: no rule of domain \"edge\" matches nothing=x"),
        "{}",
        err.message()
    );
    // The CLI names rules too: exit 0 allowed, 2 denied.
    let cli = |entries: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_arbiter"))
            .args(["check", "--server", &format!("http://{}", server.addr)])
            .args(["--domain", "edge", "--descriptor", entries])
            .output()
            .unwrap()
    };
    let out = cli("remote_address=cli");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("allowed limit=3 remaining=2"));
    assert_eq!(cli("path=/login").status.code(), Some(2));
    let mut both = named(&[("path", "/login")]);
    both.key = "k".into();
    let err = c.check(check(vec![both])).await.unwrap_err();
    assert!(
        err.message().contains("key and limit must be empty"),
        "{}",
        err.message()
    );
}

#[test]
fn limits_check_validates_offline() {
    let dir = fresh_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("edge.yaml"), EDGE).unwrap();
    let bin = env!("CARGO_BIN_EXE_arbiter");
    let out = std::process::Command::new(bin)
        .args(["limits", "check", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 domain(s): edge"));
    std::fs::write(
        dir.join("more.yaml"),
        "domain: more\ndescriptors:\n  - key: a\n    value: b\n  - key: a\n    value: b\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["limits", "check", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("more.yaml") && err.contains("the same key and value twice"),
        "{err}"
    );
    // A server will not start on a broken file either.
    let (status, log) = crate::support::refused_start(
        &fresh_dir(),
        &["--limits", dir.join("more.yaml").to_str().unwrap()],
    );
    assert!(
        !status.success() && log.contains("the same key and value twice"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every member serves the same limits from its own copy of the files, a
/// follower's answers are decided by the leader (one counter), and a change
/// applies on every member.
#[tokio::test(flavor = "multi_thread")]
async fn every_member_answers_from_one_counter_and_reloads() {
    let mut cm = ConfigMap::new(&[("edge.yaml", EDGE)]);
    let mut cluster = Cluster::start(
        3,
        &[
            "--limits",
            cm.path().to_str().unwrap(),
            "--leader-wait-ms",
            "500",
        ],
    );
    let leader = cluster.leader().await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(rls(cluster.node(i)).await);
    }
    let addr = || request("edge", vec![descriptor(&[("remote_address", "shared")])]);
    // 3 an hour in all, whichever member is asked.
    let mut codes_seen = Vec::new();
    for i in [(leader + 1) % 3, (leader + 2) % 3, leader, (leader + 1) % 3] {
        codes_seen.push(ask(&mut clients[i], addr()).await.overall_code);
    }
    assert_eq!(codes_seen, [1, 1, 1, 2], "OK, OK, OK, OVER_LIMIT");
    cm.swap(&[(
        "edge.yaml",
        &EDGE.replace("requests_per_unit: 3", "requests_per_unit: 9"),
    )]);
    for i in 0..3 {
        let node = cluster.node(i);
        eventually("every member applies the change", || async {
            let r = ask(
                &mut rls(node).await,
                request("edge", vec![descriptor(&[("remote_address", "x")])]),
            )
            .await;
            (r.statuses[0]
                .current_limit
                .as_ref()
                .map(|l| l.requests_per_unit)
                == Some(9))
            .then_some(())
        })
        .await;
    }
    // Without a majority: UNAVAILABLE, so Envoy's failure_mode_deny decides.
    let survivor = (leader + 1) % 3;
    cluster.kill9(leader);
    cluster.kill9((leader + 2) % 3);
    let c = rls(cluster.node(survivor)).await;
    eventually("UNAVAILABLE from the lone survivor", || {
        let mut c = c.clone();
        async move {
            c.should_rate_limit(addr())
                .await
                .err()
                .filter(|e| e.code() == tonic::Code::Unavailable)
        }
    })
    .await;
}

/// A request carrying `token` as a bearer token.
fn as_bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// The named limits' keyspace (`rls/...`) is theirs: a plain Check on one
/// of its keys (which, with another algorithm, starts Envoy's counter
/// afresh) is refused for a principal that is not admin, even one whose
/// namespaces cover `rls/`; an admin may. Seen failing before the fix: the
/// Check reset the counter and the next ShouldRateLimit was allowed.
#[tokio::test(flavor = "multi_thread")]
async fn the_named_limits_keyspace_is_reserved() {
    use crate::rate_limiter::{lc, tb};
    use crate::security::sha256_hex;
    let cm = ConfigMap::new(&[("edge.yaml", EDGE)]);
    let auth = cm.path().with_extension("auth.yaml");
    std::fs::write(
        &auth,
        format!(
            "principals:\n  - name: envoy\n    token_sha256: \"{}\"\n    namespaces: [\"rls/\"]\n  \
             - name: ops\n    token_sha256: \"{}\"\n    namespaces: [\"*\"]\n    admin: true\n",
            sha256_hex("envoy-token"),
            sha256_hex("ops-token")
        ),
    )
    .unwrap();
    let server = Server::start(&[
        "--limits",
        cm.path().to_str().unwrap(),
        "--auth-file",
        auth.to_str().unwrap(),
    ]);
    let mut c = rls(&server).await;
    let edge = || request("edge", vec![descriptor(&[("remote_address", "10.0.0.9")])]);
    let mut codes_seen = Vec::new();
    for _ in 0..4 {
        let r = c
            .should_rate_limit(as_bearer(edge(), "envoy-token"))
            .await
            .unwrap()
            .into_inner();
        codes_seen.push(r.overall_code);
    }
    assert_eq!(
        codes_seen.last(),
        Some(&(Code::OverLimit as i32)),
        "{codes_seen:?}"
    );
    let key = "rls/edge/remote_address=10.0.0.9";
    let check = || CheckRequest {
        checks: vec![lc(key, tb(100, 100, 1000), None)],
        all_or_nothing: false,
    };
    let mut limits = server.limits().await;
    let refused = limits
        .check(as_bearer(check(), "envoy-token"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("rls/"), "{refused:?}");
    // Envoy's counter is untouched.
    let r = c
        .should_rate_limit(as_bearer(edge(), "envoy-token"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    // An admin may (to repair a counter by hand).
    limits
        .check(as_bearer(check(), "ops-token"))
        .await
        .expect("an admin may check a named limit's key");
    drop(server);
    let _ = std::fs::remove_file(&auth);
}

/// Named limits are decided by one path, so Envoy's rate limit service and
/// `LimitCheck.named` in `arbiter.v1` agree on the same requests: a rule
/// that another matched rule `replaces` limits nothing, and a shadow-mode
/// rule counts but never denies. Seen failing before the two front doors
/// shared their decision: `replaces` held only for Envoy, and the replaced
/// rule denied the second `arbiter.v1` request.
#[tokio::test(flavor = "multi_thread")]
async fn both_front_doors_decide_named_limits_alike() {
    const TWIN: &str = "domain: twin
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 1, name: general}
  - key: b
    value: vip
    rate_limit: {unit: minute, requests_per_unit: 100, replaces: [{name: general}]}
  - key: s
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
";
    let cm = ConfigMap::new(&[("twin.yaml", TWIN)]);
    let server = Server::start(&["--limits", cm.path().to_str().unwrap()]);
    let mut envoy = rls(&server).await;
    let mut v1 = server.limits().await;
    // Each door asks with entries of its own; each request gives which of
    // its asks were allowed.
    let mut envoy_seen = Vec::new();
    let mut v1_seen = Vec::new();
    for (door, seen) in [("envoy", &mut envoy_seen), ("v1", &mut v1_seen)] {
        let a = || ("a".to_string(), door.to_string());
        let vip = || ("b".to_string(), "vip".to_string());
        let s = || ("s".to_string(), door.to_string());
        let requests = [
            vec![vec![a()], vec![vip()]],
            vec![vec![a()], vec![vip()]],
            vec![vec![a()]],
            vec![vec![a()]],
            vec![vec![s()]],
            vec![vec![s()]],
        ];
        for entries in requests {
            let allowed: Vec<bool> = if door == "envoy" {
                let descriptors = entries
                    .iter()
                    .map(|e| {
                        let e: Vec<(&str, &str)> =
                            e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                        descriptor(&e)
                    })
                    .collect();
                codes(&ask(&mut envoy, request("twin", descriptors)).await)
                    .into_iter()
                    .map(|c| c == Code::Ok)
                    .collect()
            } else {
                let checks = entries
                    .into_iter()
                    .map(|e| arbiter::proto::LimitCheck {
                        key: String::new(),
                        limit: None,
                        cost: None,
                        dry_run: false,
                        max_delay_ms: 0,
                        named: Some(NamedLimit {
                            domain: "twin".into(),
                            entries: e
                                .into_iter()
                                .map(|(key, value)| named_limit::Entry { key, value })
                                .collect(),
                        }),
                    })
                    .collect();
                v1.check(CheckRequest {
                    checks,
                    all_or_nothing: true,
                })
                .await
                .unwrap()
                .into_inner()
                .results
                .iter()
                .map(|r| r.allowed)
                .collect()
            };
            seen.push(allowed);
        }
    }
    let want: Vec<Vec<bool>> = vec![
        vec![true, true],
        vec![true, true], // `a` is replaced by the vip rule: not counted
        vec![true],       // alone, `a` is limited: its first
        vec![false],      // and its second, over 1 a minute
        vec![true],
        vec![true], // shadow mode: over its limit, still allowed
    ];
    assert_eq!(envoy_seen, want, "Envoy's rate limit service");
    assert_eq!(v1_seen, want, "arbiter.v1 named checks");
}
