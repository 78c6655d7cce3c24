//! The single mapping from engine refusals to gRPC status codes.

use tonic::Status;

use crate::engine::EngineError;
use crate::node::NodeError;

pub fn to_status(e: EngineError) -> Status {
    match e {
        // The caller's view of ownership is out of date; retrying the same
        // call cannot succeed, so this is not UNAVAILABLE or ABORTED.
        EngineError::NotHolder { .. }
        | EngineError::NotPermitHolder { .. }
        | EngineError::StaleAttempt { .. } => Status::failed_precondition(e.to_string()),
        // The lease, permits or idempotency attempt belong to another
        // authenticated principal.
        EngineError::NotOwner { .. }
        | EngineError::NotPermitOwner { .. }
        | EngineError::NotRecordOwner { .. } => Status::permission_denied(e.to_string()),
        // A configured memory bound; the service stays up and the caller may
        // retry later once sweeps free room.
        EngineError::Exhausted { .. } => Status::resource_exhausted(e.to_string()),
        // A counter at its maximum: no further number can be given.
        EngineError::CounterAtMax { .. } => Status::resource_exhausted(e.to_string()),
        // The caller's own quota (other principals are not affected).
        EngineError::OverQuota { .. } => Status::resource_exhausted(e.to_string()),
    }
}

pub fn node_status(e: NodeError) -> Status {
    match e {
        NodeError::Engine(e) => to_status(e),
        // No leader or shutting down: the command was not applied (or its
        // outcome is unknown to this node), and retrying is safe because a
        // retried lease/idempotency call is answered from the stored state.
        NodeError::Unavailable(m) => Status::unavailable(m),
        NodeError::NotLeader => Status::unavailable("no leader; retry"),
        NodeError::NotOwner => Status::unavailable("the slot's owner is changing; retry"),
        // The cluster refused the change as asked (e.g. removing the last
        // voter, or a change already in progress).
        NodeError::Membership(m) => Status::failed_precondition(m),
    }
}
