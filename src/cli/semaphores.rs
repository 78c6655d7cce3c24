//! `arbiter sem`: a semaphore's permits, one call each.

use std::process::ExitCode;

use clap::Subcommand;

use super::{connect, parse_duration_ms, status, CliResult, Server};
use crate::proto::{self as pb, semaphores_client::SemaphoresClient};

#[derive(Subcommand)]
pub(super) enum SemCmd {
    /// Take permits if they fit under the limit (exit 2 when they do not).
    Acquire {
        #[command(flatten)]
        server: Server,
        name: String,
        /// The most permits held under the name at once.
        #[arg(long)]
        limit: u64,
        #[arg(long)]
        holder: String,
        #[arg(long, default_value_t = 1)]
        permits: u64,
        /// e.g. `10s`, `500ms`.
        #[arg(long, value_parser = parse_duration_ms)]
        ttl: u64,
    },
    /// Extend held permits.
    Renew {
        #[command(flatten)]
        server: Server,
        name: String,
        #[arg(long)]
        holder: String,
        #[arg(long)]
        token: u64,
        #[arg(long, value_parser = parse_duration_ms)]
        ttl: u64,
    },
    /// Give held permits back.
    Release {
        #[command(flatten)]
        server: Server,
        name: String,
        #[arg(long)]
        holder: String,
        #[arg(long)]
        token: u64,
    },
    /// Every holder and the permits held.
    Get {
        #[command(flatten)]
        server: Server,
        name: String,
    },
    /// The holders, then every change (Ctrl-C ends it).
    Watch {
        #[command(flatten)]
        server: Server,
        name: String,
    },
}

fn print_permit(p: &pb::SemaphorePermit) {
    println!(
        "name={} holder={} permits={} fencing_token={} ttl_ms={} remaining_ms={}",
        p.name, p.holder, p.permits, p.fencing_token, p.ttl_ms, p.remaining_ms
    );
}

pub(super) async fn sem(cmd: SemCmd) -> CliResult {
    match cmd {
        SemCmd::Acquire {
            server,
            name,
            limit,
            holder,
            permits,
            ttl,
        } => {
            let r = SemaphoresClient::new(connect(&server).await?)
                .acquire(pb::SemaphoreAcquireRequest {
                    name,
                    holder,
                    limit,
                    permits: Some(permits),
                    ttl_ms: ttl,
                })
                .await
                .map_err(status)?
                .into_inner();
            match r.permit {
                Some(p) => {
                    print!("granted held={} ", r.held);
                    print_permit(&p);
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    println!("full held={} retry_after_ms={}", r.held, r.retry_after_ms);
                    Ok(ExitCode::from(2))
                }
            }
        }
        SemCmd::Renew {
            server,
            name,
            holder,
            token,
            ttl,
        } => {
            let r = SemaphoresClient::new(connect(&server).await?)
                .renew(pb::SemaphoreRenewRequest {
                    name,
                    holder,
                    fencing_token: token,
                    ttl_ms: ttl,
                })
                .await
                .map_err(status)?
                .into_inner();
            print!("renewed ");
            r.permit.iter().for_each(print_permit);
            Ok(ExitCode::SUCCESS)
        }
        SemCmd::Release {
            server,
            name,
            holder,
            token,
        } => {
            SemaphoresClient::new(connect(&server).await?)
                .release(pb::SemaphoreReleaseRequest {
                    name: name.clone(),
                    holder: holder.clone(),
                    fencing_token: token,
                })
                .await
                .map_err(status)?;
            println!("released name={name} holder={holder} fencing_token={token}");
            Ok(ExitCode::SUCCESS)
        }
        SemCmd::Get { server, name } => {
            let r = SemaphoresClient::new(connect(&server).await?)
                .get(pb::GetSemaphoreRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            println!("held={} holders={}", r.held, r.permits.len());
            r.permits.iter().for_each(print_permit);
            Ok(ExitCode::SUCCESS)
        }
        SemCmd::Watch { server, name } => {
            let mut stream = SemaphoresClient::new(connect(&server).await?)
                .watch(pb::WatchSemaphoreRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(e) = stream.message().await.map_err(status)? {
                let kind = pb::semaphore_event::Kind::try_from(e.kind)
                    .map_or("UNKNOWN", |k| k.as_str_name());
                print!("{kind} held={} ", e.held);
                match &e.permit {
                    Some(p) => print_permit(p),
                    None => println!("holders={}", e.permits.len()),
                }
                e.permits.iter().for_each(print_permit);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
