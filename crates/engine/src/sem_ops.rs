//! The semaphore operations (see `semaphores`), as log commands: each a
//! struct with its [`Write`] impl, as `ops` declares the others.

use serde::{Deserialize, Serialize};

use super::ops::{Command, Events, Outcome, Write};
use super::semaphores::{Ask, Permit, SemaphoreGrant};
use super::{EngineError, Tables};

/// Takes permits under a name if they fit its limit, or renews the
/// holder's own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemAcquire {
    pub name: String,
    pub holder: String,
    pub limit: u64,
    pub permits: u64,
    pub ttl_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
    /// How many holder entries the principal may have (as `Acquire::quota`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
}

/// Extends a holder's permits, proven by their fencing token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemRenew {
    pub name: String,
    pub holder: String,
    pub fencing_token: u64,
    pub ttl_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
}

/// Gives a holder's permits back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemRelease {
    pub name: String,
    pub holder: String,
    pub fencing_token: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
}

impl Write for SemAcquire {
    type Output = SemaphoreGrant;

    fn apply_to(
        self,
        t: &mut Tables,
        now_ms: u64,
        events: &mut Events,
    ) -> Result<SemaphoreGrant, EngineError> {
        let ask = Ask {
            name: &self.name,
            holder: &self.holder,
            principal: &self.principal,
            limit: self.limit,
            permits: self.permits,
            ttl_ms: self.ttl_ms,
            quota: self.quota,
        };
        t.semaphores.acquire(ask, now_ms, &mut events.semaphores)
    }

    fn into_outcome(v: SemaphoreGrant) -> Outcome {
        Outcome::SemAcquire(v)
    }

    fn output(outcome: Outcome) -> Result<SemaphoreGrant, Outcome> {
        match outcome {
            Outcome::SemAcquire(v) => Ok(v),
            other => Err(other),
        }
    }
}

impl Write for SemRenew {
    type Output = Permit;

    fn apply_to(
        self,
        t: &mut Tables,
        now_ms: u64,
        events: &mut Events,
    ) -> Result<Permit, EngineError> {
        t.semaphores.renew(
            &self.name,
            &self.holder,
            &self.principal,
            self.fencing_token,
            self.ttl_ms,
            now_ms,
            &mut events.semaphores,
        )
    }

    fn into_outcome(v: Permit) -> Outcome {
        Outcome::SemRenew(v)
    }

    fn output(outcome: Outcome) -> Result<Permit, Outcome> {
        match outcome {
            Outcome::SemRenew(v) => Ok(v),
            other => Err(other),
        }
    }
}

impl Write for SemRelease {
    type Output = Permit;

    fn apply_to(
        self,
        t: &mut Tables,
        now_ms: u64,
        events: &mut Events,
    ) -> Result<Permit, EngineError> {
        t.semaphores.release(
            &self.name,
            &self.holder,
            &self.principal,
            self.fencing_token,
            now_ms,
            &mut events.semaphores,
        )
    }

    fn into_outcome(v: Permit) -> Outcome {
        Outcome::SemRelease(v)
    }

    fn output(outcome: Outcome) -> Result<Permit, Outcome> {
        match outcome {
            Outcome::SemRelease(v) => Ok(v),
            other => Err(other),
        }
    }
}

impl From<SemAcquire> for Command {
    fn from(op: SemAcquire) -> Self {
        Command::SemAcquire(op)
    }
}

impl From<SemRenew> for Command {
    fn from(op: SemRenew) -> Self {
        Command::SemRenew(op)
    }
}

impl From<SemRelease> for Command {
    fn from(op: SemRelease) -> Self {
        Command::SemRelease(op)
    }
}
