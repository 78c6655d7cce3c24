//! Circuit breaker calls: decided, as rate-limit checks are, by whoever
//! decides the breaker name's slot (the leader before slots are spread),
//! from its in-memory table, with no log entry per call. What a call
//! changes is replicated by the rate-limit sync (`limit_sync`); a phase
//! change reaches this node's watchers at once and other members' when
//! the sync is applied there.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::operations::Operation;
use super::routing::{Router, OWNER_WAIT};
use super::NodeError;
use crate::engine::{
    slot_of, Breaker, BreakerChange, BreakerDef, BreakerQuota, CallOutcome, Reported, Verdict,
};

/// What a breaker call asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BreakerAction {
    /// May a call go now? (A probe permit while half-open.)
    Allow,
    /// One call's outcome, made under `probe_token` (0: none).
    Report {
        outcome: CallOutcome,
        probe_token: u64,
    },
    /// Its state, changing nothing.
    Get,
}

/// One call on the breaker `name`, with its thresholds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BreakerCall {
    pub name: String,
    pub def: BreakerDef,
    pub action: BreakerAction,
    /// The caller ("" without authentication), whose new breakers count
    /// against `quota`.
    #[serde(default)]
    pub principal: String,
    #[serde(default)]
    pub quota: Option<u64>,
}

/// A breaker call's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerAnswer {
    /// For `Allow`.
    pub verdict: Option<Verdict>,
    /// For `Report`.
    pub reported: Option<Reported>,
    /// The breaker after the call, as of `now_ms` (absent: closed, never
    /// reported to, or idle and dropped).
    pub breaker: Option<Breaker>,
    pub now_ms: u64,
}

impl Operation for BreakerCall {
    type Output = BreakerAnswer;
    const WRITE: bool = true;

    async fn serve(self, at: &Router) -> Result<BreakerAnswer, NodeError> {
        let map = at.engine.slots();
        if map.assigned() {
            if !at
                .slots
                .may_decide_keys(&map, || std::iter::once(self.name.as_str()))
            {
                return Err(NodeError::NotOwner);
            }
        } else {
            at.leadership.ready_to_decide().await?;
        }
        at.decide_breaker(self)
    }
}

impl Router {
    /// Serves a breaker call where it is decided: here when this node
    /// decides the name's slot, otherwise at its owner (the leader before
    /// slots are spread), sent again while the owner cannot decide it (no
    /// leader yet, the slot moving), until `--leader-wait-ms`.
    pub async fn breaker(&self, call: BreakerCall) -> Result<BreakerAnswer, NodeError> {
        /// How often a call whose owner could not decide it is sent again.
        const RETRY: Duration = Duration::from_millis(10);
        let deadline = Instant::now() + self.leader_wait;
        loop {
            let map = self.engine.slots();
            let name = || std::iter::once(call.name.as_str());
            let (here, owner) = if map.assigned() {
                let here = self.slots.may_decide_keys(&map, name);
                (here, map.owner(slot_of(&call.name)))
            } else {
                (self.leadership.may_decide(), self.view.leader())
            };
            if here {
                return self.decide_breaker(call);
            }
            let answer = match owner {
                // Its own, but not yet decidable at once (a leader that
                // has not yet applied its predecessors' entries): served
                // here, which waits for that, or answers NotOwner.
                Some(o) if o == self.view.id() => self.serve_bounded(call.clone()).await,
                Some(o) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let principal = call.principal.clone();
                    self.forwarder
                        .forward::<BreakerCall>(
                            o,
                            call.clone().into(),
                            &principal,
                            left.min(OWNER_WAIT),
                        )
                        .await
                }
                None => Err(NodeError::NotLeader),
            };
            match answer {
                Err(NodeError::NotOwner | NodeError::NotLeader) => {}
                other => return other,
            }
            self.rerouted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if Instant::now() + RETRY > deadline {
                return Err(NodeError::Unavailable(format!(
                    "no member could decide circuit breaker {:?} within {} ms (no leader, or \
                     its slot moving)",
                    call.name,
                    self.leader_wait.as_millis()
                )));
            }
            // Polled, as a rerouted check is.
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Decides `call` here (the caller made sure this node may).
    fn decide_breaker(&self, call: BreakerCall) -> Result<BreakerAnswer, NodeError> {
        let now_ms = self.decide_ms();
        let table = self.engine.breakers();
        let (name, def) = (call.name.as_str(), &call.def);
        let mut answer = BreakerAnswer {
            verdict: None,
            reported: None,
            breaker: None,
            now_ms,
        };
        let change = match call.action {
            BreakerAction::Allow => {
                let (verdict, change) = table.allow(name, def, now_ms);
                answer.verdict = Some(verdict);
                change
            }
            BreakerAction::Report {
                outcome,
                probe_token,
            } => {
                let quota = BreakerQuota {
                    principal: &call.principal,
                    max: call.quota,
                };
                let (reported, change) =
                    table.report(name, def, outcome, probe_token, now_ms, quota)?;
                answer.reported = Some(reported);
                change
            }
            BreakerAction::Get => None,
        };
        answer.breaker = table.get(name).map(|b| b.at(def, now_ms));
        if let Some(change) = change {
            self.breaker_moved(std::slice::from_ref(&change));
        }
        Ok(answer)
    }

    /// Counts and publishes phase changes made here.
    fn breaker_moved(&self, changes: &[BreakerChange]) {
        for c in changes {
            metrics::counter!("arbiter_breaker_transitions_total", "to" => phase_name(c.breaker.phase))
                .increment(1);
        }
        self.watchers.publish_breakers(changes);
    }
}

/// A phase's name in metrics and logs.
pub fn phase_name(phase: crate::engine::Phase) -> &'static str {
    match phase {
        crate::engine::Phase::Closed => "closed",
        crate::engine::Phase::Open => "open",
        crate::engine::Phase::HalfOpen => "half_open",
    }
}
