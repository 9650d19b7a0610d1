//! The running daemon: each stage's state built once at start, each task handed what it uses
//! (no struct every stage reaches into), one shutdown signal for all of them.
//!
//! Threads and tasks: the tail (its own thread: SQLite blocks), the reload thread, the
//! write-behind workers and warm start (tokio tasks), and the HTTP server (tokio). Stopping:
//! the signal turns true, the server stops accepting and lets requests finish (live feeds end;
//! the tail still applies, so a `?fresh=1` read in flight gets its answer); then the tail writes
//! its cursor and releases its lease, and the threads are joined.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::apply::write_behind::Workers;
use crate::apply::{Applier, ApplyCounters, WarmProgress, WriteBehindQueue, warm};
use crate::cache::Cache;
use crate::capture::InstallReport;
use crate::config::{Config, Reads, check};
use crate::db::ReadPool;
use crate::escape::Escaped;
use crate::http::{self, Http};
use crate::ops::{Sources, VerifyCounters};
use crate::progress;
use crate::registry::Registry;
use crate::tail::{Doorbell, Feed, Outbox, Tail, TailCounters, files};
use crate::{Prepared, reload};

/// Everything the running daemon is made of: the stages' state (behind `sources`, read by
/// the endpoint and the reports), the live feed, and the tail that alone writes its progress.
pub(crate) struct Parts {
    pub sources: Sources,
    pub feed: Feed,
    pub tail: Tail,
}

/// Builds the stages for `config`, whose queries read what `reads` says, from the durable
/// `cursor`.
pub(crate) fn build(config: Config, reads: Reads, cursor: u64) -> Parts {
    let pool = Arc::new(
        ReadPool::new(config.database.clone(), config.http.readers)
            .with_queue(config.http.read_queue),
    );
    let queue = Arc::new(WriteBehindQueue::new(config.write_behind.delay));
    let (writer, progress) = progress::channel(cursor);
    let registry = Arc::new(Registry::new(config, reads));
    let cache = Arc::new(Cache::new(
        &registry.config(),
        Arc::clone(&pool),
        Arc::clone(&registry),
        progress.clone(),
    ));
    let apply = Arc::new(ApplyCounters::default());
    let tail_counters = Arc::new(TailCounters::default());
    let feed = Feed::default();
    let applier = Applier::new(Arc::clone(&cache), Arc::clone(&queue), Arc::clone(&apply));
    let tail = Tail::new(
        Arc::clone(&registry),
        applier,
        writer,
        feed.clone(),
        Arc::clone(&tail_counters),
    );
    let sources = Sources {
        registry,
        cache,
        pool,
        progress,
        tail: tail_counters,
        apply,
        write_behind: queue,
        warm: Arc::new(WarmProgress::default()),
        verify: Arc::new(VerifyCounters::default()),
    };
    Parts {
        sources,
        feed,
        tail,
    }
}

/// Runs a prepared daemon until `shutdown` resolves.
pub(crate) async fn run(
    config: Config,
    prepared: Prepared,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    for gap in check::tracking_gaps(&config, &prepared.reads) {
        tracing::warn!("{}", Escaped(gap));
    }
    let Prepared {
        outbox,
        report,
        reads,
    } = prepared;
    let parts = build(config, reads, outbox.cursor());
    let Parts {
        sources,
        feed,
        tail,
    } = parts;
    let Some((tail, outbox)) = take_first_lease(tail, &report, outbox).await else {
        return;
    };
    // Two steps: the server stops first and lets its requests finish (a `?fresh=1` read among
    // them waits for the tail, which keeps applying), then the threads stop.
    let (stop, stopping) = watch::channel(false);
    let (halt, halting) = watch::channel(false);
    let threads = Threads::start(&sources, tail, outbox, &halting);
    let tasks = start_tasks(&sources);
    let config = sources.registry.config();
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, database = %config.database.display(), cursor = sources.progress.applied(), "cachetail serving");
    }
    let http = Http {
        sources: sources.clone(),
        feed,
        stopping,
    };
    let server = tokio::spawn(http::serve(http, listener, config.http.clone()));
    shutdown.await;
    stop.send_replace(true);
    let _ = server.await;
    halt.send_replace(true);
    for task in tasks {
        task.abort();
    }
    threads.stop().await;
    tracing::info!(cursor = sources.progress.applied(), "cachetail stopped");
}

/// The first try for the lease, before serving (on a blocking thread: SQLite), after noting what
/// the start-up install found.
async fn take_first_lease(
    tail: Tail,
    report: &InstallReport,
    outbox: Outbox,
) -> Option<(Tail, Outbox)> {
    tail.note_install(report);
    let taken = tokio::task::spawn_blocking(move || {
        let mut outbox = outbox;
        tail.first_take_over(&mut outbox);
        (tail, outbox)
    })
    .await;
    match taken {
        Ok(taken) => Some(taken),
        Err(e) => {
            tracing::error!(error = %e, "taking the lease panicked");
            None
        }
    }
}

/// Warm start, and SIGHUP (reloads the config, as daemons do; file
/// changes reload it too).
fn start_tasks(sources: &Sources) -> Vec<tokio::task::JoinHandle<()>> {
    vec![tokio::spawn(warm::run(
        Arc::clone(&sources.cache),
        Arc::clone(&sources.registry),
        Arc::clone(&sources.pool),
        Arc::clone(&sources.warm),
    ))]
}

/// The threads (tail, reload, the write-behind workers), the tail's and reload's doorbells, and what rings them (the file watcher,
/// SIGHUP).
struct Threads {
    handles: Vec<std::thread::JoinHandle<()>>,
    write_behind: Arc<WriteBehindQueue>,
    bells: [Arc<Doorbell>; 2],
    _watcher: Option<notify::RecommendedWatcher>,
    hangup: Option<tokio::task::JoinHandle<()>>,
}

impl Threads {
    fn start(
        sources: &Sources,
        tail: Tail,
        outbox: Outbox,
        stopping: &watch::Receiver<bool>,
    ) -> Threads {
        let config = sources.registry.config();
        let database_bell = Arc::new(Doorbell::default());
        let config_bell = Arc::new(Doorbell::default());
        let watcher = files::watch_files(
            &config.database,
            config.path.as_deref(),
            Arc::clone(&database_bell),
            Arc::clone(&config_bell),
        );
        if let Err(e) = &watcher {
            tracing::warn!(error = %e, poll = ?config.tail.poll_interval, "file notifications unavailable; polling only");
        }
        let mut handles = Vec::new();
        let spawned = {
            let (bell, stopping) = (Arc::clone(&database_bell), stopping.clone());
            std::thread::Builder::new()
                .name("cachetail-tail".into())
                .spawn(move || tail.run(outbox, &bell, &stopping))
        };
        handles.extend(spawned.ok());
        let spawned = {
            let reloader = reload::Reloader::new(sources);
            let (bell, tail_bell, stopping) = (
                Arc::clone(&config_bell),
                Arc::clone(&database_bell),
                stopping.clone(),
            );
            std::thread::Builder::new()
                .name("cachetail-reload".into())
                .spawn(move || reloader.run(&bell, &tail_bell, &stopping))
        };
        handles.extend(spawned.ok());
        handles.extend(
            Workers {
                queue: Arc::clone(&sources.write_behind),
                cache: Arc::clone(&sources.cache),
                registry: Arc::clone(&sources.registry),
                progress: sources.progress.clone(),
                counters: Arc::clone(&sources.apply),
                database: config.database.clone(),
            }
            .start(config.write_behind.workers),
        );
        Threads {
            handles,
            write_behind: Arc::clone(&sources.write_behind),
            hangup: hangup(Arc::clone(&config_bell)),
            bells: [database_bell, config_bell],
            _watcher: watcher.ok(),
        }
    }

    /// Wakes the threads (the shutdown signal was sent) and waits for them: the tail writes
    /// its cursor and releases its lease on the way out; the write-behind workers finish the
    /// recompute they run, if any.
    async fn stop(self) {
        self.write_behind.stop();
        for bell in &self.bells {
            bell.ring();
        }
        if let Some(hangup) = &self.hangup {
            hangup.abort();
        }
        let handles = self.handles;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in handles {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// SIGHUP rings the config doorbell.
fn hangup(bell: Arc<Doorbell>) -> Option<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        let kind = tokio::signal::unix::SignalKind::hangup();
        let mut signal = tokio::signal::unix::signal(kind).ok()?;
        Some(tokio::spawn(async move {
            while signal.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config");
                bell.ring();
            }
        }))
    }
    #[cfg(not(unix))]
    {
        let _ = bell;
        None
    }
}
