//! The client subcommands: one call each, printed for a person.

use std::process::ExitCode;

use super::*;

fn print_lease(l: &pb::Lease) {
    println!(
        "name={} holder={} fencing_token={} ttl_ms={} remaining_ms={}",
        l.name, l.holder, l.fencing_token, l.ttl_ms, l.remaining_ms
    );
}

pub(super) async fn check(a: CheckArgs) -> CliResult {
    use pb::limit::Algorithm;
    let check = match (a.domain, a.descriptor) {
        (Some(domain), Some(Entries(entries))) => pb::LimitCheck {
            key: String::new(),
            limit: None,
            cost: Some(a.cost),
            dry_run: a.dry_run,
            max_delay_ms: 0,
            named: Some(pb::NamedLimit {
                domain,
                entries: entries
                    .into_iter()
                    .map(|(key, value)| pb::named_limit::Entry { key, value })
                    .collect(),
            }),
        },
        _ => {
            let algorithm = match (a.token_bucket, a.sliding_window, a.fixed_window) {
                (Some(t), _, _) => Algorithm::TokenBucket(t),
                (_, Some(s), _) => Algorithm::SlidingWindow(s),
                (_, _, Some(f)) => Algorithm::FixedWindow(f),
                _ => match a.leaky_bucket {
                    Some(l) => Algorithm::LeakyBucket(pb::LeakyBucket {
                        burst: a.burst.unwrap_or(1),
                        ..l
                    }),
                    None => {
                        return Err(
                            "one of --token-bucket, --sliding-window, --fixed-window or \
                                    --leaky-bucket (or --domain with --descriptor) is required"
                                .into(),
                        )
                    }
                },
            };
            pb::LimitCheck {
                key: a.key.unwrap_or_default(),
                limit: Some(pb::Limit {
                    algorithm: Some(algorithm),
                }),
                cost: Some(a.cost),
                dry_run: a.dry_run,
                max_delay_ms: a.max_delay.unwrap_or(0),
                named: None,
            }
        }
    };
    let mut client = RateLimiterClient::new(connect(&a.server).await?);
    let reply = client
        .check(pb::CheckRequest {
            checks: vec![check],
            all_or_nothing: false,
        })
        .await
        .map_err(status)?
        .into_inner();
    let r = reply.results.first().ok_or("server returned no result")?;
    println!(
        "{} limit={} remaining={} retry_after_ms={} reset_after_ms={} delay_ms={}",
        if r.allowed { "allowed" } else { "denied" },
        r.limit,
        r.remaining,
        r.retry_after_ms,
        r.reset_after_ms,
        r.delay_ms
    );
    Ok(if r.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

pub(super) async fn lease(cmd: LeaseCmd) -> CliResult {
    match cmd {
        LeaseCmd::Acquire {
            server,
            name,
            holder,
            ttl,
        } => lease_acquire(&server, name, holder, ttl).await,
        LeaseCmd::Renew {
            server,
            name,
            holder,
            token,
            ttl,
        } => {
            let r = LeasesClient::new(connect(&server).await?)
                .renew(pb::RenewRequest {
                    name,
                    holder,
                    fencing_token: token,
                    ttl_ms: ttl,
                })
                .await
                .map_err(status)?
                .into_inner();
            print!("renewed ");
            r.lease.iter().for_each(print_lease);
            Ok(ExitCode::SUCCESS)
        }
        LeaseCmd::Release {
            server,
            name,
            holder,
            token,
        } => {
            let r = LeasesClient::new(connect(&server).await?)
                .release(pb::ReleaseRequest {
                    name,
                    holder,
                    fencing_token: token,
                })
                .await
                .map_err(status)?
                .into_inner();
            print!("released ");
            r.lease.iter().for_each(print_lease);
            Ok(ExitCode::SUCCESS)
        }
        LeaseCmd::Get { server, name } => {
            let r = LeasesClient::new(connect(&server).await?)
                .get(pb::GetLeaseRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            match r.lease {
                Some(l) => print_lease(&l),
                None => println!("free"),
            }
            Ok(ExitCode::SUCCESS)
        }
        LeaseCmd::Watch { server, name } => lease_watch(&server, name).await,
    }
}

async fn lease_acquire(server: &Server, name: String, holder: String, ttl_ms: u64) -> CliResult {
    let r = LeasesClient::new(connect(server).await?)
        .acquire(pb::AcquireRequest {
            name,
            holder,
            ttl_ms,
        })
        .await
        .map_err(status)?
        .into_inner();
    print!(
        "{} ",
        if r.acquired {
            "acquired"
        } else {
            "held-by-other"
        }
    );
    if let Some(l) = &r.lease {
        print_lease(l);
    }
    Ok(if r.acquired {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Prints the lease's state, then each change, until the server ends the
/// stream.
async fn lease_watch(server: &Server, name: String) -> CliResult {
    let mut stream = LeasesClient::new(connect(server).await?)
        .watch(pb::WatchLeaseRequest { name })
        .await
        .map_err(status)?
        .into_inner();
    while let Some(event) = stream.message().await.map_err(status)? {
        let kind = pb::lease_event::Kind::try_from(event.kind)
            .map(|k| k.as_str_name())
            .unwrap_or("UNKNOWN");
        match &event.lease {
            Some(l) => {
                print!("{kind} ");
                print_lease(l);
            }
            None => println!("{kind} free"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn idem(cmd: IdemCmd) -> CliResult {
    match cmd {
        IdemCmd::Begin {
            server,
            key,
            fingerprint,
            lock_ttl,
            retention,
        } => {
            let r = IdempotencyClient::new(connect(&server).await?)
                .begin(pb::BeginRequest {
                    key,
                    fingerprint: fingerprint.into_bytes(),
                    lock_ttl_ms: lock_ttl,
                    retention_ms: retention.unwrap_or(0),
                })
                .await
                .map_err(status)?
                .into_inner();
            let outcome = pb::Outcome::try_from(r.outcome)
                .map(|o| o.as_str_name())
                .unwrap_or("UNKNOWN");
            println!(
                "{outcome} attempt={} retry_after_ms={} response={}",
                r.attempt,
                r.retry_after_ms,
                String::from_utf8_lossy(&r.response)
            );
            Ok(ExitCode::SUCCESS)
        }
        IdemCmd::Complete {
            server,
            key,
            attempt,
            response,
        } => {
            IdempotencyClient::new(connect(&server).await?)
                .complete(pb::CompleteRequest {
                    key,
                    attempt,
                    response: response.into_bytes(),
                })
                .await
                .map_err(status)?;
            println!("completed");
            Ok(ExitCode::SUCCESS)
        }
        IdemCmd::Abort {
            server,
            key,
            attempt,
        } => {
            IdempotencyClient::new(connect(&server).await?)
                .abort(pb::AbortRequest { key, attempt })
                .await
                .map_err(status)?;
            println!("aborted");
            Ok(ExitCode::SUCCESS)
        }
        IdemCmd::Get { server, key } => {
            let r = IdempotencyClient::new(connect(&server).await?)
                .get(pb::GetRecordRequest { key })
                .await
                .map_err(status)?
                .into_inner();
            match &r.record {
                Some(rec) => print_record(rec),
                None => println!("absent"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_record(rec: &pb::Record) {
    let state = pb::record::State::try_from(rec.state)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN");
    println!(
        "{state} attempt={} expires_after_ms={} response={}",
        rec.attempt,
        rec.expires_after_ms,
        String::from_utf8_lossy(&rec.response)
    );
}

async fn rebalance(server: Server, drain: Vec<u64>, restore: Vec<u64>) -> CliResult {
    let mut client = ClusterClient::new(connect(&server).await?);
    let st = client
        .rebalance(pb::RebalanceRequest { drain, restore })
        .await
        .map_err(status)?
        .into_inner();
    print_status(&st)
}

pub(super) async fn cluster(cmd: ClusterCmd) -> CliResult {
    let (server, call) = match cmd {
        ClusterCmd::Status { server } => (server, None),
        ClusterCmd::Add {
            server,
            id,
            peer_addr,
            force,
        } => (server, Some((id, Some((peer_addr, force))))),
        ClusterCmd::Remove { server, id } => (server, Some((id, None))),
        ClusterCmd::Rebalance {
            server,
            drain,
            restore,
        } => return rebalance(server, drain, restore).await,
    };
    let mut client = ClusterClient::new(connect(&server).await?);
    let st = match call {
        None => client.status(pb::ClusterStatusRequest::default()).await,
        Some((id, Some((peer_addr, force)))) => {
            client
                .add_member(pb::AddMemberRequest {
                    id,
                    peer_addr,
                    force,
                })
                .await
        }
        Some((id, None)) => client.remove_member(pb::RemoveMemberRequest { id }).await,
    }
    .map_err(status)?
    .into_inner();
    print_status(&st)
}

fn print_status(st: &pb::ClusterStatusResponse) -> CliResult {
    let leader = st.leader_id.map_or("none".to_owned(), |l| l.to_string());
    println!(
        "node_id={} state={} leader={leader} term={} applied_index={} ready={} cluster_id={}",
        st.node_id, st.state, st.term, st.applied_index, st.ready, st.cluster_id
    );
    if !st.config_error.is_empty() {
        println!("not ready: {}", st.config_error);
    }
    if st.membership_changing {
        println!("membership change in progress (joint: old and new voters must both agree)");
    }
    if st.slot_map_version > 0 {
        println!("slot_map_version={}", st.slot_map_version);
    }
    for m in &st.members {
        println!(
            "member id={} peer={} {}{}",
            m.id,
            m.peer_addr,
            if m.voter { "voter" } else { "learner" },
            if st.slot_map_version > 0 {
                format!(" slots={}", m.slots)
            } else {
                String::new()
            }
        );
        if m.drained {
            println!(
                "  (drained: restore with `arbiter cluster rebalance --restore {}`)",
                m.id
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn health(args: HealthArgs) -> CliResult {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let service = match args.service.as_str() {
        "ready" => "arbiter.v1.Leases".to_owned(),
        s => s.to_owned(),
    };
    let mut client = HealthClient::new(connect(&args.server).await?);
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.clone(),
    });
    request.set_timeout(Duration::from_secs(5));
    let st = client.check(request).await.map_err(status)?.into_inner();
    let serving = st.status == ServingStatus::Serving as i32;
    let name = ServingStatus::try_from(st.status).map_or("UNKNOWN", |s| s.as_str_name());
    println!("service={service:?} status={name}");
    Ok(if serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `arbiter limits check PATH`: the server's parser, offline.
pub(super) fn limits_check(path: &std::path::Path, merge_domains: bool) -> CliResult {
    let limits = crate::limits::Limits::load(path, merge_domains)?;
    let mut domains: Vec<&str> = limits.domains().collect();
    domains.sort_unstable();
    for file in &limits.files {
        println!("ok {}", file.display());
    }
    println!(
        "{} file(s), {} domain(s): {}",
        limits.files.len(),
        domains.len(),
        domains.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}
