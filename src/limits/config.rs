//! Named limits in envoyproxy/ratelimit's configuration format, with
//! Arbiter's additions (`algorithm`, `burst`): the loaded rules and
//! descriptor matching (the file format is read in `file.rs`).
//!
//! ```yaml
//! domain: edge
//! descriptors:
//!   - key: remote_address            # no value: each address its own counter
//!     rate_limit: {unit: second, requests_per_unit: 10}
//!   - key: path
//!     value: /login
//!     rate_limit: {unit: minute, requests_per_unit: 5, algorithm: sliding_window}
//!     descriptors:                   # nested: matches [path=/login, user=*]
//!       - key: user
//!         rate_limit: {unit: hour, requests_per_unit: 100, algorithm: token_bucket, burst: 20}
//! ```
//!
//! Matching follows envoyproxy/ratelimit: at each level a `key` + `value`
//! rule wins over a wildcard value (`*` anywhere, each matching any run of
//! characters; the first in the file that matches), which wins over a
//! `key`-only rule; a request descriptor matches only a rule at exactly its
//! depth.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use crate::engine::{LimitDef, MAX_WINDOW_MS};

/// A rule's time unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    /// The unit in ms (a month is 30 days, a year 365), or `None` when the
    /// engine cannot hold a window that long.
    pub fn millis(self) -> Option<u64> {
        let ms = match self {
            Unit::Second => 1_000,
            Unit::Minute => 60_000,
            Unit::Hour => 3_600_000,
            Unit::Day => 86_400_000,
            Unit::Week => 7 * 86_400_000,
            Unit::Month => 30 * 86_400_000,
            Unit::Year => 365 * 86_400_000,
        };
        (ms <= MAX_WINDOW_MS).then_some(ms)
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// Envoy's `RateLimitResponse.RateLimit.Unit` number.
    pub fn envoy(self) -> i32 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 2,
            Unit::Hour => 3,
            Unit::Day => 4,
            Unit::Month => 5,
            Unit::Year => 6,
            Unit::Week => 7,
        }
    }

    /// From Envoy's `type.v3.RateLimitUnit` number (a request's override).
    pub fn from_envoy(n: i32) -> Option<Unit> {
        Some(match n {
            1 => Unit::Second,
            2 => Unit::Minute,
            3 => Unit::Hour,
            4 => Unit::Day,
            5 => Unit::Month,
            6 => Unit::Year,
            7 => Unit::Week,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    FixedWindow,
    SlidingWindow,
    TokenBucket,
    /// Drains `requests_per_unit` per unit, `burst` (default: the same) at
    /// once; named checks of it are plain checks (no reserve mode).
    LeakyBucket,
}

// ---- the loaded form ----

/// A configured limit.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The metric label and the name reported to Envoy: the rule's `name`,
    /// or its descriptor path (`key=value.key`).
    pub id: String,
    /// `rate_limit.name` as configured ("" when absent).
    pub name: String,
    pub unit: Unit,
    pub requests_per_unit: u64,
    pub algorithm: Algorithm,
    pub burst: Option<u64>,
    pub unlimited: bool,
    pub shadow_mode: bool,
    /// Over its limit, it makes a request over limit only if every
    /// quota-mode descriptor of the request is over too.
    pub quota_mode: bool,
    /// `rate_limit.replaces`: the names of rules this one drops from a
    /// request that matches both.
    pub replaces: Vec<String>,
    /// The descriptor's `metadata`, returned to Envoy as dynamic metadata
    /// (`--rls-dynamic-metadata`) when the descriptor passes.
    pub metadata: Option<prost_types::Struct>,
    /// Its metrics, resolved on first use (see `limits::record`).
    pub counters: RuleCounters,
}

/// A rule's counters, looked up in the metrics registry once rather than
/// on every decision.
#[derive(Clone, Default)]
pub struct RuleCounters(Arc<OnceLock<[metrics::Counter; 4]>>);

impl std::fmt::Debug for RuleCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuleCounters")
    }
}

/// Counters are not part of what a rule is.
impl PartialEq for RuleCounters {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl RuleCounters {
    /// Hits, over limit, near limit and shadow-mode denials, registered
    /// under `domain` and `id` the first time.
    pub fn get(&self, domain: &str, id: &str) -> &[metrics::Counter; 4] {
        self.0.get_or_init(|| {
            let labels = [("domain", domain.to_owned()), ("rule", id.to_owned())];
            [
                metrics::counter!("arbiter_rls_hits_total", &labels),
                metrics::counter!("arbiter_rls_over_limit_total", &labels),
                metrics::counter!("arbiter_rls_near_limit_total", &labels),
                metrics::counter!("arbiter_rls_shadow_mode_total", &labels),
            ]
        })
    }
}

impl Rule {
    /// The engine definition, or `None` when the rule admits nothing
    /// (`requests_per_unit: 0`) or everything (`unlimited`).
    pub fn def(&self, requests_per_unit: u64, unit: Unit) -> Option<LimitDef> {
        if self.unlimited {
            return None;
        }
        self.def_ignoring_unlimited(requests_per_unit, unit)
    }

    /// As [`Rule::def`], for a caller's override of an `unlimited` rule.
    pub fn def_ignoring_unlimited(&self, requests_per_unit: u64, unit: Unit) -> Option<LimitDef> {
        let window_ms = unit.millis()?;
        if requests_per_unit == 0 {
            return None;
        }
        Some(match self.algorithm {
            Algorithm::FixedWindow => LimitDef::FixedWindow {
                limit: requests_per_unit,
                window_ms,
            },
            Algorithm::SlidingWindow => LimitDef::SlidingWindow {
                limit: requests_per_unit,
                window_ms,
            },
            Algorithm::TokenBucket => LimitDef::TokenBucket {
                capacity: self.burst.unwrap_or(requests_per_unit),
                refill_tokens: requests_per_unit,
                refill_interval_ms: window_ms,
            },
            Algorithm::LeakyBucket => LimitDef::LeakyBucket {
                rate: requests_per_unit,
                interval_ms: window_ms,
                burst: self.burst.unwrap_or(requests_per_unit),
            },
        })
    }
}

#[derive(Debug, Default)]
pub struct Level {
    /// key -> value -> node (nested, so a lookup borrows the request's strings).
    exact: HashMap<String, HashMap<String, Branch>>,
    /// Wildcard values, in file order: the first that matches wins.
    wildcard: Vec<Wildcard>,
    key_only: HashMap<String, Branch>,
}

/// A wildcard value (`foo*`, `/api*v1`, `svc*ep*rpc`) under a key.
#[derive(Debug)]
pub(super) struct Wildcard {
    key: String,
    /// The value as written.
    pattern: String,
    /// The value split at each `*`.
    parts: Vec<String>,
    branch: Branch,
}

impl Wildcard {
    pub(super) fn new(key: &str, pattern: &str, branch: Branch) -> Self {
        Self {
            key: key.to_owned(),
            pattern: pattern.to_owned(),
            parts: pattern.split('*').map(str::to_owned).collect(),
            branch,
        }
    }

    /// Whether `value` matches: it starts with the first part, ends with
    /// the last, and holds the others in order between them.
    fn matches(&self, value: &str) -> bool {
        let (first, last) = (&self.parts[0], &self.parts[self.parts.len() - 1]);
        let fixed: usize = self.parts.iter().map(String::len).sum();
        if value.len() < fixed
            || !value.starts_with(first.as_str())
            || !value.ends_with(last.as_str())
        {
            return false;
        }
        let mut rest = &value[first.len()..value.len() - last.len()];
        for part in &self.parts[1..self.parts.len() - 1] {
            match rest.find(part.as_str()) {
                Some(i) => rest = &rest[i + part.len()..],
                None => return false,
            }
        }
        true
    }
}

/// A descriptor entry: its rule, if any, and the entries under it.
#[derive(Debug, Default)]
pub(super) struct Branch {
    pub(super) rule: Option<Arc<Rule>>,
    /// `share_threshold`: every value its wildcard matches counts as one.
    pub(super) share: bool,
    pub(super) children: Level,
}

impl Level {
    /// Adds a `key` + `value` rule; false if that pair is there already.
    pub(super) fn add_exact(&mut self, key: &str, value: &str, branch: Branch) -> bool {
        let values = self.exact.entry(key.to_owned()).or_default();
        if values.contains_key(value) {
            return false;
        }
        values.insert(value.to_owned(), branch);
        true
    }

    pub(super) fn add_wildcard(&mut self, w: Wildcard) -> bool {
        let dup = self
            .wildcard
            .iter()
            .any(|o| o.key == w.key && o.pattern == w.pattern);
        if !dup {
            self.wildcard.push(w);
        }
        !dup
    }

    pub(super) fn add_key_only(&mut self, key: &str, branch: Branch) -> bool {
        if self.key_only.contains_key(key) {
            return false;
        }
        self.key_only.insert(key.to_owned(), branch);
        true
    }

    /// Adds another file's top-level entries for the same domain; the
    /// path of the first entry configured in both is the error.
    pub(super) fn merge(&mut self, other: Level) -> Result<(), String> {
        for (key, values) in other.exact {
            for (value, branch) in values {
                if !self.add_exact(&key, &value, branch) {
                    return Err(format!("{key}={value}"));
                }
            }
        }
        for w in other.wildcard {
            let at = format!("{}={}", w.key, w.pattern);
            if !self.add_wildcard(w) {
                return Err(at);
            }
        }
        for (key, branch) in other.key_only {
            if !self.add_key_only(&key, branch) {
                return Err(key);
            }
        }
        Ok(())
    }
}

/// The rule a request descriptor matched, and for each entry the wildcard
/// value it counts under when that wildcard has `share_threshold`.
#[derive(Debug)]
pub struct Matched<'a> {
    pub rule: &'a Arc<Rule>,
    pub shared: Vec<Option<&'a str>>,
}

impl Matched<'_> {
    /// The entries the descriptor is counted by: its own, with each shared
    /// value replaced by its wildcard.
    pub fn counted(&self, entries: &[(String, String)]) -> Option<Vec<(String, String)>> {
        self.shared.iter().any(Option::is_some).then(|| {
            entries
                .iter()
                .zip(&self.shared)
                .map(|((k, v), s)| (k.clone(), s.map_or_else(|| v.clone(), str::to_owned)))
                .collect()
        })
    }
}

/// Every configured domain, as last loaded.
#[derive(Debug, Default)]
pub struct Limits {
    pub(super) domains: HashMap<String, Level>,
    /// Circuit breaker thresholds by name (`breakers` files).
    pub breakers: HashMap<String, super::breakers::Thresholds>,
    /// The files they came from, for `limits check` and the log.
    pub files: Vec<PathBuf>,
}

impl Limits {
    /// One domain's rules (tests).
    pub fn with(domain: String, level: Level) -> Limits {
        let mut limits = Limits::default();
        limits.domains.insert(domain, level);
        limits
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(String::as_str)
    }

    /// The rule a descriptor's entries match in `domain`: the most specific
    /// rule at exactly the entries' depth, if any.
    pub fn matching(&self, domain: &str, entries: &[(String, String)]) -> Option<&Arc<Rule>> {
        self.matched(domain, entries).map(|m| m.rule)
    }

    /// [`Limits::matching`], with the entries' shared wildcards.
    pub fn matched(&self, domain: &str, entries: &[(String, String)]) -> Option<Matched<'_>> {
        let mut level = self.domains.get(domain)?;
        let mut node = None;
        let mut shared = Vec::new();
        for (key, value) in entries {
            let exact = level.exact.get(key).and_then(|values| values.get(value));
            let (next, share) = match exact {
                Some(b) => (b, None),
                None => match level
                    .wildcard
                    .iter()
                    .find(|w| w.key == *key && w.matches(value))
                {
                    Some(w) => (&w.branch, w.branch.share.then_some(w.pattern.as_str())),
                    None => (level.key_only.get(key)?, None),
                },
            };
            shared.push(share);
            level = &next.children;
            node = Some(next);
        }
        let rule = node?.rule.as_ref()?;
        Some(Matched { rule, shared })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::file::parse;

    fn limits(yaml: &str) -> Limits {
        let (domain, level) = parse(yaml).unwrap();
        let mut l = Limits::default();
        l.domains.insert(domain, level);
        l
    }

    fn entries(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const CONFIG: &str = r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: path
    value: /login
    rate_limit: {unit: minute, requests_per_unit: 5, algorithm: sliding_window, name: login}
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 100, algorithm: token_bucket, burst: 20}
  - key: path
    rate_limit: {unit: second, requests_per_unit: 50}
  - key: path
    value: /api/*
    rate_limit: {unit: second, requests_per_unit: 30}
  - key: path
    value: /api/v2/*
    rate_limit: {unit: second, requests_per_unit: 20}
  - key: client
    value: internal
    rate_limit: {unlimited: true}
  - key: tenant
    descriptors:
      - key: plan
        value: free
        rate_limit: {unit: day, requests_per_unit: 1000}
"#;

    #[test]
    fn key_and_value_beat_wildcards_which_beat_key_only() {
        let l = limits(CONFIG);
        let rpu = |e: &[(&str, &str)]| l.matching("edge", &entries(e)).map(|r| r.requests_per_unit);
        assert_eq!(rpu(&[("path", "/login")]), Some(5));
        assert_eq!(
            rpu(&[("path", "/api/v2/users")]),
            Some(30),
            "the first wildcard in the file that matches, as in envoyproxy/ratelimit"
        );
        assert_eq!(rpu(&[("path", "/api/v1/users")]), Some(30));
        assert_eq!(rpu(&[("path", "/other")]), Some(50));
        assert_eq!(rpu(&[("remote_address", "10.0.0.1")]), Some(10));
        assert_eq!(
            rpu(&[("path", "/login"), ("user", "ann")]),
            Some(100),
            "nested"
        );
        assert_eq!(rpu(&[("tenant", "t1"), ("plan", "free")]), Some(1000));
        assert_eq!(rpu(&[("tenant", "t1")]), None, "no rule at that depth");
        assert_eq!(
            rpu(&[("remote_address", "a"), ("user", "b")]),
            None,
            "deeper than the rule"
        );
        assert_eq!(rpu(&[("unknown", "x")]), None);
        assert!(l
            .matching("other", &entries(&[("path", "/login")]))
            .is_none());
        let unlimited = l
            .matching("edge", &entries(&[("client", "internal")]))
            .unwrap();
        assert!(unlimited.unlimited);
    }

    #[test]
    fn rules_become_engine_limits() {
        let l = limits(CONFIG);
        let login = l.matching("edge", &entries(&[("path", "/login")])).unwrap();
        assert_eq!(login.id, "login");
        assert_eq!(
            login.def(login.requests_per_unit, login.unit),
            Some(LimitDef::SlidingWindow {
                limit: 5,
                window_ms: 60_000
            })
        );
        let user = l
            .matching("edge", &entries(&[("path", "/login"), ("user", "x")]))
            .unwrap();
        assert_eq!(user.id, "path=/login.user");
        assert_eq!(
            user.def(user.requests_per_unit, user.unit),
            Some(LimitDef::TokenBucket {
                capacity: 20,
                refill_tokens: 100,
                refill_interval_ms: 3_600_000
            })
        );
        let leaky = limits(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 10, \
             algorithm: leaky_bucket, burst: 3}\n",
        );
        let rule = leaky.matching("d", &entries(&[("k", "v")])).unwrap();
        assert_eq!(
            rule.def(rule.requests_per_unit, rule.unit),
            Some(LimitDef::LeakyBucket {
                rate: 10,
                interval_ms: 1_000,
                burst: 3
            })
        );
    }

    #[test]
    fn bad_configs_are_refused_with_where() {
        let err = |yaml: &str| parse(yaml).map(|_| ()).unwrap_err();
        let dup = "domain: d\ndescriptors:\n  - key: k\n    value: v\n  - key: k\n    value: v\n";
        assert!(
            err(dup).contains("\"k=v\": the same key and value twice"),
            "{}",
            err(dup)
        );
        let typo = "domain: d\ndescriptors:\n  - key: k\n    rate_limt: {unit: second}\n";
        assert!(err(typo).contains("line 4"), "{}", err(typo));
        let unit = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n";
        assert!(
            err(unit).contains("\"k\": rate_limit.unit: one of second"),
            "{}",
            err(unit)
        );
        let burst = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, burst: 5}\n";
        assert!(
            err(burst).contains("only for algorithm token_bucket or leaky_bucket"),
            "{}",
            err(burst)
        );
        let no_unit =
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {requests_per_unit: 1}\n";
        assert!(err(no_unit).contains("unit: required"), "{}", err(no_unit));
        assert!(err("descriptors: []\n").contains("domain"));
    }
}

#[cfg(test)]
mod envoy_format {
    use super::*;
    use crate::limits::file::parse;

    fn entries(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn wildcards_may_stand_anywhere_and_shared_ones_count_as_one() {
        let (domain, level) = parse(
            r#"
domain: d
descriptors:
  - {key: mid, value: "/api*v1", rate_limit: {unit: minute, requests_per_unit: 1}}
  - {key: multi, value: "svc*ep*rpc", rate_limit: {unit: minute, requests_per_unit: 2}}
  - key: files
    value: "files/*"
    share_threshold: true
    descriptors:
      - {key: op, rate_limit: {unit: minute, requests_per_unit: 3}}
"#,
        )
        .unwrap();
        let l = Limits::with(domain, level);
        let rpu = |e: &[(&str, &str)]| l.matching("d", &entries(e)).map(|r| r.requests_per_unit);
        assert_eq!(rpu(&[("mid", "/api/users/v1")]), Some(1));
        assert_eq!(rpu(&[("mid", "/apiv1")]), Some(1));
        assert_eq!(rpu(&[("mid", "/api/v2")]), None);
        assert_eq!(rpu(&[("multi", "svc-a-ep-b-rpc")]), Some(2));
        assert_eq!(rpu(&[("multi", "svc-rpc-ep")]), None, "parts in order");
        assert_eq!(rpu(&[("multi", "svcep")]), None, "too short for its parts");
        let m = l
            .matched("d", &entries(&[("files", "files/a.txt"), ("op", "get")]))
            .unwrap();
        assert_eq!(m.shared, [Some("files/*"), None]);
        assert_eq!(
            m.counted(&entries(&[("files", "files/a.txt"), ("op", "get")])),
            Some(entries(&[("files", "files/*"), ("op", "get")]))
        );
    }

    #[test]
    fn refusals_match_envoyproxy_ratelimit() {
        let err = |yaml: &str| parse(yaml).map(|_| ()).unwrap_err();
        let cases = [
            (
                "  - key: k\n    rate_limit: {unit: day, requests_per_unit: 1}\n    replaces: [{name: x}]\n",
                "replaces belongs inside rate_limit",
            ),
            (
                "  - key: k\n    rate_limit: {unlimited: true, unit: day}\n",
                "not with unlimited",
            ),
            (
                "  - key: k\n    rate_limit: {unit: second, requests_per_unit: 5, name: self, replaces: [{name: self}]}\n",
                "this rule's own name",
            ),
            (
                "  - key: k\n    rate_limit: {unit: second, requests_per_unit: 5, replaces: [{name: }]}\n",
                "replaces[0].name: must not be empty",
            ),
            (
                "  - key: k\n    value: v\n    share_threshold: true\n    rate_limit: {unit: second, requests_per_unit: 5}\n",
                "share_threshold needs a wildcard",
            ),
            (
                "  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 5}\n",
                "got \"fortnight\"",
            ),
        ];
        for (descriptors, want) in cases {
            let e = err(&format!("domain: d\ndescriptors:\n{descriptors}"));
            assert!(e.contains(want), "{descriptors}: {e}");
        }
        // Accepted as there: a year, any case of a unit, an unknown unit
        // beside unlimited, metadata of any shape.
        parse("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: year, requests_per_unit: 1}\n").unwrap();
        parse("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: SECOND, requests_per_unit: 1}\n").unwrap();
        parse(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unlimited: true, unit: never}\n",
        )
        .unwrap();
        let (_, level) = parse(
            "domain: d\ndescriptors:\n  - key: k\n    metadata: {a: {b: [1, x]}}\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
        )
        .unwrap();
        let l = Limits::with("d".into(), level);
        let meta = l
            .matching("d", &entries(&[("k", "v")]))
            .unwrap()
            .metadata
            .clone();
        assert!(meta.unwrap().fields.contains_key("a"));
    }

    #[test]
    fn a_domain_in_two_files_merges_only_when_asked() {
        let dir = std::env::temp_dir().join(format!("arbiter-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, body: &str| std::fs::write(dir.join(name), body).unwrap();
        write(
            "a.yaml",
            "domain: d\ndescriptors:\n  - {key: k1, rate_limit: {unit: second, requests_per_unit: 1}}\n",
        );
        write(
            "b.yaml",
            "domain: d\ndescriptors:\n  - {key: k2, rate_limit: {unit: second, requests_per_unit: 2}}\n",
        );
        let refused = Limits::load(&dir, false).unwrap_err();
        assert!(refused.contains("--limits-merge-domains"), "{refused}");
        let merged = Limits::load(&dir, true).unwrap();
        for (key, rpu) in [("k1", 1), ("k2", 2)] {
            let rule = merged.matching("d", &entries(&[(key, "x")])).unwrap();
            assert_eq!(rule.requests_per_unit, rpu);
        }
        write(
            "c.yaml",
            "domain: d\ndescriptors:\n  - {key: k1, rate_limit: {unit: second, requests_per_unit: 3}}\n",
        );
        let dup = Limits::load(&dir, true).unwrap_err();
        assert!(
            dup.contains("descriptor \"k1\"") && dup.contains("a.yaml"),
            "{dup}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
