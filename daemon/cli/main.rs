//! The `cachetail` command: the arguments and the dispatch. The subcommands that call the library
//! are in `commands`; the tools that drive a daemon from outside, through `cachetail::run` and
//! HTTP, in `bench`, `demo` and `watch`.

mod bench;
mod client;
mod commands;
mod demo;
mod embedded;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "cachetail",
    version,
    about = "Keeps a cache of SQLite query results exactly as fresh as the database"
)]
struct Cli {
    /// Log format: human-readable text, or JSON lines for log shippers. Filter with RUST_LOG.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: install capture, apply changes, serve HTTP.
    Run {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Check a config file and the database it names, without running (exit 2 on problems).
    Check {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Print the keys, tags and strategies a change maps to under a config (no daemon needed).
    Explain {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// The changed table.
        #[arg(long)]
        table: String,
        /// insert, update or delete.
        #[arg(long, value_parser = ["insert", "update", "delete"])]
        op: String,
        /// The old row's column values, as a JSON object (update, delete).
        #[arg(long)]
        old: Option<String>,
        /// The new row's column values, as a JSON object (insert, update).
        #[arg(long)]
        new: Option<String>,
    },
    /// Follow the running daemon's live feed: a line per applied change, a status line a second.
    Watch {
        /// The daemon's config (its `listen` address is followed).
        #[arg(long, short, conflicts_with = "url")]
        config: Option<PathBuf>,
        /// Or the daemon's address, like http://127.0.0.1:8080.
        #[arg(long)]
        url: Option<String>,
    },
    /// Install (or adjust) the outbox and the capture triggers, then exit.
    Install {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Pause capture for a migration that drops or rewrites a captured column: the triggers are
    /// removed and a running daemon serves reads from the database until `resume`.
    Pause {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Resume capture after `pause`: triggers reinstalled, values read before dropped.
    Resume {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Ask the running daemon to recompute a sample of cached values and report stale ones
    /// (exit 1 if any).
    Verify {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// How many cached values to check at most.
        #[arg(long, default_value_t = 1000)]
        sample: usize,
    },
    /// Remove cachetail's triggers and tables; the app's data is left untouched.
    Uninstall {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Measure the performance figures, each beside its baseline, and print a table.
    Bench {
        /// A short smoke run (what CI runs), not the figures.
        #[arg(long)]
        quick: bool,
        /// Where the benchmark's databases go.
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// Only the figures whose name contains this (capture, drain, fresh, redis, stampede, memory,
        /// takeover).
        #[arg(long)]
        only: Option<String>,
    },
    /// Build a demo catalog, run the daemon on it with a simulated app, print a live line.
    Demo {
        /// Where the demo's database and config go: a new or empty folder, or one a demo made
        /// (its files are replaced). Any other folder is refused, left as it was.
        #[arg(long, default_value = "demo-data")]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 5_000)]
        books: u32,
        #[arg(long, default_value_t = 1_000)]
        users: u32,
        #[arg(long, default_value_t = 100_000)]
        reviews: u32,
        /// The simulated app's writes per second.
        #[arg(long, default_value_t = 200)]
        writes_per_second: u32,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
    },
}

fn main() -> ExitCode {
    one_malloc_arena();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match execute(cli.command) {
        Ok(code) => code,
        Err(error) => {
            if let Some(config_error) = error.downcast_ref::<cachetail::ConfigError>() {
                print_lines(&config_error.to_string());
                return ExitCode::from(2);
            }
            if let Some(cachetail::Error::Config(config_error)) =
                error.downcast_ref::<cachetail::Error>()
            {
                print_lines(&config_error.to_string());
                return ExitCode::from(2);
            }
            print_lines(&format!("error: {error:#}"));
            ExitCode::FAILURE
        }
    }
}

/// One glibc malloc arena for every thread (glibc gives threads that contend arenas of their
/// own, up to eight per core). Cached values are allocated by the reader threads that fill them
/// and freed by whichever thread evicts them: spread over several arenas, each keeps its own
/// high-water mark, and with `[cache] max_bytes` the RSS settled 20 MiB higher (66 MiB cached
/// after 1M values read; `cachetail bench --only memory`). Small allocations still come from
/// each thread's own cache (tcache), without the arena's lock; hot reads measured no slower.
/// The crate's only `unsafe`: the lint denies it everywhere else.
#[allow(unsafe_code)]
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets a tunable; it runs first thing, before any other thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Prints an error on stderr, a line per problem, each escaped (it may quote the database's
/// names or data).
fn print_lines(text: &str) {
    for line in text.lines() {
        eprintln!("{}", cachetail::escape::Escaped(line));
    }
}

/// Each subcommand to the function or module that does it.
fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => commands::run(&config),
        Command::Check { config } => commands::check(&config),
        Command::Install { config } => commands::install(&config),
        Command::Pause { config } => commands::pause(&config),
        Command::Resume { config } => commands::resume(&config),
        Command::Uninstall { config } => commands::uninstall(&config),
        Command::Explain {
            config,
            table,
            op,
            old,
            new,
        } => commands::explain(&config, &table, &op, old.as_deref(), new.as_deref()),
        Command::Verify { config, sample } => commands::verify(&config, sample),
        Command::Watch { config, url } => watch::run(config.as_deref(), url.as_deref()),
        Command::Bench { quick, dir, only } => {
            bench::run(&bench::BenchOptions { dir, quick, only })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            dir,
            listen,
            books,
            users,
            reviews,
            writes_per_second,
            seconds,
        } => {
            demo::run(demo::DemoOptions {
                dir,
                listen,
                books,
                users,
                reviews,
                writes_per_second,
                duration: seconds.map(Duration::from_secs),
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Logs to stderr: text (coloured only on a terminal, so a log file or the journal holds no
/// escape sequences) or JSON lines. Fields that carry app data are escaped where they are
/// logged (`cachetail::escape`).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
