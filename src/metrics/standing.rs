//! What a scrape reads off the node as it stands: its Raft state and lag,
//! the caps and how full they are, memory against the budget, and leases
//! about to lapse. Rendered as Prometheus text at each scrape (a follower's
//! lag series exist only while this node leads and that follower is a
//! member, which the exporter's registry could not forget).

use std::fmt::Write as _;

use crate::config::{BYTES_PER_LEASE, BYTES_PER_LIMIT_KEY, BYTES_PER_RECORD};
use crate::node::Node;

/// The window of `arbiter_leases_expiring`.
pub const EXPIRING_WITHIN_MS: u64 = 10_000;

/// Bounds set at start-up that the engine does not hold.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bounds {
    /// `--memory-budget-mib`, in bytes.
    pub memory_budget_bytes: u64,
    /// `--max-watchers`.
    pub max_watchers: u64,
}

/// One metric's HELP and TYPE lines, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn start(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) -> &mut Self {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
        self
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) -> &mut Self {
        self.start(name, "gauge", help).sample(name, "", value)
    }
}

/// The node's standing in Prometheus text format.
pub fn render(node: &Node, bounds: Bounds) -> String {
    let mut out = String::new();
    render_raft(node, &mut Family { out: &mut out });
    render_capacity(node, bounds, &mut Family { out: &mut out });
    out
}

fn render_raft(node: &Node, f: &mut Family<'_>) {
    let standing = node.standing();
    let log = node.replication();
    let leading = standing.role == "Leader";
    f.gauge("arbiter_node_id", "This node's id.", node.id())
        .gauge(
            "arbiter_raft_term",
            "The Raft term this node is in.",
            standing.term,
        )
        .gauge(
            "arbiter_raft_has_leader",
            "1 while this node knows a leader of its term, 0 otherwise.",
            u8::from(standing.leader.is_some()),
        )
        .gauge(
            "arbiter_raft_leader_id",
            "The leader this node knows (0 when it knows none).",
            standing.leader.unwrap_or(0),
        )
        .gauge(
            "arbiter_raft_voters",
            "Voters in the membership this node knows.",
            standing.members.iter().filter(|m| m.voter).count(),
        )
        .gauge(
            "arbiter_raft_is_leader",
            "1 while this node leads, 0 otherwise.",
            u8::from(leading),
        );
    f.start(
        "arbiter_raft_state",
        "gauge",
        "1 for this node's Raft role, 0 for the others.",
    );
    for role in ["Leader", "Follower", "Candidate", "Learner", "Shutdown"] {
        let labels = format!("state=\"{role}\"");
        f.sample(
            "arbiter_raft_state",
            &labels,
            u8::from(standing.role == role),
        );
    }
    f.gauge(
        "arbiter_raft_last_log_index",
        "Index of the last entry in this node's log.",
        log.last_log_index,
    )
    .gauge(
        "arbiter_raft_applied_index",
        "Index of the last entry applied to this node's state.",
        standing.applied_index,
    )
    .gauge(
        "arbiter_raft_apply_lag_entries",
        "Entries in this node's log not yet applied to its state.",
        log.last_log_index.saturating_sub(standing.applied_index),
    )
    .gauge(
        "arbiter_raft_snapshot_index",
        "Index of the last entry in this node's latest snapshot (0: none).",
        log.snapshot_index,
    );
    f.start(
        "arbiter_raft_follower_lag_entries",
        "gauge",
        "On the leader, per member it replicates to: entries of the leader's log the member has \
         not confirmed.",
    );
    for (peer, lag) in &log.follower_lag {
        let labels = format!("peer=\"{peer}\"");
        f.sample("arbiter_raft_follower_lag_entries", &labels, lag);
    }
    f.start(
        "arbiter_raft_quorum_ack_age_seconds",
        "gauge",
        "On the leader: time since a majority last acknowledged it.",
    );
    if let Some(ms) = log.quorum_ack_ms {
        let seconds = ms as f64 / 1000.0;
        f.sample("arbiter_raft_quorum_ack_age_seconds", "", seconds);
    }
}

fn render_capacity(node: &Node, bounds: Bounds, f: &mut Family<'_>) {
    let caps = node.engine_config();
    let counts = node.counts();
    f.start(
        "arbiter_cap",
        "gauge",
        "The most of each kind this node holds at once; past it new ones get RESOURCE_EXHAUSTED \
         (compare arbiter_live_keys, arbiter_idempotency_record_bytes, arbiter_lease_watchers).",
    );
    for (kind, cap) in [
        ("rate_limit", caps.max_limit_keys as u64),
        ("lease", caps.max_leases as u64),
        ("idempotency_record", caps.max_records as u64),
        ("idempotency_record_bytes", caps.max_record_bytes as u64),
        ("lease_watchers", bounds.max_watchers),
    ] {
        f.sample("arbiter_cap", &format!("kind=\"{kind}\""), cap);
    }
    let state = counts.limit_keys * BYTES_PER_LIMIT_KEY
        + counts.leases * BYTES_PER_LEASE
        + counts.records * BYTES_PER_RECORD
        + counts.record_bytes;
    f.gauge(
        "arbiter_memory_budget_bytes",
        "--memory-budget-mib, in bytes: what the state's caps were sized for.",
        bounds.memory_budget_bytes,
    )
    .gauge(
        "arbiter_state_memory_bytes",
        "The state's estimated memory: live entries at their measured cost each, and what \
         idempotency records hold.",
        state,
    );
    if let Some(rss) = resident_bytes() {
        f.gauge(
            "arbiter_resident_memory_bytes",
            "The process's resident memory.",
            rss,
        );
    }
    f.gauge(
        "arbiter_leases_expiring",
        "Live leases lapsing within the next 10 s unless renewed.",
        node.leases_expiring(EXPIRING_WITHIN_MS),
    );
}

/// The process's resident set size, where `/proc` tells it.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_and_type_before_their_samples() {
        let mut out = String::new();
        Family { out: &mut out }
            .gauge("a", "A thing.", 3)
            .start("b", "gauge", "B things.")
            .sample("b", "peer=\"2\"", 7);
        assert_eq!(
            out,
            "# HELP a A thing.\n# TYPE a gauge\na 3\n\
             # HELP b B things.\n# TYPE b gauge\nb{peer=\"2\"} 7\n"
        );
    }

    #[test]
    fn resident_memory_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(resident_bytes().is_some_and(|b| b > 0));
        }
    }
}
