//! Arbiter: rate limits, leases with fencing tokens and idempotency records,
//! served over gRPC.
//!
//! # Layout
//! - [`engine`]: the pure state machines (no clock, no I/O, no async);
//!   `apply(command, now_ms)` is the single entry point for state changes.
//! - [`clock`]: the one place time is read.
//! - [`node`]: stamps commands with the time, serialises writes, fans out
//!   lease events to watchers, runs sweeps, the rate-limit sync
//!   (`node/limit_sync.rs`) and elections behind a pre-vote
//!   (`node/election.rs`).
//! - [`raft`]: openraft types, the state machine, the peer network and the
//!   leader lease (`raft/lease.rs`); [`storage`]: the redb log store.
//! - [`api`]: one file per gRPC service, proto⇄domain conversion with input
//!   validation, and the single engine-error → status mapping.
//! - [`server`]: binds ports, serves gRPC, health, reflection and metrics,
//!   shuts down gracefully.
//! - [`config`] / [`cli`]: command-line flags and the client subcommands.

pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub use arbiter_engine as engine;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod server;
pub mod storage;

/// The Raft log format (`proto/arbiter/log/v1/log.proto`).
pub mod log_proto {
    tonic::include_proto!("arbiter.log.v1");
}

/// Generated protobuf and gRPC code for `arbiter.v1`.
pub mod proto {
    tonic::include_proto!("arbiter.v1");

    /// Encoded file descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("arbiter_descriptor");
}
