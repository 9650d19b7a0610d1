//! The `cachetail` command: a thin CLI around the library, and the tools that drive a daemon from
//! outside (`bench`, `demo`, `watch`).

mod bench;
mod client;
mod demo;
mod embedded;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cachetail::{Config, capture, check, sqlite};
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
        /// Where the demo's database and config go (replaced if present).
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
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match execute(cli.command) {
        Ok(code) => code,
        Err(error) => {
            if let Some(config_error) = error.downcast_ref::<cachetail::ConfigError>() {
                eprintln!("{config_error}");
                return ExitCode::from(2);
            }
            if let Some(cachetail::Error::Config(config_error)) =
                error.downcast_ref::<cachetail::Error>()
            {
                eprintln!("{config_error}");
                return ExitCode::from(2);
            }
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => run(&config),
        Command::Check { config } => {
            let config = Config::load(&config)?;
            if !config.database.exists() {
                anyhow::bail!(cachetail::Error::NoDatabase(config.database.clone()));
            }
            let mut conn = sqlite::open(&config.database).context("opening the database")?;
            check::check_database(&config, &mut conn)?;
            if let cachetail::config::Backend::Redis { url, .. } = &config.cache.backend {
                // Not a config problem (the daemon waits for Redis), but worth knowing now.
                let reached =
                    cachetail::resp::Conn::connect(url, std::time::Duration::from_secs(2))
                        .and_then(|mut conn| conn.cmd(&["PING"]));
                if let Err(e) = reached {
                    eprintln!(
                        "warning: redis at {}:{} does not answer ({e}); the daemon will retry until it does",
                        url.host, url.port
                    );
                }
            }
            for rule in config.rules.iter().filter(|r| r.derived_from.is_some()) {
                let mut names: Vec<&str> = rule.keys.iter().map(|k| k.source()).collect();
                names.extend(rule.tags.iter().map(|t| t.source()));
                println!(
                    "derived (invalidate = \"auto\" on `{}`): a change to `{}` → {} ({})",
                    rule.derived_from.as_deref().unwrap_or(""),
                    rule.table,
                    if rule.keys.is_empty() {
                        "every key of the family".to_owned()
                    } else {
                        names.join(", ")
                    },
                    rule.strategy.name()
                );
            }
            for gap in check::tracking_gaps(&config) {
                eprintln!("warning: {gap}");
            }
            println!(
                "{}: ok ({} key families, {} rules, watching {})",
                config.file,
                config.families.len(),
                config.rules.len(),
                config
                    .captured_columns()
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Install { config } => {
            let config = Config::load(&config)?;
            cachetail::prepare(&config)?;
            println!("capture installed in {}", config.database.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { config } => {
            let config = Config::load(&config)?;
            let mut conn = open_existing(&config.database)?;
            let triggers = capture::pause(&mut conn)?;
            println!(
                "capture paused: {triggers} triggers removed from {}; run your migration, then `cachetail resume`",
                config.database.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { config } => {
            let config = Config::load(&config)?;
            let mut conn = open_existing(&config.database)?;
            check::check_database(&config, &mut conn)?;
            let report = capture::resume(&mut conn, &config)?;
            println!(
                "capture resumed: {} triggers installed; values read from {} before are dropped",
                report.created.len(),
                report.flushed.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain {
            config,
            table,
            op,
            old,
            new,
        } => {
            let config = Config::load(&config)?;
            let op = match op.as_str() {
                "insert" => cachetail::config::Op::Insert,
                "update" => cachetail::config::Op::Update,
                _ => cachetail::config::Op::Delete,
            };
            let explained = match cachetail::explain::explain(
                &config,
                &table,
                op,
                old.as_deref(),
                new.as_deref(),
            ) {
                Ok(explained) => explained,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            println!("{} on {table}:", op.name());
            if explained.flush_all {
                println!("  everything is dropped (the change cannot be mapped to keys)");
            }
            let width = explained
                .keys
                .iter()
                .map(|(k, _)| k.len())
                .max()
                .unwrap_or(0);
            for (key, strategy) in &explained.keys {
                println!("  key  {key:<width$}  {}", strategy.name());
            }
            for tag in &explained.tags {
                println!("  tag  {tag}");
            }
            if explained.keys.is_empty() && explained.tags.is_empty() && !explained.flush_all {
                println!("  nothing (no rule fires for it)");
            }
            for note in &explained.not_shown {
                println!("  (not shown: {note})");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { config, url } => {
            let address: std::net::SocketAddr = match (config, url) {
                (_, Some(url)) => url
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .parse()
                    .with_context(|| format!("`--url {url}` is not like http://127.0.0.1:8080"))?,
                (Some(config), None) => Config::load(&config)?.listen,
                (None, None) => Config::load(std::path::Path::new("config.toml"))?.listen,
            };
            watch::follow(address, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { config, sample } => {
            let config = Config::load(&config)?;
            let mut client = client::Client::new(config.listen);
            let bearer = config.admin_token.as_ref().map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> = bearer
                .as_deref()
                .map(|b| vec![("Authorization", b)])
                .unwrap_or_default();
            let reply = client
                .request(
                    "POST",
                    &format!("/v1/verify?sample={sample}"),
                    &headers,
                    &[],
                )
                .with_context(|| format!("cannot reach the daemon at {}", config.listen))?;
            let report = reply.json()?;
            if reply.status != 200 {
                anyhow::bail!("the daemon answered {}: {}", reply.status, report["error"]);
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
            let stale = report["stale"].as_u64().unwrap_or(0);
            Ok(if stale == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Uninstall { config } => {
            let config = Config::load(&config)?;
            let mut conn = open_existing(&config.database)?;
            let triggers = capture::uninstall(&mut conn)?;
            println!(
                "removed {triggers} triggers and cachetail's tables from {}",
                config.database.display()
            );
            Ok(ExitCode::SUCCESS)
        }
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

fn open_existing(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    if !path.exists() {
        anyhow::bail!(cachetail::Error::NoDatabase(path.to_path_buf()));
    }
    Ok(sqlite::open_writer(path)?)
}

fn run(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        println!("cachetail listening on http://{}", listener.local_addr()?);
        cachetail::run(config, listener, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
