//! The `courier` binary: parses arguments and maps failures to exit codes
//! (0 success, 2 bad usage or configuration, 1 runtime failure).

use clap::Parser;

fn main() {
    let cli = courier::cli::Cli::parse();
    if let Err(failure) = courier::cli::run(cli) {
        eprintln!("error: {}", one_line(failure.error()));
        std::process::exit(failure.exit_code());
    }
}

/// The error and its causes on one line, each said once: an error whose message already
/// ends with its source's (`AMQP error: IO error: …`) is not followed by that text again.
fn one_line(error: &anyhow::Error) -> String {
    let mut out = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
    }
    out
}
