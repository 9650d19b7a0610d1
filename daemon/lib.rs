//! cachetail keeps a cache of SQLite query results exactly as fresh as the database.
//!
//! The data path, one module per stage:
//!
//! ```text
//! capture (triggers → outbox) → tail (cursor, wake-ups, batches) → rules (change → keys)
//!     → apply (delete / write-through / write-behind) → cache (moka, stale-fill guard)
//!     → serve (HTTP)
//! ```
//!
//! with `config` (parse, validate), `check` (against the database) and `reload` beside it.
//! [`run`] is the whole daemon; the `cachetail` binary is a thin CLI around it.

/// FNV-1a, 64-bit: a stable hash (the same across builds and processes), for ETags and Redis
/// family generations.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash: u64, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub mod admin;
pub mod apply;
pub mod auto;
pub mod cache;
pub mod capture;
pub mod check;
pub mod config;
pub mod events;
pub mod explain;
pub mod fill;
pub mod latency;
pub mod lease;
pub mod metrics;
pub mod redis_cache;
pub mod reload;
pub mod resp;
pub mod rules;
pub mod serve;
pub mod sqlite;
pub mod state;
pub mod status;
pub mod tail;
pub mod template;
pub mod ui;
pub mod verify;
pub mod warm;
pub mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;

pub use config::{Config, ConfigError};
pub use state::Shared;

/// Why the daemon could not start.
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

/// How long start-up waits for an app transaction that holds the write lock.
const LOCKED_AT_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Checks the config against its database, installs capture, and opens the outbox: everything
/// that must succeed before the daemon serves. Blocking. A database locked by an app writer is
/// waited for (the install needs the write lock for a moment), up to two minutes.
pub fn prepare(config: &Config) -> Result<(tail::Outbox, capture::InstallReport), Error> {
    if !config.database.exists() {
        return Err(Error::NoDatabase(config.database.clone()));
    }
    let open_error = |source| Error::Open {
        path: config.database.clone(),
        source,
    };
    let mut conn = sqlite::open_writer(&config.database).map_err(open_error)?;
    check::check_database(config, &mut conn)?;
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(100);
    let report = loop {
        match capture::install(&mut conn, config) {
            Err(capture::CaptureError::Sqlite(e))
                if is_busy(&e) && started.elapsed() < LOCKED_AT_START_TIMEOUT =>
            {
                tracing::warn!(error = %e, "the database is locked by another writer; waiting to install capture");
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            other => break other?,
        }
    };
    Ok((tail::Outbox::open(&config.database)?, report))
}

/// Whether an error means "another connection holds the lock".
pub fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Runs the daemon until `shutdown` resolves: capture installed, the tail applying the outbox,
/// the config watched for reloads, the HTTP endpoint serving on `listener`. Then it stops
/// accepting, lets in-flight requests finish, and returns with the cursor persisted.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let (config, (outbox, report)) =
        tokio::task::spawn_blocking(move || prepare(&config).map(|prepared| (config, prepared)))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
    for gap in check::tracking_gaps(&config) {
        tracing::warn!("{gap}");
    }
    let shared = Arc::new(Shared::new(config, outbox.cursor()));
    tail::note_install(&shared, &report);
    run_with(shared, outbox, listener, shutdown).await;
    Ok(())
}

/// Runs the stages on an already prepared daemon state (used by `run` and the demo).
pub async fn run_with(
    shared: Arc<Shared>,
    outbox: tail::Outbox,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let config = shared.config();
    let taking = Arc::clone(&shared);
    let outbox = match tokio::task::spawn_blocking(move || {
        let mut outbox = outbox;
        tail::first_take_over(&taking, &mut outbox);
        outbox
    })
    .await
    {
        Ok(outbox) => outbox,
        Err(e) => {
            tracing::error!(error = %e, "taking the lease panicked");
            return;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let database_bell = Arc::new(tail::Doorbell::default());
    let config_bell = Arc::new(tail::Doorbell::default());
    let watcher = watch::watch_files(
        &config.database,
        config.path.as_deref(),
        Arc::clone(&database_bell),
        Arc::clone(&config_bell),
    );
    if let Err(e) = &watcher {
        tracing::warn!(error = %e, poll = ?config.tail.poll_interval, "file notifications unavailable; polling only");
    }

    let tail_thread = {
        let (shared, bell, stop) = (
            Arc::clone(&shared),
            Arc::clone(&database_bell),
            Arc::clone(&stop),
        );
        std::thread::Builder::new()
            .name("cachetail-tail".into())
            .spawn(move || tail::run(shared, outbox, bell, stop))
    };
    let reload_thread = {
        let (shared, bell, tail_bell, stop) = (
            Arc::clone(&shared),
            Arc::clone(&config_bell),
            Arc::clone(&database_bell),
            Arc::clone(&stop),
        );
        std::thread::Builder::new()
            .name("cachetail-reload".into())
            .spawn(move || reload::run(shared, bell, tail_bell, stop))
    };
    let mut workers: Vec<_> = (0..config.write_behind.workers)
        .map(|_| tokio::spawn(apply::write_behind_worker(Arc::clone(&shared))))
        .collect();
    workers.push(tokio::spawn(warm::run(Arc::clone(&shared))));
    // SIGHUP reloads the config, as daemons do (file changes reload it too).
    #[cfg(unix)]
    workers.push({
        let bell = Arc::clone(&config_bell);
        tokio::spawn(async move {
            let hangup = tokio::signal::unix::SignalKind::hangup();
            if let Ok(mut signal) = tokio::signal::unix::signal(hangup) {
                while signal.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the config");
                    bell.ring();
                }
            }
        })
    });
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, database = %config.database.display(), cursor = shared.applied(), "cachetail serving");
    }

    serve::serve(Arc::clone(&shared), listener, shutdown).await;

    stop.store(true, Ordering::Release);
    database_bell.ring();
    config_bell.ring();
    for worker in workers {
        worker.abort();
    }
    let _ = tokio::task::spawn_blocking(move || {
        for thread in [tail_thread, reload_thread].into_iter().flatten() {
            let _ = thread.join();
        }
    })
    .await;
    drop(watcher);
    tracing::info!(cursor = shared.applied(), "cachetail stopped");
}
