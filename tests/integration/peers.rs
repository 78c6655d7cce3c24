//! The peer port speaks only to members: every message must carry this
//! cluster's id and, for Raft traffic, come from a node id of the
//! membership; with peer TLS the certificate must name a current member
//! (its peer host), so neither a stranger's certificate from the peer CA
//! nor a client's certificate from a shared CA is a member; and auth
//! without peer TLS refuses to start unless explicitly opted out of.

use std::time::Duration;

use arbiter::proto::cluster_client::ClusterClient;
use arbiter::proto::leases_client::LeasesClient;
use arbiter::proto::raft_peer_client::RaftPeerClient;
use arbiter::proto::{
    AcquireRequest, ClusterStatusRequest, ClusterStatusResponse, DecideRequest, PeerMessage,
    RemoveMemberRequest,
};
use arbiter::raft::network::{encode, encode_append};
use arbiter::raft::TypeConfig;
use arbiter::security::{connect, ClientFiles, ClientOptions, Conn};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::Vote;
use tonic::Code;

use crate::cluster::Cluster;
use crate::rate_limiter::{lc, tb};
use crate::security::{Identity, Pki};
use crate::support::{eventually, fresh_dir, refused_start, Server};

async fn status(conn: Conn) -> ClusterStatusResponse {
    ClusterClient::new(conn)
        .status(ClusterStatusRequest::default())
        .await
        .expect("status")
        .into_inner()
}

/// A peer request carrying `cluster` (as a member's would) or no id.
fn peer_request(m: PeerMessage, cluster: Option<&str>) -> tonic::Request<PeerMessage> {
    let mut r = tonic::Request::new(m);
    if let Some(id) = cluster {
        r.metadata_mut()
            .insert("x-arbiter-cluster", id.parse().unwrap());
    }
    r
}

/// A heartbeat claiming leadership of `term` for `node`.
fn heartbeat(term: u64, node: u64) -> PeerMessage {
    encode_append(&AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term, node),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    })
}

fn vote_request(term: u64, node: u64) -> PeerMessage {
    encode(&VoteRequest::<u64> {
        vote: Vote::new(term, node),
        last_log_id: None,
    })
}

/// Without peer TLS (and without auth): a message with no cluster id, or
/// from a node id that is not a member, is refused before Raft sees it.
/// Seen failing before the fix: a forged heartbeat from node 9 raised a
/// follower's term by 50 and an Identify without an id was answered.
#[tokio::test]
async fn the_plain_peer_port_refuses_messages_without_the_cluster_id_or_from_strangers() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let before = status(cluster.node(follower).conn(&Default::default()).await).await;
    let cluster_id = before.cluster_id.clone();
    assert_eq!(cluster_id.len(), 32, "the status shows the cluster id");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.peer_addr(follower)))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut p = RaftPeerClient::new(channel);
    let forged_term = before.term + 50;

    // No cluster id: refused, whatever the message.
    let r = p.identify(peer_request(encode(&()), None)).await;
    assert_eq!(code(r), Code::FailedPrecondition, "Identify without an id");
    let r = p
        .append_entries(peer_request(heartbeat(forged_term, 9), None))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition, "heartbeat without an id");
    let r = p
        .append_entries(peer_request(heartbeat(forged_term, 1), None))
        .await;
    assert_eq!(
        code(r),
        Code::FailedPrecondition,
        "a member's id, no cluster id"
    );
    // Another cluster's id: refused.
    let other = "0123456789abcdef0123456789abcdef";
    let r = p.identify(peer_request(encode(&()), Some(other))).await;
    assert_eq!(
        code(r),
        Code::FailedPrecondition,
        "another cluster's Identify"
    );

    // This cluster's id but a node that is not a member: refused.
    let id = Some(cluster_id.as_str());
    let r = p
        .append_entries(peer_request(heartbeat(forged_term, 9), id))
        .await;
    assert_eq!(code(r), Code::PermissionDenied, "a stranger's heartbeat");
    let r = p.vote(peer_request(vote_request(forged_term, 9), id)).await;
    assert_eq!(code(r), Code::PermissionDenied, "a stranger's vote request");
    // The id is enough for Identify (it changes nothing).
    p.identify(peer_request(encode(&()), id))
        .await
        .expect("an Identify with the cluster's id");

    // A forwarded call is held to the client port's bounds at the leader:
    // a Begin with a lock TTL of 10^15 ms (seen accepted before the fix).
    let leader_channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.peer_addr(leader)))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let begin = encode(&arbiter::node::Call::Begin(arbiter::engine::Begin {
        quota: Default::default(),
        principal: String::new(),
        key: "pay-1".into(),
        fingerprint: b"fp".to_vec(),
        lock_ttl_ms: 1_000_000_000_000_000,
        retention_ms: 60_000,
    }));
    let r = RaftPeerClient::new(leader_channel)
        .forward(peer_request(begin, id))
        .await;
    let refused = r.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("lock_ttl_ms"), "{refused:?}");

    let after = status(cluster.node(follower).conn(&Default::default()).await).await;
    assert!(
        after.term < forged_term,
        "a forged message moved the term from {} to {}",
        before.term,
        after.term
    );
    // And the cluster still serves.
    let mut l = cluster.node(follower).leases().await;
    l.acquire(AcquireRequest {
        name: "after-forgeries".into(),
        holder: "h".into(),
        ttl_ms: 10_000,
    })
    .await
    .unwrap();
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// A cluster with `--auth-file` whose peer port has no TLS would take any
/// forwarded principal from anyone who reaches it: it refuses to start,
/// naming the flags, unless `--insecure-peer-port` says so, which then
/// shows in the log and the metrics. Seen failing before the fix: the
/// server started with a warning.
#[tokio::test]
async fn auth_in_a_cluster_needs_peer_tls_or_an_explicit_opt_out() {
    let dir = fresh_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let auth = dir.with_extension("auth.yaml");
    std::fs::write(
        &auth,
        format!(
            "principals:\n  - name: ops\n    token_sha256: \"{}\"\n    admin: true\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let auth_path = auth.to_str().unwrap();
    let peers = ["--node-id", "1", "--peers", "1=127.0.0.1:0,2=127.0.0.1:9"];
    let mut flags = vec!["--auth-file", auth_path];
    flags.extend(peers);
    let (exit, stderr) = refused_start(&dir, &flags);
    assert!(!exit.success(), "{stderr}");
    assert!(
        stderr.contains("--peer-tls-cert") && stderr.contains("--insecure-peer-port"),
        "{stderr}"
    );

    flags.push("--insecure-peer-port");
    let s = Server::start_in(&dir, &flags);
    let metrics = crate::support::http_get(s.metrics, "/metrics");
    assert!(
        metrics.contains("arbiter_insecure_peer_port 1"),
        "the opt-out is shown in the metrics"
    );
    assert!(
        s.log().iter().any(|l| l.contains("--insecure-peer-port")),
        "the opt-out is logged"
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&auth);
}

/// Three members with mutual TLS between them, each on a loopback address
/// of its own with a certificate naming only that address; one CA signs
/// both the members' and the clients' certificates (the harder case).
struct Hosted {
    cluster: Cluster,
    pki: Pki,
    members: Vec<Identity>,
    alice: Identity,
}

impl Drop for Hosted {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pki.dir);
    }
}

fn hosted() -> Hosted {
    let dir = fresh_dir().with_extension("pki");
    let pki = Pki::new(&dir, "shared");
    let auth = dir.join("auth.yaml");
    std::fs::write(
        &auth,
        "principals:\n  - name: alice\n    certificate: alice\n    namespaces: [\"a/\"]\n  \
         - name: ops\n    certificate: ops\n    admin: true\n",
    )
    .unwrap();
    // The client port's certificate names 127.0.0.1 (where clients
    // connect), which is no member's peer host.
    let server = pki.issue("arbiter", "server");
    let members: Vec<Identity> = (0..3)
        .map(|i| {
            let host = format!("127.0.0.{}", i + 2);
            pki.issue_for(
                &format!("member-{}", i + 1),
                &[&host],
                &format!("member-{i}"),
            )
        })
        .collect();
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let common: Vec<String> = vec![
        "--tls-cert".into(),
        path(&server.cert),
        "--tls-key".into(),
        path(&server.key),
        "--tls-client-ca".into(),
        path(&pki.ca),
        "--auth-file".into(),
        path(&auth),
        "--peer-tls-ca".into(),
        path(&pki.ca),
    ];
    let common: Vec<&str> = common.iter().map(String::as_str).collect();
    let node_args = members
        .iter()
        .map(|m| {
            vec![
                "--peer-tls-cert".to_owned(),
                path(&m.cert),
                "--peer-tls-key".to_owned(),
                path(&m.key),
            ]
        })
        .collect();
    let ops = pki.issue("ops", "ops");
    let cluster = Cluster::start_hosted(3, 0, &common, node_args, pki.client(Some(&ops), None));
    Hosted {
        alice: pki.issue("alice", "alice"),
        cluster,
        members,
        pki,
    }
}

impl Hosted {
    /// A connection to node `i`'s peer port presenting `cert`.
    async fn peer(&self, i: usize, cert: &Identity) -> Option<RaftPeerClient<Conn>> {
        let opts = ClientOptions {
            tls: Some(ClientFiles {
                ca: self.pki.ca.clone(),
                cert: Some(cert.cert.clone()),
                key: Some(cert.key.clone()),
            }),
            token: None,
            server_name: Some(self.cluster.host(i)),
        };
        let url = format!("https://{}", self.cluster.peer_addr(i));
        connect(&url, &opts).await.ok().map(RaftPeerClient::new)
    }
}

/// A lease call forwarded as alice, as a follower would send it.
fn forwarded_acquire(name: &str, cluster: &str) -> tonic::Request<PeerMessage> {
    let call = encode(&arbiter::node::Call::Acquire(arbiter::engine::Acquire {
        quota: Default::default(),
        name: name.into(),
        holder: "pod-x".into(),
        ttl_ms: 60_000,
        principal: "alice".into(),
    }));
    let mut r = peer_request(call, Some(cluster));
    r.metadata_mut()
        .insert("x-arbiter-principal", "alice".parse().unwrap());
    r
}

/// Whether a peer with `cert` gets anything through node `i`'s peer
/// port: an Identify answered, or a forwarded call served.
async fn answered(h: &Hosted, i: usize, cert: &Identity, cluster: &str) -> (bool, bool) {
    let Some(mut p) = h.peer(i, cert).await else {
        return (false, false);
    };
    let identify = p
        .identify(peer_request(encode(&()), Some(cluster)))
        .await
        .is_ok();
    let forward = p
        .forward(forwarded_acquire("a/forged", cluster))
        .await
        .is_ok();
    (identify, forward)
}

/// Whether a peer with `cert` gets a check decided on node `i`'s check
/// stream (`Decide`), as alice, as a member forwarding her check would.
async fn streamed(h: &Hosted, i: usize, cert: &Identity, cluster: &str) -> bool {
    let Some(mut p) = h.peer(i, cert).await else {
        return false;
    };
    let batch = DecideRequest {
        id: 7,
        principal: "alice".into(),
        checks: vec![lc("a/streamed", tb(1_000, 1, 1_000), None)],
    };
    let mut r = tonic::Request::new(tokio_stream::iter([batch]));
    r.metadata_mut()
        .insert("x-arbiter-cluster", cluster.parse().unwrap());
    let Ok(replies) = p.decide(r).await else {
        return false;
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.into_inner().message()).await;
    matches!(reply, Ok(Ok(Some(reply))) if reply.id == 7 && reply.results.len() == 1)
}

/// With peer TLS, a certificate of the peer CA is not enough: it must name
/// a current member. A stranger's certificate (`CN=rogue`) and a client's
/// certificate from the same CA are refused on every peer RPC; a member's
/// is refused from the next call on once it is removed. Seen failing
/// before the fix: the rogue certificate's forwarded Acquire was served.
#[tokio::test]
async fn only_a_certificate_naming_a_current_member_speaks_on_the_peer_port() {
    let h = hosted();
    let leader = h.cluster.leader().await;
    let admin = h
        .cluster
        .node(leader)
        .conn(h.cluster.client_options())
        .await;
    let cluster_id = status(admin.clone()).await.cluster_id;

    // Members talk: a write through a follower is forwarded and served.
    let follower = (leader + 1) % 3;
    let alice_opts = h.pki.client(Some(&h.alice), None);
    let mut leases = LeasesClient::new(h.cluster.node(follower).conn(&alice_opts).await);
    let held = leases
        .acquire(AcquireRequest {
            name: "a/job".into(),
            holder: "pod-a".into(),
            ttl_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(held.acquired);

    let rogue = h.pki.issue_for("rogue", &["rogue.invalid"], "rogue");
    assert_eq!(
        answered(&h, leader, &rogue, &cluster_id).await,
        (false, false),
        "a peer-CA certificate naming no member was answered"
    );
    assert!(
        !streamed(&h, leader, &rogue, &cluster_id).await,
        "a peer-CA certificate naming no member had a check decided on the check stream"
    );
    assert_eq!(
        answered(&h, leader, &h.alice, &cluster_id).await,
        (false, false),
        "a client certificate was answered on the peer port"
    );
    assert!(
        !streamed(&h, leader, &h.alice, &cluster_id).await,
        "a client certificate had a check decided on the check stream"
    );
    // A member's own certificate is answered, on the check stream too.
    let member = &h.members[follower];
    assert_eq!(
        answered(&h, leader, member, &cluster_id).await,
        (true, true),
        "a member's certificate was refused"
    );
    assert!(
        streamed(&h, leader, member, &cluster_id).await,
        "a member's check stream was refused"
    );

    // Remove the third member (not the leader); its certificate is then
    // refused by the others.
    let removed = (0..3).find(|i| *i != leader && *i != follower).unwrap();
    ClusterClient::new(admin.clone())
        .remove_member(RemoveMemberRequest {
            id: removed as u64 + 1,
        })
        .await
        .unwrap();
    let cert = &h.members[removed];
    eventually(
        "the removed member's certificate refused by both",
        || async {
            let by_leader = answered(&h, leader, cert, &cluster_id).await;
            let by_follower = answered(&h, follower, cert, &cluster_id).await;
            let stream = streamed(&h, leader, cert, &cluster_id).await;
            (by_leader == (false, false) && by_follower == (false, false) && !stream).then_some(())
        },
    )
    .await;
    // The remaining two still serve.
    tokio::time::timeout(
        Duration::from_secs(10),
        leases.acquire(AcquireRequest {
            name: "a/after".into(),
            holder: "pod-a".into(),
            ttl_ms: 60_000,
        }),
    )
    .await
    .expect("in time")
    .unwrap();
}

/// Each peer RPC takes a request only as large as its largest legitimate
/// one: a 1 MiB `Identify` or vote is refused (an append or a snapshot
/// chunk may be larger), and the port goes on answering.
#[tokio::test]
async fn an_oversized_peer_message_is_refused() {
    let node = Server::start(&[]);
    let cluster_id = status(node.conn(&Default::default()).await)
        .await
        .cluster_id;
    let log = node.log().join("\n");
    let peer = log
        .lines()
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let f = v.get("fields")?;
            (f.get("message")?.as_str()? == "arbiter serving")
                .then(|| f.get("peer")?.as_str().map(str::to_owned))?
        })
        .expect("the peer address in the log");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{peer}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut p = RaftPeerClient::new(channel).max_encoding_message_size(8 << 20);
    let big = PeerMessage {
        json: vec![b' '; 1 << 20],
        ..Default::default()
    };
    let r = p
        .identify(peer_request(big.clone(), Some(&cluster_id)))
        .await;
    assert!(r.is_err(), "a 1 MiB Identify was answered");
    let r = p.vote(peer_request(big, Some(&cluster_id))).await;
    assert!(r.is_err(), "a 1 MiB vote was answered");
    p.identify(peer_request(encode(&()), Some(&cluster_id)))
        .await
        .expect("a small Identify is answered");
}

/// A TLS listener standing in for a member on its peer address: it
/// presents `id`'s certificate and counts the handshakes the members
/// complete with it and those they break off.
struct Impostor {
    completed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Impostor {
    async fn listen(addr: &str, id: &Identity) -> std::io::Result<Impostor> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let certs = CertificateDer::pem_file_iter(&id.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&id.key).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let completed = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let (c, r) = (completed.clone(), refused.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, c, r) = (acceptor.clone(), c.clone(), r.clone());
                tokio::spawn(async move {
                    let done = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp));
                    match done.await {
                        Ok(Ok(_stream)) => c.fetch_add(1, Ordering::SeqCst),
                        _ => r.fetch_add(1, Ordering::SeqCst),
                    };
                });
            }
        });
        Ok(Impostor {
            completed,
            refused,
            task,
        })
    }

    fn counts(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        (
            self.completed.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The README: each member verifies the others' certificates for their
/// peer host names. Member 3 is stopped and its peer address taken by a
/// listener with a certificate from the peer CA that names member 1's host
/// (a member's certificate, for the wrong member): the leader, dialling
/// member 3, breaks off every handshake. The same listener with a
/// certificate naming member 3's host is accepted (so the refusals were
/// for the name, not for the listener).
#[tokio::test]
async fn a_member_refuses_a_peer_whose_certificate_names_another_host() {
    let mut h = hosted();
    h.cluster.leader().await;
    h.cluster.kill9(2);
    let addr = h.cluster.peer_addr(2);
    let wrong = h
        .pki
        .issue_for("member-3", &[&h.cluster.host(0)], "impostor-wrong-host");
    let impostor = eventually("member 3's address free", || async {
        Impostor::listen(&addr, &wrong).await.ok()
    })
    .await;
    eventually("the members to try member 3 three times", || async {
        (impostor.counts().1 >= 3).then_some(())
    })
    .await;
    assert_eq!(
        impostor.counts().0,
        0,
        "a member completed a handshake with a certificate for {}",
        h.cluster.host(0)
    );
    drop(impostor);

    let right = h
        .pki
        .issue_for("member-3", &[&h.cluster.host(2)], "impostor-right-host");
    let listener = eventually("member 3's address free again", || async {
        Impostor::listen(&addr, &right).await.ok()
    })
    .await;
    eventually(
        "a member to complete a handshake with the right name",
        || async { (listener.counts().0 >= 1).then_some(()) },
    )
    .await;
}
