//! `arbiter cluster rebalance`: an operator drains members of their
//! rate-limit slots (before maintenance, say) or gives them back their
//! share. The drained set travels in the slot map, through the log, so a
//! new leader keeps it; the slots move by the same rule as any move (the
//! old owner's slot lease lapses first).

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::operations::Operation;
use super::routing::Router;
use super::slots::SLOT_RENEW_MS;
use super::NodeError;
use crate::raft::NodeId;

/// How long the leader waits for the moves to be applied, beyond the
/// leader wait: a slot moves only after its owner's lease has lapsed.
const MOVE_WAIT: Duration = Duration::from_secs(5);

/// Drains `drain` and gives `restore` back their share; with neither,
/// spreads the slots evenly over the voters heard from now. Answers the
/// version of the slot map that holds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rebalance {
    pub drain: Vec<NodeId>,
    pub restore: Vec<NodeId>,
}

impl Operation for Rebalance {
    type Output = u64;
    const WRITE: bool = true;

    fn bound(&self, at: &Router) -> Duration {
        at.leader_wait + MOVE_WAIT
    }

    async fn serve(self, at: &Router) -> Result<u64, NodeError> {
        if !at.view.is_leader() {
            return Err(NodeError::NotLeader);
        }
        let refused = |why: String| Err(NodeError::Membership(why));
        if !at.slots.spread() {
            return refused(
                "the rate-limit slots are not spread: start every member with --slot-owners \
                 spread"
                    .into(),
            );
        }
        let voters = at.view.voters();
        for (field, ids) in [("drain", &self.drain), ("restore", &self.restore)] {
            if let Some(id) = ids.iter().find(|id| !voters.contains(id)) {
                return refused(format!("{field}: node {id} is not a voter"));
            }
        }
        if let Some(id) = self.drain.iter().find(|id| self.restore.contains(id)) {
            return refused(format!("node {id} is both drained and restored"));
        }
        let map = at.engine.slots();
        let mut drained: BTreeSet<NodeId> = map.drained.iter().copied().collect();
        drained.extend(&self.drain);
        drained.retain(|id| !self.restore.contains(id) && voters.contains(id));
        if voters.iter().all(|v| drained.contains(v)) {
            return refused(
                "drain: that would leave no member to own the rate-limit slots".to_owned(),
            );
        }
        let wanted: Vec<NodeId> = drained.into_iter().collect();
        at.slots.want_drained(wanted.clone());
        // Polled: the moves wait for leases, which have no event here.
        let deadline = Instant::now() + MOVE_WAIT;
        loop {
            let applied = at.engine.slots();
            let settled =
                applied.drained == wanted && applied.owners.iter().all(|o| !wanted.contains(o));
            if settled {
                return Ok(applied.version);
            }
            if Instant::now() >= deadline {
                return Err(NodeError::Unavailable(format!(
                    "the slots had not moved within {} ms; they move once their owners' slot \
                     leases lapse, so look again with `arbiter cluster status`",
                    MOVE_WAIT.as_millis()
                )));
            }
            tokio::time::sleep(Duration::from_millis(SLOT_RENEW_MS)).await;
        }
    }
}
