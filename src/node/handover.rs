//! Handing leadership over on shutdown, so a rolling restart costs no
//! election timeout.
//!
//! openraft 0.9 has no leadership transfer, so the leader does it in two
//! steps. First it stops serving: no more rate-limit decisions or writes
//! here (calls wait for the next leader and are forwarded to it). Then it
//! asks the voter that has replicated the most (`TakeOver`) to start an
//! election at once, skipping the pre-vote: the old leader, no longer
//! serving, grants its vote, which with the candidate's own is a majority
//! of three. The old leader waits (a bounded time) until it sees the new
//! leader, then shuts down as before. If anything fails, the followers
//! elect a leader on their own once the old one has gone quiet.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::admission::Gate;
use super::leadership::Leadership;
use super::view::View;
use crate::proto::raft_peer_client::RaftPeerClient;
use crate::raft::network::{encode, with_cluster, Channels, ClusterId};
use crate::raft::NodeId;

/// How long the old leader waits for the new one before shutting down.
const HAND_OVER_WAIT: Duration = Duration::from_secs(2);

use crate::timing::VOTE_LEASE_MS;

/// `TakeOver`: the leader of `term` asks the receiver to stand at once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TakeOver {
    pub leader: NodeId,
    pub term: u64,
}

/// Hands leadership over (as the leader shutting down) and takes it over
/// (as the successor asked to).
pub struct Handover {
    pub view: View,
    pub leadership: Arc<Leadership>,
    pub gate: Arc<Gate>,
    pub channels: Channels,
    pub cluster: ClusterId,
}

impl Handover {
    /// On shutdown: if this node leads, stop serving and hand leadership to
    /// the most caught-up voter. Returns the new leader, if one took over
    /// within [`HAND_OVER_WAIT`].
    pub async fn hand_over(&self) -> Option<NodeId> {
        let (term, leading) = self.view.term_and_leading();
        if !leading {
            return None;
        }
        let me = self.view.id();
        let m = self.view.raft().metrics().borrow().clone();
        let matched = m.replication.clone().unwrap_or_default();
        let successor = self
            .view
            .voters()
            .into_iter()
            .filter(|v| *v != me)
            .max_by_key(|v| matched.get(v).copied().flatten())?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&successor)?
            .addr
            .clone();
        self.leadership.step_down();
        tracing::info!(successor, "shutting down: handing leadership over");
        // Let the successor receive everything this node has in its log
        // (its vote goes only to a candidate whose log is as long).
        let last = m.last_log_index;
        let mut metrics = self.view.raft().metrics();
        let caught_up = metrics.wait_for(|m| {
            m.replication
                .as_ref()
                .is_some_and(|r| r.get(&successor).copied().flatten().map(|l| l.index) >= last)
        });
        let _ = tokio::time::timeout(Duration::from_millis(500), caught_up).await;
        // A leader elected moments ago would refuse the successor its vote.
        let now = self.leadership.mono_ms();
        let elected_at = self.leadership.led_since(term).unwrap_or(now);
        let age = now.saturating_sub(elected_at);
        if age < VOTE_LEASE_MS {
            tokio::time::sleep(Duration::from_millis(VOTE_LEASE_MS - age)).await;
        }
        let ask = TakeOver { leader: me, term };
        let asked = async {
            let channel = self.channels.get(&addr).map_err(|e| e.to_string())?;
            let request = with_cluster(encode(&ask), &self.cluster, Duration::from_secs(1));
            RaftPeerClient::new(channel)
                .take_over(request)
                .await
                .map_err(|s| s.to_string())
        };
        if let Err(e) = asked.await {
            tracing::warn!(successor, error = %e, "the successor did not take over");
            return None;
        }
        let mut server = self.view.changes();
        let new_leader = tokio::time::timeout(
            HAND_OVER_WAIT,
            server.wait_for(|s| s.current_leader.is_some_and(|l| l != me)),
        )
        .await;
        match new_leader {
            Ok(Ok(s)) => s.current_leader,
            _ => {
                tracing::warn!(successor, "no new leader within the hand-over wait");
                None
            }
        }
    }

    /// Serves a `TakeOver`: if it comes from this node's current leader in
    /// its current term, starts an election now.
    pub async fn take_over(&self, ask: TakeOver) -> Result<(), String> {
        let (leader, term) = self.view.leader_and_term();
        if ask.term != term || leader != Some(ask.leader) {
            return Err(format!(
                "not taking over from node {} in term {}: this node is in term {term} with leader {leader:?}",
                ask.leader, ask.term
            ));
        }
        let me = self.view.id();
        if !self.view.voters().contains(&me) || !self.gate.admitted() {
            return Err(format!("node {me} is not a voter"));
        }
        tracing::info!(from = ask.leader, "taking over leadership");
        self.view
            .raft()
            .trigger()
            .elect()
            .await
            .map_err(|e| e.to_string())
    }
}
