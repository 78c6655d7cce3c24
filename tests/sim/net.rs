//! The simulated network: every peer connection is a pair of in-memory
//! byte streams joined by relay tasks that this module controls.
//!
//! It models what TCP does under faults, not a datagram network: within a
//! connection bytes arrive in order, each chunk after its own delay (drawn
//! from the seed); messages on different connections reorder freely. A cut
//! from `a` to `b` holds `a`'s bytes towards `b` until it heals (then they
//! arrive, stale, as retransmissions would), and a new connection across a
//! cut in either direction fails after the connect timeout. A reset drops
//! every connection between two nodes, so both ends see them break and
//! whatever was in flight is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::rng::Rng;

/// Bytes buffered by each in-memory stream.
const PIPE_BYTES: usize = 64 << 10;
/// Chunks in flight on one direction of a connection.
const IN_FLIGHT: usize = 256;
/// How long a connection attempt across a cut takes to fail (the peer
/// channel's connect timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub type NodeId = u64;

/// A connection's two ends and its relay tasks (one each way).
type Link = ((NodeId, NodeId), [JoinHandle<()>; 2]);

struct State {
    /// Who listens at each address.
    listeners: BTreeMap<String, (NodeId, mpsc::Sender<io::Result<DuplexStream>>)>,
    /// Directed cuts: bytes from `.0` to `.1` do not arrive.
    cuts: BTreeSet<(NodeId, NodeId)>,
    /// Per-chunk delay range, in ms.
    delay: (u64, u64),
    rng: Rng,
    /// The relay tasks of every open connection, by its two ends.
    links: Vec<Link>,
}

pub struct Net {
    state: Mutex<State>,
    /// Bumped whenever a cut heals, to wake held relays.
    healed: watch::Sender<u64>,
}

impl Net {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                listeners: BTreeMap::new(),
                cuts: BTreeSet::new(),
                delay: (0, 2),
                rng: Rng::new(seed ^ 0x6e65_7477_6f72_6b00),
                links: Vec::new(),
            }),
            healed: watch::channel(0).0,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections to `addr` are handed to `incoming`, as node `id`'s.
    pub fn listen(&self, addr: &str, id: NodeId, incoming: mpsc::Sender<io::Result<DuplexStream>>) {
        self.state()
            .listeners
            .insert(addr.to_owned(), (id, incoming));
    }

    /// Node `id`, listening at `addr`, loses power: every connection to or
    /// from it breaks, and dialling it is refused (its own dialler stops
    /// connecting: `cluster::Cluster::boot`).
    pub fn unplug(&self, id: NodeId, addr: &str) {
        let mut s = self.state();
        s.listeners.remove(addr);
        s.links.retain(|((x, y), tasks)| {
            let hit = *x == id || *y == id;
            if hit {
                tasks.iter().for_each(JoinHandle::abort);
            }
            !hit
        });
    }

    /// Cuts `from` → `to` (one way).
    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.state().cuts.insert((from, to));
    }

    /// Cuts both ways between `node` and every other node.
    pub fn isolate(&self, node: NodeId, all: &[NodeId]) {
        for &other in all.iter().filter(|&&o| o != node) {
            self.cut(node, other);
            self.cut(other, node);
        }
    }

    /// Heals every cut.
    pub fn heal(&self) {
        self.state().cuts.clear();
        self.healed.send_modify(|g| *g += 1);
    }

    /// Sets the per-chunk delay range (ms).
    pub fn set_delay(&self, min_ms: u64, max_ms: u64) {
        self.state().delay = (min_ms, max_ms.max(min_ms));
    }

    /// Breaks every connection between `a` and `b`.
    pub fn reset(&self, a: NodeId, b: NodeId) {
        let mut s = self.state();
        s.links.retain(|((x, y), tasks)| {
            let hit = (*x, *y) == (a, b) || (*x, *y) == (b, a);
            if hit {
                tasks.iter().for_each(JoinHandle::abort);
            }
            !hit
        });
    }

    fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.state().cuts.contains(&(from, to))
    }

    fn next_delay(&self) -> Duration {
        let mut s = self.state();
        let (lo, hi) = s.delay;
        Duration::from_millis(lo + s.rng.below(hi - lo + 1))
    }

    /// Opens a connection from node `from` to `addr`.
    pub async fn dial(self: Arc<Self>, from: NodeId, addr: String) -> io::Result<DuplexStream> {
        let listener = self.state().listeners.get(&addr).cloned();
        let Some((to, incoming)) = listener else {
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, addr));
        };
        if self.is_cut(from, to) || self.is_cut(to, from) {
            tokio::time::sleep(CONNECT_TIMEOUT).await;
            return Err(io::Error::new(io::ErrorKind::TimedOut, addr));
        }
        let (client, client_far) = tokio::io::duplex(PIPE_BYTES);
        let (server, server_far) = tokio::io::duplex(PIPE_BYTES);
        let (client_read, client_write) = tokio::io::split(client_far);
        let (server_read, server_write) = tokio::io::split(server_far);
        let there = tokio::spawn(self.clone().relay(from, to, client_read, server_write));
        let back = tokio::spawn(self.clone().relay(to, from, server_read, client_write));
        {
            let mut s = self.state();
            s.links
                .retain(|(_, tasks)| !tasks.iter().all(JoinHandle::is_finished));
            s.links.push(((from, to), [there, back]));
        }
        incoming
            .send(Ok(server))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, "node stopped"))?;
        Ok(client)
    }

    /// Carries bytes `from` → `to`: each chunk is due its delay after it
    /// was sent (never before the chunk ahead of it), and waits while the
    /// direction is cut.
    async fn relay(
        self: Arc<Self>,
        from: NodeId,
        to: NodeId,
        mut read: tokio::io::ReadHalf<DuplexStream>,
        mut write: tokio::io::WriteHalf<DuplexStream>,
    ) {
        let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
        let net = self.clone();
        let reader = async move {
            let mut last = Instant::now();
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                last = last.max(Instant::now() + net.next_delay());
                if tx.send((last, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        };
        let writer = async move {
            let mut healed = self.healed.subscribe();
            while let Some((due, bytes)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                while self.is_cut(from, to) {
                    if healed.changed().await.is_err() {
                        return;
                    }
                }
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            let _ = write.shutdown().await;
        };
        tokio::join!(reader, writer);
    }
}
