//! The `courier` binary: parses arguments and maps failures to exit codes
//! (0 success, 2 bad usage or configuration, 1 runtime failure).

use clap::Parser;

fn main() {
    let cli = courier::cli::Cli::parse();
    if let Err(failure) = courier::cli::run(cli) {
        eprintln!("error: {:#}", failure.error());
        std::process::exit(failure.exit_code());
    }
}
