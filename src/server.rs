//! Binds the ports, serves gRPC (the three services, health, reflection) and
//! metrics, and shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Server;

use crate::api::{self, Bounds, Shared};
use crate::clock::Clock;
use crate::config::Config;
use crate::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use crate::limits::NamedLimits;
use crate::metrics::{self, Metrics};
use crate::node::{self, Node, PeerService};
use crate::proto::cluster_server::ClusterServer;
use crate::proto::idempotency_server::IdempotencyServer;
use crate::proto::leases_server::LeasesServer;
use crate::proto::raft_peer_server::RaftPeerServer;
use crate::proto::rate_limiter_server::RateLimiterServer;
use crate::raft::network::PEER_MESSAGE_LIMIT;
use crate::security::{self, Connector};

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
    let bind_err = |addr| move |source| ServerError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(config.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(bind_err(config.listen))?;
    let client_addr = listener.local_addr().map_err(bind_err(config.listen))?;
    let peer_listener = tokio::net::TcpListener::bind(config.peer_listen)
        .await
        .map_err(bind_err(config.peer_listen))?;
    let peer_addr = peer_listener
        .local_addr()
        .map_err(bind_err(config.peer_listen))?;
    let tls = Security::load(&config).map_err(ServerError::Security)?;
    let hostname = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok());
    let membership = config
        .membership(peer_addr, hostname.as_deref())
        .map_err(ServerError::Cluster)?;
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(bind_err(config.metrics_listen))?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(bind_err(config.metrics_listen))?;

    let handle = match metrics::install() {
        Ok(h) => h,
        Err(e) => {
            // Only possible when a recorder is already installed in this
            // process; serve an empty exposition rather than fail.
            tracing::warn!(error = %e, "metrics recorder not installed");
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle()
        }
    };
    let metrics = Arc::new(Metrics::new());
    ::metrics::gauge!("arbiter_insecure_peer_port").set(if tls.insecure_peers { 1.0 } else { 0.0 });
    let node = Node::start(node::Options {
        engine: config.engine(),
        data_dir: config.data_dir.clone(),
        membership,
        snapshot_logs: config.snapshot_logs,
        leader_wait: Duration::from_millis(config.leader_wait_ms.max(1)),
        member_catch_up: Duration::from_millis(config.member_catch_up_ms.max(1)),
        limit_sync: Duration::from_millis(config.limit_sync_ms.max(1)),
        limit_sweep: Duration::from_millis(config.sweep_interval_ms.max(1)),
        clock,
        watch_limits: config.watch_limits(),
        max_clock_skew_ms: config.max_clock_skew_ms,
        peer_tls: tls.peer_client.clone().map(Connector::new),
        cluster_token: config.cluster_token.clone(),
        accept_peers_without_cluster_id: config.accept_peers_without_cluster_id,
        simulation: None,
    })
    .await?;

    // Raft traffic keeps flowing while client calls drain; it stops last.
    let (peer_stop, peer_stopped) = tokio::sync::watch::channel(false);
    let (peer_tx, peer_rx) = tokio::sync::mpsc::channel(serving::HANDOFF);
    serving::accept(peer_listener, vec![peer_tx], peer_stopped.clone());
    let peer_server = {
        let mut stopped = peer_stopped;
        tokio::spawn(
            Server::builder()
                // Raft, pre-votes and forwarded calls from a few members.
                .max_concurrent_streams(Some(PEER_STREAMS))
                .layer(crate::api::layer::PeerBodyLimitLayer)
                .add_service(
                    RaftPeerServer::new(PeerService::new(
                        node.clone(),
                        tls.auth.clone(),
                        tls.peer_server.is_some(),
                        Some(Bounds::from(&config)),
                    ))
                    .max_decoding_message_size(PEER_MESSAGE_LIMIT)
                    .max_encoding_message_size(PEER_MESSAGE_LIMIT),
                )
                .serve_with_incoming_shutdown(
                    serving::handshakes(peer_rx, tls.peer_server.clone()),
                    async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    },
                ),
        )
    };
    if tls.insecure_peers {
        let mut stop = node.shutdown_signal();
        node.spawn_task("insecure peer port", async move {
            tokio::select! {
                _ = warn_insecure_peer_port(peer_addr) => {}
                _ = Node::stopped(&mut stop) => {}
            }
        });
    }
    let limits = match &config.limits {
        Some(path) => NamedLimits::watch(path).map_err(ServerError::Limits)?,
        None => NamedLimits::none(),
    };
    let shared = Shared {
        node: node.clone(),
        metrics: metrics.clone(),
        bounds: Bounds::from(&config),
        auth: tls.auth.clone(),
        limits: limits.clone(),
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    // Liveness: the empty service name, serving while the process runs.
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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(crate::envoy::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    node.spawn_task(
        "metrics",
        metrics::serve(
            metrics_listener,
            handle,
            metrics.clone(),
            node.clone(),
            tls.metrics.clone(),
            node.shutdown_signal(),
        ),
    );

    let shared_metrics = metrics;
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection)
        .add_service(RateLimiterServer::new(
            api::rate_limiter::RateLimiterService(shared.clone()),
        ))
        .add_service(LeasesServer::new(api::leases::LeasesService(
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
            },
        }))
        .add_service(ClusterServer::new(api::cluster::ClusterService(shared)))
        .prepare();
    let addrs = Addrs {
        client: client_addr,
        peer: peer_addr,
        metrics: metrics_addr,
    };
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
        listener,
        routes,
        health,
        metrics: shared_metrics,
        peer_stop,
        peer_server,
        client_tls: tls.client,
        auth: tls.auth.clone(),
    })
}

/// The TLS configurations and auth rules a server was started with, each
/// re-read when its files change.
struct Security {
    client: Option<Arc<security::Reloading<rustls::ServerConfig>>>,
    peer_server: Option<Arc<security::Reloading<rustls::ServerConfig>>>,
    peer_client: Option<Arc<security::Reloading<rustls::ClientConfig>>>,
    metrics: Option<Arc<security::Reloading<rustls::ServerConfig>>>,
    auth: Option<security::Auth>,
    /// Auth is on and the peer port has no TLS (see
    /// [`warn_insecure_peer_port`]).
    insecure_peers: bool,
}

impl Security {
    fn load(config: &Config) -> Result<Security, String> {
        let client = config
            .client_tls()
            .map(|f| f.watch("client TLS"))
            .transpose()?;
        let (peer_server, peer_client) = match config.peer_tls() {
            Some((server, client)) => (
                Some(server.watch("peer TLS")?),
                Some(client.watch("peer TLS (outgoing)")?),
            ),
            None => (None, None),
        };
        let metrics = config
            .metrics_tls()
            .map(|f| f.watch("metrics TLS"))
            .transpose()?;
        let auth = config
            .auth_file
            .clone()
            .map(security::auth::watch)
            .transpose()?;
        if config.tls_client_cert_optional && auth.is_none() {
            return Err(
                "--tls-client-cert-optional needs --auth-file: without it a client with no \
                 certificate would be let in as anyone, and the client CA would restrict nothing"
                    .to_owned(),
            );
        }
        let exposed = !config.listen.ip().is_loopback();
        if auth.is_none() && exposed {
            tracing::warn!(
                listen = %config.listen,
                "no --auth-file: any client that reaches this port may use every key and lease"
            );
        }
        if auth.is_some() && client.is_none() && exposed {
            tracing::warn!(
                "--auth-file without --tls-cert: bearer tokens cross the network in clear text"
            );
        }
        let clustered = config.peers.len() > 1 || config.replicas.is_some_and(|n| n > 1);
        let insecure_peers = auth.is_some()
            && peer_server.is_none()
            && (clustered || !config.peer_listen.ip().is_loopback());
        if insecure_peers && clustered && !config.insecure_peer_port {
            return Err(
                "--auth-file in a cluster needs mutual TLS on the peer port (--peer-tls-cert, \
                 --peer-tls-key, --peer-tls-ca): without it anyone who reaches the peer port can \
                 speak for any member and forward calls as any principal. To run so anyway, \
                 pass --insecure-peer-port"
                    .to_owned(),
            );
        }
        Ok(Security {
            client,
            peer_server,
            peer_client,
            metrics,
            auth,
            insecure_peers,
        })
    }
}

/// Says, every minute, that the peer port takes anyone's word (auth on,
/// no peer TLS: `--insecure-peer-port`, or a single node whose peer port
/// is not on loopback).
async fn warn_insecure_peer_port(peer: SocketAddr) {
    loop {
        tracing::warn!(
            %peer,
            "the peer port has no TLS (--insecure-peer-port, or a single node's peer port off \
             loopback): anyone who reaches it can speak for a member and forward calls as any \
             principal; set --peer-tls-cert/--peer-tls-key/--peer-tls-ca"
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
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
        let stopping = {
            let node = node.clone();
            let failed = failed.clone();
            let mut admission = node.admission();
            async move {
                // A node refused by its peers (see `node::admission`) shuts
                // down as if asked to, and reports why. So does one whose
                // Raft stopped on a fatal error (a failed disk write): it
                // could never serve again, so it exits non-zero and its
                // supervisor starts it afresh, from what is on disk.
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
                // A leader hands over first: its calls in flight and the
                // ones still arriving go to the new leader.
                if failed.get().is_none() {
                    if let Some(new_leader) = node.hand_over().await {
                        tracing::info!(new_leader, "leadership handed over");
                    }
                }
                node.begin_shutdown();
            }
        };
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
        let _ = peer_server.await;
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

/// Client connections are served by `n` threads, each running its own
/// single-threaded event loop; the acceptor hands each new connection to the
/// next thread in turn. A connection stays on one thread for its life, so
/// the HTTP/2 connection task and the per-call tasks it spawns run on the same
/// thread: replies that become ready together leave in one write, and no call
/// pays for a cross-thread wake-up (BENCHMARKS.md has the measurements).
mod serving {
    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::{mpsc, oneshot, watch, Semaphore};
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::service::Routes;
    use tonic::transport::Server;

    use super::ServerError;
    use crate::api::layer::{AuthGateLayer, RpcMetricsLayer};
    use crate::security::tls::{self, ServerIo};
    use crate::security::Reloading;

    /// Accepted connections waiting for a serving thread to take them up,
    /// per thread, at most.
    pub const HANDOFF: usize = 64;

    /// TLS handshakes in progress per serving thread, at most; past it the
    /// thread takes up no new connection until one finishes.
    const HANDSHAKES: usize = 256;

    /// TLS handshakes in progress from one source address, at most, across
    /// the process; a connection past it is closed at once (counted in
    /// `arbiter_tls_handshakes_refused_total`), so idle connections from a
    /// few sources cannot hold every handshake slot.
    pub const HANDSHAKES_PER_SOURCE: u32 = 16;

    /// Handshakes in progress, by source address.
    static IN_HANDSHAKE: std::sync::Mutex<
        Option<std::collections::HashMap<std::net::IpAddr, u32>>,
    > = std::sync::Mutex::new(None);

    /// One source's handshake slot, given back on drop.
    struct SourceSlot(std::net::IpAddr);

    impl SourceSlot {
        fn take(ip: std::net::IpAddr) -> Option<SourceSlot> {
            let mut map = IN_HANDSHAKE.lock().unwrap_or_else(|e| e.into_inner());
            let n = map
                .get_or_insert_with(Default::default)
                .entry(ip)
                .or_insert(0);
            if *n >= HANDSHAKES_PER_SOURCE {
                return None;
            }
            *n += 1;
            Some(SourceSlot(ip))
        }
    }

    impl Drop for SourceSlot {
        fn drop(&mut self) {
            let mut map = IN_HANDSHAKE.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(map) = map.as_mut() {
                if let Some(n) = map.get_mut(&self.0) {
                    *n -= 1;
                    if *n == 0 {
                        map.remove(&self.0);
                    }
                }
            }
        }
    }

    pub struct Serving {
        pub conns: Vec<mpsc::Sender<std::net::TcpStream>>,
        done: Vec<oneshot::Receiver<Result<(), tonic::transport::Error>>>,
        pub stop: watch::Receiver<bool>,
    }

    /// Takes up handed-over connections on the current runtime and
    /// completes their TLS handshakes (when `tls` is given) concurrently,
    /// yielding the ready connections. A failed handshake is logged and
    /// dropped, never passed to the server.
    pub fn handshakes(
        mut conns: mpsc::Receiver<std::net::TcpStream>,
        tls: Option<Arc<Reloading<rustls::ServerConfig>>>,
    ) -> ReceiverStream<std::io::Result<ServerIo>> {
        let (tx, rx) = mpsc::channel(HANDOFF);
        let pending = Arc::new(Semaphore::new(HANDSHAKES));
        tokio::spawn(async move {
            while let Some(conn) = conns.recv().await {
                // Plaintext needs no handshake: nothing to hold a slot for.
                let slot = match (&tls, conn.peer_addr()) {
                    (Some(_), Ok(peer)) => match SourceSlot::take(peer.ip()) {
                        Some(slot) => Some(slot),
                        None => {
                            ::metrics::counter!("arbiter_tls_handshakes_refused_total")
                                .increment(1);
                            tracing::debug!(%peer, "too many TLS handshakes from one source");
                            continue;
                        }
                    },
                    _ => None,
                };
                let Ok(permit) = pending.clone().acquire_owned().await else {
                    return;
                };
                let tcp = match conn
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpStream::from_std(conn))
                {
                    Ok(tcp) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot take a connection up");
                        continue;
                    }
                };
                let (tx, tls) = (tx.clone(), tls.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let _slot = slot;
                    match tls::accept(tcp, tls.as_deref()).await {
                        Ok(io) => {
                            let _ = tx.send(Ok(io)).await;
                        }
                        Err(e) => {
                            ::metrics::counter!("arbiter_tls_handshake_failures_total")
                                .increment(1);
                            tracing::debug!(error = %e, "TLS handshake failed");
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }

    impl Serving {
        /// Resolves when every serving thread has drained its connections.
        pub async fn finished(self) -> Result<(), ServerError> {
            drop(self.conns);
            for done in self.done {
                // A thread that ended without reporting has panicked;
                // its calls are gone either way.
                if let Ok(r) = done.await {
                    r?;
                }
            }
            Ok(())
        }
    }

    /// Starts `n` serving threads. `stopping` resolves when the server is
    /// asked to stop; each thread then stops taking new calls and returns
    /// once its in-flight calls have finished.
    pub fn spawn(
        n: usize,
        max_streams: u32,
        routes: Routes,
        layer: tower_layer::Stack<AuthGateLayer, RpcMetricsLayer>,
        tls: Option<Arc<Reloading<rustls::ServerConfig>>>,
        stopping: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<Serving> {
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            stopping.await;
            stop_tx.send_replace(true);
            // Keep the sender alive until every receiver is gone.
            stop_tx.closed().await;
        });
        let mut conns = Vec::with_capacity(n);
        let mut done = Vec::with_capacity(n);
        for i in 0..n {
            let (conn_tx, conn_rx) = mpsc::channel::<std::net::TcpStream>(HANDOFF);
            let (done_tx, done_rx) = oneshot::channel();
            let routes = routes.clone();
            let layer = layer.clone();
            let mut stop = stop.clone();
            let tls = tls.clone();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("arbiter-grpc-{i}"))
                .spawn(move || {
                    let incoming = {
                        let _on = runtime.enter();
                        handshakes(conn_rx, tls)
                    };
                    let served = runtime.block_on(
                        Server::builder()
                            .http2_keepalive_interval(Some(Duration::from_secs(30)))
                            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                            .max_concurrent_streams(Some(max_streams))
                            .layer(layer)
                            .add_routes(routes)
                            .serve_with_incoming_shutdown(incoming, async move {
                                let _ = stop.wait_for(|s| *s).await;
                            }),
                    );
                    // Drop every task this thread still holds (and the node
                    // handles in them) before reporting the thread done, so
                    // a stopped server has let go of its data directory.
                    drop(runtime);
                    let _ = done_tx.send(served);
                })?;
            conns.push(conn_tx);
            done.push(done_rx);
        }
        Ok(Serving { conns, done, stop })
    }

    /// Accepts connections until `stop` turns true, handing them out to
    /// `conns` (the serving threads) in turn.
    pub fn accept(
        listener: tokio::net::TcpListener,
        conns: Vec<mpsc::Sender<std::net::TcpStream>>,
        mut stop: watch::Receiver<bool>,
    ) {
        tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                let conn = tokio::select! {
                    r = listener.accept() => r,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let stream = match conn {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors and the like: back off briefly
                        // rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let conn = match stream.set_nodelay(true).and_then(|()| stream.into_std()) {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot hand a connection over");
                        continue;
                    }
                };
                // A serving thread with HANDOFF connections not yet taken
                // up holds the acceptor back: new connections then wait in
                // the kernel's backlog instead of in memory.
                tokio::select! {
                    _ = conns[next % conns.len()].send(conn) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                next = next.wrapping_add(1);
            }
        });
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// With no serving thread taking connections up, the acceptor
        /// hands over HANDOFF and then waits; every connection is handed
        /// over once there is room, none is dropped.
        #[tokio::test]
        async fn the_hand_off_is_bounded_and_loses_no_connection() {
            let (tx, mut rx) = mpsc::channel(HANDOFF);
            let (stop_tx, stop) = watch::channel(false);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            accept(listener, vec![tx], stop);
            let total = HANDOFF + 8;
            let mut clients = Vec::new();
            for _ in 0..total {
                clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while rx.len() < HANDOFF {
                assert!(
                    std::time::Instant::now() < deadline,
                    "only {} handed",
                    rx.len()
                );
                tokio::task::yield_now().await;
            }
            assert_eq!(rx.len(), HANDOFF);
            for n in 0..total {
                let taken = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
                assert!(matches!(taken, Ok(Some(_))), "connection {n}: {taken:?}");
            }
            stop_tx.send_replace(true);
        }
    }
}
