//! The load loops (one per workload) and the requests they send,
//! encoded once per key and sent as raw bytes.

use super::*;

/// One key's entry of the request's repeated field, encoded: for the rls
/// workload a `RateLimitRequest.descriptors` entry, else a
/// `CheckRequest.checks` entry.
pub(super) fn request_entry(args: &Args, key: String) -> Vec<u8> {
    if args.workload == Workload::Rls {
        rls_entry(key)
    } else {
        check_entry(args, key)
    }
}

/// One descriptor `user=<key>` of `RateLimitRequest.descriptors` (field 2).
pub(super) fn rls_entry(key: String) -> Vec<u8> {
    use arbiter::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor, RateLimitDescriptor,
    };
    use arbiter::envoy::service::ratelimit::v3::RateLimitRequest;
    use prost::Message;
    RateLimitRequest {
        domain: String::new(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![rate_limit_descriptor::Entry {
                key: "user".into(),
                value: key,
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    }
    .encode_to_vec()
}

/// One key's entry of `CheckRequest.checks` (field 1), encoded.
pub(super) fn check_entry(args: &Args, key: String) -> Vec<u8> {
    use prost::Message;
    let algorithm = match args.algorithm {
        super::Algo::TokenBucket => Algorithm::TokenBucket(pb::TokenBucket {
            capacity: args.capacity,
            refill_tokens: args.refill_tokens,
            refill_interval_ms: args.refill_interval_ms,
        }),
        super::Algo::LeakyBucket => Algorithm::LeakyBucket(pb::LeakyBucket {
            rate: args.refill_tokens,
            interval_ms: args.refill_interval_ms,
            burst: args.capacity,
        }),
    };
    pb::CheckRequest {
        checks: vec![pb::LimitCheck {
            key,
            limit: Some(pb::Limit {
                algorithm: Some(algorithm),
            }),
            cost: None,
            dry_run: false,
            named: None,
            max_delay_ms: args.max_delay_ms,
        }],
        all_or_nothing: false,
    }
    .encode_to_vec()
}

/// Sends `CheckRequest`s whose bytes the client assembled itself: a
/// repeated field may be written as its entries one after another, so a
/// request is the entries of its keys (each encoded once, before the run)
/// copied end to end. The server receives exactly what a generated client
/// would send; the client spends a copy per check instead of building and
/// encoding messages, which matters when it shares the server's cores.
/// (The rls workload sends `RateLimitRequest`s the same way.)
pub(super) struct RawCodec<R>(std::marker::PhantomData<fn() -> R>);

impl<R> RawCodec<R> {
    fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<R> Clone for RawCodec<R> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<R: prost::Message + Default + Send + 'static> tonic::codec::Codec for RawCodec<R> {
    type Encode = Vec<u8>;
    type Decode = R;
    type Encoder = Self;
    type Decoder = Self;
    fn encoder(&mut self) -> Self {
        self.clone()
    }
    fn decoder(&mut self) -> Self {
        self.clone()
    }
}

impl<R: Send + 'static> tonic::codec::Encoder for RawCodec<R> {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl<R: prost::Message + Default + Send + 'static> tonic::codec::Decoder for RawCodec<R> {
    type Item = R;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<R>, tonic::Status> {
        R::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("undecodable response: {e}")))
    }
}

/// `RateLimitRequest.domain` (field 1) = "bench", encoded.
pub(super) const RLS_DOMAIN: &[u8] = b"\x0a\x05bench";

pub(super) async fn rls_worker(
    args: &Args,
    run: &Run,
    channel: Channel,
    rng: &mut Rng,
) -> Result<Tally, String> {
    use arbiter::envoy::service::ratelimit::v3::{rate_limit_response::Code, RateLimitResponse};
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    );
    let mut t = Tally::new();
    while let Some(measured) = run.admit() {
        let mut body = Vec::with_capacity(args.batch * 40 + RLS_DOMAIN.len());
        body.extend_from_slice(RLS_DOMAIN);
        for _ in 0..args.batch {
            let n = key_index(args, run, rng);
            match run.entries.get(n as usize) {
                Some(entry) => body.extend_from_slice(entry),
                None => body.extend_from_slice(&rls_entry(key_name(args, n))),
            }
        }
        let sent = Instant::now();
        let reply = match grpc.ready().await {
            Ok(()) => {
                grpc.unary(
                    tonic::Request::new(body),
                    path.clone(),
                    RawCodec::<RateLimitResponse>::new(),
                )
                .await
            }
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        record(&mut t, measured, sent);
        match reply {
            Ok(r) if measured => {
                let r = r.into_inner();
                t.decisions += r.statuses.len() as u64;
                t.allowed += r
                    .statuses
                    .iter()
                    .filter(|s| s.code == Code::Ok as i32)
                    .count() as u64;
            }
            Ok(_) => {}
            Err(_) => t.errors += u64::from(measured),
        }
    }
    Ok(t)
}

/// `check_worker` with `--route slots`: each call goes to the owner of
/// its first key, and the rest of its keys are drawn from that owner's.
pub(super) async fn routed_check_worker(
    args: &Args,
    run: &Run,
    routes: Vec<Channel>,
    rng: &mut Rng,
) -> Result<Tally, String> {
    let mut grpcs: Vec<_> = routes.into_iter().map(tonic::client::Grpc::new).collect();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/arbiter.v1.RateLimiter/Check");
    let mut t = Tally::new();
    while let Some(measured) = run.admit() {
        let mut body = Vec::with_capacity(args.batch * 48 + 2);
        let first = key_index(args, run, rng);
        let owner = run.owner_of[first as usize];
        body.extend_from_slice(&run.entries[first as usize]);
        let mut added = 1;
        while added < args.batch {
            let n = key_index(args, run, rng);
            if run.owner_of[n as usize] == owner {
                body.extend_from_slice(&run.entries[n as usize]);
                added += 1;
            }
        }
        if args.all_or_nothing {
            body.extend_from_slice(&[0x10, 0x01]); // field 2, varint 1
        }
        send_check(&mut grpcs[owner as usize], &path, body, measured, &mut t).await;
    }
    Ok(t)
}

/// Sends one encoded `CheckRequest` and counts its answer.
async fn send_check(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &tonic::codegen::http::uri::PathAndQuery,
    body: Vec<u8>,
    measured: bool,
    t: &mut Tally,
) {
    let sent = Instant::now();
    let reply = match grpc.ready().await {
        Ok(()) => {
            grpc.unary(
                tonic::Request::new(body),
                path.clone(),
                RawCodec::<pb::CheckResponse>::new(),
            )
            .await
        }
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    record(t, measured, sent);
    match reply {
        Ok(r) if measured => {
            let r = r.into_inner();
            t.decisions += r.results.len() as u64;
            t.allowed += r.results.iter().filter(|r| r.allowed).count() as u64;
        }
        Ok(_) => {}
        Err(status) => {
            t.errors += u64::from(measured);
            if t.first_error.is_none() {
                t.first_error = Some(format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
}

pub(super) async fn check_worker(
    args: &Args,
    run: &Run,
    channel: Channel,
    rng: &mut Rng,
) -> Result<Tally, String> {
    let mut grpc = tonic::client::Grpc::new(channel);
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/arbiter.v1.RateLimiter/Check");
    let mut t = Tally::new();
    while let Some(measured) = run.admit() {
        let mut body = Vec::with_capacity(args.batch * 48 + 2);
        for _ in 0..args.batch {
            let n = key_index(args, run, rng);
            match run.entries.get(n as usize) {
                Some(entry) => body.extend_from_slice(entry),
                None => body.extend_from_slice(&check_entry(args, key_name(args, n))),
            }
        }
        if args.all_or_nothing {
            body.extend_from_slice(&[0x10, 0x01]); // field 2, varint 1
        }
        send_check(&mut grpc, &path, body, measured, &mut t).await;
    }
    Ok(t)
}

pub(super) async fn lease_worker(
    args: &Args,
    run: &Run,
    channel: Channel,
    w: usize,
    rng: &mut Rng,
) -> Result<Tally, String> {
    let mut client = LeasesClient::new(channel);
    let mut t = Tally::new();
    let holder = format!("bench-worker-{w}");
    let keep_ms = args.keep_secs * 1000;
    let mut n = 0u64;
    while let Some(measured) = run.admit() {
        // Workers use disjoint names so every acquire is a grant.
        n += 1;
        let name = if keep_ms > 0 {
            format!("bench:lease:{}:{w}:{n}", now_ms())
        } else {
            format!("bench:lease:{w}:{}", rng.below(args.keys))
        };
        let name = padded(name, args.key_bytes);
        let sent = Instant::now();
        let acquired = client
            .acquire(pb::AcquireRequest {
                name: name.clone(),
                holder: holder.clone(),
                ttl_ms: if keep_ms > 0 { keep_ms } else { 10_000 },
            })
            .await;
        record(&mut t, measured, sent);
        if keep_ms > 0 {
            t.errors += u64::from(acquired.is_err() && measured);
            continue;
        }
        let Ok(acquired) = acquired else {
            t.errors += u64::from(measured);
            continue;
        };
        let token = acquired
            .into_inner()
            .lease
            .map(|l| l.fencing_token)
            .unwrap_or(0);
        let Some(measured) = run.admit() else { break };
        let sent = Instant::now();
        let renewed = client
            .renew(pb::RenewRequest {
                name: name.clone(),
                holder: holder.clone(),
                fencing_token: token,
                ttl_ms: 10_000,
            })
            .await;
        record(&mut t, measured, sent);
        t.errors += u64::from(renewed.is_err() && measured);
        let Some(measured) = run.admit() else { break };
        let sent = Instant::now();
        let released = client
            .release(pb::ReleaseRequest {
                name,
                holder: holder.clone(),
                fencing_token: token,
            })
            .await;
        record(&mut t, measured, sent);
        t.errors += u64::from(released.is_err() && measured);
    }
    Ok(t)
}

/// Acquire, renew and release one permit under a name drawn from --keys,
/// as a holder of this worker's own: every acquire is a grant (the limit
/// is never reached), so each call is one write through the log, as the
/// lease workload's are.
pub(super) async fn sem_worker(
    args: &Args,
    run: &Run,
    channel: Channel,
    w: usize,
    rng: &mut Rng,
) -> Result<Tally, String> {
    let mut client = SemaphoresClient::new(channel);
    let mut t = Tally::new();
    let holder = format!("bench-worker-{w}");
    while let Some(measured) = run.admit() {
        let name = padded(
            format!("bench:sem:{}", rng.below(args.keys)),
            args.key_bytes,
        );
        let sent = Instant::now();
        let acquired = client
            .acquire(pb::SemaphoreAcquireRequest {
                name: name.clone(),
                holder: holder.clone(),
                limit: 1_000_000,
                permits: Some(1),
                ttl_ms: 10_000,
            })
            .await;
        record(&mut t, measured, sent);
        let token = match acquired.map(|r| r.into_inner().permit) {
            Ok(Some(p)) => p.fencing_token,
            _ => {
                t.errors += u64::from(measured);
                continue;
            }
        };
        let Some(measured) = run.admit() else { break };
        let sent = Instant::now();
        let renewed = client
            .renew(pb::SemaphoreRenewRequest {
                name: name.clone(),
                holder: holder.clone(),
                fencing_token: token,
                ttl_ms: 10_000,
            })
            .await;
        record(&mut t, measured, sent);
        t.errors += u64::from(renewed.is_err() && measured);
        let Some(measured) = run.admit() else { break };
        let sent = Instant::now();
        let released = client
            .release(pb::SemaphoreReleaseRequest {
                name,
                holder: holder.clone(),
                fencing_token: token,
            })
            .await;
        record(&mut t, measured, sent);
        t.errors += u64::from(released.is_err() && measured);
    }
    Ok(t)
}

pub(super) async fn idem_worker(
    args: &Args,
    run: &Run,
    channel: Channel,
    w: usize,
) -> Result<Tally, String> {
    let keep_secs = args.keep_secs;
    let response = vec![b'r'; args.response_bytes];
    let mut client = IdempotencyClient::new(channel);
    let mut t = Tally::new();
    let prefix = format!("bench:idem:{}:{w}", now_ms());
    let mut n = 0u64;
    while let Some(measured) = run.admit() {
        n += 1;
        let key = padded(format!("{prefix}:{n}"), args.key_bytes);
        let sent = Instant::now();
        let begun = client
            .begin(pb::BeginRequest {
                key: key.clone(),
                fingerprint: b"sha256:bench".to_vec(),
                lock_ttl_ms: 10_000,
                retention_ms: (keep_secs * 1000).max(1_000),
            })
            .await;
        record(&mut t, measured, sent);
        let Ok(begun) = begun else {
            t.errors += u64::from(measured);
            continue;
        };
        let Some(measured) = run.admit() else { break };
        let sent = Instant::now();
        let done = client
            .complete(pb::CompleteRequest {
                key,
                attempt: begun.into_inner().attempt,
                response: response.clone(),
            })
            .await;
        record(&mut t, measured, sent);
        t.errors += u64::from(done.is_err() && measured);
    }
    Ok(t)
}

pub(super) async fn redis_worker(
    args: &Args,
    run: &Run,
    addr: SocketAddr,
    sha: Vec<u8>,
    rng: &mut Rng,
) -> Result<Tally, String> {
    let mut conn = redis::Conn::connect(addr)
        .await
        .map_err(|e| format!("redis {addr}: {e}"))?;
    let mut t = Tally::new();
    let (cap, refill, interval) = (
        args.capacity.to_string(),
        args.refill_tokens.to_string(),
        args.refill_interval_ms.to_string(),
    );
    while let Some(measured) = run.admit() {
        let key = key(args, run, rng);
        let now = now_ms().to_string();
        let sent = Instant::now();
        let reply = conn
            .call(&[
                b"EVALSHA",
                &sha,
                b"1",
                key.as_bytes(),
                cap.as_bytes(),
                refill.as_bytes(),
                interval.as_bytes(),
                now.as_bytes(),
                b"1",
            ])
            .await;
        record(&mut t, measured, sent);
        match reply {
            Ok(redis::Reply::Array(items)) if measured => {
                t.decisions += 1;
                t.allowed += u64::from(items.first() == Some(&redis::Reply::Int(1)));
            }
            Ok(_) => {}
            Err(e) => {
                t.errors += u64::from(measured);
                if e.kind() != std::io::ErrorKind::Other {
                    return Err(format!("redis connection lost: {e}"));
                }
            }
        }
    }
    Ok(t)
}
