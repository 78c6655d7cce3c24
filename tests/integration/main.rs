//! Integration tests: each starts the real `arbiter` binary on OS-chosen
//! loopback ports and talks to it over gRPC (time-based tests instead run
//! the server in-process on a manual clock, `manual_clock.rs`). One test binary with modules,
//! so it links once.

mod support;

mod bounds;
mod breakers;
mod cluster;
mod durability;

mod idempotency;
mod leases;
mod linearizability;
mod manual_clock;
mod peers;
mod rate_limiter;
mod replication;
mod rls;
mod rls_compat;
mod security;
mod semaphores;
mod server;
mod slots;
mod telemetry;
mod upgrade;
mod validation;
