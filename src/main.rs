//! The `arbiter` binary: parse flags, then serve or run a client subcommand.

use clap::Parser;

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
