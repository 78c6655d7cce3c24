//! `arbiter top`: a live view of the cluster at a terminal, from any
//! member. Every interval it asks that member for the cluster's status and
//! every member's metrics (`Cluster/Status`, `Cluster/Metrics`) and redraws
//! the frame (`frame.rs`) with plain ANSI codes. `q` quits (the terminal
//! is put in non-canonical mode with `stty` and restored on the way out);
//! `--once` prints one frame as text, after two samples an interval apart.

mod frame;

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use super::{connect, status, CliResult, Server};
use crate::proto::{self as pb, cluster_client::ClusterClient};
use crate::security::Conn;
use frame::Snapshot;

#[derive(Args)]
pub(super) struct TopArgs {
    #[command(flatten)]
    server: Server,
    /// Time between two frames (and between the two samples of --once),
    /// e.g. 1s, 500ms; at least 100ms.
    #[arg(long, default_value = "1s", value_parser = super::parse_duration_ms)]
    interval: u64,
    /// Print one frame as text and exit (for scripts).
    #[arg(long)]
    once: bool,
}

async fn sample(client: &mut ClusterClient<Conn>) -> Result<Snapshot, String> {
    let st = client
        .status(pb::ClusterStatusRequest::default())
        .await
        .map_err(status)?
        .into_inner();
    let metrics = client
        .metrics(pb::ClusterMetricsRequest::default())
        .await
        .map_err(status)?
        .into_inner();
    Ok(Snapshot::new(st, metrics))
}

pub(super) async fn top(args: TopArgs) -> CliResult {
    if args.interval < 100 {
        return Err(format!(
            "--interval: at least 100ms, got {}ms",
            args.interval
        ));
    }
    let every = Duration::from_millis(args.interval);
    let mut client = ClusterClient::new(connect(&args.server).await?);
    let server = args.server.server.clone();
    if args.once {
        let before = sample(&mut client).await?;
        let taken = Instant::now();
        tokio::time::sleep(every).await;
        let now = sample(&mut client).await?;
        print!(
            "{}",
            frame::render(&server, Some(&before), &now, taken.elapsed(), every)
        );
        return Ok(ExitCode::SUCCESS);
    }
    let _terminal = Terminal::take();
    let (quit_tx, mut quit) = tokio::sync::mpsc::channel::<()>(1);
    // Reads keys until `q` (blocking reads, off the runtime). Ends with the
    // process.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut byte = [0u8; 1];
        while let Ok(1) = stdin.read(&mut byte) {
            if byte[0].eq_ignore_ascii_case(&b'q') {
                let _ = quit_tx.blocking_send(());
                return;
            }
        }
    });
    let mut before: Option<(Snapshot, Instant)> = None;
    loop {
        let text = match sample(&mut client).await {
            Ok(now) => {
                let taken = Instant::now();
                let elapsed = before.as_ref().map_or(Duration::ZERO, |(_, t)| taken - *t);
                let text = frame::render(
                    &server,
                    before.as_ref().map(|(s, _)| s),
                    &now,
                    elapsed,
                    every,
                );
                before = Some((now, taken));
                text
            }
            Err(e) => format!("arbiter top  {server}\n\nerror: {e} (retrying)\n"),
        };
        // Home, clear, the frame with line ends the raw terminal needs.
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\x1b[H\x1b[2J{}", text.replace('\n', "\r\n"));
        let _ = out.flush();
        drop(out);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = quit.recv() => return Ok(ExitCode::SUCCESS),
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// The terminal's settings before `top` changed them, put back on drop.
struct Terminal {
    saved: Option<String>,
}

impl Terminal {
    /// Keys without Enter and without echo, and the cursor hidden, when
    /// stdin is a terminal.
    fn take() -> Self {
        let saved = std::io::stdin()
            .is_terminal()
            .then(|| stty(&["-g"]))
            .flatten();
        if saved.is_some() {
            stty(&["-icanon", "-echo", "min", "1"]);
            print!("\x1b[?25l");
        }
        Self { saved }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            stty(&[saved.trim()]);
            print!("\x1b[?25h\r\n");
            let _ = std::io::stdout().flush();
        }
    }
}

/// Runs `stty ARGS` on this terminal; its output, if it succeeded.
fn stty(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("stty")
        .args(args)
        .stdin(std::process::Stdio::inherit())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
