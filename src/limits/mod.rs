//! Named limits: rules configured on the server (`--limits`, in
//! envoyproxy/ratelimit's format) that callers name by domain and
//! descriptor entries instead of sending a limit definition. Served to Envoy
//! as its rate limit service (`api/rls.rs`) and in `arbiter.v1` as a
//! `LimitCheck.named`.
//!
//! The configuration is reloaded when its files change (checked every
//! second; a directory's files may come and go, as a ConfigMap's do);
//! a change that fails to load keeps the last good one.

pub mod breakers;
pub mod config;
pub mod file;

use std::path::Path;
use std::sync::Arc;

pub use config::{Algorithm, Limits, Rule, Unit};

use crate::engine::{KeyQuota, LimitCheck, LimitResult};
use crate::node::{Node, NodeError};
use crate::security::Reloading;

/// The longest key the engine takes (bytes); longer derived keys are hashed.
const MAX_KEY_BYTES: usize = 1024;

/// The configured limits, reloaded on change; empty without `--limits`.
#[derive(Clone)]
pub struct NamedLimits(Option<Arc<Reloading<Limits>>>);

impl NamedLimits {
    pub fn none() -> Self {
        Self(None)
    }

    /// Loads `path` (a file or a directory) and watches it;
    /// `merge_domains` joins a domain spread over several files.
    pub fn watch(path: &Path, merge_domains: bool) -> Result<Self, String> {
        let (list, load) = (path.to_owned(), path.to_owned());
        let reloading = Reloading::start_listing(
            "limits",
            move || file::files_of(&list).unwrap_or_default(),
            move || Limits::load(&load, merge_domains),
        )?;
        let limits = reloading.current();
        tracing::info!(
            files = limits.files.len(),
            domains = limits.domains().count(),
            "named limits loaded"
        );
        Ok(Self(Some(reloading)))
    }

    /// The limits as last loaded.
    pub fn current(&self) -> Arc<Limits> {
        match &self.0 {
            Some(r) => r.current(),
            None => Arc::new(Limits::default()),
        }
    }

    /// Re-reads the files now if they changed (tests; the watcher does it
    /// every second).
    pub fn check(&self) -> bool {
        self.0.as_ref().is_some_and(|r| r.check())
    }
}

/// One descriptor to decide: its entries, the hits it adds, and the
/// caller's limit override, if any. `dry_run`: decided, nothing consumed.
#[derive(Clone, Debug)]
pub struct Descriptor {
    pub entries: Vec<(String, String)>,
    pub hits: u64,
    pub limit_override: Option<(u64, Unit)>,
    pub dry_run: bool,
}

/// One check of a request: a descriptor of a domain's named limits, or a
/// plain check with the caller's own key and definition (`arbiter.v1`
/// may mix them in one request).
#[derive(Clone, Debug)]
pub enum Ask {
    Named {
        domain: String,
        descriptor: Descriptor,
    },
    Plain(LimitCheck),
}

/// What became of one ask.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// No rule matched (and no override): not limited.
    Unmatched,
    /// Matched an `unlimited` rule.
    Unlimited { rule: Arc<Rule> },
    /// Checked against a limit. `shadow`: counted, but never denies.
    /// `quota`: a quota-mode rule (over its limit, it denies only when
    /// every quota-mode ask of the request is over, see [`over_limit`]).
    Checked {
        rule: Arc<Rule>,
        requests_per_unit: u64,
        unit: Unit,
        result: LimitResult,
        shadow: bool,
        quota: bool,
    },
    /// A plain check, decided.
    Plain(LimitResult),
}

impl Verdict {
    /// Whether this ask is over its limit (a shadow-mode one never is).
    pub fn over(&self) -> bool {
        match self {
            Verdict::Checked { result, shadow, .. } => !shadow && !result.allowed,
            Verdict::Plain(result) => !result.allowed,
            _ => false,
        }
    }

    fn quota(&self) -> bool {
        matches!(self, Verdict::Checked { quota: true, .. })
    }
}

/// Whether a request is over limit, as envoyproxy/ratelimit decides it: an
/// ask over its limit that is not in quota mode, or every quota-mode ask
/// over its limit.
pub fn over_limit(verdicts: &[Verdict]) -> bool {
    let mut quota = verdicts.iter().filter(|v| v.quota()).peekable();
    let all_quota_over = quota.peek().is_some() && quota.all(Verdict::over);
    all_quota_over || verdicts.iter().any(|v| v.over() && !v.quota())
}

/// Where every named limit's key starts: a keyspace reserved for them
/// (plain checks on it need an admin).
pub const KEY_PREFIX: &str = "rls/";

/// The engine key for a descriptor: the domain and every entry, hashed when
/// longer than a key may be.
pub fn key_for(domain: &str, entries: &[(String, String)]) -> String {
    let len = 4
        + domain.len()
        + entries
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>();
    let mut key = String::with_capacity(len);
    key.push_str(KEY_PREFIX);
    key.push_str(domain);
    for (k, v) in entries {
        key.push('/');
        key.push_str(k);
        key.push('=');
        key.push_str(v);
    }
    if key.len() <= MAX_KEY_BYTES {
        return key;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{KEY_PREFIX}{}/#{hex}", truncate(domain, 256))
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// An ask resolved to its rule and engine check.
enum Plan {
    Plain(LimitCheck),
    Unmatched,
    /// Matched a rule that another matched rule `replaces`: not limited.
    Replaced,
    Unlimited(Arc<Rule>),
    /// `requests_per_unit: 0`: admits nothing, nothing to count.
    Blocked(Arc<Rule>, u64, Unit),
    Check(Arc<Rule>, u64, Unit, LimitCheck),
}

/// A request's asks resolved against the configuration: each named one to
/// its matching rule (or the caller's override), `replaces` applied across
/// the request's asks of the same domain. Resolved once, then authorised
/// ([`Planned::keys`]) and decided ([`decide`]).
pub struct Planned {
    asks: Vec<(Plan, Option<(String, u64)>)>,
}

impl Planned {
    pub fn new(limits: &Limits, asks: &[Ask]) -> Planned {
        let found: Vec<Option<config::Matched<'_>>> = asks
            .iter()
            .map(|a| match a {
                Ask::Named { domain, descriptor } => limits.matched(domain, &descriptor.entries),
                Ask::Plain(_) => None,
            })
            .collect();
        let matched: Vec<Option<&Arc<Rule>>> =
            found.iter().map(|m| m.as_ref().map(|m| m.rule)).collect();
        let replaced: Vec<(&str, &str)> = asks
            .iter()
            .zip(&matched)
            .filter_map(|(a, r)| match a {
                Ask::Named { domain, .. } => r.map(|r| (domain.as_str(), r)),
                Ask::Plain(_) => None,
            })
            .flat_map(|(d, r)| r.replaces.iter().map(move |n| (d, n.as_str())))
            .collect();
        let plans = asks
            .iter()
            .zip(&matched)
            .zip(&found)
            .map(|((a, rule), found)| match a {
                Ask::Plain(check) => (Plan::Plain(check.clone()), None),
                Ask::Named { domain, descriptor } => {
                    let kept = rule.filter(|r| {
                        r.name.is_empty() || !replaced.contains(&(domain.as_str(), r.name.as_str()))
                    });
                    let plan = match (rule, kept, descriptor.limit_override) {
                        (Some(_), None, None) => Plan::Replaced,
                        _ => {
                            let counted =
                                found.as_ref().and_then(|m| m.counted(&descriptor.entries));
                            plan_named(domain, descriptor, kept, counted)
                        }
                    };
                    (plan, Some((domain.clone(), descriptor.hits)))
                }
            })
            .collect();
        Planned { asks: plans }
    }

    /// The first named ask that no rule matched (nor an override).
    pub fn unmatched(&self) -> Option<usize> {
        self.asks
            .iter()
            .position(|(p, named)| named.is_some() && matches!(p, Plan::Unmatched))
    }

    /// The engine keys the named asks use (for namespace checks before
    /// deciding).
    pub fn keys(&self) -> Vec<String> {
        self.asks
            .iter()
            .filter_map(|(p, _)| match p {
                Plan::Check(_, _, _, check) => Some(check.key.clone()),
                _ => None,
            })
            .collect()
    }
}

/// `counted`: the entries to count by when a `share_threshold` wildcard
/// matched (else the descriptor's own).
fn plan_named(
    domain: &str,
    d: &Descriptor,
    rule: Option<&Arc<Rule>>,
    counted: Option<Vec<(String, String)>>,
) -> Plan {
    match (rule, d.limit_override) {
        (None, None) => Plan::Unmatched,
        (Some(r), None) if r.unlimited => Plan::Unlimited(r.clone()),
        (rule, over) => {
            let rule = match rule {
                Some(r) => r.clone(),
                None => Arc::new(Rule {
                    id: "override".into(),
                    name: String::new(),
                    unit: Unit::Second,
                    requests_per_unit: 0,
                    algorithm: Algorithm::FixedWindow,
                    burst: None,
                    unlimited: false,
                    shadow_mode: false,
                    quota_mode: false,
                    replaces: Vec::new(),
                    metadata: None,
                    counters: Default::default(),
                }),
            };
            let (rpu, unit) = over.unwrap_or((rule.requests_per_unit, rule.unit));
            match rule.def_ignoring_unlimited(rpu, unit) {
                Some(limit) => {
                    let check = LimitCheck {
                        key: key_for(domain, counted.as_deref().unwrap_or(&d.entries)),
                        limit,
                        cost: d.hits,
                        dry_run: d.dry_run,
                        max_delay_ms: 0,
                    };
                    Plan::Check(rule, rpu, unit, check)
                }
                None if unit.millis().is_none() => Plan::Unmatched,
                None => Plan::Blocked(rule, rpu, unit),
            }
        }
    }
}

/// Decides every ask: quota-mode limits first, each on its own; then the
/// enforced ones (plain checks and named limits) together, all-or-nothing
/// as asked, and consuming nothing when every quota-mode limit was over
/// (the request is over limit then); shadow-mode limits on their own
/// (counted, never denying). Records per-rule metrics. The one decision
/// path of named limits, for Envoy's rate limit service and `arbiter.v1`.
pub async fn decide(
    node: &Node,
    quota: KeyQuota<'_>,
    planned: Planned,
    all_or_nothing: bool,
) -> Result<Vec<Verdict>, NodeError> {
    let mut asks = planned.asks;
    // (ask index, check) for the enforced rules, the shadow-mode ones and
    // the quota-mode ones.
    let mut enforced = (
        Vec::with_capacity(asks.len()),
        Vec::with_capacity(asks.len()),
    );
    let mut shadow = (Vec::new(), Vec::new());
    let mut quota_mode = (Vec::new(), Vec::new());
    for (i, (p, _)) in asks.iter_mut().enumerate() {
        let (group, check) = match p {
            Plan::Check(rule, _, _, check) if rule.shadow_mode => (&mut shadow, check),
            Plan::Check(rule, _, _, check) if rule.quota_mode => (&mut quota_mode, check),
            Plan::Check(_, _, _, check) | Plan::Plain(check) => (&mut enforced, check),
            _ => continue,
        };
        group.0.push(i);
        // The plan keeps the rest; the key moves to the engine.
        group.1.push(LimitCheck {
            key: std::mem::take(&mut check.key),
            limit: check.limit,
            cost: check.cost,
            dry_run: check.dry_run,
            max_delay_ms: check.max_delay_ms,
        });
    }
    let mut results: Vec<Option<LimitResult>> = vec![None; asks.len()];
    let mut all_quota_over = false;
    for (group, (idx, mut checks), atomic) in [
        (Group::Quota, quota_mode, false),
        (Group::Enforced, enforced, all_or_nothing),
        (Group::Shadow, shadow, false),
    ] {
        if checks.is_empty() {
            continue;
        }
        if group == Group::Enforced && all_quota_over {
            // The request is over limit: the others consume nothing.
            for c in &mut checks {
                c.dry_run = true;
            }
        }
        let mut decided = node.check_as(checks, atomic, quota).await?;
        if group == Group::Quota {
            all_quota_over = decided.iter().all(|r| !r.allowed);
        } else if group == Group::Enforced && all_quota_over {
            // Denied with the request, as a check that would have passed
            // in a denied all-or-nothing batch is: nothing to wait for.
            for r in decided.iter_mut().filter(|r| r.allowed) {
                r.allowed = false;
                r.retry_after_ms = 0;
            }
        }
        for (i, r) in idx.into_iter().zip(decided) {
            results[i] = Some(r);
        }
    }
    let blocked = LimitResult {
        allowed: false,
        limit: 0,
        remaining: 0,
        retry_after_ms: u64::MAX,
        reset_after_ms: 0,
        delay_ms: 0,
    };
    let verdicts = asks
        .into_iter()
        .zip(results)
        .map(|((p, named), r)| {
            let (rule, rpu, unit, result) = match (p, r) {
                (Plan::Plain(_), Some(result)) => return Verdict::Plain(result),
                (Plan::Check(rule, rpu, unit, _), Some(result)) => (rule, rpu, unit, result),
                (Plan::Blocked(rule, rpu, unit), _) => (rule, rpu, unit, blocked),
                (Plan::Unlimited(rule), _) => return Verdict::Unlimited { rule },
                _ => return Verdict::Unmatched,
            };
            if let Some((domain, hits)) = named {
                record(&domain, &rule, hits, &result);
            }
            Verdict::Checked {
                shadow: rule.shadow_mode,
                quota: rule.quota_mode && !rule.shadow_mode,
                rule,
                requests_per_unit: rpu,
                unit,
                result,
            }
        })
        .collect();
    Ok(verdicts)
}

/// The groups of asks [`decide`] decides in turn.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    Quota,
    Enforced,
    Shadow,
}

/// The counters envoyproxy/ratelimit users dashboard on, per domain and
/// rule: hits, over limit, near limit (at least 80 % used) and shadow-mode
/// denials.
pub fn record(domain: &str, rule: &Rule, hits: u64, r: &LimitResult) {
    let [total, over, near, shadow] = rule.counters.get(domain, &rule.id);
    total.increment(hits);
    if !r.allowed {
        if rule.shadow_mode { shadow } else { over }.increment(hits);
    } else if r.limit > 0 && u128::from(r.remaining) * 5 <= u128::from(r.limit) {
        near.increment(hits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_domain_and_entries_and_long_ones_are_hashed() {
        let e = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            key_for("edge", &[e("path", "/a"), e("user", "ann")]),
            "rls/edge/path=/a/user=ann"
        );
        let long = key_for("edge", &[e("path", &"x".repeat(2000))]);
        assert!(long.len() <= MAX_KEY_BYTES && long.starts_with("rls/edge/#"));
        assert_ne!(long, key_for("edge", &[e("path", &"y".repeat(2000))]));
    }

    #[test]
    fn replaces_drops_the_named_rule_and_overrides_apply_without_a_rule() {
        let (domain, level) = file::parse(
            r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 10, name: general}
  - key: b
    value: vip
    rate_limit: {unit: second, requests_per_unit: 100, replaces: [{name: general}]}
"#,
        )
        .unwrap();
        let limits = Limits::with(domain, level);
        let d = |k: &str, v: &str| Descriptor {
            entries: vec![(k.into(), v.into())],
            hits: 1,
            limit_override: None,
            dry_run: false,
        };
        let plan = |descriptors: Vec<Descriptor>| {
            let asks: Vec<Ask> = descriptors
                .into_iter()
                .map(|descriptor| Ask::Named {
                    domain: "d".into(),
                    descriptor,
                })
                .collect();
            Planned::new(&limits, &asks)
                .asks
                .into_iter()
                .map(|(p, _)| p)
                .collect::<Vec<_>>()
        };
        let plans = plan(vec![d("a", "1"), d("b", "vip")]);
        assert!(matches!(plans[0], Plan::Replaced));
        assert!(matches!(plans[1], Plan::Check(_, 100, Unit::Second, _)));
        let plans = plan(vec![d("a", "1")]);
        assert!(matches!(plans[0], Plan::Check(_, 10, _, _)));
        let plans = plan(vec![d("nothing", "1")]);
        assert!(matches!(plans[0], Plan::Unmatched));
        let overridden = Descriptor {
            limit_override: Some((3, Unit::Minute)),
            ..d("zzz", "1")
        };
        let plans = plan(vec![overridden]);
        assert!(matches!(&plans[0], Plan::Check(r, 3, Unit::Minute, _) if r.id == "override"));
    }
}
