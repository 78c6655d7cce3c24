//! Server configuration: flags with `ARBITER_*` environment equivalents,
//! parsed once into [`Config`]. Tests build a `Config` directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, ValueEnum};

use crate::engine::EngineConfig;
use crate::node::{Membership, WatchLimits};
use crate::security::{ClientCerts, ClientFiles, ServerFiles};

/// `--slot-owners`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SlotOwnersArg {
    /// The leader decides every rate-limit key.
    Leader,
    /// The leader spreads the rate-limit slots over the voters; each
    /// decides its own.
    Spread,
}

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

    /// Who decides rate limits in a cluster: `leader` (every call is
    /// decided by the leader; through another member it is forwarded
    /// there) or `spread` (keys hash to 1,024 slots, which the leader
    /// spreads over the voters; each member decides its own slots' keys,
    /// and forwards the others to their owner). See "Slots" in the README.
    #[arg(
        long,
        env = "ARBITER_SLOT_OWNERS",
        value_enum,
        default_value = "leader"
    )]
    pub slot_owners: SlotOwnersArg,

    /// How long a call waits for a leader before answering UNAVAILABLE.
    #[arg(long, env = "ARBITER_LEADER_WAIT_MS", default_value_t = 3000)]
    pub leader_wait_ms: u64,

    /// How long a member being added (`cluster add`) has to catch up as a
    /// learner before it is made a voter; one that has not is removed
    /// again and the add fails (unless forced).
    #[arg(long, env = "ARBITER_MEMBER_CATCH_UP_MS", default_value_t = 10_000)]
    pub member_catch_up_ms: u64,

    /// The most the members' wall clocks may differ by. A node that has
    /// applied nothing yet (the first leader of a new cluster) starts the
    /// replicated timeline this far behind its wall clock, so a clock ahead
    /// by up to this much never makes a lease or lock lapse early (see
    /// "Guarantees" in the README).
    #[arg(long, env = "ARBITER_MAX_CLOCK_SKEW_MS", default_value_t = 1000)]
    pub max_clock_skew_ms: u64,

    /// Where state is kept. Created at start-up.
    #[arg(long, env = "ARBITER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Log line format.
    #[arg(long, env = "ARBITER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. `info` or `arbiter=debug`.
    #[arg(long, env = "ARBITER_LOG", default_value = "info")]
    pub log: String,

    /// Export traces to this OTLP/gRPC collector, e.g. http://127.0.0.1:4317
    /// (off without it): a span per call, with the hop to another member
    /// and the Raft commit as children, in the caller's trace when its
    /// metadata carries `traceparent`.
    #[arg(long, env = "ARBITER_OTLP_ENDPOINT", value_parser = crate::telemetry::parse_endpoint)]
    pub otlp_endpoint: Option<String>,

    /// The share of calls without a sampled caller trace that start a
    /// trace, from 0 to 1 (calls in a sampled trace are always traced).
    #[arg(long, env = "ARBITER_OTLP_SAMPLE_RATIO", default_value_t = 1.0,
          value_parser = crate::telemetry::parse_sample_ratio)]
    pub otlp_sample_ratio: f64,

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

    /// Memory for state, in MiB: sets the caps below that are not given,
    /// half of it for rate-limit keys, a quarter for leases and a quarter
    /// for idempotency records and what they hold (see "Sizing" in the
    /// README). The default
    /// fits the helm chart's default memory limit (1 GiB) with room for a
    /// snapshot being built.
    #[arg(long, env = "ARBITER_MEMORY_BUDGET_MIB", default_value_t = 600)]
    pub memory_budget_mib: usize,

    /// Most rate-limit keys held at once (idle keys are swept and do not count
    /// for long); beyond it new keys get RESOURCE_EXHAUSTED [default: from
    /// --memory-budget-mib].
    #[arg(long, env = "ARBITER_MAX_LIMIT_KEYS")]
    pub max_limit_keys: Option<usize>,

    /// Most circuit breakers held at once.
    #[arg(long, env = "ARBITER_MAX_BREAKERS", default_value_t = 100_000)]
    pub max_breakers: usize,

    /// Most leases held at once [default: from --memory-budget-mib].
    #[arg(long, env = "ARBITER_MAX_LEASES")]
    pub max_leases: Option<usize>,

    /// Most idempotency records held at once [default: from
    /// --memory-budget-mib].
    #[arg(long, env = "ARBITER_MAX_RECORDS")]
    pub max_records: Option<usize>,

    /// Most bytes of idempotency records (keys, fingerprints, responses)
    /// [default: from --memory-budget-mib].
    #[arg(long, env = "ARBITER_MAX_RECORD_BYTES")]
    pub max_record_bytes: Option<usize>,

    /// Most lease watches served at once; beyond it a Watch gets
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "ARBITER_MAX_WATCHERS", default_value_t = 10_000)]
    pub max_watchers: usize,

    /// Most watches of one lease at once.
    #[arg(long, env = "ARBITER_MAX_WATCHERS_PER_LEASE", default_value_t = 1_000)]
    pub max_watchers_per_lease: usize,

    /// Most calls in flight on one client connection (HTTP/2 concurrent
    /// streams); a client past it waits for one of its calls to finish.
    #[arg(
        long,
        env = "ARBITER_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1024
    )]
    pub max_streams_per_connection: u32,

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

    /// Serve the client port over TLS with this certificate chain (PEM);
    /// needs --tls-key. Re-read when the file changes.
    #[arg(long, env = "ARBITER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The client port's private key (PEM).
    #[arg(long, env = "ARBITER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require a client certificate signed by this CA (PEM) on the client
    /// port: a client without one is refused at the handshake (see
    /// --tls-client-cert-optional). Needs --tls-cert.
    #[arg(long, env = "ARBITER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// With --tls-client-ca, also let in clients that present no
    /// certificate: they must then name themselves with a bearer token
    /// from the auth file (so this needs --auth-file). A certificate that
    /// is presented is still verified.
    #[arg(
        long,
        env = "ARBITER_TLS_CLIENT_CERT_OPTIONAL",
        requires = "tls_client_ca"
    )]
    pub tls_client_cert_optional: bool,

    /// Principals and their namespaces (YAML, see "Security" in the
    /// README). With it every call but health and reflection needs a known
    /// principal. Re-read when the file changes; a bad file keeps the last
    /// good rules.
    #[arg(long, env = "ARBITER_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Named limits in envoyproxy/ratelimit's format (plus `algorithm` and
    /// `burst`): one YAML file, or a directory of them (one domain per
    /// file, as a ConfigMap mounts it). Served to Envoy as its rate limit
    /// service and by name in `arbiter.v1`. Re-read when it changes; a bad
    /// change keeps the last good limits. `arbiter limits check PATH`
    /// validates a file offline.
    #[arg(long, env = "ARBITER_LIMITS")]
    pub limits: Option<PathBuf>,

    /// A domain may be configured in several --limits files: their
    /// descriptors are joined (a key and value in two of them is an error),
    /// as envoyproxy/ratelimit's MERGE_DOMAIN_CONFIG does. Without it a
    /// domain in two files is an error.
    #[arg(long, env = "ARBITER_LIMITS_MERGE_DOMAINS")]
    pub limits_merge_domains: bool,

    /// Envoy's rate limit service: return each passing descriptor's
    /// `metadata` (merged), the domain, the descriptors and the hits as the
    /// response's dynamic metadata, as envoyproxy/ratelimit does with its
    /// response dynamic metadata switched on.
    #[arg(long, env = "ARBITER_RLS_DYNAMIC_METADATA")]
    pub rls_dynamic_metadata: bool,

    /// Envoy's rate limit service: consume from the descriptors that pass
    /// even when another is over limit (envoyproxy/ratelimit's behaviour).
    /// By default nothing is consumed unless every descriptor passes.
    #[arg(long, env = "ARBITER_RLS_CONSUME_ON_DENY")]
    pub rls_consume_on_deny: bool,

    /// Envoy's rate limit service: add x-ratelimit-limit, -remaining and
    /// -reset response headers (IETF draft form) for the tightest limit.
    #[arg(long, env = "ARBITER_RLS_HEADERS")]
    pub rls_headers: bool,

    /// Mutual TLS on the peer port and to peers: this member's certificate
    /// (PEM). Needs --peer-tls-key and --peer-tls-ca.
    #[arg(long, env = "ARBITER_PEER_TLS_CERT", requires_all = ["peer_tls_key", "peer_tls_ca"])]
    pub peer_tls_cert: Option<PathBuf>,

    /// This member's peer private key (PEM).
    #[arg(long, env = "ARBITER_PEER_TLS_KEY", requires = "peer_tls_cert")]
    pub peer_tls_key: Option<PathBuf>,

    /// The CA every member's peer certificate is signed by (PEM); a peer
    /// without such a certificate is refused at the handshake.
    #[arg(long, env = "ARBITER_PEER_TLS_CA", requires = "peer_tls_cert")]
    pub peer_tls_ca: Option<PathBuf>,

    /// Run a cluster with --auth-file but without peer TLS: anyone who
    /// reaches the peer port can then speak for any member and forward
    /// calls as any principal. Refused without this flag; with it, a
    /// warning every minute and `arbiter_insecure_peer_port 1`.
    #[arg(long, env = "ARBITER_INSECURE_PEER_PORT")]
    pub insecure_peer_port: bool,

    /// Part of a new cluster's id, which is otherwise derived from the
    /// initial members alone: give a cluster re-created with the same
    /// members a new token, so that a member left with the old cluster's
    /// data is refused rather than taken for one of the new.
    #[arg(long, env = "ARBITER_CLUSTER_TOKEN")]
    pub cluster_token: Option<String>,

    /// Accept peer messages that carry no cluster id: only for one rolling
    /// upgrade from a version whose members sent none (logged at start).
    #[arg(long, env = "ARBITER_ACCEPT_PEERS_WITHOUT_CLUSTER_ID")]
    pub accept_peers_without_cluster_id: bool,

    /// Serve metrics over TLS with this certificate (PEM); needs
    /// --metrics-tls-key.
    #[arg(long, env = "ARBITER_METRICS_TLS_CERT", requires = "metrics_tls_key")]
    pub metrics_tls_cert: Option<PathBuf>,

    /// The metrics port's private key (PEM).
    #[arg(long, env = "ARBITER_METRICS_TLS_KEY", requires = "metrics_tls_cert")]
    pub metrics_tls_key: Option<PathBuf>,

    /// Require a client certificate signed by this CA (PEM) on the metrics
    /// port: a scraper without one is refused at the handshake. Needs
    /// --metrics-tls-cert.
    #[arg(
        long,
        env = "ARBITER_METRICS_TLS_CLIENT_CA",
        requires = "metrics_tls_cert"
    )]
    pub metrics_tls_client_ca: Option<PathBuf>,
}

/// Memory one rate-limit key takes (resident, with its share of the table
/// and snapshot slack; BENCHMARKS.md "Snapshots at size").
pub const BYTES_PER_LIMIT_KEY: usize = 200;
/// Memory one lease takes, names of about 30 bytes.
pub const BYTES_PER_LEASE: usize = 400;
/// Memory one idempotency record takes beyond its key, fingerprint and
/// response.
pub const BYTES_PER_RECORD: usize = 400;

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
            // The manual clock of in-process tests is the only clock.
            max_clock_skew_ms: 0,
            ..Self::default()
        }
    }

    /// The engine's caps: each as given, or its share of
    /// `--memory-budget-mib` at the measured cost of one entry.
    pub fn engine(&self) -> EngineConfig {
        let budget = self.memory_budget_mib.saturating_mul(1 << 20);
        let share = |part: usize, per_entry: usize| (budget / part / per_entry).max(1);
        let max_leases = self.max_leases.unwrap_or_else(|| share(4, BYTES_PER_LEASE));
        EngineConfig {
            limit_shards: self.limit_shards,
            max_limit_keys: self
                .max_limit_keys
                .unwrap_or_else(|| share(2, BYTES_PER_LIMIT_KEY)),
            max_leases,
            // A holder entry costs about what a lease does; semaphores
            // have as many as leases, counted apart.
            max_semaphore_holders: max_leases,
            max_breakers: self.max_breakers,
            // Records' quarter is split between their fixed cost and what
            // they hold (key, fingerprint, response: `--max-record-bytes`).
            max_records: self
                .max_records
                .unwrap_or_else(|| share(8, BYTES_PER_RECORD)),
            max_record_bytes: self.max_record_bytes.unwrap_or_else(|| share(8, 1)),
        }
    }

    /// The client port's TLS files, if TLS is on.
    pub fn client_tls(&self) -> Option<ServerFiles> {
        Some(ServerFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_client_ca.clone(),
            client_certs: match (&self.tls_client_ca, self.tls_client_cert_optional) {
                (None, _) => ClientCerts::None,
                (Some(_), true) => ClientCerts::Optional,
                (Some(_), false) => ClientCerts::Required,
            },
        })
    }

    /// The peer port's mutual TLS files: the server side and the client
    /// side (the same certificate, presented to other members).
    pub fn peer_tls(&self) -> Option<(ServerFiles, ClientFiles)> {
        let (cert, key, ca) = (
            self.peer_tls_cert.clone()?,
            self.peer_tls_key.clone()?,
            self.peer_tls_ca.clone()?,
        );
        Some((
            ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: Some(ca.clone()),
                client_certs: ClientCerts::Required,
            },
            ClientFiles {
                ca,
                cert: Some(cert),
                key: Some(key),
            },
        ))
    }

    pub fn metrics_tls(&self) -> Option<ServerFiles> {
        Some(ServerFiles {
            cert: self.metrics_tls_cert.clone()?,
            key: self.metrics_tls_key.clone()?,
            ca: self.metrics_tls_client_ca.clone(),
            client_certs: if self.metrics_tls_client_ca.is_some() {
                ClientCerts::Required
            } else {
                ClientCerts::None
            },
        })
    }

    pub fn watch_limits(&self) -> WatchLimits {
        WatchLimits {
            total: self.max_watchers,
            per_lease: self.max_watchers_per_lease,
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
    fn the_memory_budget_sets_the_caps_not_given_within_itself() {
        let budget_of = |e: &EngineConfig| {
            e.max_limit_keys * BYTES_PER_LIMIT_KEY
                + e.max_leases * BYTES_PER_LEASE
                + e.max_records * BYTES_PER_RECORD
                + e.max_record_bytes
        };
        let e = cfg(&[]).engine();
        assert_eq!(e.max_limit_keys, (600 << 20) / 2 / BYTES_PER_LIMIT_KEY);
        assert!(budget_of(&e) <= 600 << 20, "{e:?}");
        assert!(budget_of(&e) > 590 << 20, "most of it is used: {e:?}");
        let e = cfg(&["--memory-budget-mib", "2400"]).engine();
        assert_eq!(e.max_leases, (2400 << 20) / 4 / BYTES_PER_LEASE);
        // A cap given by itself wins; the others still come from the budget.
        let e = cfg(&["--max-leases", "7"]).engine();
        assert_eq!(e.max_leases, 7);
        assert_eq!(e.max_records, (600 << 20) / 8 / BYTES_PER_RECORD);
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
