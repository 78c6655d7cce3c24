//! Binds the ports, serves gRPC (the three services, health, reflection) and
//! metrics, and shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::api::{self, Bounds, Shared};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::metrics::{self, Metrics};
use crate::node::Node;
use crate::proto::idempotency_server::IdempotencyServer;
use crate::proto::leases_server::LeasesServer;
use crate::proto::rate_limiter_server::RateLimiterServer;

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
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

const GRPC_SERVICES: [&str; 3] = [
    "arbiter.v1.RateLimiter",
    "arbiter.v1.Leases",
    "arbiter.v1.Idempotency",
];

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight
/// calls finish (up to `shutdown_grace_ms`), ends watch streams and returns.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let bind_err = |addr| move |source| ServerError::Bind { addr, source };
    let incoming = TcpIncoming::bind(config.listen)
        .map_err(bind_err(config.listen))?
        .with_nodelay(Some(true));
    let client_addr = incoming.local_addr().map_err(bind_err(config.listen))?;
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
    let node = Node::start(
        config.engine(),
        &config.data_dir,
        client_addr.to_string(),
        config.snapshot_logs,
        Arc::new(SystemClock),
    )
    .await?;
    let shared = Shared {
        node: node.clone(),
        metrics: metrics.clone(),
        bounds: Bounds::from(&config),
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in GRPC_SERVICES.iter().chain(&[""]) {
        health
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    tokio::spawn(
        node.clone()
            .run_sweeper(Duration::from_millis(config.sweep_interval_ms.max(1))),
    );
    tokio::spawn(metrics::serve(
        metrics_listener,
        handle,
        metrics,
        node.clone(),
        node.shutdown_signal(),
    ));

    // Shutdown order: mark NOT_SERVING, end watch streams and background
    // tasks, stop accepting; tonic then waits for in-flight calls.
    let stopping = {
        let node = node.clone();
        let health = health.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight calls");
            for name in GRPC_SERVICES.iter().chain(&[""]) {
                health
                    .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
            node.begin_shutdown();
        }
    };

    tracing::info!(
        client = %client_addr,
        metrics = %metrics_addr,
        data_dir = %config.data_dir.display(),
        "arbiter serving"
    );

    let serve = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(RateLimiterServer::new(
            api::rate_limiter::RateLimiterService(shared.clone()),
        ))
        .add_service(LeasesServer::new(api::leases::LeasesService(
            shared.clone(),
        )))
        .add_service(IdempotencyServer::new(
            api::idempotency::IdempotencyService(shared),
        ))
        .serve_with_incoming_shutdown(incoming, stopping);
    tokio::pin!(serve);

    let mut stopped = node.shutdown_signal();
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    tokio::select! {
        r = &mut serve => r?,
        _ = async { Node::stopped(&mut stopped).await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_ms = config.shutdown_grace_ms, "in-flight calls outlived the shutdown grace period");
        }
    }
    node.stop_raft().await;
    tracing::info!("arbiter stopped");
    Ok(())
}
