//! Binds the ports, serves gRPC (the three services, health, reflection) and
//! metrics, and shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Server;

use crate::api::peer_service::PeerService;
use crate::api::{self, Bounds, Shared};
use crate::clock::Clock;
use crate::config::Config;
use crate::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use crate::limits::NamedLimits;
use crate::metrics::{self, Metrics};
use crate::node::{self, Node};
use crate::proto::breakers_server::BreakersServer;
use crate::proto::cluster_server::ClusterServer;
use crate::proto::idempotency_server::IdempotencyServer;
use crate::proto::leases_server::LeasesServer;
use crate::proto::raft_peer_server::RaftPeerServer;
use crate::proto::rate_limiter_server::RateLimiterServer;
use crate::proto::semaphores_server::SemaphoresServer;
use crate::raft::network::PEER_MESSAGE_LIMIT;
use crate::security::{self, Connector};

mod secured;
mod serving;

use self::secured::{warn_insecure_peer_port, Security};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Node(#[from] crate::node::StartError),
    #[error("cluster configuration: {0}")]
    Cluster(String),
    #[error("cannot start the serving threads: {0}")]
    Runtime(std::io::Error),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("this node may not join its cluster: {0}")]
    Refused(String),
    #[error("Raft stopped on a fatal error: {0}")]
    RaftFailed(String),
    #[error("{0}")]
    Security(String),
    #[error("limits: {0}")]
    Limits(String),
}

/// The addresses a started server listens on (ports chosen by the system
/// when the configuration asked for port 0).
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub metrics: SocketAddr,
}

/// A started server: its ports are bound and its node runs; it serves
/// clients until [`Started::serve_until`].
pub struct Started {
    pub addrs: Addrs,
    config: Config,
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    routes: tonic::service::Routes,
    health: tonic_health::server::HealthReporter,
    metrics: Arc<Metrics>,
    peer_stop: tokio::sync::watch::Sender<bool>,
    peer_server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    client_tls: Option<Arc<security::Reloading<rustls::ServerConfig>>>,
    /// The auth file, for the gate that refuses unknown callers before
    /// their messages are read.
    auth: Option<security::Auth>,
}

/// Concurrent calls per peer connection, at most: each member's openraft
/// replication stream, its elections and the calls its clients forward.
const PEER_STREAMS: u32 = 256;

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight
/// calls finish (up to `shutdown_grace_ms`), ends watch streams and returns.
/// Commands are stamped with `clock`'s time.
pub async fn run(
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    start(config, clock).await?.serve_until(shutdown).await
}

/// Binds the ports, opens the data directory and starts the node.
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<Started, ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let listeners = Listeners::bind(&config).await?;
    let addrs = listeners.addrs;
    // Before anything is loaded: the certificates' and the auth file's
    // first load sets their `arbiter_config_generation`.
    let handle = install_metrics();
    let tls = Security::load(&config).map_err(ServerError::Security)?;
    let hostname = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok());
    let membership = config
        .membership(addrs.peer, hostname.as_deref())
        .map_err(ServerError::Cluster)?;

    let metrics = Arc::new(Metrics::new().with_bounds(crate::metrics::Bounds {
        memory_budget_bytes: (config.memory_budget_mib as u64) << 20,
        max_watchers: config.max_watchers as u64,
    }));
    ::metrics::gauge!("arbiter_insecure_peer_port").set(if tls.insecure_peers { 1.0 } else { 0.0 });
    let node = Node::start(node_options(&config, membership, clock, &tls)).await?;
    {
        // Weak: the node holds this closure.
        let (handle, metrics, node_ref) = (handle.clone(), metrics.clone(), Arc::downgrade(&node));
        node.set_metrics_text(Box::new(move || {
            node_ref
                .upgrade()
                .map(|node| crate::metrics::render(&handle, &metrics, &node))
                .unwrap_or_default()
        }));
    }

    if let Some(endpoint) = &config.otlp_endpoint {
        if let Some(spans) = crate::telemetry::install(config.otlp_sample_ratio) {
            let mut stop = node.shutdown_signal();
            let export =
                crate::telemetry::export::run(endpoint.clone(), node.id(), spans, async move {
                    Node::stopped(&mut stop).await
                });
            node.spawn_task("trace export", export);
        }
    }
    let (peer_stop, peer_server) = spawn_peer_server(listeners.peer, &node, &tls, &config);
    if tls.insecure_peers {
        let mut stop = node.shutdown_signal();
        node.spawn_task("insecure peer port", async move {
            tokio::select! {
                _ = warn_insecure_peer_port(addrs.peer) => {}
                _ = Node::stopped(&mut stop) => {}
            }
        });
    }
    let limits = match &config.limits {
        Some(path) => {
            NamedLimits::watch(path, config.limits_merge_domains).map_err(ServerError::Limits)?
        }
        None => NamedLimits::none(),
    };
    let shared = Shared {
        node: node.clone(),
        metrics: metrics.clone(),
        bounds: Bounds::from(&config),
        auth: tls.auth.clone(),
        limits: limits.clone(),
    };

    let (health, health_service) = health(&node, &tls).await;
    node.spawn_task(
        "metrics",
        metrics::serve(
            listeners.metrics,
            handle,
            metrics.clone(),
            node.clone(),
            tls.metrics.clone(),
            node.shutdown_signal(),
        ),
    );
    let routes = client_routes(shared, limits, health_service, &config)?;
    tracing::info!(
        client = %addrs.client,
        peer = %addrs.peer,
        node_id = node.id(),
        client_tls = tls.client.is_some(),
        peer_tls = tls.peer_server.is_some(),
        auth = tls.auth.is_some(),
        metrics = %addrs.metrics,
        data_dir = %config.data_dir.display(),
        "arbiter serving"
    );
    Ok(Started {
        addrs,
        config,
        node,
        listener: listeners.client,
        routes,
        health,
        metrics,
        peer_stop,
        peer_server,
        client_tls: tls.client,
        auth: tls.auth,
    })
}

/// The health service: liveness (the empty service name) serving while the
/// process runs, readiness reported by the node (and by the auth file's
/// last reload).
async fn health(
    node: &Arc<Node>,
    tls: &Security,
) -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (health, service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let auth_failure: Arc<dyn Fn() -> Option<String> + Send + Sync> = {
        let auth = tls.auth.clone();
        Arc::new(move || auth.as_ref().and_then(|a| a.failure()))
    };
    node.spawn_task(
        "readiness",
        node::report_readiness(node.clone(), health.clone(), auth_failure),
    );
    (health, service)
}

/// The three ports, bound before anything starts (a port in use fails
/// fast), with the addresses they got.
struct Listeners {
    client: tokio::net::TcpListener,
    peer: tokio::net::TcpListener,
    metrics: tokio::net::TcpListener,
    addrs: Addrs,
}

impl Listeners {
    async fn bind(config: &Config) -> Result<Self, ServerError> {
        async fn bind(
            addr: SocketAddr,
        ) -> Result<(tokio::net::TcpListener, SocketAddr), ServerError> {
            let err = |source| ServerError::Bind { addr, source };
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
            let bound = listener.local_addr().map_err(err)?;
            Ok((listener, bound))
        }
        let (client, client_addr) = bind(config.listen).await?;
        let (peer, peer_addr) = bind(config.peer_listen).await?;
        let (metrics, metrics_addr) = bind(config.metrics_listen).await?;
        Ok(Self {
            client,
            peer,
            metrics,
            addrs: Addrs {
                client: client_addr,
                peer: peer_addr,
                metrics: metrics_addr,
            },
        })
    }
}

/// The global Prometheus recorder's handle.
fn install_metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    metrics::install().unwrap_or_else(|e| {
        // Only possible when a recorder is already installed in this
        // process; serve an empty exposition rather than fail.
        tracing::warn!(error = %e, "metrics recorder not installed");
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle()
    })
}

fn node_options(
    config: &Config,
    membership: node::Membership,
    clock: Arc<dyn Clock>,
    tls: &Security,
) -> node::Options {
    let ms = |v: u64| Duration::from_millis(v.max(1));
    node::Options {
        engine: config.engine(),
        data_dir: config.data_dir.clone(),
        membership,
        snapshot_logs: config.snapshot_logs,
        leader_wait: ms(config.leader_wait_ms),
        member_catch_up: ms(config.member_catch_up_ms),
        limit_sync: ms(config.limit_sync_ms),
        max_checks_per_call: config.max_checks_per_request,
        slot_owners: match config.slot_owners {
            crate::config::SlotOwnersArg::Leader => node::SlotOwners::Leader,
            crate::config::SlotOwnersArg::Spread => node::SlotOwners::Spread,
        },
        limit_sweep: ms(config.sweep_interval_ms),
        clock,
        watch_limits: config.watch_limits(),
        max_clock_skew_ms: config.max_clock_skew_ms,
        peer_tls: tls.peer_client.clone().map(Connector::new),
        cluster_token: config.cluster_token.clone(),
        accept_peers_without_cluster_id: config.accept_peers_without_cluster_id,
        simulation: None,
    }
}

type PeerServer = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// How long the peer port may take to close once Raft has stopped.
const PEER_DRAIN: Duration = Duration::from_secs(2);

/// Serves the peer port (Raft, pre-votes, forwarded calls) until the
/// returned sender says stop: Raft traffic keeps flowing while client calls
/// drain, and stops last.
fn spawn_peer_server(
    listener: tokio::net::TcpListener,
    node: &Arc<Node>,
    tls: &Security,
    config: &Config,
) -> (tokio::sync::watch::Sender<bool>, PeerServer) {
    let (peer_stop, mut stopped) = tokio::sync::watch::channel(false);
    let (peer_tx, peer_rx) = tokio::sync::mpsc::channel(serving::HANDOFF);
    serving::accept(listener, vec![peer_tx], stopped.clone());
    let service = PeerService::new(
        node.clone(),
        tls.auth.clone(),
        tls.peer_server.is_some(),
        Some(Bounds::from(config)),
    );
    let server = tokio::spawn(
        Server::builder()
            // Raft, pre-votes and forwarded calls from a few members.
            .max_concurrent_streams(Some(PEER_STREAMS))
            .layer(crate::api::layer::PeerBodyLimitLayer)
            .add_service(
                RaftPeerServer::new(service)
                    .max_decoding_message_size(PEER_MESSAGE_LIMIT)
                    .max_encoding_message_size(PEER_MESSAGE_LIMIT),
            )
            .serve_with_incoming_shutdown(
                serving::handshakes(peer_rx, tls.peer_server.clone()),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            ),
    );
    (peer_stop, server)
}

/// The client port's services: health, reflection, the three `arbiter.v1`
/// services, Envoy's rate limit service and the cluster service.
fn client_routes(
    shared: Shared,
    limits: NamedLimits,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    config: &Config,
) -> Result<tonic::service::Routes, tonic_reflection::server::Error> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(crate::envoy::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    Ok(tonic::service::Routes::new(health)
        .add_service(reflection)
        .add_service(RateLimiterServer::new(
            api::rate_limiter::RateLimiterService(shared.clone()),
        ))
        .add_service(LeasesServer::new(api::leases::LeasesService(
            shared.clone(),
        )))
        .add_service(SemaphoresServer::new(api::semaphores::SemaphoresService(
            shared.clone(),
        )))
        .add_service(BreakersServer::new(api::breakers::BreakersService(
            shared.clone(),
        )))
        .add_service(IdempotencyServer::new(
            api::idempotency::IdempotencyService(shared.clone()),
        ))
        .add_service(RateLimitServiceServer::new(api::rls::RlsService {
            shared: shared.clone(),
            limits,
            options: api::rls::RlsOptions {
                consume_on_deny: config.rls_consume_on_deny,
                headers: config.rls_headers,
                dynamic_metadata: config.rls_dynamic_metadata,
            },
        }))
        .add_service(ClusterServer::new(api::cluster::ClusterService(shared)))
        .prepare())
}

impl Started {
    /// Serves clients until `shutdown` resolves, then shuts down in order:
    /// mark NOT_SERVING, end watch streams, stop accepting, let in-flight
    /// calls finish (up to `--shutdown-grace-ms`), stop the node's loops,
    /// Raft, and the peer port.
    pub async fn serve_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Started {
            config,
            node,
            listener,
            routes,
            health,
            metrics,
            peer_stop,
            peer_server,
            client_tls,
            auth,
            ..
        } = self;
        let failed = Arc::new(std::sync::OnceLock::new());
        let stopping = stop_when(shutdown, node.clone(), health, failed.clone());
        let threads = config
            .worker_threads
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        // Metrics outermost, so refused calls are counted too.
        let layer = tower_layer::Stack::new(
            crate::api::layer::AuthGateLayer(auth),
            crate::api::layer::RpcMetricsLayer(metrics),
        );
        let serving = serving::spawn(
            threads,
            config.max_streams_per_connection,
            routes,
            layer,
            client_tls,
            stopping,
        )
        .map_err(ServerError::Runtime)?;
        serving::accept(listener, serving.conns.clone(), serving.stop.clone());

        let mut stopped = node.shutdown_signal();
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        tokio::select! {
            r = serving.finished() => r?,
            _ = async { Node::stopped(&mut stopped).await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_ms = config.shutdown_grace_ms, "in-flight calls outlived the shutdown grace period");
            }
        }
        node.stop().await;
        let _ = peer_stop.send(true);
        // Bounded: Raft has stopped, and a peer call still open cannot be
        // served any more. (Once seen in a nemesis run: a node's peer
        // server did not finish for 10 s after its Raft stopped, and the
        // container was killed; the cause is not known.)
        if tokio::time::timeout(PEER_DRAIN, peer_server).await.is_err() {
            tracing::warn!(
                drain_ms = PEER_DRAIN.as_millis() as u64,
                "peer connections still open after Raft stopped; exiting without them"
            );
        }
        tracing::info!("arbiter stopped");
        if let Some(why) = failed.get() {
            return Err(ServerError::RaftFailed(why.clone()));
        }
        match &*node.admission().borrow() {
            node::Admission::Refused(why) => Err(ServerError::Refused(why.clone())),
            _ => Ok(()),
        }
    }
}

/// Waits for `shutdown`, or for this node to be refused by its peers (see
/// `node::admission`), or for its Raft to stop on a fatal error (recorded
/// in `failed`), then marks every service NOT_SERVING, hands leadership
/// over (unless Raft failed) and starts the node's shutdown. A refused or
/// failed node shuts down as if asked to and reports why: a failed one
/// could never serve again, so it exits non-zero and its supervisor starts
/// it afresh, from what is on disk.
async fn stop_when(
    shutdown: impl Future<Output = ()>,
    node: Arc<Node>,
    health: tonic_health::server::HealthReporter,
    failed: Arc<std::sync::OnceLock<String>>,
) {
    let mut admission = node.admission();
    tokio::select! {
        _ = shutdown => {}
        _ = admission.wait_for(|a| matches!(a, node::Admission::Refused(_))) => {}
        why = node.raft_failed() => {
            tracing::error!(
                error = %why,
                "Raft stopped on a fatal error: storage failed or its core panicked; \
                 shutting down so that the node is restarted"
            );
            let _ = failed.set(why);
        }
    }
    tracing::info!("shutting down: draining in-flight calls");
    for name in node::READY_SERVICES.iter().chain(&[""]) {
        health
            .set_service_status(*name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    // A leader hands over first: its calls in flight and the ones still
    // arriving go to the new leader.
    if failed.get().is_none() {
        if let Some(new_leader) = node.hand_over().await {
            tracing::info!(new_leader, "leadership handed over");
        }
    }
    node.begin_shutdown();
}
