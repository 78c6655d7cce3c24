//! `arbiter.v1.RateLimiter`: decided at once from the sharded table.

use tonic::{Request, Response, Status};

use super::authz::authorize;
use super::{convert, error, Shared};
use crate::engine::{LimitCheck, LimitResult};
use crate::limits;
use crate::proto::rate_limiter_server::RateLimiter;
use crate::proto::{CheckRequest, CheckResponse, NamedLimit};
use crate::security::Caller;

/// At most this many entries in a named check's descriptor.
const MAX_NAMED_ENTRIES: usize = 32;

pub struct RateLimiterService(pub Shared);

/// One check of a request that names limits.
enum Item {
    /// Decided by the engine; `shadow` ones are counted apart and reported
    /// allowed. `rule`: the named rule's domain and id, for its metrics.
    Check {
        check: LimitCheck,
        shadow: bool,
        rule: Option<(String, std::sync::Arc<limits::Rule>)>,
    },
    /// Answered without the engine (an unlimited or a zero rule).
    Fixed(LimitResult),
}

/// The named limits' keyspace (see `limits::key_for`): their counters are
/// reached by name (Envoy's rate limit service, `LimitCheck.named`), and a
/// plain check on one of their keys, with another algorithm, would start
/// it afresh. Refused unless the caller is an admin.
fn reserved(caller: &Caller, i: usize, key: &str) -> Result<(), Status> {
    if !key.starts_with(crate::limits::KEY_PREFIX) {
        return Ok(());
    }
    caller
        .admin("a check on the named limits' keyspace")
        .map_err(|_| {
            Status::permission_denied(format!(
            "checks[{i}].key {key:?}: keys under {:?} belong to the named limits; check them by \
             name (LimitCheck.named, or Envoy's rate limit service), or as an admin",
            crate::limits::KEY_PREFIX
        ))
        })
}

impl RateLimiterService {
    /// A request with at least one `named` check: each resolved against the
    /// named limits, enforced ones decided together (all-or-nothing as
    /// asked), shadow-mode ones on their own.
    async fn check_named(
        &self,
        caller: Caller,
        req: CheckRequest,
    ) -> Result<Response<CheckResponse>, Status> {
        let s = &self.0;
        let limits = s.limits.current();
        let mut items = Vec::with_capacity(req.checks.len());
        for (i, c) in req.checks.into_iter().enumerate() {
            let Some(named) = c.named.clone() else {
                reserved(&caller, i, &c.key)?;
                items.push(Item::Check {
                    check: convert::limit_check(i, c)?,
                    shadow: false,
                    rule: None,
                });
                continue;
            };
            if !c.key.is_empty() || c.limit.is_some() {
                return Err(Status::invalid_argument(format!(
                    "checks[{i}]: key and limit must be empty when named is set"
                )));
            }
            items.push(resolve(&limits, i, named, c.cost.unwrap_or(1), c.dry_run)?);
        }
        for item in &items {
            if let Item::Check { check, .. } = item {
                authorize(&caller, std::slice::from_ref(check))?;
            }
        }
        let mut results: Vec<Option<LimitResult>> = items
            .iter()
            .map(|it| match it {
                Item::Fixed(r) => Some(*r),
                Item::Check { .. } => None,
            })
            .collect();
        for (shadow_group, all_or_nothing) in [(false, req.all_or_nothing), (true, false)] {
            let (idx, checks): (Vec<usize>, Vec<LimitCheck>) = items
                .iter()
                .enumerate()
                .filter_map(|(i, it)| match it {
                    Item::Check { check, shadow, .. } if *shadow == shadow_group => {
                        Some((i, check.clone()))
                    }
                    _ => None,
                })
                .unzip();
            if checks.is_empty() {
                continue;
            }
            let decided = s
                .node
                .check_as(checks, all_or_nothing, caller.key_quota(&s.bounds.caps))
                .await
                .map_err(error::node_status)?;
            for (i, r) in idx.into_iter().zip(decided) {
                results[i] = Some(r);
            }
        }
        let results: Vec<LimitResult> = items
            .iter()
            .zip(results)
            .map(|(item, r)| {
                let mut r = r.expect("every check decided");
                if let Item::Check {
                    check,
                    shadow,
                    rule: Some((domain, rule)),
                } = item
                {
                    limits::record(domain, rule, check.cost, &r);
                    if *shadow {
                        r.allowed = true;
                        r.retry_after_ms = 0;
                    }
                }
                r
            })
            .collect();
        let allowed = results.iter().filter(|r| r.allowed).count() as u64;
        s.metrics.decisions(allowed, results.len() as u64 - allowed);
        Ok(Response::new(CheckResponse {
            results: results.into_iter().map(Into::into).collect(),
        }))
    }
}

/// A named check resolved against the configured rules.
fn resolve(
    limits: &limits::Limits,
    i: usize,
    named: NamedLimit,
    cost: u64,
    dry_run: bool,
) -> Result<Item, Status> {
    if named.domain.is_empty() {
        return Err(Status::invalid_argument(format!(
            "checks[{i}].named.domain: must not be empty"
        )));
    }
    let n = named.entries.len();
    if n == 0 || n > MAX_NAMED_ENTRIES {
        return Err(Status::invalid_argument(format!(
            "checks[{i}].named.entries: must hold 1 to {MAX_NAMED_ENTRIES}, got {n}"
        )));
    }
    let entries: Vec<(String, String)> = named
        .entries
        .into_iter()
        .map(|e| (e.key, e.value))
        .collect();
    let Some(rule) = limits.matching(&named.domain, &entries) else {
        let shown: Vec<String> = entries.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Err(Status::invalid_argument(format!(
            "checks[{i}].named: no rule of domain {:?} matches {}",
            named.domain,
            shown.join(",")
        )));
    };
    let fixed = |allowed: bool, remaining: u64| LimitResult {
        allowed,
        limit: 0,
        remaining,
        retry_after_ms: if allowed { 0 } else { u64::MAX },
        reset_after_ms: 0,
    };
    if rule.unlimited {
        return Ok(Item::Fixed(fixed(true, u64::MAX)));
    }
    Ok(match rule.def(rule.requests_per_unit, rule.unit) {
        Some(limit) => Item::Check {
            check: LimitCheck {
                key: limits::key_for(&named.domain, &entries),
                limit,
                cost,
                dry_run,
            },
            shadow: rule.shadow_mode,
            rule: Some((named.domain.clone(), rule.clone())),
        },
        // requests_per_unit: 0 admits nothing.
        None => Item::Fixed(fixed(rule.shadow_mode, 0)),
    })
}

#[tonic::async_trait]
impl RateLimiter for RateLimiterService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let req = request.into_inner();
        let n = req.checks.len();
        if n == 0 || n > s.bounds.max_checks {
            return Err(Status::invalid_argument(format!(
                "checks: must hold 1 to {} checks, got {n}",
                s.bounds.max_checks
            )));
        }
        if req.checks.iter().any(|c| c.named.is_some()) {
            return self.check_named(caller, req).await;
        }
        for (i, c) in req.checks.iter().enumerate() {
            reserved(&caller, i, &c.key)?;
        }
        let checks = req
            .checks
            .into_iter()
            .enumerate()
            .map(|(i, c)| convert::limit_check(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        authorize(&caller, checks.as_slice())?;
        let results = s
            .node
            .check_as(checks, req.all_or_nothing, caller.key_quota(&s.bounds.caps))
            .await
            .map_err(error::node_status)?;
        let allowed = results.iter().filter(|r| r.allowed).count() as u64;
        s.metrics.decisions(allowed, results.len() as u64 - allowed);
        Ok(Response::new(CheckResponse {
            results: results.into_iter().map(Into::into).collect(),
        }))
    }
}
