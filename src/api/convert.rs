//! proto ⇄ domain conversions. Every inbound conversion validates, and a bad
//! field becomes `INVALID_ARGUMENT` naming the field and its bound.

use tonic::Status;

use crate::engine::{self, LimitCheck, LimitDef, LimitResult};
use crate::proto as pb;

/// Longest key, lease name, holder or fingerprint, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

fn invalid(field: &str, bound: impl std::fmt::Display, got: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: must be {bound}, got {got}"))
}

/// A required string of 1..=1024 bytes. `field` is built only on error.
pub fn key(value: &str, field: impl FnOnce() -> String) -> Result<(), Status> {
    if value.is_empty() || value.len() > MAX_KEY_BYTES {
        return Err(invalid(
            &field(),
            format_args!("1 to {MAX_KEY_BYTES} bytes"),
            format_args!("{} bytes", value.len()),
        ));
    }
    Ok(())
}

/// A TTL in 1..=max ms.
pub fn ttl(value: u64, field: &str, max: u64) -> Result<(), Status> {
    if value == 0 || value > max {
        return Err(invalid(field, format_args!("1 to {max} ms"), value));
    }
    Ok(())
}

/// At most `max` bytes (may be empty).
pub fn bytes(value: &[u8], field: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(invalid(
            field,
            format_args!("at most {max} bytes"),
            format_args!("{} bytes", value.len()),
        ));
    }
    Ok(())
}

pub fn limit_check(index: usize, c: pb::LimitCheck) -> Result<LimitCheck, Status> {
    key(&c.key, || format!("checks[{index}].key"))?;
    let algorithm = c.limit.and_then(|l| l.algorithm).ok_or_else(|| {
        Status::invalid_argument(format!(
            "checks[{index}].limit: required (token_bucket, sliding_window, fixed_window or leaky_bucket)"
        ))
    })?;
    let limit = match algorithm {
        pb::limit::Algorithm::TokenBucket(t) => LimitDef::TokenBucket {
            capacity: t.capacity,
            refill_tokens: t.refill_tokens,
            refill_interval_ms: t.refill_interval_ms,
        },
        pb::limit::Algorithm::SlidingWindow(w) => LimitDef::SlidingWindow {
            limit: w.limit,
            window_ms: w.window_ms,
        },
        pb::limit::Algorithm::FixedWindow(w) => LimitDef::FixedWindow {
            limit: w.limit,
            window_ms: w.window_ms,
        },
        pb::limit::Algorithm::LeakyBucket(b) => LimitDef::LeakyBucket {
            rate: b.rate,
            interval_ms: b.interval_ms,
            burst: b.burst,
        },
    };
    limit.validate().map_err(|e| {
        invalid(
            &format!("checks[{index}].limit.{}", e.field),
            format_args!("1 to {}", e.max),
            e.got,
        )
    })?;
    max_delay(index, &limit, c.max_delay_ms)?;
    Ok(LimitCheck {
        key: c.key,
        limit,
        cost: c.cost.unwrap_or(1),
        dry_run: c.dry_run,
        max_delay_ms: c.max_delay_ms,
    })
}

/// Reserve mode's bound, and only for a leaky bucket.
pub fn max_delay(index: usize, limit: &LimitDef, value: u64) -> Result<(), Status> {
    let field = || format!("checks[{index}].max_delay_ms");
    if value > engine::MAX_DELAY_MS {
        return Err(invalid(
            &field(),
            format_args!("0 to {} ms", engine::MAX_DELAY_MS),
            value,
        ));
    }
    if value > 0 && !matches!(limit, LimitDef::LeakyBucket { .. }) {
        return Err(Status::invalid_argument(format!(
            "{}: reserve mode needs a leaky_bucket limit",
            field()
        )));
    }
    Ok(())
}

impl From<LimitResult> for pb::LimitResult {
    fn from(r: LimitResult) -> Self {
        Self {
            allowed: r.allowed,
            limit: r.limit,
            remaining: r.remaining,
            retry_after_ms: r.retry_after_ms,
            reset_after_ms: r.reset_after_ms,
            delay_ms: r.delay_ms,
        }
    }
}

pub fn permit(p: engine::Permit, now_ms: u64) -> pb::SemaphorePermit {
    pb::SemaphorePermit {
        remaining_ms: p.remaining_ms(now_ms),
        name: p.name,
        holder: p.holder,
        permits: p.permits,
        fencing_token: p.fencing_token,
        ttl_ms: p.ttl_ms,
        principal: p.principal,
    }
}

pub fn lease(l: engine::Lease, now_ms: u64) -> pb::Lease {
    pb::Lease {
        remaining_ms: l.remaining_ms(now_ms),
        name: l.name,
        holder: l.holder,
        fencing_token: l.fencing_token,
        ttl_ms: l.ttl_ms,
        principal: l.principal,
    }
}

pub fn lease_event(e: engine::LeaseEvent, now_ms: u64) -> pb::LeaseEvent {
    use engine::LeaseEventKind as K;
    use pb::lease_event::Kind;
    let kind = match e.kind {
        K::Acquired => Kind::Acquired,
        K::Renewed => Kind::Renewed,
        K::Released => Kind::Released,
        K::Expired => Kind::Expired,
    };
    pb::LeaseEvent {
        kind: kind as i32,
        lease: Some(lease(e.lease, now_ms)),
    }
}

/// A record as a caller sees it: the owning principal only for an admin.
pub fn record(key: String, r: engine::Record, now_ms: u64, show_owner: bool) -> pb::Record {
    let (state, response) = match r.state {
        engine::RecordState::InProgress => (pb::record::State::InProgress, Vec::new()),
        engine::RecordState::Completed { response } => (pb::record::State::Completed, response),
    };
    pb::Record {
        principal: if show_owner {
            r.principal
        } else {
            String::new()
        },
        key,
        state: state as i32,
        attempt: r.attempt,
        fingerprint: r.fingerprint,
        response,
        expires_after_ms: r.expires_at_ms.saturating_sub(now_ms),
    }
}

/// A semaphore's limit (1 to 10^15) and the permits asked (1 to it).
pub fn permits(limit: u64, permits: u64) -> Result<(), Status> {
    let max = engine::limits::MAX_AMOUNT;
    if limit == 0 || limit > max {
        return Err(invalid("limit", format_args!("1 to {max}"), limit));
    }
    if permits == 0 || permits > limit {
        return Err(invalid(
            "permits",
            format_args!("1 to limit ({limit})"),
            permits,
        ));
    }
    Ok(())
}

/// A forwarded call's checks: how many, each key and each limit.
fn checks_within(checks: &[crate::engine::LimitCheck], b: &super::Bounds) -> Result<(), Status> {
    let n = checks.len();
    if n == 0 || n > b.max_checks {
        return Err(Status::invalid_argument(format!(
            "checks: must hold 1 to {} checks, got {n}",
            b.max_checks
        )));
    }
    checks.iter().enumerate().try_for_each(|(i, c)| {
        key(&c.key, || format!("checks[{i}].key"))?;
        c.limit.validate().map_err(|e| {
            invalid(
                &format!("checks[{i}].limit.{}", e.field),
                format_args!("1 to {}", e.max),
                e.got,
            )
        })?;
        max_delay(i, &c.limit, c.max_delay_ms)
    })
}

/// A circuit breaker's thresholds, within their bounds (`field`: where the
/// caller set them).
pub fn breaker_def(def: &crate::engine::BreakerDef, field: &str) -> Result<(), Status> {
    def.validate()
        .map_err(|(f, bound)| Status::invalid_argument(format!("{field}.{f}: {bound}")))
}

/// The bounds a client-facing handler applies, re-applied by the leader to
/// a call a follower forwarded (a peer could send anything): keys, TTLs,
/// retention, sizes, the number of checks and each limit.
pub fn forwarded(call: &crate::node::Call, b: &super::Bounds) -> Result<(), Status> {
    use crate::node::Call;
    let name = |n: &str, field: &str| key(n, || field.to_owned());
    match call {
        Call::Acquire(op) => name(&op.name, "name").and(ttl(op.ttl_ms, "ttl_ms", b.max_ttl_ms)),
        Call::Renew(op) => name(&op.name, "name").and(ttl(op.ttl_ms, "ttl_ms", b.max_ttl_ms)),
        Call::Release(op) => name(&op.name, "name"),
        Call::GetLease(op) => name(&op.name, "name"),
        Call::SemAcquire(op) => name(&op.name, "name")
            .and(name(&op.holder, "holder"))
            .and(ttl(op.ttl_ms, "ttl_ms", b.max_ttl_ms))
            .and(permits(op.limit, op.permits)),
        Call::SemRenew(op) => name(&op.name, "name").and(ttl(op.ttl_ms, "ttl_ms", b.max_ttl_ms)),
        Call::SemRelease(op) => name(&op.name, "name"),
        Call::GetSemaphore(op) => name(&op.name, "name"),
        Call::BreakerCall(op) => name(&op.name, "name").and(breaker_def(&op.def, "config")),
        Call::Begin(op) => name(&op.key, "key")
            .and(bytes(&op.fingerprint, "fingerprint", MAX_KEY_BYTES))
            .and(ttl(op.lock_ttl_ms, "lock_ttl_ms", b.max_ttl_ms))
            .and(ttl(op.retention_ms, "retention_ms", b.max_retention_ms)),
        Call::Complete(op) => {
            name(&op.key, "key").and(bytes(&op.response, "response", b.max_response_bytes))
        }
        Call::Abort(op) => name(&op.key, "key"),
        Call::GetRecord(op) => name(&op.key, "key"),
        Call::CheckLimits(op) => checks_within(&op.checks, b),
        Call::SpanningCheck(op) => match &op.phase {
            crate::node::Phase::Reserve { checks, .. } => checks_within(checks, b),
            crate::node::Phase::Confirm | crate::node::Phase::Release => Ok(()),
        },
        Call::AddMember(op) => {
            if op.peer_addr.is_empty() {
                return Err(Status::invalid_argument(
                    "peer_addr: must be HOST:PORT, got an empty string",
                ));
            }
            Ok(())
        }
        Call::RemoveMember(_) | Call::Rebalance(_) | Call::MemberMetrics(_) => Ok(()),
    }
}
