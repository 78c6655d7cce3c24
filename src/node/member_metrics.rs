//! Every member's metrics through one member (`arbiter.v1.Cluster/Metrics`,
//! which `arbiter top` reads): the member asked renders its own and asks
//! the others over the peer port, each within a bound, all at once.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::operations::Operation;
use super::routing::Router;
use super::{Node, NodeError};
use crate::raft::NodeId;

/// How long a member's metrics are waited for.
pub const MEMBER_METRICS_WAIT: Duration = Duration::from_secs(1);

/// Renders this member's metrics (Prometheus text), as its metrics port
/// serves them. Set by the server once its metrics are installed.
pub type MetricsText = Box<dyn Fn() -> String + Send + Sync>;

/// Where the metrics text comes from: unset in a node without a metrics
/// endpoint (the simulated cluster), which then answers with none.
pub type MetricsSource = Arc<OnceLock<MetricsText>>;

/// Asks a member for its metrics text.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemberMetrics {}

impl Operation for MemberMetrics {
    type Output = String;
    const WRITE: bool = false;

    async fn serve(self, at: &Router) -> Result<String, NodeError> {
        Ok(at
            .metrics_text
            .get()
            .map(|render| render())
            .unwrap_or_default())
    }
}

impl Node {
    /// Sets how this member renders its metrics (once; later calls are
    /// ignored).
    pub fn set_metrics_text(&self, render: MetricsText) {
        let _ = self.router.metrics_text.set(render);
    }

    /// Every member's metrics text, or why it did not come within
    /// [`MEMBER_METRICS_WAIT`], by member id: this member's rendered here,
    /// the others' asked over the peer port, all at once.
    pub async fn members_metrics(&self, principal: &str) -> Vec<(NodeId, Result<String, String>)> {
        let ids: Vec<NodeId> = self.peer_members().into_iter().map(|(id, _)| id).collect();
        let asks = ids.iter().map(|&id| async move {
            let text = if id == self.id() {
                MemberMetrics {}.serve(&self.router).await
            } else {
                self.router
                    .forwarder
                    .forward::<MemberMetrics>(
                        id,
                        MemberMetrics {}.into(),
                        principal,
                        MEMBER_METRICS_WAIT,
                    )
                    .await
            };
            (id, text.map_err(|e| e.to_string()))
        });
        futures::future::join_all(asks).await
    }
}
