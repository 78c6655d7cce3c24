//! Client connections are served by `n` threads, each running its own
//! single-threaded event loop; the acceptor hands each new connection to the
//! next thread in turn. A connection stays on one thread for its life, so
//! the HTTP/2 connection task and the per-call tasks it spawns run on the same
//! thread: replies that become ready together leave in one write, and no call
//! pays for a cross-thread wake-up (BENCHMARKS.md has the measurements).

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
static IN_HANDSHAKE: std::sync::Mutex<Option<std::collections::HashMap<std::net::IpAddr, u32>>> =
    std::sync::Mutex::new(None);

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
                        ::metrics::counter!("arbiter_tls_handshakes_refused_total").increment(1);
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
                        ::metrics::counter!("arbiter_tls_handshake_failures_total").increment(1);
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
