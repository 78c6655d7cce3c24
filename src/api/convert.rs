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
            "checks[{index}].limit: required (token_bucket, sliding_window or fixed_window)"
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
    };
    limit.validate().map_err(|e| {
        invalid(
            &format!("checks[{index}].limit.{}", e.field),
            format_args!("1 to {}", e.max),
            e.got,
        )
    })?;
    Ok(LimitCheck {
        key: c.key,
        limit,
        cost: c.cost.unwrap_or(1),
        dry_run: c.dry_run,
    })
}

impl From<LimitResult> for pb::LimitResult {
    fn from(r: LimitResult) -> Self {
        Self {
            allowed: r.allowed,
            limit: r.limit,
            remaining: r.remaining,
            retry_after_ms: r.retry_after_ms,
            reset_after_ms: r.reset_after_ms,
        }
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

pub fn record(key: String, r: engine::Record, now_ms: u64) -> pb::Record {
    let (state, response) = match r.state {
        engine::RecordState::InProgress => (pb::record::State::InProgress, Vec::new()),
        engine::RecordState::Completed { response } => (pb::record::State::Completed, response),
    };
    pb::Record {
        key,
        state: state as i32,
        attempt: r.attempt,
        fingerprint: r.fingerprint,
        response,
        expires_after_ms: r.expires_at_ms.saturating_sub(now_ms),
    }
}
