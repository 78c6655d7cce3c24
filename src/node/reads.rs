//! The linearizable reads a client may ask of the leader: one lease, one
//! semaphore's holders, one idempotency record. Each waits for the read
//! barrier (the leader still leads and has applied what it committed), and
//! answers with the time it read at, for remaining-time fields.

use super::operations::{GetLease, GetRecord, GetSemaphore, Operation, Stamped};
use super::routing::Router;
use super::NodeError;
use crate::engine::{Lease, Permit, Record};

impl Operation for GetLease {
    type Output = Stamped<Option<Lease>>;
    const WRITE: bool = false;

    async fn serve(self, at: &Router) -> Result<Self::Output, NodeError> {
        if at.view.is_leader() {
            // Leases are extended before this term serves any lease call.
            at.leadership.on_leadership().await;
        }
        at.view.read_barrier().await?;
        let now_ms = at.time.now_ms();
        Ok(Stamped {
            value: at.engine.lease(&self.name, now_ms),
            now_ms,
        })
    }
}

impl Operation for GetSemaphore {
    type Output = Stamped<Vec<Permit>>;
    const WRITE: bool = false;

    async fn serve(self, at: &Router) -> Result<Self::Output, NodeError> {
        if at.view.is_leader() {
            // Permits are extended with leases before this term serves.
            at.leadership.on_leadership().await;
        }
        at.view.read_barrier().await?;
        let now_ms = at.time.now_ms();
        Ok(Stamped {
            value: at.engine.semaphore(&self.name, now_ms),
            now_ms,
        })
    }
}

impl Operation for GetRecord {
    type Output = Stamped<Option<Record>>;
    const WRITE: bool = false;

    async fn serve(self, at: &Router) -> Result<Self::Output, NodeError> {
        at.view.read_barrier().await?;
        let now_ms = at.time.now_ms();
        Ok(Stamped {
            value: at.engine.record(&self.key, now_ms),
            now_ms,
        })
    }
}
