//! Typed operations: one struct per state change a client can ask for, each
//! with the type of its result.
//!
//! A [`Command`] (what a log entry carries) is one of these operations, or
//! one of the node's own upkeep commands. Applying a command gives an
//! [`Outcome`] whose variant has the command's name and holds the
//! operation's [`Write::Output`]. Each operation's [`Write`] impl holds both
//! directions of that pairing side by side (`into_outcome`, `output`), and
//! [`Engine::apply`](super::Engine::apply) builds every outcome through
//! `into_outcome`, so the node turns an outcome back into the caller's typed
//! result in one generic place.

use serde::{Deserialize, Serialize};

use super::{
    idempotency::RecordQuota, BeginOutcome, Cell, EngineError, Lease, LeaseEvent, Permit,
    SemAcquire, SemRelease, SemRenew, SemaphoreEvent, SemaphoreGrant, SlotMap, Tables, CELL_BYTES,
};

/// The changes applying a command made, for watchers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Events {
    pub leases: Vec<LeaseEvent>,
    pub semaphores: Vec<SemaphoreEvent>,
}

/// Takes a lease that is free or lapsed, or renews the caller's own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acquire {
    pub name: String,
    pub holder: String,
    pub ttl_ms: u64,
    /// The authenticated caller ("" without authentication).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
    /// How many leases the principal may hold (`None`: no quota), as the
    /// proposing leader read its auth file: carried in the log so every
    /// replica decides alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
}

/// Extends a held lease, proving ownership with its fencing token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renew {
    pub name: String,
    pub holder: String,
    pub fencing_token: u64,
    pub ttl_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
}

/// Gives up a held lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub name: String,
    pub holder: String,
    pub fencing_token: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
}

/// Starts (or reports) an attempt under an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Begin {
    pub key: String,
    pub fingerprint: Vec<u8>,
    pub lock_ttl_ms: u64,
    pub retention_ms: u64,
    /// The caller, who then owns the attempt ("" without authentication).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
    /// The principal's record quotas (as [`Acquire::quota`]).
    #[serde(default, skip_serializing_if = "is_default")]
    pub quota: RecordQuota,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Stores the response of the attempt that owns an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complete {
    pub key: String,
    pub attempt: u64,
    pub response: Vec<u8>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
    /// The principal's quota of record bytes (as [`Acquire::quota`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_quota: Option<u64>,
}

/// Gives up an attempt, freeing the key for a retry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    pub key: String,
    pub attempt: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
}

/// What [`Acquire`] did: `acquired` is false when another holder has the
/// lease, which is then the lease reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acquired {
    pub acquired: bool,
    pub lease: Lease,
}

/// A client operation that changes state: applied through the log, with a
/// result of type [`Write::Output`].
pub trait Write: Clone + Into<Command> + Send + 'static {
    type Output;

    /// Applies the operation to the tables at `now_ms`.
    #[doc(hidden)]
    fn apply_to(
        self,
        tables: &mut Tables,
        now_ms: u64,
        events: &mut Events,
    ) -> Result<Self::Output, EngineError>;

    /// The outcome variant holding `output`.
    fn into_outcome(output: Self::Output) -> Outcome;

    /// This operation's result, out of the outcome of applying it.
    /// `Err` gives back an outcome of another command, which
    /// [`Engine::apply`](super::Engine::apply) never produces for this one.
    fn output(outcome: Outcome) -> Result<Self::Output, Outcome>;
}

impl Write for Acquire {
    type Output = Acquired;

    fn apply_to(
        self,
        t: &mut Tables,
        now_ms: u64,
        events: &mut Events,
    ) -> Result<Acquired, EngineError> {
        let (acquired, lease) = t.leases.acquire_as(
            &self.name,
            &self.holder,
            &self.principal,
            self.quota,
            self.ttl_ms,
            now_ms,
            &mut events.leases,
        )?;
        Ok(Acquired { acquired, lease })
    }

    fn into_outcome(v: Acquired) -> Outcome {
        Outcome::Acquire(v)
    }

    fn output(outcome: Outcome) -> Result<Acquired, Outcome> {
        match outcome {
            Outcome::Acquire(v) => Ok(v),
            other => Err(other),
        }
    }
}

impl Write for Renew {
    type Output = Lease;

    fn apply_to(
        self,
        t: &mut Tables,
        now_ms: u64,
        events: &mut Events,
    ) -> Result<Lease, EngineError> {
        t.leases.renew_as(
            &self.name,
            &self.holder,
            &self.principal,
            self.fencing_token,
            self.ttl_ms,
            now_ms,
            &mut events.leases,
        )
    }

    fn into_outcome(v: Lease) -> Outcome {
        Outcome::Renew(v)
    }

    fn output(outcome: Outcome) -> Result<Lease, Outcome> {
        match outcome {
            Outcome::Renew(v) => Ok(v),
            other => Err(other),
        }
    }
}

impl Write for Release {
    type Output = Lease;

    fn apply_to(
        self,
        t: &mut Tables,
        now_ms: u64,
        events: &mut Events,
    ) -> Result<Lease, EngineError> {
        t.leases.release_as(
            &self.name,
            &self.holder,
            &self.principal,
            self.fencing_token,
            now_ms,
            &mut events.leases,
        )
    }

    fn into_outcome(v: Lease) -> Outcome {
        Outcome::Release(v)
    }

    fn output(outcome: Outcome) -> Result<Lease, Outcome> {
        match outcome {
            Outcome::Release(v) => Ok(v),
            other => Err(other),
        }
    }
}

impl Write for Begin {
    type Output = BeginOutcome;

    fn apply_to(
        self,
        t: &mut Tables,
        now_ms: u64,
        _: &mut Events,
    ) -> Result<BeginOutcome, EngineError> {
        t.records.begin_as(
            &self.key,
            &self.fingerprint,
            self.lock_ttl_ms,
            self.retention_ms,
            &self.principal,
            self.quota,
            now_ms,
        )
    }

    fn into_outcome(v: BeginOutcome) -> Outcome {
        Outcome::Begin(v)
    }

    fn output(outcome: Outcome) -> Result<BeginOutcome, Outcome> {
        match outcome {
            Outcome::Begin(v) => Ok(v),
            other => Err(other),
        }
    }
}

impl Write for Complete {
    type Output = ();

    fn apply_to(self, t: &mut Tables, now_ms: u64, _: &mut Events) -> Result<(), EngineError> {
        t.records.complete_as(
            &self.key,
            self.attempt,
            &self.response,
            &self.principal,
            self.byte_quota,
            now_ms,
        )
    }

    fn into_outcome((): ()) -> Outcome {
        Outcome::Complete
    }

    fn output(outcome: Outcome) -> Result<(), Outcome> {
        match outcome {
            Outcome::Complete => Ok(()),
            other => Err(other),
        }
    }
}

impl Write for Abort {
    type Output = ();

    fn apply_to(self, t: &mut Tables, now_ms: u64, _: &mut Events) -> Result<(), EngineError> {
        t.records
            .abort_as(&self.key, self.attempt, &self.principal, now_ms)
    }

    fn into_outcome((): ()) -> Outcome {
        Outcome::Abort
    }

    fn output(outcome: Outcome) -> Result<(), Outcome> {
        match outcome {
            Outcome::Abort => Ok(()),
            other => Err(other),
        }
    }
}

/// A state change as a log entry carries it. The variants' encoding is the
/// log format: a variant's name and fields must not change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Rate-limit state replicated from the deciding node (see the node's
    /// rate-limit sync): plain upserts.
    SyncCells {
        cells: Vec<(String, Cell)>,
        /// The node that decided them. Once slots are assigned, a cell is
        /// applied only if that node owns its key's slot (a sync that
        /// arrives after its slot moved is dropped); `None` (entries from
        /// before slots): always applied.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decider: Option<u64>,
    },
    Acquire(Acquire),
    Renew(Renew),
    Release(Release),
    Begin(Begin),
    Complete(Complete),
    Abort(Abort),
    /// Purges lapsed leases (reporting them expired) and records.
    Sweep,
    /// Pushes every live lease's deadline `by_ms` later: proposed by a new
    /// leader, so a failover never shortens a lease.
    ExtendLeases {
        by_ms: u64,
    },
    /// A new slot map from the leader (see `slots`); applied only if its
    /// version is the next one.
    AssignSlots(SlotMap),
    SemAcquire(SemAcquire),
    SemRenew(SemRenew),
    SemRelease(SemRelease),
    /// Circuit breakers replicated from the node that decides them, as
    /// cells are (`decider` as in `SyncCells`): plain upserts.
    SyncBreakers {
        breakers: Vec<(String, crate::Breaker)>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decider: Option<u64>,
    },
}

/// What a command did: the variant named after the command, holding the
/// operation's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    SyncCells,
    Acquire(Acquired),
    Renew(Lease),
    Release(Lease),
    Begin(BeginOutcome),
    Complete,
    Abort,
    Sweep {
        leases: usize,
        records: usize,
        #[serde(default)]
        semaphores: usize,
    },
    ExtendLeases(usize),
    /// Whether the map was taken (its version was the next one).
    AssignSlots(bool),
    SemAcquire(SemaphoreGrant),
    SemRenew(Permit),
    SemRelease(Permit),
}

macro_rules! into_command {
    ($($op:ident),*) => {
        $(impl From<$op> for Command {
            fn from(op: $op) -> Self {
                Command::$op(op)
            }
        })*

    };
}

into_command!(Acquire, Renew, Release, Begin, Complete, Abort);

impl Command {
    /// The bytes of variable-length data the command carries (keys, names,
    /// fingerprints, responses, cells): what its size in a log entry
    /// grows with. Used to keep log entries and batches bounded in bytes.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Command::SyncCells { cells, .. } => {
                cells.iter().map(|(k, _)| k.len() + CELL_BYTES).sum()
            }
            Command::Acquire(Acquire { name, holder, .. })
            | Command::Renew(Renew { name, holder, .. })
            | Command::Release(Release { name, holder, .. })
            | Command::SemAcquire(SemAcquire { name, holder, .. })
            | Command::SemRenew(SemRenew { name, holder, .. })
            | Command::SemRelease(SemRelease { name, holder, .. }) => name.len() + holder.len(),
            Command::Begin(b) => b.key.len() + b.fingerprint.len(),
            Command::Complete(c) => c.key.len() + c.response.len(),
            Command::Abort(a) => a.key.len(),
            Command::AssignSlots(map) => map.owners.len() * 8,
            Command::SyncBreakers { breakers, .. } => breakers
                .iter()
                .map(|(k, b)| k.len() + crate::breakers::STORED_BYTES + 16 * b.probes.len())
                .sum(),
            Command::Sweep | Command::ExtendLeases { .. } => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log format: a command's JSON must read the same as before the
    /// operations became structs (a data directory written then is read
    /// now).
    #[test]
    fn commands_keep_their_log_encoding() {
        let cases = [
            (
                r#"{"Acquire":{"name":"n","holder":"h","ttl_ms":5}}"#,
                Command::Acquire(Acquire {
                    quota: Default::default(),
                    principal: String::new(),
                    name: "n".into(),
                    holder: "h".into(),
                    ttl_ms: 5,
                }),
            ),
            (
                r#"{"Renew":{"name":"n","holder":"h","fencing_token":2,"ttl_ms":5}}"#,
                Command::Renew(Renew {
                    principal: String::new(),
                    name: "n".into(),
                    holder: "h".into(),
                    fencing_token: 2,
                    ttl_ms: 5,
                }),
            ),
            (
                r#"{"Release":{"name":"n","holder":"h","fencing_token":2}}"#,
                Command::Release(Release {
                    principal: String::new(),
                    name: "n".into(),
                    holder: "h".into(),
                    fencing_token: 2,
                }),
            ),
            (
                r#"{"Begin":{"key":"k","fingerprint":[1],"lock_ttl_ms":3,"retention_ms":4}}"#,
                Command::Begin(Begin {
                    quota: Default::default(),
                    principal: String::new(),
                    key: "k".into(),
                    fingerprint: vec![1],
                    lock_ttl_ms: 3,
                    retention_ms: 4,
                }),
            ),
            (
                r#"{"Complete":{"key":"k","attempt":1,"response":[9]}}"#,
                Command::Complete(Complete {
                    byte_quota: None,
                    principal: String::new(),
                    key: "k".into(),
                    attempt: 1,
                    response: vec![9],
                }),
            ),
            (
                r#"{"Abort":{"key":"k","attempt":1}}"#,
                Command::Abort(Abort {
                    principal: String::new(),
                    key: "k".into(),
                    attempt: 1,
                }),
            ),
            (r#""Sweep""#, Command::Sweep),
            (
                r#"{"ExtendLeases":{"by_ms":400}}"#,
                Command::ExtendLeases { by_ms: 400 },
            ),
        ];
        for (json, command) in cases {
            assert_eq!(serde_json::to_string(&command).unwrap(), json);
            assert_eq!(serde_json::from_str::<Command>(json).unwrap(), command);
        }
    }
}
