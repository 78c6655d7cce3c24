//! `arbiter.v1.RateLimiter`: decided at once from the sharded table.

use tonic::{Request, Response, Status};

use super::{convert, error, Shared};
use crate::proto::rate_limiter_server::RateLimiter;
use crate::proto::{CheckRequest, CheckResponse};
use crate::security::Caller;

pub struct RateLimiterService(pub Shared);

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
        if !matches!(caller, Caller::Anyone) {
            for c in &req.checks {
                caller.may_use("key", &c.key)?;
            }
        }
        let checks = req
            .checks
            .into_iter()
            .enumerate()
            .map(|(i, c)| convert::limit_check(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        let results = s
            .node
            .check_as(checks, req.all_or_nothing, caller.name())
            .await
            .map_err(error::node_status)?;
        let allowed = results.iter().filter(|r| r.allowed).count() as u64;
        s.metrics.decisions(allowed, results.len() as u64 - allowed);
        Ok(Response::new(CheckResponse {
            results: results.into_iter().map(Into::into).collect(),
        }))
    }
}
