//! All-or-nothing batches whose keys belong to several owners: decided by
//! a reserve/confirm exchange between the member the call reached (the
//! coordinator) and the owners.
//!
//! 1. The coordinator asks each owner to **reserve** its part. An owner
//!    decides its part all or nothing under its slot lease; if every check
//!    passes it *holds* what they would consume (the engine counts holds
//!    as spent in every later decision: `limits::table::holds`), keeps the
//!    reservation for at most [`HOLD`], and answers its results.
//! 2. If every owner reserved, the coordinator asks each to **confirm**:
//!    the owner drops its holds and consumes. The caller is told "allowed"
//!    only when every owner confirmed. If an owner denied, or a reserve
//!    failed, the coordinator **releases** the others (giving back exactly
//!    what they held) and answers the denial (or the error).
//!
//! What a fault in the middle costs:
//! - a coordinator that dies, or a release or confirm that is lost: the
//!   holds lapse [`HOLD`] after they were made, and until then other
//!   checks of those keys may be denied that would have passed;
//! - a confirm that reaches some owners and not others (an owner died, was
//!   cut off, lost its slot, or its reservation lapsed): the caller gets
//!   UNAVAILABLE, "not admitted", while the owners that confirmed keep
//!   what they consumed.
//!
//! Neither ever lets a check through that a single decider holding every
//! key would have denied: a fault can only hold back or consume tokens
//! for a call that is not admitted.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::operations::Operation;
use super::routing::{Router, OWNER_WAIT};
use super::NodeError;
use crate::engine::{none_consumed, EngineError, KeyQuota, LimitCheck, LimitResult};
use crate::raft::NodeId;

/// How long an owner keeps a reservation that is neither confirmed nor
/// released.
pub const HOLD: Duration = Duration::from_secs(1);

/// Reservations one member keeps at once, at most; past it a reserve is
/// refused with RESOURCE_EXHAUSTED.
pub const MAX_RESERVATIONS: usize = 4096;

/// A reservation's name: the coordinator, its process and a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HoldId {
    pub from: NodeId,
    pub boot: u64,
    pub seq: u64,
}

/// One step of the exchange, sent to one owner.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Phase {
    /// Decide these checks (the owner's part of the batch) all or nothing,
    /// holding what they consume if all pass; refused once the owner's
    /// decision clock is past `until_ms` (a reserve that arrives after
    /// the coordinator gave up would only hold tokens back).
    Reserve {
        checks: Vec<LimitCheck>,
        until_ms: u64,
    },
    /// Consume what the reservation holds.
    Confirm,
    /// Give back what the reservation holds.
    Release,
}

/// A step of a batch spanning owners (the peer call; answers are the
/// owner's results for `Reserve`, nothing for the others).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SpanningCheck {
    pub id: HoldId,
    pub phase: Phase,
    /// The caller, whose new keys count against `key_quota`; a reservation
    /// is confirmed or released only for the principal that made it.
    #[serde(default)]
    pub principal: String,
    #[serde(default)]
    pub key_quota: Option<u64>,
}

impl Operation for SpanningCheck {
    type Output = Vec<LimitResult>;
    const WRITE: bool = false;

    async fn serve(self, at: &Router) -> Result<Vec<LimitResult>, NodeError> {
        at.serve_spanning(self)
    }
}

/// A reservation this member holds.
struct Reservation {
    checks: Vec<LimitCheck>,
    principal: String,
    key_quota: Option<u64>,
}

/// How many reservations were made, confirmed, released and left to
/// lapse at this member, and made as coordinator.
#[derive(Default)]
pub struct HoldCounts {
    pub reserved: AtomicU64,
    pub confirmed: AtomicU64,
    pub released: AtomicU64,
    pub lapsed: AtomicU64,
    /// Batches this member coordinated, and of them those answered
    /// UNAVAILABLE because not every owner confirmed.
    pub coordinated: AtomicU64,
    pub unconfirmed: AtomicU64,
}

/// What a coordinator awaits between reserving and confirming (tests put
/// a fault there).
pub type PhaseHook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The reservations this member holds for coordinators (here or elsewhere).
pub struct Holds {
    boot: u64,
    seq: AtomicU64,
    held: Mutex<HashMap<HoldId, Reservation>>,
    pub counts: HoldCounts,
    between: Mutex<Option<PhaseHook>>,
}

impl Holds {
    pub fn new(boot: u64) -> Self {
        Self {
            boot,
            seq: AtomicU64::new(0),
            held: Mutex::default(),
            counts: HoldCounts::default(),
            between: Mutex::default(),
        }
    }

    /// Sets what this member, as coordinator, awaits between the two
    /// phases: for tests, which inject faults there.
    #[doc(hidden)]
    pub fn set_between_phases(&self, hook: Option<PhaseHook>) {
        *self.between.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<HoldId, Reservation>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reservations held now.
    pub fn len(&self) -> usize {
        self.held().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self, id: &HoldId) -> Option<Reservation> {
        self.held().remove(id)
    }
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Router {
    /// At an owner: one step of a batch spanning owners.
    fn serve_spanning(&self, op: SpanningCheck) -> Result<Vec<LimitResult>, NodeError> {
        let holds = &self.holds;
        match op.phase {
            Phase::Reserve { checks, until_ms } => {
                let map = self.engine.slots();
                if !map.assigned() || !self.slots.may_decide(&map, &checks) {
                    return Err(NodeError::NotOwner);
                }
                let now = self.decide_ms();
                if now > until_ms {
                    return Err(NodeError::Unavailable(format!(
                        "the reserve arrived {} ms after its coordinator stopped waiting",
                        now - until_ms
                    )));
                }
                if holds.len() >= MAX_RESERVATIONS {
                    return Err(EngineError::Exhausted {
                        what: "reservations of all-or-nothing calls spanning owners".into(),
                        max: MAX_RESERVATIONS,
                    }
                    .into());
                }
                let quota = KeyQuota {
                    principal: &op.principal,
                    max: op.key_quota,
                };
                let results = self.engine.reserve(&checks, now, quota)?;
                if results.iter().all(|r| r.allowed) {
                    count(&holds.counts.reserved);
                    holds.held().insert(
                        op.id,
                        Reservation {
                            checks,
                            principal: op.principal,
                            key_quota: op.key_quota,
                        },
                    );
                    self.lapse_later(op.id);
                }
                Ok(results)
            }
            Phase::Confirm => {
                let Some(r) = holds.take(&op.id) else {
                    return Err(NodeError::Unavailable(format!(
                        "the reservation lapsed ({} ms) or is unknown here",
                        HOLD.as_millis()
                    )));
                };
                if r.principal != op.principal {
                    holds.held().insert(op.id, r);
                    return Err(NodeError::Unavailable(
                        "the reservation was made for another principal".into(),
                    ));
                }
                let map = self.engine.slots();
                if !map.assigned() || !self.slots.may_decide(&map, &r.checks) {
                    self.engine.release(&r.checks);
                    count(&holds.counts.released);
                    return Err(NodeError::Unavailable(
                        "this member no longer decides the reserved keys".into(),
                    ));
                }
                let quota = KeyQuota {
                    principal: &r.principal,
                    max: r.key_quota,
                };
                let results = self.engine.confirm(&r.checks, self.decide_ms(), quota)?;
                if !results.iter().all(|r| r.allowed) {
                    return Err(NodeError::Unavailable(
                        "the reserved checks no longer pass (this member lost its holds)".into(),
                    ));
                }
                count(&holds.counts.confirmed);
                self.count_decided(r.checks.len());
                Ok(Vec::new())
            }
            Phase::Release => {
                if let Some(r) = holds.take(&op.id) {
                    if r.principal == op.principal {
                        self.engine.release(&r.checks);
                        count(&holds.counts.released);
                    } else {
                        holds.held().insert(op.id, r);
                    }
                }
                Ok(Vec::new())
            }
        }
    }

    /// Gives back reservation `id` [`HOLD`] from now, if it is still held.
    fn lapse_later(&self, id: HoldId) {
        let (engine, holds) = (self.engine.clone(), self.holds.clone());
        tokio::spawn(async move {
            tokio::time::sleep(HOLD).await;
            if let Some(r) = holds.take(&id) {
                engine.release(&r.checks);
                count(&holds.counts.lapsed);
            }
        });
    }

    /// Sends one step to `owner` (served here when it is this member).
    async fn step(
        &self,
        owner: NodeId,
        op: SpanningCheck,
        deadline: Instant,
    ) -> Result<Vec<LimitResult>, NodeError> {
        if owner == self.view.id() {
            return self.serve_spanning(op);
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(OWNER_WAIT);
        let principal = op.principal.clone();
        self.forwarder
            .forward::<SpanningCheck>(owner, op.into(), &principal, left)
            .await
    }

    /// Decides an all-or-nothing batch whose keys `groups` puts on several
    /// owners (indices into `checks`, by owner): reserve everywhere, then
    /// confirm everywhere or release everywhere. `Ok(None)` when an owner
    /// no longer decides its part (nothing is then held or consumed by
    /// this attempt, and the caller routes again).
    pub(super) async fn check_spanning(
        &self,
        checks: &[LimitCheck],
        groups: BTreeMap<Option<NodeId>, Vec<usize>>,
        quota: KeyQuota<'_>,
        deadline: Instant,
    ) -> Result<Option<Vec<LimitResult>>, NodeError> {
        let id = HoldId {
            from: self.view.id(),
            boot: self.holds.boot,
            seq: self.holds.seq.fetch_add(1, Ordering::Relaxed),
        };
        let step = |phase: Phase| SpanningCheck {
            id,
            phase,
            principal: quota.principal.to_owned(),
            key_quota: quota.max,
        };
        let until_ms = self.decide_ms() + OWNER_WAIT.as_millis() as u64;
        let reserved = futures::future::join_all(groups.iter().map(|(owner, idx)| {
            let part = idx.iter().map(|i| checks[*i].clone()).collect();
            let op = step(Phase::Reserve {
                checks: part,
                until_ms,
            });
            async move {
                match owner {
                    Some(o) => self.step(*o, op, deadline).await,
                    None => Err(NodeError::NotLeader),
                }
            }
        }))
        .await;
        let owners: Vec<NodeId> = groups.keys().flatten().copied().collect();
        let mut results: Vec<Option<LimitResult>> = vec![None; checks.len()];
        let mut outcome = Ok(true);
        for ((_, idx), answer) in groups.iter().zip(reserved) {
            match answer {
                Ok(part) if part.len() == idx.len() => {
                    for (i, r) in idx.iter().zip(part) {
                        results[*i] = Some(r);
                    }
                }
                Ok(part) => {
                    outcome = Err(NodeError::Unavailable(format!(
                        "{} answers to {} checks",
                        part.len(),
                        idx.len()
                    )))
                }
                Err(NodeError::NotOwner | NodeError::NotLeader) => {
                    outcome = outcome.and(Ok(false));
                }
                Err(e) => outcome = Err(e),
            }
        }
        let all_held = matches!(outcome, Ok(true))
            && results
                .iter()
                .all(|r| r.as_ref().is_some_and(|r| r.allowed));
        if !all_held {
            // Every owner is told, whatever it answered: one whose answer
            // was lost may hold.
            futures::future::join_all(
                owners
                    .iter()
                    .map(|o| self.step(*o, step(Phase::Release), deadline)),
            )
            .await;
            return match outcome? {
                false => Ok(None),
                true => {
                    let mut results: Vec<LimitResult> = results.into_iter().flatten().collect();
                    none_consumed(&mut results, checks);
                    Ok(Some(results))
                }
            };
        }
        let between = self
            .holds
            .between
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hook) = between {
            hook().await;
        }
        let confirmed = futures::future::join_all(
            owners
                .iter()
                .map(|o| self.step(*o, step(Phase::Confirm), deadline)),
        )
        .await;
        let failed: Vec<String> = owners
            .iter()
            .zip(confirmed)
            .filter_map(|(o, c)| c.err().map(|e| format!("member {o}: {e}")))
            .collect();
        if !failed.is_empty() {
            count(&self.holds.counts.unconfirmed);
            return Err(NodeError::Unavailable(format!(
                "the all-or-nothing call was NOT admitted: its keys belong to {} members and {} \
                 of them could not confirm their part ({}); what the others confirmed stays \
                 consumed",
                owners.len(),
                failed.len(),
                failed.join("; ")
            )));
        }
        Ok(Some(results.into_iter().flatten().collect()))
    }
}
