//! The limits file: envoyproxy/ratelimit's YAML format, read as its loader
//! reads it (the same fields in the same places, the same refusals), plus
//! Arbiter's `algorithm` and `burst`. Errors name the file and the
//! descriptor path or line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::config::{Algorithm, Branch, Level, Limits, Rule, RuleCounters, Unit, Wildcard};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    domain: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    descriptors: Vec<DescriptorDoc>,
}

/// `descriptors:` with nothing after it: none, as envoyproxy/ratelimit
/// reads it.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
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
    quota_mode: bool,
    #[serde(default)]
    share_threshold: bool,
    metadata: Option<serde_yaml_ng::Value>,
    /// Where releases before 2026-12 read it: refused, naming its place.
    replaces: Option<serde_yaml_ng::Value>,
    #[serde(default, deserialize_with = "null_as_empty")]
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
    unit: Option<String>,
    #[serde(default)]
    requests_per_unit: u64,
    name: Option<String>,
    #[serde(default)]
    unlimited: bool,
    #[serde(default, deserialize_with = "null_as_empty")]
    replaces: Vec<ReplacesDoc>,
    #[serde(default)]
    algorithm: Algorithm,
    burst: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplacesDoc {
    name: Option<String>,
}

impl Limits {
    /// Loads one YAML file, or every `*.yaml`/`*.yml` file of a directory
    /// (names starting with `.`, such as a ConfigMap's `..data`, are
    /// skipped; symlinks are followed). A domain in two files is an error,
    /// unless `merge_domains`: then their descriptors join (in file-name
    /// order), and a key and value configured in both is the error.
    pub fn load(path: &Path, merge_domains: bool) -> Result<Limits, String> {
        let files = files_of(path)?;
        let mut limits = Limits::default();
        let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
        for file in &files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
            if super::breakers::is_breakers_file(&text) {
                let breakers = super::breakers::parse(&text)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                for (name, t) in breakers {
                    if limits.breakers.insert(name.clone(), t).is_some() {
                        return Err(format!(
                            "{}: breaker {name:?} is configured in two files",
                            file.display()
                        ));
                    }
                }
                continue;
            }
            let (domain, level) = parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            match (seen.get(&domain), limits.domains.get_mut(&domain)) {
                (Some(other), Some(existing)) if merge_domains => {
                    existing.merge(level).map_err(|at| {
                        format!(
                            "{}: descriptor {at:?} of domain {domain:?} is also configured in {}",
                            file.display(),
                            other.display()
                        )
                    })?;
                }
                (Some(other), _) => {
                    return Err(format!(
                        "{}: domain {domain:?} is also configured in {} (--limits-merge-domains joins them)",
                        file.display(),
                        other.display()
                    ));
                }
                _ => {
                    seen.insert(domain.clone(), file.clone());
                    limits.domains.insert(domain, level);
                }
            }
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
        let value = d.value.as_deref().filter(|v| !v.is_empty());
        let here = match value {
            Some(v) => format!("{}{}={}", parent, d.key, v),
            None => format!("{}{}", parent, d.key),
        };
        if d.key.is_empty() {
            return Err(format!("descriptor {here:?}: key must not be empty"));
        }
        if d.replaces.is_some() {
            return Err(format!(
                "descriptor {here:?}: replaces belongs inside rate_limit (rate_limit.replaces), where envoyproxy/ratelimit reads it"
            ));
        }
        let wildcard = value.is_some_and(|v| v.contains('*'));
        if d.share_threshold && !wildcard {
            return Err(format!(
                "descriptor {here:?}: share_threshold needs a wildcard value (one with '*')"
            ));
        }
        let rule = d
            .rate_limit
            .as_ref()
            .map(|r| rule(r, d, &here).map(Arc::new))
            .transpose()?;
        if rule.is_none() && (d.shadow_mode || d.quota_mode) {
            return Err(format!(
                "descriptor {here:?}: shadow_mode and quota_mode need a rate_limit"
            ));
        }
        let branch = Branch {
            rule,
            share: d.share_threshold,
            children: build(&d.descriptors, &format!("{here}."))?,
        };
        let added = match value {
            Some(v) if wildcard => level.add_wildcard(Wildcard::new(&d.key, v, branch)),
            Some(v) => level.add_exact(&d.key, v, branch),
            None => level.add_key_only(&d.key, branch),
        };
        if !added {
            return Err(format!(
                "descriptor {here:?}: the same key and value twice at one level"
            ));
        }
    }
    Ok(level)
}

/// A unit as envoyproxy/ratelimit reads one (any case); `None` for an
/// unknown one.
fn unit_of(name: &str) -> Option<Unit> {
    Some(match name.to_ascii_lowercase().as_str() {
        "second" => Unit::Second,
        "minute" => Unit::Minute,
        "hour" => Unit::Hour,
        "day" => Unit::Day,
        "week" => Unit::Week,
        "month" => Unit::Month,
        "year" => Unit::Year,
        _ => return None,
    })
}

fn rule(r: &RateLimitDoc, d: &DescriptorDoc, here: &str) -> Result<Rule, String> {
    let at = format!("descriptor {here:?}: rate_limit");
    let unit = r.unit.as_deref().and_then(unit_of);
    let unit = match (unit, r.unlimited) {
        (Some(_), true) => {
            return Err(format!(
                "{at}.unit: not with unlimited: true (an unlimited rule has no unit)"
            ))
        }
        // An unknown unit beside `unlimited` is ignored, as there.
        (None, true) => Unit::Second,
        (Some(u), false) => u,
        (None, false) => {
            return Err(match &r.unit {
                None => format!("{at}.unit: required unless unlimited"),
                Some(u) => format!(
                    "{at}.unit: one of second, minute, hour, day, week, month, year; got {u:?}"
                ),
            })
        }
    };
    const MAX: u64 = 1_000_000_000_000_000;
    if r.requests_per_unit > MAX {
        return Err(format!(
            "{at}.requests_per_unit: at most {MAX}, got {}",
            r.requests_per_unit
        ));
    }
    let bursts = matches!(r.algorithm, Algorithm::TokenBucket | Algorithm::LeakyBucket);
    match r.burst {
        Some(b) if bursts && (b == 0 || b > MAX) => {
            return Err(format!("{at}.burst: 1 to {MAX}, got {b}"));
        }
        Some(_) if !bursts => {
            return Err(format!(
                "{at}.burst: only for algorithm token_bucket or leaky_bucket"
            ))
        }
        _ => {}
    }
    let name = r.name.clone().unwrap_or_default();
    let mut replaces = Vec::with_capacity(r.replaces.len());
    for (i, x) in r.replaces.iter().enumerate() {
        match x.name.as_deref() {
            None | Some("") => {
                return Err(format!("{at}.replaces[{i}].name: must not be empty"));
            }
            Some(n) if n == name => {
                return Err(format!(
                    "{at}.replaces[{i}].name: {n:?} is this rule's own name"
                ));
            }
            Some(n) => replaces.push(n.to_owned()),
        }
    }
    let metadata = match &d.metadata {
        None => None,
        Some(m) => Some(to_struct(m).map_err(|e| format!("descriptor {here:?}: metadata: {e}"))?),
    };
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
        quota_mode: d.quota_mode,
        replaces,
        metadata,
        counters: RuleCounters::default(),
    })
}

/// A descriptor's `metadata` map as the protobuf `Struct` Envoy receives.
fn to_struct(yaml: &serde_yaml_ng::Value) -> Result<prost_types::Struct, String> {
    match to_value(yaml)?.kind {
        Some(prost_types::value::Kind::StructValue(s)) => Ok(s),
        _ => Err("must be a map".into()),
    }
}

fn to_value(yaml: &serde_yaml_ng::Value) -> Result<prost_types::Value, String> {
    use prost_types::value::Kind;
    use serde_yaml_ng::Value as Y;
    let kind = match yaml {
        Y::Null => Kind::NullValue(0),
        Y::Bool(b) => Kind::BoolValue(*b),
        Y::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Y::String(s) => Kind::StringValue(s.clone()),
        Y::Sequence(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_value).collect::<Result<_, _>>()?,
        }),
        Y::Mapping(map) => {
            let mut fields = BTreeMap::new();
            for (k, v) in map {
                let key = match k {
                    Y::String(s) => s.clone(),
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    _ => return Err("keys must be strings".into()),
                };
                fields.insert(key, to_value(v)?);
            }
            Kind::StructValue(prost_types::Struct { fields })
        }
        Y::Tagged(t) => return to_value(&t.value),
    };
    Ok(prost_types::Value { kind: Some(kind) })
}
