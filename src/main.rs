//! The `courier` binary: parses arguments and maps failures to exit codes
//! (0 success, 2 bad usage or configuration, 1 runtime failure).

use clap::Parser;

/// jemalloc, for the binary only (feature `jemalloc`, on by default; an application that
/// embeds the library keeps its own allocator and can turn the feature off). The engine
/// allocates and frees a few small buffers per message on one thread (rows, frames,
/// futures); with glibc's allocator that was a fifth of the engine's CPU, and jemalloc cut
/// its CPU per message by about a sixth in the quorum bench (README, Speed).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Freed pages go back to the system after a second, not jemalloc's default ten: with
/// 20 MiB payloads the default kept a quarter more memory resident than glibc did (peak RSS
/// 236 against 189 MB), and returning them at once (`0`) took back the CPU saved.
/// `_RJEM_MALLOC_CONF` in the environment overrides it.
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8; 37] = b"dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() {
    let cli = courier::cli::Cli::parse();
    if cli.prints_a_report() {
        end_quietly_when_the_reader_goes();
    }
    if let Err(failure) = courier::cli::run(cli) {
        eprintln!("error: {}", one_line(failure.error()));
        std::process::exit(failure.exit_code());
    }
}

/// Rust ignores SIGPIPE, so a `println!` into a pipe whose reader has gone panics ("failed
/// printing to stdout: Broken pipe", with a backtrace: an outside audit's `courier status |
/// head`). A report command takes the signal's default back and ends as `ls | head` does.
/// Not the engine: its sockets must see EPIPE as an error, not end the process.
fn end_quietly_when_the_reader_goes() {
    // SAFETY: sets one signal's disposition to its default before any other thread
    // exists; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
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
