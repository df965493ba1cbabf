//! The `courier` command line: argument definitions and one function per command.
//!
//! This is the binary's edge: library errors are wrapped with `anyhow` context here and
//! nowhere else. Exit codes: 0 success, 2 bad usage or bad configuration, 1 runtime failure.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

mod commands;
mod dead_letters;
mod demo;
mod doctor;
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
    pub(crate) config: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

impl Cli {
    /// Whether the command prints a report and ends (every command but `run` and `demo`):
    /// one whose reader goes away early (`courier status --watch | head`) should end quietly
    /// then, as Unix tools do.
    pub fn prints_a_report(&self) -> bool {
        !matches!(self.command, Command::Run | Command::Demo { .. })
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
    /// List the engine registry: each engine's host, pid, version, state, last heartbeat and
    /// the rows it holds in flight.
    Engines {
        /// Print JSON (an array, one object per engine).
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
    /// Check the whole setup: config, database (and its TLS), schema version, NOTIFY,
    /// broker, the exchanges open rows name and the dead-letter exchange (exist, publish
    /// allowed), the admin API's address. One line per check with the fix; exit 0 when
    /// none failed, 1 otherwise.
    Doctor {
        /// Print JSON (one object: `ok` and the checks).
        #[arg(long)]
        json: bool,
        /// As a service's pre-start check: an open row naming a missing or refused exchange
        /// only warns (the engine dead-letters such rows; they must not stop it starting).
        #[arg(long)]
        pre_start: bool,
    },
    /// Print a completion script for SHELL on stdout, e.g.
    /// `courier completions bash > /etc/bash_completion.d/courier`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout (`courier man | man -l -`), or with --dir write it
    /// and a page per command (courier-run.1, …) into DIR.
    Man {
        /// Write courier.1 and courier-COMMAND.1 here instead of printing courier.1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
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
    if let Command::DeadLetters(cmd) = &cli.command {
        if let Some(misuse) = cmd.misuse() {
            return Err(Failure::Config(anyhow::anyhow!(misuse)));
        }
    }
    // Generated from the argument definitions alone: no config file needed.
    match cli.command {
        Command::Completions { shell } => return completions(shell).map_err(Failure::Runtime),
        Command::Man { dir } => return man(dir.as_deref()).map_err(Failure::Runtime),
        // Loads the config itself: a bad one is a failed check, not a usage error.
        Command::Doctor { json, pre_start } => {
            return actix_rt::System::new().block_on(doctor::run(&cli.config, json, pre_start))
        }
        _ => {}
    }
    let mut config =
        Config::load(&cli.config).map_err(|e| Failure::Config(anyhow::Error::new(e)))?;
    if matches!(cli.command, Command::Demo { .. }) && std::env::var_os("RUST_LOG").is_none() {
        // The demo shows a progress bar; engine chatter would tear it.
        config.logging.level = "warn".into();
    }
    if matches!(cli.command, Command::Demo { .. }) {
        // Checked before the demo declares anything on the broker.
        demo::check_schema(&config).map_err(Failure::Config)?;
    }
    init_logging(&config);
    // Built outside the async runtime: the exporter's blocking HTTP client owns a runtime
    // of its own, which must not be created or dropped inside another. Kept until exit.
    let _traces = match cli.command {
        Command::Run => start_traces(&mut config).map_err(|e| Failure::Config(e.into()))?,
        _ => None,
    };
    let system = actix_rt::System::new();
    system.block_on(async move {
        match cli.command {
            Command::Run => commands::run(&cli.config, config).await,
            Command::Migrate => commands::migrate(&config).await,
            Command::Status { watch, json } => commands::status(&config, watch, json).await,
            Command::Engines { json } => commands::engines(&config, json).await,
            Command::DeadLetters(cmd) => dead_letters::run(&config, cmd).await,
            Command::Demo { messages } => demo::run(config, messages).await,
            Command::Completions { .. } | Command::Man { .. } | Command::Doctor { .. } => Ok(()),
        }
        .map_err(Failure::Runtime)
    })
}

/// The OTLP exporter, when traces are wanted (`telemetry.traces`, or an OTLP endpoint in
/// the environment; see [`crate::telemetry::traces_wanted`]); the engine makes spans only
/// then.
fn start_traces(
    config: &mut Config,
) -> Result<Option<crate::telemetry::Traces>, crate::telemetry::TelemetryError> {
    config.telemetry.traces =
        crate::telemetry::traces_wanted(&config.telemetry, |name| std::env::var(name).ok());
    if !config.telemetry.traces {
        return Ok(None);
    }
    if let Some(problem) = crate::telemetry::sampler_problem(|name| std::env::var(name).ok()) {
        tracing::warn!("{problem}");
    }
    let traces = crate::telemetry::Traces::install(&config.telemetry)?;
    tracing::info!("OpenTelemetry traces on: each message's spans are exported over OTLP/HTTP");
    Ok(Some(traces))
}

/// `courier completions SHELL`
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use std::io::Write;
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "courier", &mut script);
    match std::io::stdout().lock().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing the completion script"))
        }
        _ => Ok(()),
    }
}

/// `courier man [--dir DIR]`, from the argument definitions.
fn man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    let command = <Cli as clap::CommandFactory>::command();
    match dir {
        None => match clap_mangen::Man::new(command).render(&mut std::io::stdout().lock()) {
            // `courier man | head`: the reader is done, not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.context("writing the man page"),
        },
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(command, dir))
            .with_context(|| format!("writing man pages into {}", dir.display())),
    }
}

/// Library log targets quieted before the configured level or `RUST_LOG` is applied (a
/// directive of the user's that names one of these targets wins):
/// - `lapin::returned_messages=off`: lapin logs every message the broker returns (an
///   unroutable `mandatory` publish) as a WARN with its payload bytes: personal data in logs.
///   The engine records the return itself, without the payload.
/// - `lapin::channel=off`: lapin logs an ERROR for every channel the server closes, and
///   the engine's passive `exchange_declare` (how it finds a missing exchange, an expected
///   outcome) ends exactly that way. Every other channel or connection loss surfaces to the
///   engine, which logs it with context.
/// - `lapin::io_loop=off`: lapin logs an ERROR for every connection that fails or breaks
///   ("Exponential backoff attempts exhausted, aborting recovery", "Socket was readable but
///   we read 0…"), even a refused one the engine reports and retries, or one the process
///   ends at once for. The error surfaces to the engine, which logs it with its cause
///   ("cannot reach RabbitMQ", "lost the RabbitMQ connection", "RabbitMQ refused the
///   connection").
/// - `lapin=warn`: lapin's remaining warnings and errors stay; its info lines are internals.
/// - `tokio_postgres=info`: at debug it logs every statement with its bound parameters
///   (payloads and headers of the rows an application enqueues or an operator requeues).
pub(crate) const QUIET_LIBRARIES: &str = "lapin=warn,lapin::returned_messages=off,\
     lapin::channel=off,lapin::io_loop=off,tokio_postgres=info";

/// The filter: [`QUIET_LIBRARIES`], then `RUST_LOG` when set, not blank and valid, else
/// `level` (a blank `RUST_LOG=` in an environment file would otherwise silence every line,
/// errors included).
pub(crate) fn log_filter(level: &str, rust_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    let rust_log = rust_log.filter(|v| !v.trim().is_empty());
    let with_defaults = |user: &str| {
        tracing_subscriber::EnvFilter::try_new(format!("{QUIET_LIBRARIES},{user}")).ok()
    };
    rust_log
        .and_then(with_defaults)
        .or_else(|| with_defaults(level))
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(format!("{QUIET_LIBRARIES},info")))
}

/// Installs the tracing subscriber: the level filter (`logging.level`, `RUST_LOG`, quiet libraries), pretty or JSON, on stderr; colours only
/// when stderr is a terminal (and `NO_COLOR` is unset), so files and pipes get plain text.
pub fn init_logging(config: &Config) {
    use std::io::IsTerminal;
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = log_filter(&config.logging.level, rust_log.as_deref());
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    // `log_internal_errors(false)`: a log line that cannot be written (the reader of a
    // stderr pipe went away) is dropped. Reported, it went to `eprintln!`, which panics on
    // the same broken pipe, and the engine died without its clean stop.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests, embedding) keeps the first subscriber.
    let _ = match config.logging.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.fmt_fields(escaped_fields()).try_init(),
    };
}

/// The pretty format's fields (and span fields) with every control character escaped
/// (`\x0a`, `\x1b`): exchange names, keys, the reasons that quote them and broker errors
/// that echo them are producer text, and printed raw a newline in one would start a forged
/// log line, an ESC sequence recolour or rewrite the operator's terminal. JSON escapes them
/// by itself.
fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt as _;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        let text = escape::controls(&text);
        match field.name() {
            "message" => write!(w, "{text}"),
            name => write!(w, "{name}={text}"),
        }
    })
    .delimited(" ")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::log_filter;

    /// The targets of the probe events that `filter` lets through.
    fn seen(filter: tracing_subscriber::EnvFilter) -> Vec<&'static str> {
        let seen: Arc<Mutex<Vec<&'static str>>> = Default::default();
        let subscriber = tracing_subscriber::registry()
            .with(filter)
            .with(Record(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "lapin::returned_messages", "returned, with payload");
            tracing::error!(target: "lapin::channel", "Channel closed");
            tracing::error!(target: "lapin::io_loop", "Exponential backoff attempts exhausted");
            tracing::warn!(target: "lapin::heartbeat", "missed heartbeats");
            tracing::info!(target: "lapin::connection", "internals");
            tracing::debug!(target: "tokio_postgres::query", "statement with parameters");
            tracing::info!(target: "courier::engine", "engine line");
            tracing::debug!(target: "courier::engine", "engine detail");
        });
        let seen = seen.lock().expect("probe lock").clone();
        seen
    }

    struct Record(Arc<Mutex<Vec<&'static str>>>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Record {
        fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            let level = *e.metadata().level();
            let target = e.metadata().target();
            self.0
                .lock()
                .expect("probe lock")
                .push(match (target, level) {
                    ("courier::engine", tracing::Level::DEBUG) => "courier debug",
                    ("courier::engine", _) => "courier info",
                    (t, _) => t,
                });
        }
    }

    #[test]
    fn the_default_filter_quiets_payload_dumps_and_expected_channel_closes() {
        assert_eq!(
            seen(log_filter("info", None)),
            ["lapin::heartbeat", "courier info"]
        );
        // A broader level does not bring them back, neither from the config nor RUST_LOG.
        assert_eq!(
            seen(log_filter("debug", None)),
            ["lapin::heartbeat", "courier info", "courier debug"]
        );
        assert_eq!(
            seen(log_filter("warn", Some("trace"))),
            ["lapin::heartbeat", "courier info", "courier debug"]
        );
        // Naming the target does.
        assert_eq!(
            seen(log_filter("info,lapin::channel=error", None)),
            ["lapin::channel", "lapin::heartbeat", "courier info"]
        );
        // An invalid RUST_LOG falls back to the configured level.
        assert_eq!(
            seen(log_filter("warn", Some("=[bad"))),
            ["lapin::heartbeat"]
        );
        // So does a blank one (an empty filter would silence every line, errors too).
        assert_eq!(seen(log_filter("warn", Some(" "))), ["lapin::heartbeat"]);
    }
}
