//! `arbiter breaker`: a shared circuit breaker, one call each.

use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};

use super::{connect, parse_duration_ms, status, CliResult, Server};
use crate::proto::{self as pb, breakers_client::BreakersClient};

/// Thresholds; each left out comes from the server's limits files, else
/// the default.
#[derive(Args, Clone, Copy, Default)]
pub(super) struct Thresholds {
    /// The sliding window outcomes count in, e.g. `10s` [default: 10s].
    #[arg(long, value_parser = parse_duration_ms)]
    window: Option<u64>,
    /// Fewest outcomes in the window before it can trip [default: 20].
    #[arg(long)]
    min_calls: Option<u32>,
    /// Failures in the window, in percent, that trip it [default: 50].
    #[arg(long)]
    failure_percent: Option<u32>,
    /// How long it stays open, e.g. `5s` [default: 5s].
    #[arg(long, value_parser = parse_duration_ms)]
    open_for: Option<u64>,
    /// Probe permits out at once while half-open [default: 1].
    #[arg(long)]
    probes: Option<u32>,
    /// Successful probes that close it [default: 3].
    #[arg(long)]
    probes_to_close: Option<u32>,
    /// How long a probe permit lasts unreported, e.g. `10s` [default: 10s].
    #[arg(long, value_parser = parse_duration_ms)]
    probe_ttl: Option<u64>,
}

impl Thresholds {
    fn config(self) -> Option<pb::BreakerConfig> {
        Some(pb::BreakerConfig {
            window_ms: self.window.unwrap_or(0),
            min_calls: self.min_calls.unwrap_or(0),
            failure_percent: self.failure_percent.unwrap_or(0),
            open_ms: self.open_for.unwrap_or(0),
            probes: self.probes.unwrap_or(0),
            probes_to_close: self.probes_to_close.unwrap_or(0),
            probe_ttl_ms: self.probe_ttl.unwrap_or(0),
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum Outcome {
    Success,
    Failure,
    Timeout,
}

#[derive(Subcommand)]
pub(super) enum BreakerCmd {
    /// May a call go now? Exit 0 if so (closed, or a probe permit), 2 if not.
    Allow {
        #[command(flatten)]
        server: Server,
        name: String,
        #[command(flatten)]
        thresholds: Thresholds,
    },
    /// Report one call's outcome (with --probe-token for a probe's).
    Report {
        #[command(flatten)]
        server: Server,
        name: String,
        #[arg(value_enum)]
        outcome: Outcome,
        #[arg(long, default_value_t = 0)]
        probe_token: u64,
        #[command(flatten)]
        thresholds: Thresholds,
    },
    /// Its phase and window.
    Get {
        #[command(flatten)]
        server: Server,
        name: String,
        #[command(flatten)]
        thresholds: Thresholds,
    },
    /// Its state, then each phase change (Ctrl-C ends it).
    Watch {
        #[command(flatten)]
        server: Server,
        name: String,
    },
}

fn phase(p: i32) -> &'static str {
    pb::BreakerPhase::try_from(p).map_or("UNKNOWN", |p| p.as_str_name())
}

fn print_state(s: &pb::BreakerState) {
    println!(
        "name={} phase={} retry_after_ms={} calls={} failures={} previous_calls={} \
         previous_failures={} probes_out={} probe_successes={}",
        s.name,
        phase(s.phase),
        s.retry_after_ms,
        s.calls,
        s.failures,
        s.previous_calls,
        s.previous_failures,
        s.probes_out,
        s.probe_successes
    );
}

pub(super) async fn breaker(cmd: BreakerCmd) -> CliResult {
    match cmd {
        BreakerCmd::Allow {
            server,
            name,
            thresholds,
        } => {
            let r = BreakersClient::new(connect(&server).await?)
                .allow(pb::BreakerAllowRequest {
                    name,
                    config: thresholds.config(),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "{} phase={} probe_token={} retry_after_ms={}",
                if r.allowed { "allowed" } else { "refused" },
                phase(r.phase),
                r.probe_token,
                r.retry_after_ms
            );
            Ok(if r.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        BreakerCmd::Report {
            server,
            name,
            outcome,
            probe_token,
            thresholds,
        } => {
            let outcome = match outcome {
                Outcome::Success => pb::CallOutcome::Success,
                Outcome::Failure => pb::CallOutcome::Failure,
                Outcome::Timeout => pb::CallOutcome::Timeout,
            };
            let r = BreakersClient::new(connect(&server).await?)
                .report(pb::BreakerReportRequest {
                    name,
                    outcome: outcome as i32,
                    probe_token,
                    config: thresholds.config(),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("counted={} phase={}", r.counted, phase(r.phase));
            Ok(ExitCode::SUCCESS)
        }
        BreakerCmd::Get {
            server,
            name,
            thresholds,
        } => {
            let r = BreakersClient::new(connect(&server).await?)
                .get(pb::GetBreakerRequest {
                    name,
                    config: thresholds.config(),
                })
                .await
                .map_err(status)?
                .into_inner();
            print_state(&r);
            Ok(ExitCode::SUCCESS)
        }
        BreakerCmd::Watch { server, name } => {
            let mut stream = BreakersClient::new(connect(&server).await?)
                .watch(pb::WatchBreakerRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(e) = stream.message().await.map_err(status)? {
                let kind = pb::breaker_event::Kind::try_from(e.kind)
                    .map_or("UNKNOWN", |k| k.as_str_name());
                print!("{kind} ");
                match &e.state {
                    Some(s) => print_state(s),
                    None => println!(),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
