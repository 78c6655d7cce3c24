//! The decision engine: pure, deterministic state machines.
//!
//! Nothing here reads a clock, does I/O or awaits. Every state change is a
//! [`Command`] applied with [`Engine::apply`] at a time chosen by the caller
//! (the leader stamps it), so replicas applying the same commands in the same
//! order reach the same state, and tests move time by passing numbers.
//!
//! Rate-limit state lives in a sharded table decided concurrently; leases and
//! idempotency records live behind one mutex, matching the single-threaded
//! apply order of a replicated log.

mod breaker_table;
pub mod breakers;
mod export;
pub mod idempotency;
pub mod leases;
pub mod limits;
pub mod ops;
mod sem_ops;
pub mod semaphores;
pub mod slots;
mod usage;

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::{Deserialize, Serialize};

pub use breakers::{
    Breaker, BreakerChange, BreakerDef, BreakerQuota, BreakerTable, CallOutcome, Phase, Reported,
    Verdict,
};
pub use export::Item;
pub use idempotency::{BeginOutcome, Record, RecordQuota, RecordState, RecordTable};
pub use leases::{Lease, LeaseEvent, LeaseEventKind, LeaseTable};
pub use limits::{
    none_consumed, Cell, KeyQuota, LimitCheck, LimitDef, LimitResult, LimitTable, CELL_BYTES,
    MAX_DELAY_MS, MAX_WINDOW_MS,
};
pub use ops::{
    Abort, Acquire, Acquired, Begin, Command, Complete, Events, Outcome, Release, Renew, Write,
};
pub use sem_ops::{SemAcquire, SemRelease, SemRenew};
pub use semaphores::{Permit, SemaphoreEvent, SemaphoreEventKind, SemaphoreGrant, SemaphoreTable};
pub use slots::{slot_of, SlotMap, SLOTS};

/// Why a command was refused. Malformed input is rejected before it becomes a
/// command, so these are the refusals a well-formed command can still get.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum EngineError {
    #[error("lease {name:?} is not held by {holder:?} under fencing token {fencing_token}")]
    NotHolder {
        name: String,
        holder: String,
        fencing_token: u64,
    },
    #[error("lease {name:?} was granted to another principal; {principal:?} may not renew or release it")]
    NotOwner { name: String, principal: String },
    #[error(
        "semaphore {name:?} permits are not held by {holder:?} under fencing token {fencing_token}"
    )]
    NotPermitHolder {
        name: String,
        holder: String,
        fencing_token: u64,
    },
    #[error("semaphore {name:?} permits were granted to another principal; {principal:?} may not renew or release them")]
    NotPermitOwner { name: String, principal: String },
    #[error("idempotency key {key:?} was begun by another principal; {principal:?} may not complete or abort its attempt")]
    NotRecordOwner { key: String, principal: String },
    #[error("attempt {attempt} no longer owns idempotency key {key:?} (its lock lapsed, or it completed or aborted)")]
    StaleAttempt { key: String, attempt: u64 },
    #[error("{what} limit reached ({max})")]
    Exhausted {
        what: std::borrow::Cow<'static, str>,
        max: usize,
    },
    #[error(
        "{what} are used up: the counter is at its maximum ({}), and a number is never given twice",
        u64::MAX
    )]
    CounterAtMax {
        what: std::borrow::Cow<'static, str>,
    },
    #[error("principal {principal:?} is at its quota of {quota} {what} (set in the auth file)")]
    OverQuota {
        principal: String,
        what: std::borrow::Cow<'static, str>,
        quota: u64,
    },
}

/// Live counts (see [`Engine::counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub limit_keys: usize,
    pub leases: usize,
    pub records: usize,
    pub record_bytes: usize,
    pub semaphore_holders: usize,
    pub breakers: usize,
}

/// Bounds on memory. Defaults suit a node with a few GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub limit_shards: usize,
    pub max_limit_keys: usize,
    pub max_leases: usize,
    pub max_records: usize,
    pub max_record_bytes: usize,
    /// Holder entries across every semaphore.
    pub max_semaphore_holders: usize,
    /// Circuit breakers this node holds (decided here or replicated).
    #[serde(default = "default_max_breakers")]
    pub max_breakers: usize,
}

fn default_max_breakers() -> usize {
    100_000
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            limit_shards: 64,
            max_limit_keys: 10_000_000,
            max_leases: 1_000_000,
            max_records: 1_000_000,
            max_record_bytes: 1 << 30,
            max_semaphore_holders: 1_000_000,
            max_breakers: default_max_breakers(),
        }
    }
}

/// What one principal holds, against its quotas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub leases: u64,
    pub records: u64,
    pub record_bytes: u64,
    pub limit_keys: u64,
    pub semaphore_holders: u64,
    pub breakers: u64,
}

/// An applied command's outcome and the lease changes it caused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    pub events: Vec<LeaseEvent>,
    pub semaphore_events: Vec<SemaphoreEvent>,
    /// Breakers a sync moved to another phase.
    pub breaker_changes: Vec<BreakerChange>,
}

/// The replicated tables (leases and idempotency records), changed only by
/// applying [`Command`]s.
#[derive(Debug, Default)]
pub struct Tables {
    pub(crate) leases: LeaseTable,
    pub(crate) records: RecordTable,
    pub(crate) semaphores: SemaphoreTable,
}

/// Everything the engine holds, for snapshots and restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub limits: Vec<(String, Cell)>,
    pub leases: LeaseTable,
    pub records: RecordTable,
    #[serde(default)]
    pub slots: SlotMap,
    #[serde(default)]
    pub semaphores: SemaphoreTable,
    #[serde(default)]
    pub breakers: Vec<(String, Breaker)>,
}

pub struct Engine {
    config: EngineConfig,
    limits: LimitTable,
    breakers: BreakerTable,
    tables: Mutex<Tables>,
    /// Who decides each rate-limit slot: replicated (changed only by
    /// applying `AssignSlots`), read on every decision.
    slots: RwLock<Arc<SlotMap>>,
}

/// Applies a client operation and wraps its output in its outcome variant.
fn run<W: Write>(
    op: W,
    tables: &mut Tables,
    now_ms: u64,
    events: &mut Events,
) -> Result<Outcome, EngineError> {
    op.apply_to(tables, now_ms, events).map(W::into_outcome)
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Self {
            config,
            limits: LimitTable::new(config.limit_shards, config.max_limit_keys),
            breakers: BreakerTable::new(config.max_breakers),
            tables: Mutex::new(Tables {
                leases: LeaseTable::new(config.max_leases),
                records: RecordTable::new(config.max_records, config.max_record_bytes),
                semaphores: SemaphoreTable::new(config.max_semaphore_holders),
            }),
            slots: RwLock::default(),
        }
    }

    /// The slot map as last applied.
    pub fn slots(&self) -> Arc<SlotMap> {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_slots(&self, map: SlotMap) {
        *self.slots.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        // Tables are only changed through `&mut` methods that validate before
        // mutating, so a panic elsewhere cannot leave them half-changed.
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one command at `now_ms`: the single entry point for changes
    /// to replicated state. (Rate-limit decisions are not commands: the
    /// leader makes them with [`Engine::check`] and replicates the cells
    /// they changed as [`Command::SyncCells`].)
    pub fn apply(&self, command: Command, now_ms: u64) -> Result<Applied, EngineError> {
        let mut events = Events::default();
        let mut breaker_changes = Vec::new();
        let mut tables = self.tables();
        let t = &mut *tables;
        let outcome = match command {
            Command::SemAcquire(op) => run(op, t, now_ms, &mut events)?,
            Command::SemRenew(op) => run(op, t, now_ms, &mut events)?,
            Command::SemRelease(op) => run(op, t, now_ms, &mut events)?,
            Command::Acquire(op) => run(op, t, now_ms, &mut events)?,
            Command::Renew(op) => run(op, t, now_ms, &mut events)?,
            Command::Release(op) => run(op, t, now_ms, &mut events)?,
            Command::Begin(op) => run(op, t, now_ms, &mut events)?,
            Command::Complete(op) => run(op, t, now_ms, &mut events)?,
            Command::Abort(op) => run(op, t, now_ms, &mut events)?,
            Command::SyncCells { cells, decider } => {
                let slots = self.slots();
                match decider {
                    Some(d) if slots.assigned() => self.limits.upsert(
                        cells
                            .into_iter()
                            .filter(|(key, _)| slots.owner(slot_of(key)) == Some(d)),
                    ),
                    _ => self.limits.upsert(cells),
                }
                Outcome::SyncCells
            }
            Command::SyncBreakers { breakers, decider } => {
                let slots = self.slots();
                breaker_changes = match decider {
                    Some(d) if slots.assigned() => self.breakers.upsert(
                        breakers
                            .into_iter()
                            .filter(|(name, _)| slots.owner(slot_of(name)) == Some(d)),
                    ),
                    _ => self.breakers.upsert(breakers),
                };
                Outcome::SyncCells
            }
            Command::AssignSlots(map) => {
                let next = map.version == self.slots().version + 1
                    && (map.owners.len() == SLOTS || map.owners.is_empty());
                if next {
                    self.set_slots(map);
                }
                Outcome::AssignSlots(next)
            }
            Command::ExtendLeases { by_ms } => Outcome::ExtendLeases(
                t.leases.extend_all(by_ms, now_ms) + t.semaphores.extend_all(by_ms, now_ms),
            ),
            Command::Sweep => {
                let leases = t.leases.sweep(now_ms, &mut events.leases);
                let records = t.records.sweep(now_ms);
                let semaphores = t.semaphores.sweep(now_ms, &mut events.semaphores);
                Outcome::Sweep {
                    leases,
                    records,
                    semaphores,
                }
            }
        };
        Ok(Applied {
            outcome,
            events: events.leases,
            semaphore_events: events.semaphores,
            breaker_changes,
        })
    }

    /// Applies one client operation at `now_ms`, with its typed result (as
    /// [`Engine::apply`] would for its command).
    #[cfg(any(test, feature = "test-support"))]
    pub fn execute<W: Write>(
        &self,
        op: W,
        now_ms: u64,
    ) -> Result<(W::Output, Vec<LeaseEvent>), EngineError> {
        let mut events = Events::default();
        let output = op.apply_to(&mut self.tables(), now_ms, &mut events)?;
        Ok((output, events.leases))
    }

    /// Rate-limit decisions without building a [`Command`]: the hot path.
    pub fn check(
        &self,
        checks: &[LimitCheck],
        all_or_nothing: bool,
        now_ms: u64,
    ) -> Result<Vec<LimitResult>, EngineError> {
        self.limits.check(checks, all_or_nothing, now_ms)
    }

    /// [`check`](Self::check) with the keys it makes counted against
    /// `quota`'s principal.
    pub fn check_for(
        &self,
        checks: &[LimitCheck],
        all_or_nothing: bool,
        now_ms: u64,
        quota: KeyQuota<'_>,
    ) -> Result<Vec<LimitResult>, EngineError> {
        self.limits.check_for(checks, all_or_nothing, now_ms, quota)
    }

    /// Reserves `checks` all or nothing for a batch whose other keys other
    /// members decide (see `limits::table::holds`).
    pub fn reserve(
        &self,
        checks: &[LimitCheck],
        now_ms: u64,
        quota: KeyQuota<'_>,
    ) -> Result<Vec<LimitResult>, EngineError> {
        self.limits.reserve(checks, now_ms, quota)
    }

    /// Consumes what a reservation of `checks` held.
    pub fn confirm(
        &self,
        checks: &[LimitCheck],
        now_ms: u64,
        quota: KeyQuota<'_>,
    ) -> Result<Vec<LimitResult>, EngineError> {
        self.limits.confirm(checks, now_ms, quota)
    }

    /// Gives back what a reservation of `checks` held.
    pub fn release(&self, checks: &[LimitCheck]) {
        self.limits.release(checks)
    }

    /// Keys that reservations hold something of now.
    pub fn held_keys(&self) -> usize {
        self.limits.held_keys()
    }

    /// What `principal` holds: leases, idempotency records and their
    /// bytes, and the rate-limit keys its checks made on this node.
    pub fn held_by(&self, principal: &str) -> Held {
        let t = self.tables();
        let (records, record_bytes) = t.records.held_by(principal);
        Held {
            leases: t.leases.held_by(principal),
            records,
            record_bytes,
            limit_keys: self.limits.held_by(principal),
            semaphore_holders: t.semaphores.held_by(principal),
            breakers: self.breakers.held_by(principal),
        }
    }

    pub fn lease(&self, name: &str, now_ms: u64) -> Option<Lease> {
        self.tables().leases.get(name, now_ms)
    }

    pub fn record(&self, key: &str, now_ms: u64) -> Option<Record> {
        self.tables().records.get(key, now_ms).cloned()
    }

    /// A semaphore's live holders, in grant order.
    pub fn semaphore(&self, name: &str, now_ms: u64) -> Vec<Permit> {
        self.tables().semaphores.get(name, now_ms)
    }

    /// Drops rate-limit cells equivalent to absent keys. Local to each node:
    /// idle cells mean the same as no cell, so replicas need not agree on
    /// when they go.
    pub fn sweep_limits(&self, now_ms: u64) -> usize {
        self.limits.sweep(now_ms)
    }

    /// The circuit breakers (decided with [`Engine::breakers`]'s `allow`
    /// and `report` by whoever decides the name's slot, replicated as
    /// [`Command::SyncBreakers`]).
    pub fn breakers(&self) -> &BreakerTable {
        &self.breakers
    }

    /// Rate-limit cells changed since they were last drained (for sync
    /// entries): about `max` cells or `max_bytes` (keys plus
    /// [`CELL_BYTES`] per cell) at most.
    pub fn drain_dirty_limits(&self, max: usize, max_bytes: usize) -> Vec<(String, Cell)> {
        self.limits.drain_dirty(max, max_bytes)
    }

    /// Marks the cells of `keys` changed again, so the next drain takes
    /// them (a sync that did not reach the log).
    pub fn requeue_dirty_limits<'k>(&self, keys: impl IntoIterator<Item = &'k str>) {
        self.limits.mark_dirty(keys);
    }

    /// Whether a [`Command::Sweep`] at `now_ms` would purge anything.
    pub fn sweep_due(&self, now_ms: u64) -> bool {
        let d = self.tables();
        let due = |t: Option<u64>| t.is_some_and(|t| t <= now_ms);
        due(d.leases.next_expiry())
            || due(d.records.next_expiry())
            || due(d.semaphores.next_expiry())
    }

    /// The earliest lease deadline or record expiry, if any.
    pub fn next_expiry(&self) -> Option<u64> {
        let d = self.tables();
        [
            d.leases.next_expiry(),
            d.records.next_expiry(),
            d.semaphores.next_expiry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// What the engine holds now.
    pub fn counts(&self) -> Counts {
        let d = self.tables();
        Counts {
            limit_keys: self.limits.len(),
            leases: d.leases.len(),
            records: d.records.len(),
            record_bytes: d.records.bytes(),
            semaphore_holders: d.semaphores.len(),
            breakers: self.breakers.len(),
        }
    }

    /// The caps it was made with.
    pub fn config(&self) -> EngineConfig {
        self.config
    }

    /// Live leases lapsing within `within_ms` of `now_ms`.
    pub fn leases_expiring(&self, now_ms: u64, within_ms: u64) -> usize {
        self.tables().leases.expiring(now_ms, within_ms)
    }

    pub fn snapshot(&self) -> Snapshot {
        let d = self.tables();
        Snapshot {
            limits: self.limits.cells(),
            leases: d.leases.clone(),
            records: d.records.clone(),
            slots: (*self.slots()).clone(),
            semaphores: d.semaphores.clone(),
            breakers: self.breakers.all(),
        }
    }

    #[cfg(any(test, feature = "test-support"))]
    pub fn restore(config: EngineConfig, snapshot: Snapshot) -> Self {
        let engine = Self::new(config);
        engine.limits.upsert(snapshot.limits);
        engine.breakers.upsert(snapshot.breakers);
        {
            let mut d = engine.tables();
            d.leases = snapshot.leases;
            d.leases.restored(config.max_leases);
            d.records = snapshot.records;
            d.records
                .restored(config.max_records, config.max_record_bytes);
            d.semaphores = snapshot.semaphores;
            d.semaphores.restored(config.max_semaphore_holders);
        }
        engine.set_slots(snapshot.slots);
        engine
    }

    /// Replaces all state with `snapshot` (a snapshot installed from the
    /// leader, or the latest one at start-up).
    pub fn load(&self, snapshot: Snapshot) {
        self.limits.clear();
        self.limits.upsert(snapshot.limits);
        self.breakers.clear();
        self.breakers.upsert(snapshot.breakers);
        let mut d = self.tables();
        d.leases = snapshot.leases;
        d.leases.restored(self.config.max_leases);
        d.records = snapshot.records;
        d.records
            .restored(self.config.max_records, self.config.max_record_bytes);
        d.semaphores = snapshot.semaphores;
        d.semaphores.restored(self.config.max_semaphore_holders);
        self.set_slots(snapshot.slots);
    }
}

#[cfg(test)]
mod breaker_tests;
#[cfg(test)]
mod semaphore_tests;
#[cfg(test)]
mod tests;
