//! The gRPC layer: one file per service, conversions with validation in
//! [`convert`], the one engine-error → status mapping in [`error`], and
//! per-RPC metrics and tracing as one tower layer around them all
//! ([`layer`]).

pub mod authz;
pub mod breakers;
pub mod cluster;
pub mod convert;
pub mod error;
pub mod idempotency;
pub mod layer;
pub mod leases;
pub mod peer_service;
pub mod rate_limiter;
pub mod rls;
mod rls_metadata;
pub mod semaphores;
mod watch_stream;

use std::sync::Arc;

use crate::config::Config;
use crate::limits::NamedLimits;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::security::{Auth, Caller};

/// Request bounds the API enforces before anything reaches the engine.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub max_ttl_ms: u64,
    pub default_retention_ms: u64,
    pub max_retention_ms: u64,
    pub max_response_bytes: usize,
    pub max_checks: usize,
    /// The global caps, against which a principal's default quotas (half
    /// of each) are reckoned.
    pub caps: Caps,
}

/// The server's global caps on what it holds.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub leases: usize,
    pub records: usize,
    pub record_bytes: usize,
    pub limit_keys: usize,
    pub watchers: usize,
}

impl Caller {
    /// The caller's quota of leases (`None`: none).
    pub fn lease_quota(&self, caps: &Caps) -> Option<u64> {
        self.quota(|q| q.leases, caps.leases)
    }

    /// The caller's quotas of idempotency records and their bytes.
    pub fn record_quota(&self, caps: &Caps) -> crate::engine::RecordQuota {
        crate::engine::RecordQuota {
            records: self.quota(|q| q.records, caps.records),
            bytes: self.quota(|q| q.record_bytes, caps.record_bytes),
        }
    }

    /// The caller's quota of watch streams on one node.
    pub fn watch_quota(&self, caps: &Caps) -> Option<u64> {
        self.quota(|q| q.watchers, caps.watchers)
    }

    /// The caller's quota of rate-limit keys.
    pub fn limit_key_quota(&self, caps: &Caps) -> Option<u64> {
        self.quota(|q| q.limit_keys, caps.limit_keys)
    }

    /// The caller and its quota of rate-limit keys, for a check.
    pub fn key_quota(&self, caps: &Caps) -> crate::engine::KeyQuota<'_> {
        crate::engine::KeyQuota {
            principal: self.name(),
            max: self.limit_key_quota(caps),
        }
    }
}

impl From<&Config> for Bounds {
    fn from(c: &Config) -> Self {
        Self {
            max_ttl_ms: c.max_ttl_ms,
            default_retention_ms: c.default_retention_ms,
            max_retention_ms: c.max_retention_ms,
            max_response_bytes: c.max_response_bytes,
            max_checks: c.max_checks_per_request,
            caps: {
                let e = c.engine();
                Caps {
                    leases: e.max_leases,
                    records: e.max_records,
                    record_bytes: e.max_record_bytes,
                    limit_keys: e.max_limit_keys,
                    watchers: c.max_watchers,
                }
            },
        }
    }
}

/// What every service handler needs.
#[derive(Clone)]
pub struct Shared {
    pub node: Arc<Node>,
    pub metrics: Arc<Metrics>,
    pub bounds: Bounds,
    /// The auth file's rules (`--auth-file`); `None` lets every call in.
    pub auth: Option<Auth>,
    /// The named limits (`--limits`); empty without it.
    pub limits: NamedLimits,
}

impl Shared {
    /// Who sent `request` (`UNAUTHENTICATED` when authentication is on
    /// and the caller is not known).
    pub fn caller<T>(&self, request: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
        Caller::of(self.auth.as_ref(), request)
    }
}
