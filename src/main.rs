//! The `arbiter` binary: parse flags, then serve or run a client subcommand.

use clap::Parser;

// The system allocator (glibc malloc). mimalloc kept the server at 185-205
// MiB with 1M live keys against glibc's 156 MiB; unary Check throughput was
// the same within noise, batched Check 5-18% lower with glibc in paired runs
// (BENCHMARKS.md).

fn main() -> std::process::ExitCode {
    let cli = arbiter::cli::Cli::parse();
    // Raft, peer traffic and background work; client calls are served on
    // threads of their own (`--worker-threads`, see `server::serving`).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arbiter: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(arbiter::cli::run(cli))
}
