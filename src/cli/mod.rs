//! The `courier` command line: argument definitions and one function per command.
//!
//! This is the binary's edge: library errors are wrapped with `anyhow` context here and
//! nowhere else. Exit codes: 0 success, 2 bad usage or bad configuration, 1 runtime failure.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

mod commands;
pub use commands::stats_json;
mod dead_letters;
mod demo;
mod escape;

/// Courier: publishes PostgreSQL outbox rows to RabbitMQ with publisher confirms, retries
/// what fails and dead-letters what keeps failing.
#[derive(Debug, Parser)]
#[command(name = "courier", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (YAML). `COURIER_*` environment variables override its keys.
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "COURIER_CONFIG",
        default_value = "config.yaml"
    )]
    pub config: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the engine: publish outbox rows until SIGINT or SIGTERM (migrates first unless
    /// `database.auto_migrate: false`).
    Run,
    /// Create the schema and apply the embedded migrations; safe to run any number of times.
    Migrate,
    /// Print the outbox's counts by status and the age of the oldest undelivered row.
    Status {
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// Print JSON (one object; one line per refresh with --watch).
        #[arg(long)]
        json: bool,
    },
    /// Inspect, requeue or discard dead letters.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(dead_letters::DeadLetterCommand),
    /// Declare a demo exchange and queue, enqueue N messages, run the engine and show
    /// progress, then a summary (throughput, commit→confirm p50/p99).
    Demo {
        /// How many messages to send.
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
    },
}

/// Why the process exits non-zero.
#[derive(Debug)]
pub enum Failure {
    /// Bad configuration: exit code 2.
    Config(anyhow::Error),
    /// Anything at run time: exit code 1.
    Runtime(anyhow::Error),
}

impl Failure {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Config(_) => 2,
            Failure::Runtime(_) => 1,
        }
    }

    /// The error to print.
    pub fn error(&self) -> &anyhow::Error {
        match self {
            Failure::Config(e) | Failure::Runtime(e) => e,
        }
    }
}

/// Parses nothing (clap did), loads the config, sets up logging and runs the command.
pub fn run(cli: Cli) -> Result<(), Failure> {
    let mut config =
        Config::load(&cli.config).map_err(|e| Failure::Config(anyhow::Error::new(e)))?;
    if matches!(cli.command, Command::Demo { .. }) && std::env::var_os("RUST_LOG").is_none() {
        // The demo shows a progress bar; engine chatter would tear it.
        config.logging.level = "warn".into();
    }
    init_logging(&config);
    let system = actix_rt::System::new();
    system.block_on(async move {
        match cli.command {
            Command::Run => commands::run(&cli.config, config).await,
            Command::Migrate => commands::migrate(&config).await,
            Command::Status { watch, json } => commands::status(&config, watch, json).await,
            Command::DeadLetters(cmd) => dead_letters::run(&config, cmd).await,
            Command::Demo { messages } => demo::run(config, messages).await,
        }
        .map_err(Failure::Runtime)
    })
}

/// Installs the tracing subscriber: the configured filter (or `RUST_LOG`), pretty or JSON.
pub fn init_logging(config: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(&config.logging.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests, embedding) keeps the first subscriber.
    let _ = match config.logging.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
