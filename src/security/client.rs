//! Connecting to Arbiter as a client (the CLI, tests): TLS with a CA and an
//! optional client certificate, and a bearer token on every call.

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use super::tls::{ClientFiles, Connector};
use super::Reloading;

/// Adds `authorization: Bearer <token>` to every call (when there is a
/// token).
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        token
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| "the token must be printable ASCII".to_owned())
            })
            .transpose()
            .map(BearerToken)
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A client connection: a channel whose calls carry the token.
pub type Conn = InterceptedService<Channel, BearerToken>;

/// How to reach a server.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// TLS: the CA to trust and, for mutual TLS, a certificate and key.
    pub tls: Option<ClientFiles>,
    pub token: Option<String>,
    /// Verify the server's certificate for this name rather than the
    /// address's host (e.g. `localhost` when calling a pod by its IP).
    pub server_name: Option<String>,
}

/// Connects to `target` (`http://HOST:PORT`, or `https://` with TLS).
pub async fn connect(target: &str, options: &ClientOptions) -> Result<Conn, String> {
    let https = target.starts_with("https://");
    let target = match (&options.tls, https) {
        // TLS options given with an http:// address: use TLS anyway.
        (Some(_), false) => target.replacen("http://", "https://", 1),
        (None, true) => {
            return Err(format!(
                "{target}: TLS needs --tls-ca (the CA that signed the server's certificate)"
            ))
        }
        _ => target.to_owned(),
    };
    let endpoint = Endpoint::from_shared(target.clone())
        .map_err(|e| format!("{target:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5));
    let token = BearerToken::new(options.token.as_deref())?;
    let channel = match &options.tls {
        Some(files) => {
            let files = files.clone();
            let tls = Reloading::start("client TLS", Vec::new(), move || files.load())?;
            Connector::new(tls)
                .with_server_name(options.server_name.clone())
                .connect(endpoint)
                .await
        }
        None => endpoint.connect().await,
    }
    .map_err(|e| {
        let mut msg = format!("cannot reach {target}: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        msg
    })?;
    Ok(InterceptedService::new(channel, token))
}
