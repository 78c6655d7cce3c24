//! Compatibility with envoyproxy/ratelimit: its configuration files
//! (written out in `tests/fixtures/envoy_ratelimit`) load here exactly when
//! they load there, each request descriptor of its config tests matches
//! the rule it matches there, and its integration tests' request sequences
//! get the same answers through `ShouldRateLimit` on a real server, in
//! both accounting modes where Arbiter's default differs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use arbiter::envoy::service::ratelimit::v3::rate_limit_response::Code;
use arbiter::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use arbiter::limits::Limits;

use crate::rls::{ask, descriptor, request, rls};
use crate::support::{eventually_within, fresh_dir, Server};

const SECOND: i32 = 1;
const MINUTE: i32 = 2;
const HOUR: i32 = 3;
const DAY: i32 = 4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/envoy_ratelimit")
        .join(name)
}

/// A directory holding copies of `files` (as a ConfigMap would mount them).
fn dir_of(files: &[&str]) -> PathBuf {
    let dir = fresh_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for f in files {
        let to = dir.join(Path::new(f).file_name().unwrap());
        std::fs::copy(fixture(f), to).unwrap();
    }
    dir
}

/// Each file (or set of files, loaded together) and whether
/// envoyproxy/ratelimit loads it: `None`, or the refusal's gist (Arbiter's
/// message must name it). As its `test/config/config_test.go` pins them.
const LOADS: &[(&[&str], bool, Option<&str>)] = &[
    (&["basic_config.yaml"], false, None),
    (&["bad_limit_unit.yaml"], false, Some("rate_limit.unit")),
    (&["bad_yaml.yaml"], false, Some("")),
    (&["duplicate_domain.yaml"], false, None),
    (
        &["basic_config.yaml", "duplicate_domain.yaml"],
        false,
        Some("domain \"test-domain\" is also configured"),
    ),
    (
        &["duplicate_key.yaml"],
        false,
        Some("\"key1=value1\": the same key and value twice"),
    ),
    (&["empty_domain.yaml"], false, Some("domain")),
    (&["empty_key.yaml"], false, Some("key")),
    (&["misspelled_key.yaml"], false, Some("ratelimit")),
    (&["misspelled_key2.yaml"], false, Some("requestsperunit")),
    (&["non_map_list.yaml"], false, Some("")),
    (&["non_string_key.yaml"], false, Some("")),
    (
        &["replaces_empty.yaml"],
        false,
        Some("replaces[0].name: must not be empty"),
    ),
    (&["replaces_self.yaml"], false, Some("this rule's own name")),
    (
        &["unlimited_with_unit.yaml"],
        false,
        Some("not with unlimited"),
    ),
    (&["shadowmode_config.yaml"], false, None),
    (&["wildcard.yaml"], false, None),
    (&["share_threshold.yaml"], false, None),
    (&["metadata.yaml"], false, None),
    (
        &["merge_domain_key1.yaml", "merge_domain_key2.yaml"],
        false,
        Some("--limits-merge-domains"),
    ),
    (
        &["merge_domain_key1.yaml", "merge_domain_key2.yaml"],
        true,
        None,
    ),
    (
        &["basic_config.yaml", "merge_domain_key1.yaml"],
        true,
        Some("descriptor \"key1=value1\" of domain \"test-domain\" is also configured"),
    ),
    (&["integration_basic.yaml"], false, None),
    (&["integration_another.yaml"], false, None),
    (&["integration_share_threshold.yaml"], false, None),
    (&["examples/config.yaml"], false, None),
    (&["examples/example.yaml"], false, None),
];

#[test]
fn every_file_loads_exactly_when_envoyproxy_ratelimit_loads_it() {
    for (files, merge, refusal) in LOADS {
        let dir = dir_of(files);
        let loaded = Limits::load(&dir, *merge);
        match (refusal, loaded) {
            (None, Ok(_)) => {}
            (Some(gist), Err(e)) => {
                assert!(e.contains(gist), "{files:?}: {e}");
                // The message names the file.
                let named = files
                    .iter()
                    .any(|f| e.contains(Path::new(f).file_name().unwrap().to_str().unwrap()));
                assert!(named, "{files:?}: {e}");
            }
            (None, Err(e)) => panic!("{files:?} loads in envoyproxy/ratelimit; here: {e}"),
            (Some(_), Ok(_)) => {
                panic!("{files:?} is refused by envoyproxy/ratelimit; here it loads")
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// What a descriptor matched, as a status shows it.
#[derive(Debug, PartialEq)]
enum Rule {
    /// requests per unit, unit, name.
    Limited(u32, i32, &'static str),
    Unlimited,
    None,
}

fn rule_of(r: &RateLimitResponse) -> Rule {
    let s = &r.statuses[0];
    match &s.current_limit {
        Some(l) => Rule::Limited(
            l.requests_per_unit,
            l.unit,
            Box::leak(l.name.clone().into_boxed_str()),
        ),
        None if s.limit_remaining == u32::MAX => Rule::Unlimited,
        None => Rule::None,
    }
}

/// Asks once for each descriptor and compares the rule it matched; dry
/// enough (one hit per distinct descriptor, limits of 5 and more) that no
/// answer is over.
async fn expect_rules(config: &str, cases: &[(&[(&str, &str)], Rule)]) {
    let server = Server::start(&["--limits", fixture(config).to_str().unwrap()]);
    let mut c = rls(&server).await;
    for (entries, want) in cases {
        let r = ask(&mut c, request("test-domain", vec![descriptor(entries)])).await;
        assert_eq!(&rule_of(&r), want, "{config}: {entries:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn descriptors_match_the_rules_they_match_there() {
    use Rule::*;
    expect_rules(
        "basic_config.yaml",
        &[
            (&[("key1", "something")], None),
            (&[("key1", "value1")], None),
            (&[("key2", "value2"), ("subkey", "subvalue")], None),
            (&[("key5", "value5"), ("subkey5", "subvalue")], None),
            (
                &[("key1", "value1"), ("subkey1", "something")],
                Limited(5, SECOND, ""),
            ),
            (
                &[("key1", "value1"), ("subkey1", "subvalue1")],
                Limited(10, SECOND, ""),
            ),
            (&[("key2", "something")], Limited(20, MINUTE, "")),
            (&[("key2", "value2")], Limited(30, MINUTE, "")),
            (&[("key2", "value3")], None),
            (&[("key3", "foo")], Limited(1, HOUR, "")),
            (&[("key4", "foo")], Limited(1, DAY, "key4_rate_limit")),
            (&[("key6", "foo")], Unlimited),
            (&[("key7", "unspecified_value")], Limited(70, MINUTE, "")),
            (&[("key7", "another_value")], Limited(70, MINUTE, "")),
        ],
    )
    .await;
    expect_rules(
        "wildcard.yaml",
        &[
            (&[("noVal", "foo1")], Limited(20, MINUTE, "")),
            (&[("wild", "foo1")], Limited(20, MINUTE, "")),
            (&[("wild", "foo")], Limited(20, MINUTE, "")),
            (
                &[("nestedWild", "val1"), ("wild", "goo2")],
                Limited(20, MINUTE, ""),
            ),
            (&[("wild", "bar")], None),
            (&[("noWild", "foo1")], None),
            (&[("midWild", "barab")], Limited(20, MINUTE, "")),
            (&[("midWild", "bar123b")], Limited(20, MINUTE, "")),
            (&[("midWild", "barb")], Limited(20, MINUTE, "")),
            (&[("midWild", "bara")], None),
            (&[("midWild", "xbarb")], None),
            (&[("multiWild", "foo123bar456baz")], Limited(10, MINUTE, "")),
            (&[("multiWild", "foobarbaz")], Limited(10, MINUTE, "")),
            (&[("multiWild", "foo123baz")], None),
            (&[("multiWild", "bar456baz")], None),
        ],
    )
    .await;
    expect_rules(
        "share_threshold.yaml",
        &[
            (&[("files", "files/a.pdf")], Limited(100, MINUTE, "")),
            (
                &[("nested", "parent"), ("files", "nested/x")],
                Limited(200, MINUTE, ""),
            ),
            (
                &[("files", "top/a"), ("files", "nested/b")],
                Limited(300, MINUTE, ""),
            ),
            (
                &[("route", "api/v1"), ("method", "GET")],
                Limited(60, MINUTE, ""),
            ),
            (
                &[("service", "svc/a"), ("endpoint", "e")],
                Limited(80, MINUTE, ""),
            ),
            (
                &[("path", "path/a"), ("file", "file/b"), ("type", "t")],
                Limited(120, MINUTE, ""),
            ),
            (
                &[("user", "user/a"), ("resource", "res/b"), ("action", "x")],
                Limited(150, MINUTE, ""),
            ),
            (&[("file", "test1")], Limited(50, MINUTE, "")),
            (&[("file", "test2")], Limited(100, MINUTE, "")),
            (&[("midpath", "/api/x/v1")], Limited(100, MINUTE, "")),
            (&[("multiroute", "svc-a-ep-b-rpc")], Limited(50, MINUTE, "")),
            (&[("midroute", "/api/y/v2")], Limited(80, MINUTE, "")),
            (
                &[("tenant", "t1prod"), ("resource", "res1v2")],
                Limited(60, MINUTE, ""),
            ),
        ],
    )
    .await;
    expect_rules(
        "shadowmode_config.yaml",
        &[
            (
                &[("key1", "value1"), ("subkey1", "x")],
                Limited(5, SECOND, ""),
            ),
            (
                &[("key1", "value1"), ("subkey1", "subvalue1")],
                Limited(10, SECOND, ""),
            ),
            (&[("key2", "x")], Limited(20, MINUTE, "")),
            (&[("key2", "value2")], Limited(30, MINUTE, "")),
        ],
    )
    .await;
}

/// Waits, if need be, until the current minute window has at least 10 s
/// left, so a sequence of a few dozen calls stays in one window: asks with
/// fresh values of `key`, limited per minute in `domain`.
async fn in_one_minute(c: &mut crate::rls::Client, domain: &str, key: &str, probe: &str) {
    let mut n = 0;
    // Up to 10 s for the next window, so more than `eventually`'s deadline.
    eventually_within(
        Duration::from_secs(30),
        "a minute window with 10 s left",
        || {
            n += 1;
            let r = request(domain, vec![descriptor(&[(key, &format!("{probe}-{n}"))])]);
            let mut c = c.clone();
            async move {
                let s = ask(&mut c, r).await.statuses[0].clone();
                (s.duration_until_reset.unwrap().seconds >= 10).then_some(())
            }
        },
    )
    .await;
}

/// envoyproxy/ratelimit's integration sequences (`testBasicBaseConfig`,
/// `testShareThreshold`) against its integration configuration, with
/// `--rls-consume-on-deny` (its accounting) and without (Arbiter's
/// all-or-nothing, which matches its `StopCacheKeyIncrementWhenOverlimit`).
#[tokio::test(flavor = "multi_thread")]
async fn its_request_sequences_get_the_same_answers() {
    let dir = dir_of(&[
        "integration_basic.yaml",
        "integration_another.yaml",
        "integration_share_threshold.yaml",
    ]);
    for consume_on_deny in [true, false] {
        let mut args = vec!["--limits", dir.to_str().unwrap()];
        if consume_on_deny {
            args.push("--rls-consume-on-deny");
        }
        let server = Server::start(&args);
        let mut c = rls(&server).await;
        // An unknown domain: OK, no limit, nothing remaining.
        let r = ask(
            &mut c,
            request("foo", vec![descriptor(&[("hello", "world")])]),
        )
        .await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(
            (r.statuses[0].code, r.statuses[0].limit_remaining),
            (Code::Ok as i32, 0)
        );
        assert_eq!(r.statuses[0].current_limit, None);
        let r = ask(
            &mut c,
            request("basic", vec![descriptor(&[("key1", "foo")])]),
        )
        .await;
        assert_eq!(rule_of(&r), Rule::Limited(50, SECOND, ""));
        assert_eq!(r.statuses[0].limit_remaining, 49);

        // 25 calls against 20 a minute.
        in_one_minute(
            &mut c,
            "another",
            "key2",
            &format!("probe-{consume_on_deny}"),
        )
        .await;
        let value = format!("v-{consume_on_deny}");
        for i in 0..25u32 {
            let r = ask(
                &mut c,
                request("another", vec![descriptor(&[("key2", &value)])]),
            )
            .await;
            let (code, remaining) = if i >= 20 {
                (Code::OverLimit, 0)
            } else {
                (Code::Ok, 20 - (i + 1))
            };
            assert_eq!(r.overall_code, code as i32, "call {i}");
            assert_eq!(r.statuses[0].limit_remaining, remaining, "call {i}");
            assert_eq!(rule_of(&r), Rule::Limited(20, MINUTE, ""));
        }

        // Two keys: 20 a minute and 10 an hour, 15 times.
        in_one_minute(
            &mut c,
            "another",
            "key2",
            &format!("probe2-{consume_on_deny}"),
        )
        .await;
        let value = format!("w-{consume_on_deny}");
        for i in 0..15u32 {
            let r = ask(
                &mut c,
                request(
                    "another",
                    vec![
                        descriptor(&[("key2", &value)]),
                        descriptor(&[("key3", &value)]),
                    ],
                ),
            )
            .await;
            let over = i >= 10;
            // Over the hour's limit, envoyproxy/ratelimit still counts the
            // minute's; all-or-nothing does not.
            let first = if over && !consume_on_deny {
                10
            } else {
                20 - (i + 1)
            };
            let second = if over { 0 } else { 10 - (i + 1) };
            let want = if over { Code::OverLimit } else { Code::Ok } as i32;
            assert_eq!(r.overall_code, want, "call {i}");
            assert_eq!(
                [r.statuses[0].code, r.statuses[1].code],
                [Code::Ok as i32, want],
                "call {i}"
            );
            assert_eq!(
                [r.statuses[0].limit_remaining, r.statuses[1].limit_remaining],
                [first, second],
                "call {i} (consume on deny: {consume_on_deny})"
            );
        }
        // A day's window resets within a day.
        let r = ask(
            &mut c,
            request("another", vec![descriptor(&[("key4", "durTest")])]),
        )
        .await;
        let reset = r.statuses[0].duration_until_reset.unwrap().seconds;
        assert!(reset > 0 && reset <= 86_400, "{reset}");

        // share_threshold: every value under files/* shares one counter;
        // without it each value has its own.
        let domain = "share-threshold-test";
        for i in 0..10 {
            let v = format!("files/{consume_on_deny}-{i}.pdf");
            let r = ask(&mut c, request(domain, vec![descriptor(&[("files", &v)])])).await;
            assert_eq!(r.statuses[0].limit_remaining, 9 - i, "call {i}");
        }
        let r = ask(
            &mut c,
            request(domain, vec![descriptor(&[("files", "files/b.csv")])]),
        )
        .await;
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        assert_eq!(rule_of(&r), Rule::Limited(10, HOUR, ""));
        assert_eq!(r.statuses[0].limit_remaining, 0);
        for i in 0..10 {
            let v = format!("files_no_share/{consume_on_deny}-{i}");
            let r = ask(
                &mut c,
                request(domain, vec![descriptor(&[("files_no_share", &v)])]),
            )
            .await;
            assert_eq!(r.overall_code, Code::Ok as i32);
            assert_eq!(r.statuses[0].limit_remaining, 9);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Its example configuration: `replaces` inside `rate_limit`, quota mode
/// (a request is over limit only when every quota-mode descriptor is), and
/// descriptor metadata returned as dynamic metadata.
#[tokio::test(flavor = "multi_thread")]
async fn its_example_replaces_quota_mode_and_metadata_behave_the_same() {
    let example = fixture("examples/example.yaml");
    let server = Server::start(&[
        "--limits",
        example.to_str().unwrap(),
        "--rls-dynamic-metadata",
        "--rls-headers",
    ]);
    let mut c = rls(&server).await;
    // Every call below counts in one minute window.
    in_one_minute(&mut c, "rl", "unspec", "probe").await;
    // category=account replaces the rule named bkthomps.
    let both = request(
        "rl",
        vec![
            descriptor(&[("category", "account")]),
            descriptor(&[("foo", "f"), ("bar", "bkthomps")]),
        ],
    );
    let r = ask(&mut c, both).await;
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        4
    );
    assert_eq!(r.statuses[1].current_limit, None, "replaced");
    let alone = ask(
        &mut c,
        request("rl", vec![descriptor(&[("foo", "f"), ("bar", "bkthomps")])]),
    )
    .await;
    assert_eq!(rule_of(&alone), Rule::Limited(1, MINUTE, "bkthomps"));

    // Quota mode: service_1 allows 1 a minute, service_2 2 a minute.
    let quota = |c: &mut crate::rls::Client| {
        let r: RateLimitRequest = request(
            "rl",
            vec![
                descriptor(&[("service", "service_1")]),
                descriptor(&[("service", "service_2")]),
            ],
        );
        let mut c = c.clone();
        async move { ask(&mut c, r).await }
    };
    let first = quota(&mut c).await;
    assert_eq!(first.overall_code, Code::Ok as i32);
    let meta = first.dynamic_metadata.as_ref().expect("dynamic metadata");
    assert_eq!(string_at(meta, &["domain"]), Some("rl"));
    // Both passed: their metadata merge, the first value kept.
    assert_eq!(
        string_at(meta, &["metadata", "service_with_quota", "name"]),
        Some("service_1")
    );
    let second = quota(&mut c).await;
    assert_eq!(
        (
            second.overall_code,
            second.statuses[0].code,
            second.statuses[1].code
        ),
        (Code::Ok as i32, Code::OverLimit as i32, Code::Ok as i32),
        "one quota descriptor over: the request passes"
    );
    let meta = second.dynamic_metadata.as_ref().unwrap();
    assert_eq!(
        string_at(meta, &["metadata", "service_with_quota", "name"]),
        Some("service_2"),
        "only the descriptors that passed"
    );
    let third = quota(&mut c).await;
    assert_eq!(
        third.overall_code,
        Code::OverLimit as i32,
        "every quota descriptor over"
    );
    // Over limit so, the request consumes nothing from its other
    // descriptors (all-or-nothing), which still report OK.
    let account = || descriptor(&[("category", "account")]);
    let mixed = request(
        "rl",
        vec![
            descriptor(&[("service", "service_1")]),
            descriptor(&[("service", "service_2")]),
            account(),
        ],
    );
    let r = ask(&mut c, mixed).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[2].code, Code::Ok as i32);
    let after = ask(&mut c, request("rl", vec![account()])).await;
    assert_eq!(
        after.statuses[0].limit_remaining, 2,
        "4 a minute: one taken at the start, one now, none by the denied request"
    );
    // The headers describe the tightest limit: the limit alone, what
    // remains, seconds to the window's end.
    let headers: Vec<(&str, &str)> = third
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(
        &headers[..2],
        &[("RateLimit-Limit", "1"), ("RateLimit-Remaining", "0")]
    );
    assert_eq!(headers[2].0, "RateLimit-Reset");
    let reset: u64 = headers[2].1.parse().unwrap();
    assert!(reset > 0 && reset <= 60, "{reset}");
}

fn string_at<'a>(s: &'a prost_types::Struct, path: &[&str]) -> Option<&'a str> {
    use prost_types::value::Kind;
    let (last, parents) = path.split_last()?;
    let mut at = s;
    for p in parents {
        match &at.fields.get(*p)?.kind {
            Some(Kind::StructValue(inner)) => at = inner,
            _ => return None,
        }
    }
    match &at.fields.get(*last)?.kind {
        Some(Kind::StringValue(v)) => Some(v),
        _ => None,
    }
}
