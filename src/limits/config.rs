//! Named limits in envoyproxy/ratelimit's configuration format, with
//! Arbiter's additions (`algorithm`, `burst`): parsing, validation and
//! descriptor matching.
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
//! rule wins over a trailing-wildcard value (`foo*`, the longest prefix
//! first), which wins over a `key`-only rule; a request descriptor matches
//! only a rule at exactly its depth.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use crate::engine::LimitDef;

/// The longest window the engine keeps (u32 milliseconds, about 49.7 days).
const MAX_WINDOW_MS: u64 = u32::MAX as u64;

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
}

// ---- the file format ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    domain: String,
    #[serde(default)]
    descriptors: Vec<DescriptorDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorDoc {
    key: String,
    value: Option<String>,
    rate_limit: Option<RateLimitDoc>,
    #[serde(default)]
    shadow_mode: bool,
    #[serde(default)]
    replaces: Vec<ReplacesDoc>,
    #[serde(default)]
    descriptors: Vec<DescriptorDoc>,
    // envoyproxy/ratelimit's statistics switches: accepted, not used.
    #[serde(default)]
    #[allow(dead_code)]
    detailed_metric: bool,
    #[serde(default)]
    #[allow(dead_code)]
    value_to_metric: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitDoc {
    unit: Option<Unit>,
    #[serde(default)]
    requests_per_unit: u64,
    name: Option<String>,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    algorithm: Algorithm,
    burst: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplacesDoc {
    name: String,
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
    pub replaces: Vec<String>,
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
        })
    }
}

#[derive(Debug, Default)]
pub struct Level {
    /// key -> value -> node (nested, so a lookup borrows the request's strings).
    exact: HashMap<String, HashMap<String, Branch>>,
    /// (key, value prefix), longest prefix first.
    wildcard: Vec<Wildcard>,
    key_only: HashMap<String, Branch>,
}

/// A trailing-wildcard value (`foo*`) under a key.
#[derive(Debug)]
struct Wildcard {
    key: String,
    prefix: String,
    branch: Branch,
}

/// A descriptor entry: its rule, if any, and the entries under it.
#[derive(Debug, Default)]
struct Branch {
    rule: Option<Arc<Rule>>,
    children: Level,
}

/// Every configured domain, as last loaded.
#[derive(Debug, Default)]
pub struct Limits {
    domains: HashMap<String, Level>,
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
        let mut level = self.domains.get(domain)?;
        let mut node = None;
        for (key, value) in entries {
            let next = level
                .exact
                .get(key)
                .and_then(|values| values.get(value))
                .or_else(|| {
                    level
                        .wildcard
                        .iter()
                        .find(|w| w.key == *key && value.starts_with(w.prefix.as_str()))
                        .map(|w| &w.branch)
                })
                .or_else(|| level.key_only.get(key))?;
            level = &next.children;
            node = Some(next);
        }
        node?.rule.as_ref()
    }

    /// Loads one YAML file, or every `*.yaml`/`*.yml` file of a directory
    /// (names starting with `.`, such as a ConfigMap's `..data`, are
    /// skipped; symlinks are followed). One domain per file; a domain in
    /// two files is an error.
    pub fn load(path: &Path) -> Result<Limits, String> {
        let files = files_of(path)?;
        let mut limits = Limits::default();
        let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
        for file in &files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
            let (domain, level) = parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            if let Some(other) = seen.insert(domain.clone(), file.clone()) {
                return Err(format!(
                    "{}: domain {domain:?} is also configured in {}",
                    file.display(),
                    other.display()
                ));
            }
            limits.domains.insert(domain, level);
        }
        limits.files = files;
        Ok(limits)
    }
}

/// The files `load` reads for `path`, in name order.
pub fn files_of(path: &Path) -> Result<Vec<PathBuf>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(path).map_err(|e| format!("{}: cannot list: {e}", path.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if name.starts_with('.') || !yaml {
            continue;
        }
        let p = entry.path();
        if std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses one file: its domain and rule tree. Errors name the line (for
/// malformed YAML and unknown or mistyped fields) or the descriptor path.
pub fn parse(text: &str) -> Result<(String, Level), String> {
    let doc: FileDoc = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    if doc.domain.is_empty() {
        return Err("domain: must not be empty".into());
    }
    let level = build(&doc.descriptors, "")?;
    Ok((doc.domain, level))
}

fn build(docs: &[DescriptorDoc], parent: &str) -> Result<Level, String> {
    let mut level = Level::default();
    for d in docs {
        let here = match &d.value {
            Some(v) => format!("{}{}={}", parent, d.key, v),
            None => format!("{}{}", parent, d.key),
        };
        if d.key.is_empty() {
            return Err(format!("descriptor {here:?}: key must not be empty"));
        }
        let rule = d
            .rate_limit
            .as_ref()
            .map(|r| rule(r, d, &here).map(Arc::new))
            .transpose()?;
        if rule.is_none() && (d.shadow_mode || !d.replaces.is_empty()) {
            return Err(format!(
                "descriptor {here:?}: shadow_mode and replaces need a rate_limit"
            ));
        }
        let node = Branch {
            rule,
            children: build(&d.descriptors, &format!("{here}."))?,
        };
        let duplicate = match &d.value {
            Some(v) if v.ends_with('*') => {
                let prefix = v.trim_end_matches('*').to_owned();
                let dup = level
                    .wildcard
                    .iter()
                    .any(|w| w.key == d.key && w.prefix == prefix);
                level.wildcard.push(Wildcard {
                    key: d.key.clone(),
                    prefix,
                    branch: node,
                });
                dup
            }
            Some(v) => level
                .exact
                .entry(d.key.clone())
                .or_default()
                .insert(v.clone(), node)
                .is_some(),
            None => level.key_only.insert(d.key.clone(), node).is_some(),
        };
        if duplicate {
            return Err(format!(
                "descriptor {here:?}: the same key and value twice at one level"
            ));
        }
    }
    level
        .wildcard
        .sort_by_key(|w| std::cmp::Reverse(w.prefix.len()));
    Ok(level)
}

fn rule(r: &RateLimitDoc, d: &DescriptorDoc, here: &str) -> Result<Rule, String> {
    let at = format!("descriptor {here:?}: rate_limit");
    let unit = match (r.unit, r.unlimited) {
        (Some(u), _) => u,
        (None, true) => Unit::Second,
        (None, false) => return Err(format!("{at}.unit: required unless unlimited")),
    };
    if !r.unlimited && unit.millis().is_none() {
        return Err(format!(
            "{at}.unit: {} is longer than the longest window Arbiter keeps ({MAX_WINDOW_MS} ms, about 49 days)",
            unit.name()
        ));
    }
    const MAX: u64 = 1_000_000_000_000_000;
    if r.requests_per_unit > MAX {
        return Err(format!(
            "{at}.requests_per_unit: at most {MAX}, got {}",
            r.requests_per_unit
        ));
    }
    match (r.algorithm, r.burst) {
        (Algorithm::TokenBucket, Some(b)) if b == 0 || b > MAX => {
            return Err(format!("{at}.burst: 1 to {MAX}, got {b}"));
        }
        (Algorithm::TokenBucket, _) | (_, None) => {}
        (_, Some(_)) => return Err(format!("{at}.burst: only for algorithm token_bucket")),
    }
    let name = r.name.clone().unwrap_or_default();
    Ok(Rule {
        id: if name.is_empty() {
            here.to_owned()
        } else {
            name.clone()
        },
        name,
        unit,
        requests_per_unit: r.requests_per_unit,
        algorithm: r.algorithm,
        burst: r.burst,
        unlimited: r.unlimited,
        shadow_mode: d.shadow_mode,
        replaces: d.replaces.iter().map(|x| x.name.clone()).collect(),
        counters: RuleCounters::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Some(20),
            "longest prefix"
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
        assert!(err(unit).contains("line 4"), "{}", err(unit));
        let year = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: year, requests_per_unit: 1}\n";
        assert!(
            err(year).contains("longer than the longest window"),
            "{}",
            err(year)
        );
        let burst = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, burst: 5}\n";
        assert!(
            err(burst).contains("only for algorithm token_bucket"),
            "{}",
            err(burst)
        );
        let no_unit =
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {requests_per_unit: 1}\n";
        assert!(err(no_unit).contains("unit: required"), "{}", err(no_unit));
        assert!(err("descriptors: []\n").contains("domain"));
    }
}
