//! `arbiter.v1.RateLimiter`: decided at once from the sharded table.

use tonic::{Request, Response, Status};

use super::authz::authorize;
use super::{convert, error, Shared};
use crate::engine::LimitResult;
use crate::limits::{self, Ask, Descriptor, Planned, Verdict};
use crate::proto::rate_limiter_server::RateLimiter;
use crate::proto::{CheckRequest, CheckResponse, NamedLimit};
use crate::security::Caller;

/// At most this many entries in a named check's descriptor.
const MAX_NAMED_ENTRIES: usize = 32;

pub struct RateLimiterService(pub Shared);

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
    /// A request with at least one `named` check: decided with its plain
    /// checks by the named limits' one decision path (`limits::decide`),
    /// all-or-nothing as asked; shadow-mode rules on their own.
    async fn check_named(
        &self,
        caller: Caller,
        req: CheckRequest,
    ) -> Result<Response<CheckResponse>, Status> {
        let s = &self.0;
        let mut asks = Vec::with_capacity(req.checks.len());
        for (i, c) in req.checks.into_iter().enumerate() {
            let Some(named) = c.named.clone() else {
                reserved(&caller, i, &c.key)?;
                let check = convert::limit_check(i, c)?;
                authorize(&caller, std::slice::from_ref(&check))?;
                asks.push(Ask::Plain(check));
                continue;
            };
            if !c.key.is_empty() || c.limit.is_some() {
                return Err(Status::invalid_argument(format!(
                    "checks[{i}]: key and limit must be empty when named is set"
                )));
            }
            if c.max_delay_ms > 0 {
                return Err(Status::invalid_argument(format!(
                    "checks[{i}].max_delay_ms: reserve mode needs a leaky_bucket limit, not named"
                )));
            }
            asks.push(named_ask(i, named, c.cost.unwrap_or(1), c.dry_run)?);
        }
        let planned = Planned::new(&s.limits.current(), &asks);
        if let Some(i) = planned.unmatched() {
            let Ask::Named { domain, descriptor } = &asks[i] else {
                unreachable!("only named asks go unmatched")
            };
            let shown: Vec<String> = descriptor
                .entries
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            return Err(Status::invalid_argument(format!(
                "checks[{i}].named: no rule of domain {domain:?} matches {}",
                shown.join(",")
            )));
        }
        authorize(&caller, planned.keys().as_slice())?;
        let quota = caller.key_quota(&s.bounds.caps);
        let verdicts = limits::decide(&s.node, quota, planned, req.all_or_nothing)
            .await
            .map_err(error::node_status)?;
        let results: Vec<LimitResult> = verdicts.into_iter().map(v1_result).collect();
        let allowed = results.iter().filter(|r| r.allowed).count() as u64;
        s.metrics.decisions(allowed, results.len() as u64 - allowed);
        Ok(Response::new(CheckResponse {
            results: results.into_iter().map(Into::into).collect(),
            ..Default::default()
        }))
    }
}

/// A named check as the decision path takes it.
fn named_ask(i: usize, named: NamedLimit, cost: u64, dry_run: bool) -> Result<Ask, Status> {
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
    Ok(Ask::Named {
        domain: named.domain,
        descriptor: Descriptor {
            entries: named
                .entries
                .into_iter()
                .map(|e| (e.key, e.value))
                .collect(),
            hits: cost,
            limit_override: None,
            dry_run,
        },
    })
}

/// A verdict as `arbiter.v1` answers it: a shadow-mode rule is reported
/// allowed (it only counts), an unlimited rule allowed with no bound.
fn v1_result(v: Verdict) -> LimitResult {
    let unbounded = LimitResult {
        allowed: true,
        limit: 0,
        remaining: u64::MAX,
        retry_after_ms: 0,
        reset_after_ms: 0,
        delay_ms: 0,
    };
    match v {
        Verdict::Plain(r) => r,
        Verdict::Checked {
            mut result,
            shadow: true,
            ..
        } => {
            result.allowed = true;
            result.retry_after_ms = 0;
            result
        }
        Verdict::Checked { result, .. } => result,
        Verdict::Unlimited { .. } | Verdict::Unmatched => unbounded,
    }
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
        let (slot_map_version, owner_hint) = s.node.owner_hint(&checks);
        let reserve_mode: Vec<bool> = if checks.iter().any(|c| c.max_delay_ms > 0) {
            checks.iter().map(|c| c.max_delay_ms > 0).collect()
        } else {
            Vec::new()
        };
        let by_prefix: Vec<_> = checks
            .iter()
            .map(|c| s.metrics.prefixes.counts_for(&c.key))
            .collect();
        let results = s
            .node
            .check_as(checks, req.all_or_nothing, caller.key_quota(&s.bounds.caps))
            .await
            .map_err(error::node_status)?;
        let allowed = results.iter().filter(|r| r.allowed).count() as u64;
        s.metrics.decisions(allowed, results.len() as u64 - allowed);
        for (counts, r) in by_prefix.iter().zip(&results) {
            counts.count(r.allowed);
        }
        for (_, r) in reserve_mode.iter().zip(&results).filter(|(on, _)| **on) {
            s.metrics.reserve_mode(r.allowed, r.delay_ms);
        }
        Ok(Response::new(CheckResponse {
            results: results.into_iter().map(Into::into).collect(),
            slot_map_version,
            owner_hint,
        }))
    }
}
