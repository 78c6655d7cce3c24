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

pub mod idempotency;
pub mod leases;
pub mod limits;

use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

pub use idempotency::{BeginOutcome, Record, RecordState, RecordTable};
pub use leases::{Lease, LeaseEvent, LeaseEventKind, LeaseTable};
pub use limits::{Cell, LimitCheck, LimitDef, LimitResult, LimitTable, PackedCells};

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
    #[error("attempt {attempt} no longer owns idempotency key {key:?} (its lock lapsed, or it completed or aborted)")]
    StaleAttempt { key: String, attempt: u64 },
    #[error("{what} limit reached ({max})")]
    Exhausted {
        what: std::borrow::Cow<'static, str>,
        max: usize,
    },
}

/// Bounds on memory. Defaults suit a node with a few GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub limit_shards: usize,
    pub max_limit_keys: usize,
    pub max_leases: usize,
    pub max_records: usize,
    pub max_record_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            limit_shards: 64,
            max_limit_keys: 10_000_000,
            max_leases: 1_000_000,
            max_records: 1_000_000,
            max_record_bytes: 1 << 30,
        }
    }
}

/// A state change, serializable so it can travel through a replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Check {
        checks: Vec<LimitCheck>,
        all_or_nothing: bool,
    },
    /// Rate-limit state replicated from the deciding node: plain upserts.
    /// (Written by earlier versions; still applied when read from a log.)
    SyncLimits {
        cells: Vec<(String, Cell)>,
    },
    /// The same, packed: what the leader writes now.
    SyncCells {
        cells: PackedCells,
    },
    Acquire {
        name: String,
        holder: String,
        ttl_ms: u64,
    },
    Renew {
        name: String,
        holder: String,
        fencing_token: u64,
        ttl_ms: u64,
    },
    Release {
        name: String,
        holder: String,
        fencing_token: u64,
    },
    Begin {
        key: String,
        fingerprint: Vec<u8>,
        lock_ttl_ms: u64,
        retention_ms: u64,
    },
    Complete {
        key: String,
        attempt: u64,
        response: Vec<u8>,
    },
    Abort {
        key: String,
        attempt: u64,
    },
    /// Purges lapsed leases (reporting them expired) and records.
    Sweep,
    /// Pushes every live lease's deadline `by_ms` later: proposed by a new
    /// leader, so a failover never shortens a lease.
    ExtendLeases {
        by_ms: u64,
    },
}

/// What a command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Checked(Vec<LimitResult>),
    Synced,
    Acquired { acquired: bool, lease: Lease },
    Renewed(Lease),
    Released(Lease),
    Begun(BeginOutcome),
    Completed,
    Aborted,
    Swept { leases: usize, records: usize },
    Extended(usize),
}

/// An applied command's outcome and the lease changes it caused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    pub events: Vec<LeaseEvent>,
}

#[derive(Debug, Default)]
struct Durable {
    leases: LeaseTable,
    records: RecordTable,
}

/// Everything the engine holds, for snapshots and restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub limits: Vec<(String, Cell)>,
    pub leases: LeaseTable,
    pub records: RecordTable,
}

pub struct Engine {
    config: EngineConfig,
    limits: LimitTable,
    durable: Mutex<Durable>,
}

impl Command {
    /// The bytes of variable-length data the command carries (keys, names,
    /// fingerprints, responses, packed cells): what its size in a log entry
    /// grows with. Used to keep log entries and batches bounded in bytes.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Command::Check { checks, .. } => checks.iter().map(|c| c.key.len() + 48).sum(),
            Command::SyncLimits { cells } => cells.iter().map(|(k, _)| k.len() + 48).sum(),
            Command::SyncCells { cells } => cells.byte_len(),
            Command::Acquire { name, holder, .. }
            | Command::Renew { name, holder, .. }
            | Command::Release { name, holder, .. } => name.len() + holder.len(),
            Command::Begin {
                key, fingerprint, ..
            } => key.len() + fingerprint.len(),
            Command::Complete { key, response, .. } => key.len() + response.len(),
            Command::Abort { key, .. } => key.len(),
            Command::Sweep | Command::ExtendLeases { .. } => 0,
        }
    }
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Self {
            config,
            limits: LimitTable::new(config.limit_shards, config.max_limit_keys),
            durable: Mutex::new(Durable {
                leases: LeaseTable::new(config.max_leases),
                records: RecordTable::new(config.max_records, config.max_record_bytes),
            }),
        }
    }

    fn durable(&self) -> MutexGuard<'_, Durable> {
        // Tables are only changed through `&mut` methods that validate before
        // mutating, so a panic elsewhere cannot leave them half-changed.
        self.durable.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one command at `now_ms`.
    pub fn apply(&self, command: Command, now_ms: u64) -> Result<Applied, EngineError> {
        let mut events = Vec::new();
        let outcome = match command {
            Command::Check {
                checks,
                all_or_nothing,
            } => Outcome::Checked(self.limits.check(&checks, all_or_nothing, now_ms)?),
            Command::SyncLimits { cells } => {
                self.limits.upsert(cells);
                Outcome::Synced
            }
            Command::SyncCells { cells } => {
                self.limits.upsert(cells.iter());
                Outcome::Synced
            }
            Command::Acquire {
                name,
                holder,
                ttl_ms,
            } => {
                let (acquired, lease) =
                    self.durable()
                        .leases
                        .acquire(&name, &holder, ttl_ms, now_ms, &mut events)?;
                Outcome::Acquired { acquired, lease }
            }
            Command::Renew {
                name,
                holder,
                fencing_token,
                ttl_ms,
            } => Outcome::Renewed(self.durable().leases.renew(
                &name,
                &holder,
                fencing_token,
                ttl_ms,
                now_ms,
                &mut events,
            )?),
            Command::Release {
                name,
                holder,
                fencing_token,
            } => Outcome::Released(self.durable().leases.release(
                &name,
                &holder,
                fencing_token,
                now_ms,
                &mut events,
            )?),
            Command::Begin {
                key,
                fingerprint,
                lock_ttl_ms,
                retention_ms,
            } => Outcome::Begun(self.durable().records.begin(
                &key,
                &fingerprint,
                lock_ttl_ms,
                retention_ms,
                now_ms,
            )?),
            Command::Complete {
                key,
                attempt,
                response,
            } => {
                self.durable()
                    .records
                    .complete(&key, attempt, &response, now_ms)?;
                Outcome::Completed
            }
            Command::Abort { key, attempt } => {
                self.durable().records.abort(&key, attempt, now_ms)?;
                Outcome::Aborted
            }
            Command::ExtendLeases { by_ms } => {
                let n = self.durable().leases.extend_all(by_ms, now_ms);
                Outcome::Extended(n)
            }
            Command::Sweep => {
                let mut d = self.durable();
                let leases = d.leases.sweep(now_ms, &mut events);
                let records = d.records.sweep(now_ms);
                Outcome::Swept { leases, records }
            }
        };
        Ok(Applied { outcome, events })
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

    pub fn lease(&self, name: &str, now_ms: u64) -> Option<Lease> {
        self.durable().leases.get(name, now_ms)
    }

    pub fn record(&self, key: &str, now_ms: u64) -> Option<Record> {
        self.durable().records.get(key, now_ms).cloned()
    }

    /// Drops rate-limit cells equivalent to absent keys. Local to each node:
    /// idle cells mean the same as no cell, so replicas need not agree on
    /// when they go.
    pub fn sweep_limits(&self, now_ms: u64) -> usize {
        self.limits.sweep(now_ms)
    }

    /// Rate-limit cells changed since they were last drained (for sync
    /// entries): about `max` cells or `max_bytes` packed bytes at most.
    pub fn drain_dirty_limits(&self, max: usize, max_bytes: usize) -> PackedCells {
        self.limits.drain_dirty(max, max_bytes)
    }

    /// Whether a [`Command::Sweep`] at `now_ms` would purge anything.
    pub fn sweep_due(&self, now_ms: u64) -> bool {
        let d = self.durable();
        let due = |t: Option<u64>| t.is_some_and(|t| t <= now_ms);
        due(d.leases.next_expiry()) || due(d.records.next_expiry())
    }

    /// The earliest lease deadline or record expiry, if any.
    pub fn next_expiry(&self) -> Option<u64> {
        let d = self.durable();
        match (d.leases.next_expiry(), d.records.next_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Live counts: (rate-limit keys, leases, records, record bytes).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let d = self.durable();
        (
            self.limits.len(),
            d.leases.len(),
            d.records.len(),
            d.records.bytes(),
        )
    }

    pub fn snapshot(&self) -> Snapshot {
        let d = self.durable();
        Snapshot {
            limits: self.limits.cells(),
            leases: d.leases.clone(),
            records: d.records.clone(),
        }
    }

    pub fn restore(config: EngineConfig, snapshot: Snapshot) -> Self {
        let engine = Self::new(config);
        engine.limits.upsert(snapshot.limits);
        {
            let mut d = engine.durable();
            d.leases = snapshot.leases;
            d.leases.restored(config.max_leases);
            d.records = snapshot.records;
            d.records
                .restored(config.max_records, config.max_record_bytes);
        }
        engine
    }

    /// Replaces all state with `snapshot` (a snapshot installed from the
    /// leader, or the latest one at start-up).
    pub fn load(&self, snapshot: Snapshot) {
        self.limits.clear();
        self.limits.upsert(snapshot.limits);
        let mut d = self.durable();
        d.leases = snapshot.leases;
        d.leases.restored(self.config.max_leases);
        d.records = snapshot.records;
        d.records
            .restored(self.config.max_records, self.config.max_record_bytes);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests;
