//! The `arbiter` binary: parse flags, then serve or run a client subcommand.

use clap::Parser;

/// mimalloc: the request path allocates many small, short-lived buffers
/// (HTTP/2 frames, protobuf messages) across threads, where it measurably
/// beats glibc malloc (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = arbiter::cli::Cli::parse();
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
