//! `arbiter.v1.Cluster`: membership and leadership, for operators.

use tonic::{Request, Response, Status};

use super::authz::authorized;
use super::{error, Shared};
use crate::node::{AddMember, MemberMetrics, Rebalance, RemoveMember};
use crate::proto::cluster_server::Cluster;
use crate::proto::{
    AddMemberRequest, ClusterMetricsRequest, ClusterMetricsResponse, ClusterStatusRequest,
    ClusterStatusResponse, Member, RebalanceRequest, RemoveMemberRequest,
};

pub struct ClusterService(pub Shared);

impl ClusterService {
    fn status(&self, with_owners: bool) -> ClusterStatusResponse {
        let node = &self.0.node;
        let config_error = self
            .0
            .auth
            .as_ref()
            .and_then(|a| a.failure())
            .map(|e| format!("auth file: {e}"));
        let standing = node.standing();
        let map = node.slot_map();
        let slots = map.counts();
        ClusterStatusResponse {
            node_id: node.id(),
            leader_id: standing.leader,
            term: standing.term,
            applied_index: standing.applied_index,
            members: standing
                .members
                .into_iter()
                .map(|m| Member {
                    id: m.id,
                    peer_addr: m.peer_addr,
                    voter: m.voter,
                    slots: slots.get(&m.id).map_or(0, |n| *n as u32),
                    drained: map.drained.contains(&m.id),
                })
                .collect(),
            state: standing.role.into(),
            membership_changing: standing.membership_changing,
            ready: node.ready() && config_error.is_none(),
            cluster_id: node.cluster_id().unwrap_or_default(),
            config_error: config_error.unwrap_or_default(),
            slot_map_version: map.version,
            slot_owners: if with_owners {
                map.owners.clone()
            } else {
                Vec::new()
            },
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.0.caller(&request)?;
        Ok(Response::new(self.status(request.get_ref().slot_owners)))
    }

    async fn add_member(
        &self,
        request: Request<AddMemberRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let caller = self.0.caller(&request)?;
        let r = request.into_inner();
        if r.peer_addr.is_empty() {
            return Err(Status::invalid_argument(
                "peer_addr: must be HOST:PORT, got an empty string",
            ));
        }
        self.0
            .node
            .execute_as(
                authorized(
                    &caller,
                    AddMember {
                        id: r.id,
                        peer_addr: r.peer_addr,
                        force: r.force,
                    },
                )?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(self.status(false)))
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let caller = self.0.caller(&request)?;
        self.0
            .node
            .execute_as(
                authorized(
                    &caller,
                    RemoveMember {
                        id: request.into_inner().id,
                    },
                )?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?;
        Ok(Response::new(self.status(false)))
    }

    async fn metrics(
        &self,
        request: Request<ClusterMetricsRequest>,
    ) -> Result<Response<ClusterMetricsResponse>, Status> {
        let caller = self.0.caller(&request)?;
        authorized(&caller, MemberMetrics {})?;
        let node = &self.0.node;
        let members = node
            .members_metrics(caller.name())
            .await
            .into_iter()
            .map(|(id, answer)| {
                let (text, error) = match answer {
                    Ok(text) => (text, String::new()),
                    Err(e) => (String::new(), e),
                };
                crate::proto::MemberMetrics { id, text, error }
            })
            .collect();
        Ok(Response::new(ClusterMetricsResponse {
            node_id: node.id(),
            members,
        }))
    }

    async fn rebalance(
        &self,
        request: Request<RebalanceRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let caller = self.0.caller(&request)?;
        let r = request.into_inner();
        let node = &self.0.node;
        let version = node
            .execute_as(
                authorized(
                    &caller,
                    Rebalance {
                        drain: r.drain,
                        restore: r.restore,
                    },
                )?,
                caller.name(),
            )
            .await
            .map_err(error::node_status)?;
        // Answered with this node's view once it has applied the new map.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while node.slot_map().version < version && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Ok(Response::new(self.status(false)))
    }
}
