//! `arbiter.v1.Semaphores`: permits under a name, each holder's a lease.
//! Writes go through the node's ordered write path, as leases' do; `Watch`
//! streams the holders, then every change.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::authz::{authorize, authorized};
use super::{convert, error, watch_stream, Shared};
use crate::engine::{Permit, SemAcquire, SemRelease, SemRenew, SemaphoreEventKind};
use crate::node::{Change, GetSemaphore, Stamped};
use crate::proto::semaphore_event::Kind;
use crate::proto::semaphores_server::Semaphores;
use crate::proto::{
    GetSemaphoreRequest, GetSemaphoreResponse, SemaphoreAcquireRequest, SemaphoreAcquireResponse,
    SemaphoreEvent, SemaphoreReleaseRequest, SemaphoreReleaseResponse, SemaphoreRenewRequest,
    SemaphoreRenewResponse, WatchSemaphoreRequest,
};

/// The CURRENT event: every live holder.
fn current(permits: Vec<Permit>, now_ms: u64) -> SemaphoreEvent {
    SemaphoreEvent {
        kind: Kind::Current as i32,
        permit: None,
        held: permits.iter().map(|p| p.permits).sum(),
        permits: permits
            .into_iter()
            .map(|p| convert::permit(p, now_ms))
            .collect(),
    }
}

fn event(e: crate::engine::SemaphoreEvent, now_ms: u64) -> SemaphoreEvent {
    let kind = match e.kind {
        SemaphoreEventKind::Acquired => Kind::Acquired,
        SemaphoreEventKind::Renewed => Kind::Renewed,
        SemaphoreEventKind::Released => Kind::Released,
        SemaphoreEventKind::Expired => Kind::Expired,
    };
    SemaphoreEvent {
        kind: kind as i32,
        permit: Some(convert::permit(e.permit, now_ms)),
        held: e.held,
        permits: Vec::new(),
    }
}

pub struct SemaphoresService(pub Shared);

fn name_and_holder(name: &str, holder: &str) -> Result<(), Status> {
    convert::key(name, || "name".into())?;
    convert::key(holder, || "holder".into())
}

#[tonic::async_trait]
impl Semaphores for SemaphoresService {
    async fn acquire(
        &self,
        request: Request<SemaphoreAcquireRequest>,
    ) -> Result<Response<SemaphoreAcquireResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        name_and_holder(&r.name, &r.holder)?;
        let permits = r.permits.unwrap_or(1);
        convert::permits(r.limit, permits)?;
        convert::ttl(r.ttl_ms, "ttl_ms", s.bounds.max_ttl_ms)?;
        let op = SemAcquire {
            name: r.name,
            holder: r.holder,
            limit: r.limit,
            permits,
            ttl_ms: r.ttl_ms,
            principal: caller.name().to_owned(),
            quota: caller.lease_quota(&s.bounds.caps),
        };
        let Stamped { value, now_ms } = s
            .node
            .execute_as(authorized(&caller, op)?, caller.name())
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(SemaphoreAcquireResponse {
            granted: value.permit.is_some(),
            held: value.held,
            retry_after_ms: value.next_lapse_ms.saturating_sub(now_ms),
            permit: value.permit.map(|p| convert::permit(p, now_ms)),
        }))
    }

    async fn renew(
        &self,
        request: Request<SemaphoreRenewRequest>,
    ) -> Result<Response<SemaphoreRenewResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        name_and_holder(&r.name, &r.holder)?;
        convert::ttl(r.ttl_ms, "ttl_ms", s.bounds.max_ttl_ms)?;
        let op = SemRenew {
            name: r.name,
            holder: r.holder,
            fencing_token: r.fencing_token,
            ttl_ms: r.ttl_ms,
            principal: caller.name().to_owned(),
        };
        let Stamped { value, now_ms } = s
            .node
            .execute_as(authorized(&caller, op)?, caller.name())
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(SemaphoreRenewResponse {
            permit: Some(convert::permit(value, now_ms)),
        }))
    }

    async fn release(
        &self,
        request: Request<SemaphoreReleaseRequest>,
    ) -> Result<Response<SemaphoreReleaseResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        name_and_holder(&r.name, &r.holder)?;
        let op = SemRelease {
            name: r.name,
            holder: r.holder,
            fencing_token: r.fencing_token,
            principal: caller.name().to_owned(),
        };
        s.node
            .execute_as(authorized(&caller, op)?, caller.name())
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(SemaphoreReleaseResponse {}))
    }

    async fn get(
        &self,
        request: Request<GetSemaphoreRequest>,
    ) -> Result<Response<GetSemaphoreResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        convert::key(&r.name, || "name".into())?;
        let Stamped { value, now_ms } = s
            .node
            .execute_as(
                authorized(&caller, GetSemaphore { name: r.name })?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(GetSemaphoreResponse {
            held: value.iter().map(|p| p.permits).sum(),
            permits: value
                .into_iter()
                .map(|p| convert::permit(p, now_ms))
                .collect(),
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<SemaphoreEvent, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchSemaphoreRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.0.caller(&request)?;
        let name = request.into_inner().name;
        convert::key(&name, || "name".into())?;
        authorize(&caller, &GetSemaphore { name: name.clone() })?;
        let node = self.0.node.clone();
        let quota = caller.watch_quota(&self.0.bounds.caps);
        let watch = node
            .watch_semaphore(&name, caller.name(), quota)
            .map_err(error::node_status)?;
        let feed = watch_stream::Feed {
            what: "semaphore",
            first: current,
            change: |change, now| match change {
                Change::Semaphore(e) => Some(event(e, now)),
                _ => None,
            },
            current: |node: &crate::node::Node, name: &str| {
                let (permits, now) = node.semaphore_local(name);
                current(permits, now)
            },
        };
        let auth = self.0.auth.clone();
        let stream = watch_stream::serve(node, auth, caller, name, watch, feed);
        Ok(Response::new(Box::pin(stream)))
    }
}
