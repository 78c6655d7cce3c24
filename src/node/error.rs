//! Why a call could not be served.

use serde::{Deserialize, Serialize};

use crate::engine::EngineError;

/// Why a call could not be served.
#[derive(Clone, Debug, thiserror::Error, Serialize, Deserialize)]
pub enum NodeError {
    /// The state machine refused the command.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// No leader within the deadline, or Raft is shutting down: safe to retry.
    #[error("not available: {0}")]
    Unavailable(String),
    /// This node is not (or no longer) the leader; the call is routed again.
    #[error("not the leader")]
    NotLeader,
    /// This node does not (or no longer) decide the rate-limit slot asked
    /// about, or holds no slot lease now; the call is routed again.
    #[error("not the owner of the slot")]
    NotOwner,
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
}
