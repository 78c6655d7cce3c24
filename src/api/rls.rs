//! `envoy.service.ratelimit.v3.RateLimitService`: Envoy's rate limit
//! service over the named limits (`--limits`).
//!
//! Every descriptor is checked against its matched rule; nothing is consumed
//! unless every enforced descriptor passes (`--rls-consume-on-deny` restores
//! envoyproxy/ratelimit's "each counts on its own"). Unmatched descriptors
//! and shadow-mode rules answer OK; no quorum answers `UNAVAILABLE`, so
//! Envoy's `failure_mode_deny` decides.

use tonic::{Request, Response, Status};

use super::{error, Shared};
use crate::envoy::config::core::v3::HeaderValue;
use crate::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit as EnvoyUnit, Code, DescriptorStatus, RateLimit,
};
use crate::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use crate::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use crate::limits::{self, Ask, Descriptor, NamedLimits, Planned, Unit, Verdict};
use crate::security::Caller;

/// At most this many descriptors per request, and entries per descriptor.
const MAX_DESCRIPTORS: usize = 64;
const MAX_ENTRIES: usize = 32;

/// How the service answers (from `--rls-consume-on-deny`, `--rls-headers`,
/// `--rls-dynamic-metadata`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RlsOptions {
    pub consume_on_deny: bool,
    pub headers: bool,
    pub dynamic_metadata: bool,
}

pub struct RlsService {
    pub shared: Shared,
    pub limits: NamedLimits,
    pub options: RlsOptions,
}

#[tonic::async_trait]
impl RateLimitService for RlsService {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let s = &self.shared;
        let caller = s.caller(&request)?;
        let req = request.into_inner();
        let domain = req.domain.clone();
        let told = self
            .options
            .dynamic_metadata
            .then(|| super::rls_metadata::Told::of(&req));
        let asks = asks(req)?;
        let planned = Planned::new(&self.limits.current(), &asks);
        if !matches!(caller, Caller::Anyone) {
            super::authz::authorize(&caller, planned.keys().as_slice())?;
        }
        let all_or_nothing = !self.options.consume_on_deny;
        let quota = caller.key_quota(&s.bounds.caps);
        let mut verdicts = limits::decide(&s.node, quota, planned, all_or_nothing)
            .await
            .map_err(error::node_status)?;
        settle(&mut verdicts, &domain);
        let over = limits::over_limit(&verdicts);
        let allowed = verdicts.iter().filter(|v| !v.over()).count() as u64;
        s.metrics
            .decisions(allowed, verdicts.len() as u64 - allowed);
        let headers = if self.options.headers {
            rate_limit_headers(&verdicts)
        } else {
            Vec::new()
        };
        Ok(Response::new(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses: verdicts.iter().map(status).collect(),
            response_headers_to_add: headers,
            request_headers_to_add: Vec::new(),
            dynamic_metadata: told.map(|t| t.metadata(&verdicts)),
        }))
    }
}

/// The request's descriptors as checks of the named limits, refusing an
/// empty domain, too few or too many descriptors or entries, and an
/// override with an unknown unit (each naming the field and its bound).
fn asks(req: RateLimitRequest) -> Result<Vec<Ask>, Status> {
    if req.domain.is_empty() {
        return Err(Status::invalid_argument("domain: must not be empty"));
    }
    if req.descriptors.is_empty() || req.descriptors.len() > MAX_DESCRIPTORS {
        return Err(Status::invalid_argument(format!(
            "descriptors: must hold 1 to {MAX_DESCRIPTORS}, got {}",
            req.descriptors.len()
        )));
    }
    let request_hits = u64::from(req.hits_addend.max(1));
    let domain = req.domain;
    req.descriptors
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            if d.entries.is_empty() || d.entries.len() > MAX_ENTRIES {
                return Err(Status::invalid_argument(format!(
                    "descriptors[{i}].entries: must hold 1 to {MAX_ENTRIES}, got {}",
                    d.entries.len()
                )));
            }
            let limit_override = match d.limit {
                Some(o) => Some((
                    u64::from(o.requests_per_unit),
                    Unit::from_envoy(o.unit).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "descriptors[{i}].limit.unit: SECOND to YEAR, got {}",
                            o.unit
                        ))
                    })?,
                )),
                None => None,
            };
            Ok(Ask::Named {
                domain: domain.clone(),
                descriptor: Descriptor {
                    entries: d.entries.into_iter().map(|e| (e.key, e.value)).collect(),
                    hits: d.hits_addend.unwrap_or(request_hits),
                    limit_override,
                    dry_run: false,
                },
            })
        })
        .collect()
}

/// In a denied all-or-nothing request, a check that would have passed says
/// so with retry_after_ms = 0: it is within its limit (OK to Envoy), though
/// nothing was consumed. A shadow-mode rule over its limit is logged.
fn settle(verdicts: &mut [Verdict], domain: &str) {
    for v in verdicts.iter_mut() {
        if let Verdict::Checked { result, .. } = v {
            if !result.allowed && result.retry_after_ms == 0 {
                result.allowed = true;
            }
        }
    }
    for v in verdicts.iter() {
        if let Verdict::Checked {
            rule,
            result,
            shadow: true,
            ..
        } = v
        {
            if !result.allowed {
                tracing::info!(%domain, rule = %rule.id, "shadow-mode rule over limit");
            }
        }
    }
}

fn envoy_unit(unit: Unit) -> EnvoyUnit {
    match unit.envoy() {
        1 => EnvoyUnit::Second,
        2 => EnvoyUnit::Minute,
        3 => EnvoyUnit::Hour,
        4 => EnvoyUnit::Day,
        5 => EnvoyUnit::Month,
        6 => EnvoyUnit::Year,
        7 => EnvoyUnit::Week,
        _ => EnvoyUnit::Unknown,
    }
}

/// Milliseconds until the descriptor's window resets: the wait before a
/// retry when over, else until it is back to full.
fn reset_ms(result: &crate::engine::LimitResult) -> u64 {
    if !result.allowed && result.retry_after_ms != u64::MAX {
        result.retry_after_ms
    } else {
        result.reset_after_ms
    }
}

fn status(v: &Verdict) -> DescriptorStatus {
    match v {
        // As envoyproxy/ratelimit answers: nothing left of no limit, all
        // of an unlimited one. (Plain checks are arbiter.v1's; Envoy's
        // requests hold none.)
        Verdict::Unmatched | Verdict::Plain(_) => DescriptorStatus {
            code: Code::Ok as i32,
            current_limit: None,
            limit_remaining: 0,
            duration_until_reset: None,
        },
        Verdict::Unlimited { .. } => DescriptorStatus {
            code: Code::Ok as i32,
            current_limit: None,
            limit_remaining: u32::MAX,
            duration_until_reset: None,
        },
        Verdict::Checked {
            rule,
            requests_per_unit,
            unit,
            result,
            shadow,
            ..
        } => {
            let ms = reset_ms(result);
            DescriptorStatus {
                code: if result.allowed || *shadow {
                    Code::Ok
                } else {
                    Code::OverLimit
                } as i32,
                current_limit: Some(RateLimit {
                    // The configured name, empty without one, as there.
                    name: rule.name.clone(),
                    requests_per_unit: u32::try_from(*requests_per_unit).unwrap_or(u32::MAX),
                    unit: envoy_unit(*unit) as i32,
                }),
                limit_remaining: u32::try_from(result.remaining).unwrap_or(u32::MAX),
                duration_until_reset: Some(prost_types::Duration {
                    seconds: (ms / 1000) as i64,
                    nanos: ((ms % 1000) * 1_000_000) as i32,
                }),
            }
        }
    }
}

/// `RateLimit-Limit`, `-Remaining` and `-Reset` as envoyproxy/ratelimit
/// sends them (the IETF draft's mandatory parts): for a descriptor over its
/// limit (not in quota mode) if any, else the one with the least remaining,
/// its requests per unit, what remains, and whole seconds until its window
/// resets (rounded up).
fn rate_limit_headers(verdicts: &[Verdict]) -> Vec<HeaderValue> {
    let limited = verdicts.iter().filter_map(|v| match v {
        Verdict::Checked {
            requests_per_unit,
            result,
            shadow,
            quota,
            ..
        } => Some((
            *requests_per_unit,
            result,
            !shadow && !quota && !result.allowed,
        )),
        _ => None,
    });
    let tightest = limited.min_by_key(|(_, r, over)| (!over, r.remaining));
    let Some((rpu, result, _)) = tightest else {
        return Vec::new();
    };
    let header = |key: &str, value: String| HeaderValue {
        key: key.to_owned(),
        value,
    };
    vec![
        header("RateLimit-Limit", rpu.to_string()),
        header("RateLimit-Remaining", result.remaining.to_string()),
        header(
            "RateLimit-Reset",
            reset_ms(result).div_ceil(1000).to_string(),
        ),
    ]
}
