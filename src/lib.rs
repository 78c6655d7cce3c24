//! Arbiter: rate limits, leases with fencing tokens and idempotency records,
//! served over gRPC.
//!
//! # Layout
//! - [`engine`]: the pure state machines, a crate of their own
//!   (`crates/engine`): no clock, no I/O, no async; `apply(command, now_ms)`
//!   is the single entry point for replicated state, and each client
//!   operation is a typed struct (`engine::ops`).
//! - [`clock`]: the injected clock (wall and monotonic time);
//!   [`server::start`] takes it. [`timing`]: the cluster's timing constants,
//!   the inequalities they must keep (checked at compile time), and which
//!   kind of time each part reads.
//! - [`node`]: one room per job, each a type that owns its state and is
//!   handed the rooms it uses (routing of typed operations to the leader,
//!   the write proposer, leadership and the leader lease, elections behind
//!   a pre-vote, the hand-over on shutdown, admission of an empty node,
//!   sweeps, the rate-limit sync, lease watchers, the replicated clock, the
//!   background tasks); `Node` composes them.
//! - [`storage`]: the redb log store, the snapshot files, and the engine as
//!   openraft's state machine; [`raft`]: openraft types, the binary log
//!   codec, the snapshot format, the peer network, the leader lease, and
//!   (`raft::compat`) every reader of an earlier release's formats.
//! - Layers: engine, clock, timing, security ← raft ← storage ← node ←
//!   limits, config, metrics ← api ← server (`scripts/module-layers.sh`).
//! - [`api`]: one file per gRPC service and the peer port's receiving end, proto⇄domain conversion with input
//!   validation, the single engine-error → status mapping, and the per-RPC
//!   metrics and tracing layer.
//! - [`security`]: TLS on every port (re-read when the files change),
//!   principals and namespaces from the auth file.
//! - [`server`]: binds ports, serves gRPC, health, reflection and metrics,
//!   shuts down gracefully.
//! - [`config`] / [`cli`]: command-line flags and the client subcommands.
//!
//! See `docs/design.md` for where a call goes.

pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub use arbiter_engine as engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod security;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod timing;

/// The Raft log format (`proto/arbiter/log/v1/log.proto`).
pub mod log_proto {
    tonic::include_proto!("arbiter.log.v1");
}

/// Envoy's rate limit service (`proto/envoy`, trimmed to what Arbiter
/// serves), in modules that mirror its packages.
#[allow(clippy::all, missing_docs)]
pub mod envoy {
    pub mod service {
        pub mod ratelimit {
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");
            }
        }
    }
    pub mod extensions {
        pub mod common {
            pub mod ratelimit {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }

    /// Encoded file descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("envoy_descriptor");
}

/// Generated protobuf and gRPC code for `arbiter.v1`.
/// OTLP's trace export (`proto/otlp`, the part Arbiter sends).
pub mod otlp {
    tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
}

pub mod proto {
    tonic::include_proto!("arbiter.v1");

    /// Encoded file descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("arbiter_descriptor");
}
