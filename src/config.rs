//! Server configuration: flags with `ARBITER_*` environment equivalents,
//! parsed once into [`Config`]. Tests build a `Config` directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, ValueEnum};

use crate::engine::EngineConfig;
use crate::node::Membership;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `arbiter serve` flags.
#[derive(Clone, Debug, Args)]
pub struct Config {
    /// Client gRPC address (RateLimiter, Leases, Idempotency, health, reflection).
    #[arg(long, env = "ARBITER_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,

    /// Prometheus metrics address (`/metrics`, `/healthz`).
    #[arg(long, env = "ARBITER_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,

    /// This node's Raft id (>= 1). Default: 1 for a single node; with
    /// --peers-dns, the host name's ordinal plus one (`arbiter-0` is 1).
    #[arg(long, env = "ARBITER_NODE_ID")]
    pub node_id: Option<u64>,

    /// Peer (Raft) address to listen on.
    #[arg(long, env = "ARBITER_PEER_LISTEN", default_value = "127.0.0.1:7071")]
    pub peer_listen: SocketAddr,

    /// Every member as ID=HOST:PORT (their peer addresses), comma-separated,
    /// this node included. Omit for a single node.
    #[arg(long, env = "ARBITER_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// StatefulSet form of --peers: the peer address with `{}` for the pod
    /// ordinal, e.g. `arbiter-{}.arbiter-peers.default.svc.cluster.local:7071`.
    /// Needs --replicas; member ids are ordinal + 1.
    #[arg(long, env = "ARBITER_PEERS_DNS")]
    pub peers_dns: Option<String>,

    /// StatefulSet replica count, for --peers-dns.
    #[arg(long, env = "ARBITER_REPLICAS")]
    pub replicas: Option<u64>,

    /// How often the leader replicates changed rate-limit state. A crash or
    /// failover forgets at most about this much consumption.
    #[arg(long, env = "ARBITER_LIMIT_SYNC_MS", default_value_t = 100)]
    pub limit_sync_ms: u64,

    /// How long a call waits for a leader before answering UNAVAILABLE.
    #[arg(long, env = "ARBITER_LEADER_WAIT_MS", default_value_t = 3000)]
    pub leader_wait_ms: u64,

    /// Where state is kept. Created at start-up.
    #[arg(long, env = "ARBITER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Log line format.
    #[arg(long, env = "ARBITER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. `info` or `arbiter=debug`.
    #[arg(long, env = "ARBITER_LOG", default_value = "info")]
    pub log: String,

    /// Largest lease ttl_ms and idempotency lock_ttl_ms accepted.
    #[arg(long, env = "ARBITER_MAX_TTL_MS", default_value_t = 86_400_000)]
    pub max_ttl_ms: u64,

    /// Retention for completed idempotency records when a Begin sends 0.
    #[arg(
        long,
        env = "ARBITER_DEFAULT_RETENTION_MS",
        default_value_t = 86_400_000
    )]
    pub default_retention_ms: u64,

    /// Largest idempotency retention_ms accepted.
    #[arg(long, env = "ARBITER_MAX_RETENTION_MS", default_value_t = 604_800_000)]
    pub max_retention_ms: u64,

    /// Largest stored idempotency response, in bytes (at most 4 MiB: a
    /// response travels whole in one log entry and one peer message).
    #[arg(long, env = "ARBITER_MAX_RESPONSE_BYTES", default_value_t = 65_536,
          value_parser = max_response_bytes)]
    pub max_response_bytes: usize,

    /// Most checks in one Check request.
    #[arg(long, env = "ARBITER_MAX_CHECKS_PER_REQUEST", default_value_t = 1000)]
    pub max_checks_per_request: usize,

    /// Most rate-limit keys held at once (idle keys are swept and do not count
    /// for long); beyond it new keys get RESOURCE_EXHAUSTED.
    #[arg(long, env = "ARBITER_MAX_LIMIT_KEYS", default_value_t = 10_000_000)]
    pub max_limit_keys: usize,

    /// Most leases held at once.
    #[arg(long, env = "ARBITER_MAX_LEASES", default_value_t = 1_000_000)]
    pub max_leases: usize,

    /// Most idempotency records held at once.
    #[arg(long, env = "ARBITER_MAX_RECORDS", default_value_t = 1_000_000)]
    pub max_records: usize,

    /// Most bytes of idempotency records (keys, fingerprints, responses).
    #[arg(long, env = "ARBITER_MAX_RECORD_BYTES", default_value_t = 1 << 30)]
    pub max_record_bytes: usize,

    /// Shards of the rate-limit table (rounded up to a power of two).
    #[arg(long, env = "ARBITER_LIMIT_SHARDS", default_value_t = 64)]
    pub limit_shards: usize,

    /// How often idle rate-limit keys (full buckets, lapsed windows) are swept.
    #[arg(long, env = "ARBITER_SWEEP_INTERVAL_MS", default_value_t = 1000)]
    pub sweep_interval_ms: u64,

    /// Take a snapshot of the state (and purge the log before it) after this
    /// many log entries.
    #[arg(long, env = "ARBITER_SNAPSHOT_LOGS", default_value_t = 10_000)]
    pub snapshot_logs: u64,

    /// Threads serving client connections, each an event loop of its own;
    /// connections are spread over them in turn (default: one per CPU core).
    #[arg(long, env = "ARBITER_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish.
    #[arg(long, env = "ARBITER_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
}

#[derive(Parser)]
struct DefaultsOnly {
    #[command(flatten)]
    config: Config,
}

impl Default for Config {
    /// The documented defaults (ignoring the environment is not possible with
    /// clap's `env`, so tests that need isolation set every field they use).
    fn default() -> Self {
        DefaultsOnly::parse_from(["arbiter"]).config
    }
}

impl Config {
    /// Loopback, OS-chosen ports and the given data directory: for tests.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            metrics_listen: "127.0.0.1:0".parse().expect("literal address"),
            peer_listen: "127.0.0.1:0".parse().expect("literal address"),
            data_dir,
            ..Self::default()
        }
    }

    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            limit_shards: self.limit_shards,
            max_limit_keys: self.max_limit_keys,
            max_leases: self.max_leases,
            max_records: self.max_records,
            max_record_bytes: self.max_record_bytes,
        }
    }
}

/// The pod ordinal at the end of a StatefulSet host name (`arbiter-2` → 2).
/// The largest `--max-response-bytes` accepted.
pub const MAX_RESPONSE_BYTES_LIMIT: usize = 4 << 20;

fn max_response_bytes(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n > MAX_RESPONSE_BYTES_LIMIT {
        return Err(format!(
            "must be at most {MAX_RESPONSE_BYTES_LIMIT} (4 MiB), got {n}"
        ));
    }
    Ok(n)
}

pub fn ordinal(hostname: &str) -> Option<u64> {
    hostname.trim().rsplit_once('-')?.1.parse().ok()
}

impl Config {
    /// Resolves this node's id and the initial members from --node-id,
    /// --peers or --peers-dns/--replicas (and the host name), or a
    /// one-member cluster at `bound_peer` when none is given.
    pub fn membership(
        &self,
        bound_peer: SocketAddr,
        hostname: Option<&str>,
    ) -> Result<Membership, String> {
        let from_host = || {
            hostname.and_then(ordinal).map(|o| o + 1).ok_or_else(|| {
                format!("--node-id is not set and the host name {hostname:?} ends in no -ORDINAL")
            })
        };
        let (id, peers) = if let Some(pattern) = &self.peers_dns {
            if !pattern.contains("{}") {
                return Err(format!(
                    "--peers-dns {pattern:?}: must contain {{}} for the pod ordinal"
                ));
            }
            let replicas = self.replicas.ok_or("--peers-dns needs --replicas")?;
            if !(1..=9).contains(&replicas) {
                return Err(format!("--replicas: must be 1 to 9, got {replicas}"));
            }
            let peers = (0..replicas)
                .map(|i| (i + 1, pattern.replace("{}", &i.to_string())))
                .collect();
            (self.node_id.map_or_else(from_host, Ok)?, peers)
        } else if !self.peers.is_empty() {
            let mut peers = BTreeMap::new();
            for p in &self.peers {
                let (id, addr) = p
                    .split_once('=')
                    .ok_or_else(|| format!("--peers entry {p:?}: expected ID=HOST:PORT"))?;
                let id: u64 = id
                    .trim()
                    .parse()
                    .map_err(|_| format!("--peers entry {p:?}: bad id"))?;
                if id == 0 || addr.trim().is_empty() {
                    return Err(format!(
                        "--peers entry {p:?}: ids start at 1 and need an address"
                    ));
                }
                peers.insert(id, addr.trim().to_owned());
            }
            (self.node_id.map_or_else(from_host, Ok)?, peers)
        } else {
            let id = self.node_id.unwrap_or(1);
            (id, BTreeMap::from([(id, bound_peer.to_string())]))
        };
        if id == 0 || !peers.contains_key(&id) {
            return Err(format!(
                "node id {id} is not among the members {:?}",
                peers.keys().collect::<Vec<_>>()
            ));
        }
        Ok(Membership { id, peers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &[&str]) -> Config {
        let mut argv = vec!["arbiter"];
        argv.extend_from_slice(args);
        DefaultsOnly::parse_from(argv).config
    }

    const BOUND: &str = "127.0.0.1:7071";

    #[test]
    fn max_response_bytes_is_bounded() {
        assert_eq!(
            cfg(&["--max-response-bytes", "4194304"]).max_response_bytes,
            4 << 20
        );
        let e = DefaultsOnly::try_parse_from(["arbiter", "--max-response-bytes", "4194305"])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("at most 4194304"), "{e}");
    }

    #[test]
    fn single_node_by_default() {
        let m = cfg(&[]).membership(BOUND.parse().unwrap(), None).unwrap();
        assert_eq!(m.id, 1);
        assert_eq!(m.peers, BTreeMap::from([(1, BOUND.to_owned())]));
    }

    #[test]
    fn explicit_peers() {
        let m = cfg(&["--node-id", "2", "--peers", "1=a:1,2=b:2,3=c:3"])
            .membership(BOUND.parse().unwrap(), None)
            .unwrap();
        assert_eq!((m.id, m.peers.len(), m.peers[&3].as_str()), (2, 3, "c:3"));
        assert!(cfg(&["--node-id", "4", "--peers", "1=a:1"])
            .membership(BOUND.parse().unwrap(), None)
            .is_err());
        assert!(cfg(&["--peers", "1=a:1,x"])
            .membership(BOUND.parse().unwrap(), Some("h"))
            .is_err());
    }

    #[test]
    fn statefulset_form_derives_id_and_peers() {
        let c = cfg(&["--peers-dns", "arbiter-{}.peers:7071", "--replicas", "3"]);
        let m = c
            .membership(BOUND.parse().unwrap(), Some("arbiter-2"))
            .unwrap();
        assert_eq!(m.id, 3);
        assert_eq!(m.peers[&1], "arbiter-0.peers:7071");
        assert_eq!(m.peers[&3], "arbiter-2.peers:7071");
        assert!(c
            .membership(BOUND.parse().unwrap(), Some("arbiter-7"))
            .is_err());
        assert!(c
            .membership(BOUND.parse().unwrap(), Some("no-ordinal"))
            .is_err());
        assert!(cfg(&["--peers-dns", "x:1", "--replicas", "3"])
            .membership(BOUND.parse().unwrap(), Some("a-0"))
            .is_err());
    }
}
