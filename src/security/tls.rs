//! TLS with rustls (the ring provider): server and client configurations
//! built from PEM files, connections that remember the client certificate's
//! names, and a connector for tonic channels.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::reload::Reloading;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Every certificate in a PEM file (a chain: the leaf first).
pub fn certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("{}: no usable private key: {e}", path.display()))
}

fn roots(pem: &[u8], path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    for cert in certs(pem, path)? {
        store
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Arc::new(store))
}

/// Whether a server asks its clients for certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCerts {
    /// Not asked for (clients authenticate with tokens, or not at all).
    None,
    /// Verified against the CA when presented; a client may present none.
    Optional,
    /// Required and verified: a client without one is refused at the
    /// handshake (the peer port).
    Required,
}

/// The files of one server identity.
#[derive(Clone, Debug)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA client certificates must chain to (with `ClientCerts` other
    /// than `None`).
    pub ca: Option<PathBuf>,
    pub client_certs: ClientCerts,
}

impl ServerFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.cert.clone(), self.key.clone()];
        p.extend(self.ca.clone());
        p
    }

    /// Builds the rustls configuration from the files' current contents.
    pub fn load(&self) -> Result<ServerConfig, String> {
        let chain = certs(&read(&self.cert)?, &self.cert)?;
        let key = key(&read(&self.key)?, &self.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match (&self.ca, self.client_certs) {
            (_, ClientCerts::None) => builder.with_no_client_auth(),
            (None, _) => return Err("client certificates need a CA file".into()),
            (Some(ca), mode) => {
                let v =
                    WebPkiClientVerifier::builder_with_provider(roots(&read(ca)?, ca)?, provider());
                let v = if mode == ClientCerts::Optional {
                    v.allow_unauthenticated()
                } else {
                    v
                };
                builder.with_client_cert_verifier(
                    v.build().map_err(|e| format!("{}: {e}", ca.display()))?,
                )
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| format!("{} / {}: {e}", self.cert.display(), self.key.display()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Loads the configuration now (an error here stops the server) and
    /// re-reads it whenever one of the files changes.
    pub fn watch(self, what: &'static str) -> Result<Arc<Reloading<ServerConfig>>, String> {
        let paths = self.paths();
        Reloading::start(what, paths, move || self.load())
    }
}

/// The files of a client identity: the CA to verify servers with, and
/// optionally a certificate and key to present.
#[derive(Clone, Debug)]
pub struct ClientFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.ca.clone()];
        p.extend(self.cert.clone());
        p.extend(self.key.clone());
        p
    }

    pub fn load(&self) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots(&read(&self.ca)?, &self.ca)?);
        let mut config = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(certs(&read(c)?, c)?, key(&read(k)?, k)?)
                .map_err(|e| format!("{} / {}: {e}", c.display(), k.display()))?,
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("a client certificate needs both its cert and key files".into()),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    pub fn watch(self, what: &'static str) -> Result<Arc<Reloading<ClientConfig>>, String> {
        let paths = self.paths();
        Reloading::start(what, paths, move || self.load())
    }
}

/// What a served connection tells each of its calls (tonic puts it in the
/// request's extensions).
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The verified client certificate's common names, DNS and URI subject
    /// alternative names; empty without one.
    pub cert_names: Arc<[String]>,
    /// The verified certificate's DNS and IP subject alternative names:
    /// the hosts it speaks for (the peer port matches them against the
    /// members' peer hosts).
    pub cert_hosts: Arc<[String]>,
}

/// A served connection: plain TCP or TLS.
pub enum ServerIo {
    Plain(TcpStream, ConnInfo),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, ConnInfo),
}

/// The names a certificate can be matched by: subject common names, DNS
/// and URI subject alternative names.
pub fn cert_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(s)
                | x509_parser::extensions::GeneralName::URI(s) => names.push((*s).to_owned()),
                _ => {}
            }
        }
    }
    names
}

/// The hosts a certificate speaks for: its DNS and IP subject alternative
/// names (IP addresses in their usual text form).
pub fn cert_hosts(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut hosts = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(s) => hosts.push((*s).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    hosts.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    hosts
}

/// Whether a certificate's host name `name` (which may start with one
/// wildcard label, `*.peers.ns.svc`) covers `host`, as TLS clients match a
/// server's name: case-insensitively, a wildcard standing for exactly one
/// label. IP addresses match only exactly (in any text form).
pub fn host_matches(name: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return name.parse::<std::net::IpAddr>() == Ok(ip);
    }
    if let Some(rest) = name.strip_prefix("*.") {
        return match host.split_once('.') {
            Some((label, domain)) => !label.is_empty() && domain.eq_ignore_ascii_case(rest),
            None => false,
        };
    }
    name.eq_ignore_ascii_case(host)
}

/// Completes the server side of a connection: with `tls`, the handshake
/// (bounded by [`HANDSHAKE_TIMEOUT`]) under the configuration current now.
pub async fn accept(tcp: TcpStream, tls: Option<&Reloading<ServerConfig>>) -> io::Result<ServerIo> {
    let remote = tcp.peer_addr().ok();
    let Some(tls) = tls else {
        return Ok(ServerIo::Plain(
            tcp,
            ConnInfo {
                remote,
                cert_names: Arc::from([]),
                cert_hosts: Arc::from([]),
            },
        ));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first());
    let names = leaf.map(|c| cert_names(c.as_ref())).unwrap_or_default();
    let hosts = leaf.map(|c| cert_hosts(c.as_ref())).unwrap_or_default();
    Ok(ServerIo::Tls(
        Box::new(stream),
        ConnInfo {
            remote,
            cert_names: names.into(),
            cert_hosts: hosts.into(),
        },
    ))
}

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            ServerIo::Plain(_, i) | ServerIo::Tls(_, i) => i.clone(),
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            ServerIo::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            ServerIo::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerIo::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Plain(s, _) => s.is_write_vectored(),
            ServerIo::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s, _) => Pin::new(s).poll_flush(cx),
            ServerIo::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            ServerIo::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connects tonic channels over TLS: verifies the server's certificate
/// against the CA for the host name (or IP) in the address, and presents
/// the client certificate if there is one. Reads the configuration
/// current at each connection.
#[derive(Clone)]
pub struct Connector {
    tls: Arc<Reloading<ClientConfig>>,
    /// The name to verify the server's certificate for, instead of the
    /// address's host.
    server_name: Option<String>,
}

impl Connector {
    pub fn new(tls: Arc<Reloading<ClientConfig>>) -> Self {
        Self {
            tls,
            server_name: None,
        }
    }

    /// Verifies servers' certificates for `name` whatever the address.
    pub fn with_server_name(mut self, name: Option<String>) -> Self {
        self.server_name = name;
        self
    }

    /// A lazily connected channel to `endpoint`.
    pub fn channel(&self, endpoint: tonic::transport::Endpoint) -> tonic::transport::Channel {
        endpoint.connect_with_connector_lazy(self.clone())
    }

    /// A channel to `endpoint`, connected now.
    pub async fn connect(
        &self,
        endpoint: tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        endpoint.connect_with_connector(self.clone()).await
    }
}

type Connecting = Pin<
    Box<
        dyn std::future::Future<
                Output = io::Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                >,
            > + Send,
    >,
>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Connecting {
        let config = self.tls.current();
        let verify_as = self.server_name.clone();
        Box::pin(async move {
            let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: {m}"));
            let host = uri.host().ok_or_else(|| bad("no host"))?;
            let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
            // An IPv6 literal comes bracketed in a URI.
            let name = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let server_name = ServerName::try_from(verify_as.unwrap_or_else(|| name.clone()))
                .map_err(|_| bad("not a host name or IP"))?;
            let tcp = TcpStream::connect((name.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::host_matches;

    #[test]
    fn a_certificate_name_covers_a_host_as_tls_clients_match_it() {
        assert!(host_matches("arbiter-0.peers.ns", "ARBITER-0.peers.ns"));
        assert!(host_matches("*.peers.ns", "arbiter-1.peers.ns"));
        assert!(
            !host_matches("*.peers.ns", "a.b.peers.ns"),
            "one label only"
        );
        assert!(!host_matches("*.peers.ns", "peers.ns"));
        assert!(!host_matches("arbiter-0.peers.ns", "arbiter-1.peers.ns"));
        assert!(host_matches("127.0.0.2", "127.0.0.2"));
        assert!(!host_matches("127.0.0.2", "127.0.0.3"));
        assert!(host_matches("::1", "[0:0:0:0:0:0:0:1]"));
        assert!(
            !host_matches("*.0.0.1", "127.0.0.1"),
            "no wildcard over an address"
        );
    }
}
