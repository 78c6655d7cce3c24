//! The cluster's timing, in one place, with the inequalities its safety
//! rests on checked when the crate compiles.
//!
//! Three kinds of time are named apart:
//! - **wall time** (`Clock::wall_ms`: milliseconds since the Unix epoch
//!   from the injected [`crate::clock::Clock`]) is read once, at start, to
//!   anchor a node that has applied no time from the log yet;
//! - **command time** (`now_ms`: `Node::now_ms`, `Timekeeper::now_ms`, and
//!   every engine call's argument) is the replicated timeline that stamps
//!   commands, so lease deadlines and rate-limit windows mean the same on
//!   every replica; it moves with the monotonic clock and never goes back;
//! - **monotonic time** (`mono_ms`: `Clock::mono_ms`,
//!   `LeaderLease::mono_ms`, or tokio's `Instant`) measures how long
//!   something took or has lasted on this process alone: leader contact,
//!   the leader lease, timeouts. It is never compared across processes.
//!
//! Wall time is read only through the `Clock` the server was started with
//! (and the replicated clock built on it, `node::timekeeping`). Monotonic
//! time is read from the `Clock` and, for timers and the leader lease, from
//! tokio's clock, which is the system's except in the simulated cluster.

/// How often a leader sends heartbeats.
pub const HEARTBEAT_MS: u64 = 50;

/// Raft election timeout bounds: a follower that has heard from no leader
/// for a random time between them stands for election.
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 200;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 400;

/// How long after hearing from a leader a voter refuses to help elect
/// another (the pre-vote, and openraft's own vote handler): the longest
/// election timeout.
pub const LEADER_LEASE_MS: u64 = ELECTION_TIMEOUT_MAX_MS;

/// How long after a majority's acknowledgement a leader keeps deciding on
/// its own (rate limits, reads): the leader lease less [`DRIFT_MARGIN_MS`].
pub const DECIDE_MS: u64 = 300;

/// What [`DECIDE_MS`] leaves for clock-rate drift between members and for
/// the time between reading the clock and answering.
pub const DRIFT_MARGIN_MS: u64 = 100;

/// openraft refuses to vote for anyone else for this long after a node's
/// own vote last changed, so a leader younger than this waits before
/// handing over.
pub const VOTE_LEASE_MS: u64 = ELECTION_TIMEOUT_MAX_MS + 50;

/// A new leader moves every lease's deadline this much later, so no lease
/// lapses early because of a failover (the longest a cluster can be without
/// a leader that a client could have seen).
pub const FAILOVER_EXTENSION_MS: u64 = ELECTION_TIMEOUT_MAX_MS;

// A leader stops deciding before any other can be elected: its decisions
// end at DECIDE_MS after a majority's acknowledgement, the others refuse
// to elect anyone for LEADER_LEASE_MS after it, and the difference covers
// the drift allowed.
const _: () = assert!(DECIDE_MS + DRIFT_MARGIN_MS <= LEADER_LEASE_MS);
// A follower's refusal to elect lasts at least as long as the shortest
// election timeout, so it is never the thing that lets an election start.
const _: () = assert!(LEADER_LEASE_MS >= ELECTION_TIMEOUT_MIN_MS);
// Several heartbeats fit in the shortest election timeout, so one lost
// heartbeat does not start an election.
const _: () = assert!(3 * HEARTBEAT_MS <= ELECTION_TIMEOUT_MIN_MS);
const _: () = assert!(ELECTION_TIMEOUT_MIN_MS < ELECTION_TIMEOUT_MAX_MS);
