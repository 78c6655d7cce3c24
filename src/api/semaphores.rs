//! `arbiter.v1.Semaphores`: permits under a name, each holder's a lease.
//! Writes go through the node's ordered write path, as leases' do; `Watch`
//! streams the holders, then every change.

use std::pin::Pin;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::authz::{authorize, authorized};
use super::{convert, error, Shared};
use crate::engine::{Permit, SemAcquire, SemRelease, SemRenew, SemaphoreEventKind};
use crate::node::{Change, GetSemaphore, Stamped};
use crate::proto::semaphore_event::Kind;
use crate::proto::semaphores_server::Semaphores;
use crate::proto::{
    GetSemaphoreRequest, GetSemaphoreResponse, SemaphoreAcquireRequest, SemaphoreAcquireResponse,
    SemaphoreEvent, SemaphoreReleaseRequest, SemaphoreReleaseResponse, SemaphoreRenewRequest,
    SemaphoreRenewResponse, WatchSemaphoreRequest,
};

/// Events queued per watch stream towards a slow client.
const STREAM_BUFFER: usize = 64;

/// How often a Watch stream checks that the auth file still lets its
/// caller watch the semaphore.
const REAUTHORISE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

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
        let (permits, now, mut events, slot) =
            (watch.lease, watch.now_ms, watch.events, watch.slot);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut shutdown = node.shutdown_signal();
        let auth = self.0.auth.clone();
        tokio::spawn(async move {
            // The watch counts against the caps until this task ends.
            let _slot = slot;
            if tx.send(Ok(current(permits, now))).await.is_err() {
                return;
            }
            let mut recheck = tokio::time::interval(REAUTHORISE_EVERY);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let change = tokio::select! {
                    e = events.recv() => e,
                    _ = recheck.tick() => {
                        if let Err(refused) = caller.still_allowed(auth.as_ref(), "semaphore", &name) {
                            let _ = tx.send(Err(refused)).await;
                            return;
                        }
                        continue;
                    }
                    _ = tx.closed() => return,
                    _ = crate::node::Node::stopped(&mut shutdown) => {
                        let _ = tx.send(Err(Status::unavailable("server is shutting down; watch again"))).await;
                        return;
                    }
                };
                let out = match change {
                    Ok(Change::Semaphore(e)) => event(e, node.now_ms()),
                    // Behind, or the state was replaced: start over.
                    Ok(Change::Replaced) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        let (permits, now) = node.semaphore_local(&name);
                        current(permits, now)
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                    // Never sent on a semaphore's channel.
                    Ok(Change::Event(_)) => continue,
                };
                if tx.send(Ok(out)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
