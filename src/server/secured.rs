//! The ports' TLS and the auth file, loaded and checked for a safe
//! combination before anything is served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::security;

/// The TLS configurations and auth rules a server was started with, each
/// re-read when its files change.
pub(super) struct Security {
    pub(super) client: Option<Arc<security::Reloading<rustls::ServerConfig>>>,
    pub(super) peer_server: Option<Arc<security::Reloading<rustls::ServerConfig>>>,
    pub(super) peer_client: Option<Arc<security::Reloading<rustls::ClientConfig>>>,
    pub(super) metrics: Option<Arc<security::Reloading<rustls::ServerConfig>>>,
    pub(super) auth: Option<security::Auth>,
    /// Auth is on and the peer port has no TLS (see
    /// [`warn_insecure_peer_port`]).
    pub(super) insecure_peers: bool,
}

impl Security {
    pub(super) fn load(config: &Config) -> Result<Security, String> {
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
pub(super) async fn warn_insecure_peer_port(peer: SocketAddr) {
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
