//! Connections to the targets: loopback checks, TLS, and for
//! `--route slots` the owner of each key.

use std::net::SocketAddr;
use std::time::Duration;

use arbiter::proto as pb;
use tonic::transport::{Channel, Endpoint};

use crate::{key_name, Args, Workload, NAMED_KEYS};

/// The target as a loopback address; anything else is refused.
pub(crate) async fn resolve_loopback(target: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target)
        .await
        .map_err(|e| format!("--target {target:?}: {e}"))?
        .collect();
    match addrs.first() {
        Some(a) if addrs.iter().all(|a| a.ip().is_loopback()) => Ok(*a),
        Some(_) => Err(format!(
            "--target {target:?} is not a loopback address; arbiter-bench only loads this machine"
        )),
        None => Err(format!("--target {target:?} resolved to nothing")),
    }
}

/// One channel per `--connections`; connection i goes to target
/// i % targets.
pub(crate) async fn channels(args: &Args, addrs: &[SocketAddr]) -> Result<Vec<Channel>, String> {
    let mut channels = Vec::new();
    let tls = match &args.tls_ca {
        Some(ca) => {
            let files = arbiter::security::ClientFiles {
                ca: ca.clone(),
                cert: None,
                key: None,
            };
            let config =
                arbiter::security::Reloading::start("bench TLS", Vec::new(), move || files.load())?;
            Some(
                arbiter::security::Connector::new(config)
                    .with_server_name(Some(args.tls_server_name.clone())),
            )
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    for i in 0..args.connections {
        let addr = addrs[i % addrs.len()];
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        let ch = match &tls {
            Some(tls) => tls.connect(endpoint).await,
            None => endpoint.connect().await,
        }
        .map_err(|e| {
            let cause = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
            format!("cannot connect to {addr}: {e}{cause}")
        })?;
        channels.push(ch);
    }
    Ok(channels)
}

/// For `--route slots`: asks each target its node id and the first the
/// slot map, and gives each key the target that owns its slot.
pub(crate) async fn slot_routes(
    args: &Args,
    channels: &[Channel],
    targets: usize,
) -> Result<Vec<u16>, String> {
    use arbiter::proto::cluster_client::ClusterClient;
    if args.workload != Workload::Check {
        return Err("--route slots is for the check workload".into());
    }
    if args.keys > NAMED_KEYS || channels.len() < targets || !channels.len().is_multiple_of(targets)
    {
        return Err(format!(
            "--route slots needs --keys at most {NAMED_KEYS} and --connections a multiple of the targets"
        ));
    }
    let mut node_target = std::collections::HashMap::new();
    let mut owners = Vec::new();
    for (t, ch) in channels.iter().take(targets).enumerate() {
        let st = ClusterClient::new(ch.clone())
            .status(pb::ClusterStatusRequest {
                slot_owners: t == 0,
            })
            .await
            .map_err(|e| format!("status of target {t}: {}", e.message()))?
            .into_inner();
        node_target.insert(st.node_id, t as u16);
        if t == 0 {
            owners = st.slot_owners;
        }
    }
    if owners.is_empty() {
        return Err("no slot map: start the cluster with --slot-owners spread".into());
    }
    Ok((0..args.keys)
        .map(|n| {
            let slot = arbiter::engine::slot_of(&key_name(args, n));
            node_target.get(&owners[slot]).copied().unwrap_or(0)
        })
        .collect())
}
