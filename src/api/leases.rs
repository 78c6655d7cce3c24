//! `arbiter.v1.Leases`: writes go through the node's ordered write path;
//! `Watch` streams the current state, then every change.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::authz::{authorize, authorized};
use super::{convert, error, watch_stream, Shared};
use crate::engine::{Acquire, Release, Renew};
use crate::node::{Change, GetLease, Stamped};
use crate::proto::leases_server::Leases;
use crate::proto::{
    lease_event, AcquireRequest, AcquireResponse, GetLeaseRequest, GetLeaseResponse, LeaseEvent,
    ReleaseRequest, ReleaseResponse, RenewRequest, RenewResponse, WatchLeaseRequest,
};

pub struct LeasesService(pub Shared);

fn name_and_holder(name: &str, holder: &str) -> Result<(), Status> {
    convert::key(name, || "name".into())?;
    convert::key(holder, || "holder".into())
}

#[tonic::async_trait]
impl Leases for LeasesService {
    async fn acquire(
        &self,
        request: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        name_and_holder(&r.name, &r.holder)?;
        convert::ttl(r.ttl_ms, "ttl_ms", s.bounds.max_ttl_ms)?;
        let Stamped { value, now_ms } = s
            .node
            .execute_as(
                authorized(
                    &caller,
                    Acquire {
                        name: r.name,
                        holder: r.holder,
                        ttl_ms: r.ttl_ms,
                        principal: caller.name().to_owned(),
                        quota: caller.lease_quota(&s.bounds.caps),
                    },
                )?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(AcquireResponse {
            acquired: value.acquired,
            lease: Some(convert::lease(value.lease, now_ms)),
        }))
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        name_and_holder(&r.name, &r.holder)?;
        convert::ttl(r.ttl_ms, "ttl_ms", s.bounds.max_ttl_ms)?;
        let Stamped { value, now_ms } = s
            .node
            .execute_as(
                authorized(
                    &caller,
                    Renew {
                        name: r.name,
                        holder: r.holder,
                        fencing_token: r.fencing_token,
                        ttl_ms: r.ttl_ms,
                        principal: caller.name().to_owned(),
                    },
                )?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(RenewResponse {
            lease: Some(convert::lease(value, now_ms)),
        }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        name_and_holder(&r.name, &r.holder)?;
        let Stamped { value, now_ms } = s
            .node
            .execute_as(
                authorized(
                    &caller,
                    Release {
                        name: r.name,
                        holder: r.holder,
                        fencing_token: r.fencing_token,
                        principal: caller.name().to_owned(),
                    },
                )?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(ReleaseResponse {
            lease: Some(convert::lease(value, now_ms)),
        }))
    }

    async fn get(
        &self,
        request: Request<GetLeaseRequest>,
    ) -> Result<Response<GetLeaseResponse>, Status> {
        let s = &self.0;
        let caller = s.caller(&request)?;
        let r = request.into_inner();
        convert::key(&r.name, || "name".into())?;
        let Stamped { value, now_ms } = s
            .node
            .execute_as(
                authorized(&caller, GetLease { name: r.name })?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(GetLeaseResponse {
            lease: value.map(|l| convert::lease(l, now_ms)),
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<LeaseEvent, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchLeaseRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.0.caller(&request)?;
        let name = request.into_inner().name;
        convert::key(&name, || "name".into())?;
        authorize(&caller, &GetLease { name: name.clone() })?;
        let node = self.0.node.clone();
        let quota = caller.watch_quota(&self.0.bounds.caps);
        let watch = node
            .watch(&name, caller.name(), quota)
            .map_err(error::node_status)?;
        fn current(lease: Option<crate::engine::Lease>, now: u64) -> LeaseEvent {
            LeaseEvent {
                kind: lease_event::Kind::Current as i32,
                lease: lease.map(|l| convert::lease(l, now)),
            }
        }
        let feed = watch_stream::Feed {
            what: "lease",
            first: current,
            change: |change, now| match change {
                Change::Event(e) => Some(convert::lease_event(e, now)),
                _ => None,
            },
            current: |node: &crate::node::Node, name: &str| {
                let (lease, now) = node.lease_local(name);
                current(lease, now)
            },
        };
        let auth = self.0.auth.clone();
        let stream = watch_stream::serve(node, auth, caller, name, watch, feed);
        Ok(Response::new(Box::pin(stream)))
    }
}
