//! The gRPC layer: one file per service, conversions with validation in
//! [`convert`], the one engine-error → status mapping in [`error`], and
//! per-RPC metrics and tracing as one tower layer around them all
//! ([`layer`]).

pub mod cluster;
pub mod convert;
pub mod error;
pub mod idempotency;
pub mod layer;
pub mod leases;
pub mod rate_limiter;
pub mod rls;

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
}

impl From<&Config> for Bounds {
    fn from(c: &Config) -> Self {
        Self {
            max_ttl_ms: c.max_ttl_ms,
            default_retention_ms: c.default_retention_ms,
            max_retention_ms: c.max_retention_ms,
            max_response_bytes: c.max_response_bytes,
            max_checks: c.max_checks_per_request,
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
