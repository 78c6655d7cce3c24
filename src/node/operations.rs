//! The operations a client may ask of the leader, each declared once.
//!
//! An operation is a type (here, or the engine's write commands) with an
//! [`Operation`] impl (its result type, whether it is a write, how the
//! leader serves it: `routing.rs`) and one line in the `operations!` list
//! below. From that list follow the forwarded [`Call`] (its wire encoding),
//! the conversions into it, each call's name (the `op` label of
//! `arbiter_forwarded_calls_total`), and [`with_call!`], the one match over
//! the list, through which every path that handles any call dispatches:
//! serving a forwarded call, authorising one (`api::authz`), re-checking
//! its bounds and stamping its quotas (`api::peer_service`). Adding an
//! operation is a line here; the compiler then names each impl it lacks.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use super::breakers::BreakerCall;
pub use super::member_metrics::MemberMetrics;
pub use super::rebalance::Rebalance;
use super::routing::Router;
pub use super::spanning::SpanningCheck;
use super::NodeError;
use crate::engine::{
    Abort, Acquire, Begin, Complete, LimitCheck, Release, Renew, SemAcquire, SemRelease, SemRenew,
};
use crate::raft::NodeId;

/// A value as of a time: the time a write was stamped with, or the time a
/// read was served at (for remaining-time fields).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped<T> {
    pub value: T,
    pub now_ms: u64,
}

/// Rate-limit decisions for one request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckLimits {
    pub checks: Vec<LimitCheck>,
    pub all_or_nothing: bool,
    /// The caller ("" without authentication), whose new keys count
    /// against `key_quota`.
    #[serde(default)]
    pub principal: String,
    #[serde(default)]
    pub key_quota: Option<u64>,
}

/// A linearizable read of one lease.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GetLease {
    pub name: String,
}

/// A linearizable read of one semaphore's holders.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GetSemaphore {
    pub name: String,
}

/// A linearizable read of one idempotency record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GetRecord {
    pub key: String,
}

/// Adds a voter: as a learner first, made a voter once it has caught up
/// (within `--member-catch-up-ms`); one that has not is removed again,
/// unless `force`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddMember {
    pub id: NodeId,
    pub peer_addr: String,
    #[serde(default)]
    pub force: bool,
}

/// Removes a voter.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoveMember {
    pub id: NodeId,
}

/// Something a client may ask of the leader, with the type of its result.
pub trait Operation: Clone + Send + Sync + Into<Call> + 'static {
    type Output: Serialize + DeserializeOwned + Send;

    /// Whether serving it may change state (a write that times out has an
    /// unknown outcome).
    const WRITE: bool;

    /// How long the leader may take to serve it.
    fn bound(&self, at: &Router) -> Duration {
        at.leader_wait
    }

    /// Serves it at this node, which must lead (`NotLeader` otherwise).
    fn serve(self, at: &Router) -> impl Future<Output = Result<Self::Output, NodeError>> + Send;
}

/// Declares the operations: `Call` and everything derived from the list.
/// `$d` is a literal `$`, so that the list can define `with_call!`.
macro_rules! operations {
    ($d:tt $($(#[$attr:meta])* $op:ident),* $(,)?) => {
        /// An operation as a follower forwards it to the leader: only what
        /// clients may ask for, never the node's own upkeep commands.
        #[derive(Clone, Debug, Serialize, Deserialize)]
        pub enum Call {
            $($(#[$attr])* $op($op),)*
        }

        $(impl From<$op> for Call {
            fn from(op: $op) -> Self {
                Call::$op(op)
            }
        })*

        impl Call {
            /// The operations' names, in the order of the list.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($op)),*];

            /// This call's position in [`NAMES`](Self::NAMES).
            pub fn index(&self) -> usize {
                #[allow(non_camel_case_types)]
                enum Index { $($op),* }
                match self {
                    $(Call::$op(_) => Index::$op as usize,)*
                }
            }

            /// Whether serving it may change state.
            pub fn is_write(&self) -> bool {
                match self {
                    $(Call::$op(_) => <$op as Operation>::WRITE,)*
                }
            }
        }

        /// `with_call!(call, op => body)`: `body` for the operation inside
        /// `call` (by value or, given `&call`, by reference), typed as
        /// that operation.
        macro_rules! with_call {
            ($d call:expr, $d op:ident => $d body:expr) => {
                match $d call {
                    $($crate::node::Call::$op($d op) => $d body,)*
                }
            };
        }
        pub(crate) use with_call;
    };
}

operations!($
    Acquire,
    Renew,
    Release,
    Begin,
    Complete,
    Abort,
    // Named `Check` on the wire, as members of earlier releases send it.
    #[serde(rename = "Check")]
    CheckLimits,
    GetLease,
    GetRecord,
    AddMember,
    RemoveMember,
    SpanningCheck,
    Rebalance,
    MemberMetrics,
    SemAcquire,
    SemRenew,
    SemRelease,
    GetSemaphore,
    BreakerCall,
);

/// How many calls of each operation this node forwarded to the leader and
/// served for followers.
#[derive(Default)]
pub struct Forwarded {
    sent: [AtomicU64; Call::NAMES.len()],
    served: [AtomicU64; Call::NAMES.len()],
}

impl Forwarded {
    pub fn sent(&self, call: &Call) {
        self.sent[call.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn served(&self, call: &Call) {
        self.served[call.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// (operation, sent, served) for each operation.
    pub fn counts(&self) -> Vec<(&'static str, u64, u64)> {
        Call::NAMES
            .iter()
            .zip(self.sent.iter().zip(&self.served))
            .map(|(name, (s, v))| (*name, s.load(Ordering::Relaxed), v.load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_call_knows_its_name_and_kind() {
        let release = Call::from(Release {
            principal: String::new(),
            name: "n".into(),
            holder: "h".into(),
            fencing_token: 1,
        });
        assert_eq!(Call::NAMES[release.index()], "Release");
        assert!(release.is_write());
        let get = Call::from(GetLease { name: "n".into() });
        assert_eq!(Call::NAMES[get.index()], "GetLease");
        assert!(!get.is_write());
        let name = with_call!(&get, op => std::any::type_name_of_val(op));
        assert!(name.ends_with("GetLease"), "{name}");
        // The wire name of a check is the one earlier releases send.
        let check = Call::from(CheckLimits {
            checks: vec![],
            all_or_nothing: false,
            principal: String::new(),
            key_quota: None,
        });
        assert!(serde_json::to_string(&check)
            .unwrap()
            .starts_with("{\"Check\""));
    }
}
