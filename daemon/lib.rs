//! cachetail keeps a cache of SQLite query results exactly as fresh as the database.
//!
//! The data path, one folder per stage, each owning its state and its types:
//!
//! ```text
//! capture/ (triggers → outbox) → tail/ (cursor, lease, wake-ups, batches) → rules (change → plan)
//!     → apply/ (delete / write-through / write-behind, warm start)
//!     → cache/ (one interface; memory or Redis behind it; the stale-fill guard) → http/
//! ```
//!
//! Beside it: `config/` (plain data: parse, validate, templates, auto rules, check, diff),
//! `registry` (the config in force and what the running daemon keeps per family and rule),
//! `reload` (a diff applied), `ops/` (status, metrics, verify), `db/` (connections, the read
//! pool, running a family's query), and the leaf modules the stages hand each other: `types`
//! (changes, plans), `progress` (the tail's position and role), `counters`, `api` (the JSON
//! payloads), `escape` (app data printed for a person). `daemon` wires them together.
//!
//! The public surface is the daemon: [`prepare`] and [`run`], the [`Config`] and the errors, the
//! [`api`] payloads, [`commands`] for the CLI's other verbs, and [`escape`] for printing app data.

/// FNV-1a, 64-bit: a stable hash (the same across builds and processes), for ETags and Redis
/// family generations.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash: u64, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub mod api;
mod apply;
mod cache;
mod capture;
pub mod commands;
pub mod config;
mod counters;
mod daemon;
mod db;
pub mod escape;
mod explain;
mod http;
mod maintain;
mod ops;
mod progress;
mod registry;
mod reload;
mod rules;
mod tail;
mod types;

use std::future::Future;
use std::path::PathBuf;

use tokio::net::TcpListener;

pub use config::{Config, ConfigError};

/// Why the daemon (or a command) could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(
        "the database {0} does not exist (cachetail never creates the app's database; check `database` in the config)"
    )]
    NoDatabase(PathBuf),
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("installing capture failed: {0}")]
    Capture(#[from] capture::CaptureError),
    #[error(transparent)]
    Tail(#[from] tail::TailError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A daemon ready to run: its config checked against the database, capture installed, the
/// outbox open.
pub struct Prepared {
    outbox: tail::Outbox,
    report: capture::InstallReport,
    reads: config::Reads,
}

impl Prepared {
    /// The durable cursor: the last outbox position applied.
    pub fn cursor(&self) -> u64 {
        self.outbox.cursor()
    }
}

/// How long start-up waits for an app transaction that holds the write lock.
const LOCKED_AT_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Checks the config against its database, installs capture, and opens the outbox: everything
/// that must succeed before the daemon serves. Blocking. A database locked by an app writer is
/// waited for (the install needs the write lock for a moment), up to two minutes.
pub fn prepare(config: &Config) -> Result<Prepared, Error> {
    let mut conn = commands::open_existing(&config.database)?;
    let reads = config::check_database(config, &mut conn)?;
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(100);
    let report = loop {
        match capture::install(&mut conn, config) {
            Err(capture::CaptureError::Sqlite(e))
                if db::is_busy(&e) && started.elapsed() < LOCKED_AT_START_TIMEOUT =>
            {
                tracing::warn!(error = %e, "the database is locked by another writer; waiting to install capture");
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            other => break other?,
        }
    };
    Ok(Prepared {
        outbox: tail::Outbox::open(&config.database)?,
        report,
        reads,
    })
}

/// Runs the daemon until `shutdown` resolves: capture installed, the tail applying the outbox,
/// the config watched for reloads, the HTTP endpoint serving on `listener`. Then it stops
/// accepting, lets in-flight requests finish, and returns with the cursor persisted.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let (config, prepared) =
        tokio::task::spawn_blocking(move || prepare(&config).map(|prepared| (config, prepared)))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
    daemon::run(config, prepared, listener, shutdown).await;
    Ok(())
}
