//! Who may talk to Arbiter: TLS on the client, peer and metrics ports
//! ([`tls`]), principals and namespaces from the auth file ([`auth`]), and
//! files re-read when they change ([`reload`]). "Security" in the README
//! has the threat model and how each part is turned on.

pub mod auth;
pub mod client;
pub mod reload;
pub mod tls;

pub use auth::{Auth, Caller, Principal, Rules, PRINCIPAL_HEADER};
pub use client::{connect, ClientOptions, Conn};
pub use reload::Reloading;
pub use tls::{ClientCerts, ClientFiles, ConnInfo, Connector, ServerFiles};
