//! `arbiter.v1.Idempotency`: writes go through the node's ordered write path.

use tonic::{Request, Response, Status};

use super::authz::authorized;
use super::{convert, error, Shared};
use crate::engine::{Abort, Begin, BeginOutcome, Complete};
use crate::node::{GetRecord, Stamped};
use crate::proto::idempotency_server::Idempotency;
use crate::proto::{
    AbortRequest, AbortResponse, BeginRequest, BeginResponse, CompleteRequest, CompleteResponse,
    GetRecordRequest, GetRecordResponse, Outcome as PbOutcome,
};

pub struct IdempotencyService(pub Shared);

#[tonic::async_trait]
impl Idempotency for IdempotencyService {
    async fn begin(
        &self,
        request: Request<BeginRequest>,
    ) -> Result<Response<BeginResponse>, Status> {
        let s = &self.0;
        let b = s.bounds;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        convert::key(&r.key, || "key".into())?;
        convert::bytes(&r.fingerprint, "fingerprint", convert::MAX_KEY_BYTES)?;
        convert::ttl(r.lock_ttl_ms, "lock_ttl_ms", b.max_ttl_ms)?;
        let retention_ms = match r.retention_ms {
            0 => b.default_retention_ms,
            ms => {
                convert::ttl(ms, "retention_ms", b.max_retention_ms)?;
                ms
            }
        };
        let outcome = s
            .node
            .execute_as(
                authorized(
                    &caller,
                    Begin {
                        principal: caller.name().to_owned(),
                        key: r.key,
                        fingerprint: r.fingerprint,
                        lock_ttl_ms: r.lock_ttl_ms,
                        retention_ms,
                        quota: caller.record_quota(&b.caps),
                    },
                )?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?
            .value;
        let reply = match outcome {
            BeginOutcome::Started { attempt } => BeginResponse {
                outcome: PbOutcome::Started as i32,
                attempt,
                ..Default::default()
            },
            BeginOutcome::InProgress {
                attempt,
                retry_after_ms,
            } => BeginResponse {
                outcome: PbOutcome::InProgress as i32,
                attempt,
                retry_after_ms,
                ..Default::default()
            },
            BeginOutcome::Completed { attempt, response } => BeginResponse {
                outcome: PbOutcome::Completed as i32,
                attempt,
                response,
                ..Default::default()
            },
            BeginOutcome::FingerprintMismatch => BeginResponse {
                outcome: PbOutcome::FingerprintMismatch as i32,
                ..Default::default()
            },
        };
        Ok(Response::new(reply))
    }

    async fn complete(
        &self,
        request: Request<CompleteRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        convert::key(&r.key, || "key".into())?;
        convert::bytes(&r.response, "response", s.bounds.max_response_bytes)?;
        s.node
            .execute_as(
                authorized(
                    &caller,
                    Complete {
                        principal: caller.name().to_owned(),
                        key: r.key,
                        attempt: r.attempt,
                        response: r.response,
                        byte_quota: caller.record_quota(&s.bounds.caps).bytes,
                    },
                )?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(CompleteResponse {}))
    }

    async fn abort(
        &self,
        request: Request<AbortRequest>,
    ) -> Result<Response<AbortResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        convert::key(&r.key, || "key".into())?;
        s.node
            .execute_as(
                authorized(
                    &caller,
                    Abort {
                        principal: caller.name().to_owned(),
                        key: r.key,
                        attempt: r.attempt,
                    },
                )?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(AbortResponse {}))
    }

    async fn get(
        &self,
        request: Request<GetRecordRequest>,
    ) -> Result<Response<GetRecordResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        convert::key(&r.key, || "key".into())?;
        let Stamped { value, now_ms } = s
            .node
            .execute_as(
                authorized(&caller, GetRecord { key: r.key.clone() })?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(GetRecordResponse {
            record: value.map(|rec| convert::record(r.key, rec, now_ms, caller.is_admin())),
        }))
    }
}
