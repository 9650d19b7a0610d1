//! Tail: reads the outbox in id order, in batches, each in one short read transaction; hands
//! each batch to the rules and the applier; then advances the durable cursor and prunes.
//!
//! The cursor moves only after a batch's cache actions are done, so a crash replays the batch
//! (at-least-once) and never skips one. Wake-ups come from file notifications (`files`, ringing
//! a `Doorbell`), with a fallback poll, because notifications are a doorbell, not the truth. Of
//! the daemons on one database, the one holding the lease (`lease`) applies; the others stand
//! by, following the durable cursor. The tail publishes its progress (`progress`) and each
//! applied change (`feed`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::apply::{Applier, lookups};
use crate::cache::{BeforeBatchError, StoreError};
use crate::capture::{self, CaptureError, InstallReport};
use crate::counters::{Counter, Latency, now_ms, unix_ms};
use crate::escape::Escaped;
use crate::progress::ProgressWriter;
use crate::registry::{Live, Registry};
use crate::rules;
use crate::types::{Change, ChangeBody};

mod doorbell;
pub mod feed;
pub mod files;
pub mod lease;
pub mod outbox;
mod rows;

pub use doorbell::Doorbell;
pub use feed::Feed;
use lease::Lease;
use outbox::PERSIST_EVERY;
pub use outbox::{Backlog, Outbox, Read, Rebuilt, backlog};

/// The quick re-looks after a wake-up: 0.1, 0.2, 0.4, ... ms, up to the limit.
const RECHECK_FIRST: Duration = Duration::from_micros(100);
const RECHECK_LIMIT: Duration = Duration::from_millis(64);

/// How many times a new lease holder raises its epoch above Redis's before giving up (each
/// time another daemon claimed a higher one meanwhile).
const CLAIM_TRIES: usize = 4;

/// How often a standby looks at the lease (and follows the durable cursor).
pub const STANDBY_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("cachetail is not installed in this database (no cursor row): run `cachetail install`")]
    NotInstalled,
    #[error("applying a batch panicked (a bug: please report it with the log above)")]
    Panicked,
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("this daemon lost the lease: another daemon applies the outbox now")]
    LeaseLost,
    #[error(
        "redis saw a newer lease epoch {0} times in a row while this daemon claimed its own: is another database's daemon using the same redis prefix?"
    )]
    EpochRace(usize),
}

impl From<BeforeBatchError> for TailError {
    fn from(error: BeforeBatchError) -> TailError {
        match error {
            BeforeBatchError::Store(e) => TailError::Store(e),
            BeforeBatchError::Sqlite(e) => TailError::Sqlite(e),
        }
    }
}

/// What the tail did, for status and metrics.
#[derive(Debug)]
pub struct TailCounters {
    /// Outbox rows and batches applied.
    pub events: Counter,
    pub batches: Counter,
    /// Batches that failed and were retried.
    pub apply_errors: Counter,
    /// Capture (re)installs after start-up (a migration, a reload, pause/resume).
    pub reinstalls: Counter,
    /// Outbox rows that could not be decoded (each flushed what depends on its table).
    pub unreadable_rows: Counter,
    /// Times the outbox was found emptied or rebuilt by hand (each flushed everything).
    pub outbox_rebuilds: Counter,
    /// From a write (its captured time) to its cache actions done: 250 µs to ~8 s, doubling
    /// (the captured time has millisecond precision).
    pub fresh: Latency,
    /// Time spent on applied batches, in microseconds: mapping changes to keys and carrying out
    /// the cache actions (write-through recomputes included), and apart from it, the derived
    /// rules' lookups. The lookups asked (one per rule and lookup per batch), and those of them
    /// that dropped their family instead.
    pub apply_micros: Counter,
    pub lookup_micros: Counter,
    pub lookups: Counter,
    pub lookup_fallbacks: Counter,
}

impl Default for TailCounters {
    fn default() -> TailCounters {
        TailCounters {
            events: Counter::default(),
            batches: Counter::default(),
            apply_errors: Counter::default(),
            reinstalls: Counter::default(),
            unreadable_rows: Counter::default(),
            outbox_rebuilds: Counter::default(),
            fresh: Latency::new(0.000_25, 16),
            apply_micros: Counter::default(),
            lookup_micros: Counter::default(),
            lookups: Counter::default(),
            lookup_fallbacks: Counter::default(),
        }
    }
}

impl TailCounters {
    /// Counts one applied batch's time: `apply` (plan and cache actions), `lookup`, and what
    /// its lookups did.
    fn record_batch(&self, apply: Duration, lookup: Duration, resolved: lookups::Resolved) {
        self.apply_micros.add(apply.as_micros() as u64);
        self.lookup_micros.add(lookup.as_micros() as u64);
        self.lookups.add(resolved.asked);
        self.lookup_fallbacks.add(resolved.fell_back);
    }
}

/// The applying loop's state: what it was handed at start, and what it alone writes.
pub struct Tail {
    registry: Arc<Registry>,
    applier: Applier,
    progress: ProgressWriter,
    feed: Feed,
    counters: Arc<TailCounters>,
}

/// Where the loop stands between two turns.
struct Pace {
    /// After a wake-up that found nothing, look again a few times, quickly: a notification fires
    /// when the app writes the `-wal` file, a moment before the commit is published in the
    /// `-shm` index (which gives no notification), so the first look can be too early.
    recheck: Option<Duration>,
    /// The wait before retrying a failed batch.
    backoff: Duration,
    announced_standby: bool,
}

impl Tail {
    pub fn new(
        registry: Arc<Registry>,
        applier: Applier,
        progress: ProgressWriter,
        feed: Feed,
        counters: Arc<TailCounters>,
    ) -> Tail {
        Tail {
            registry,
            applier,
            progress,
            feed,
            counters,
        }
    }

    /// Batch after batch until `stop`, while this daemon holds the lease; a standby until then.
    /// Runs on its own thread (SQLite is blocking).
    pub fn run(self, mut outbox: Outbox, doorbell: &Doorbell, stop: &watch::Receiver<bool>) {
        if !outbox.fencing {
            outbox.use_lease(self.registry.config().tail.lease);
        }
        let mut pace = Pace {
            recheck: None,
            backoff: Duration::from_millis(20),
            announced_standby: false,
        };
        while !*stop.borrow() {
            if !outbox.lease.held() {
                self.stand_by_turn(&mut outbox, doorbell, &mut pace, stop);
                continue;
            }
            match outbox.keep_lease() {
                Ok(true) => self.apply_turn(&mut outbox, doorbell, &mut pace),
                Ok(false) | Err(_) => self.stand_by(&mut outbox),
            }
        }
        if outbox.lease.held() {
            if let Err(e) = outbox.persist(true, true) {
                tracing::warn!(error = %e, "writing the cursor at shutdown failed; the last batches will be applied again");
            }
            outbox.release_lease();
        }
        tracing::info!(cursor = outbox.cursor(), "tail stopped");
    }

    /// Without the lease: take it if it is free, else follow the durable cursor and the pause
    /// flag (a standby installs nothing, so it learns of a pause from the flag), and wait.
    fn stand_by_turn(
        &self,
        outbox: &mut Outbox,
        doorbell: &Doorbell,
        pace: &mut Pace,
        stop: &watch::Receiver<bool>,
    ) {
        match self.take_over(outbox) {
            Ok(true) => {
                pace.backoff = Duration::from_millis(20);
                pace.announced_standby = false;
                pace.recheck = Some(RECHECK_FIRST);
                return;
            }
            Ok(false) => {
                if !pace.announced_standby {
                    tracing::info!(holder = ?Lease::current(outbox.conn()).ok().flatten().map(|h| h.holder), "another daemon holds the lease: standing by (serving reads)");
                    pace.announced_standby = true;
                }
                if let Ok(cursor) = outbox.durable_cursor() {
                    self.progress.follow(cursor);
                }
                if let Ok(paused) = capture::is_paused(outbox.conn()) {
                    self.set_paused(paused);
                }
            }
            Err(e) => {
                // The try wrote to the database (it took the lease, then let it go): back off,
                // doubling up to 2 s, or the file watcher's ring would start the next try at once.
                tracing::warn!(error = %Escaped(&e), retry_in = ?pace.backoff, "taking the lease failed; retrying");
                doorbell.back_off(pace.backoff, stop);
                pace.backoff = (pace.backoff * 2).min(Duration::from_secs(2));
                return;
            }
        }
        doorbell.wait(STANDBY_POLL);
    }

    /// With the lease: one batch (caught by `catch_unwind`: a bug in one batch must not silently
    /// stop the daemon from applying; it is logged, counted, and retried like any other failure,
    /// the cursor not having moved), then what its outcome calls for.
    fn apply_turn(&self, outbox: &mut Outbox, doorbell: &Doorbell, pace: &mut Pace) {
        let live = self.registry.live();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step(&live, outbox)))
                .unwrap_or_else(|_| Err(TailError::Panicked));
        match outcome {
            Ok(0) => self.idle(outbox, doorbell, pace, &live),
            Ok(_) => {
                pace.backoff = Duration::from_millis(20);
                pace.recheck = Some(RECHECK_FIRST);
            }
            Err(e) if lost(&e) => self.stand_by(outbox),
            Err(e) => {
                self.counters.apply_errors.inc();
                tracing::warn!(error = %Escaped(&e), retry_in = ?pace.backoff, "applying the outbox failed; the cursor stays, the batch will be retried");
                doorbell.wait(pace.backoff);
                pace.backoff = (pace.backoff * 2).min(Duration::from_secs(2));
            }
        }
    }

    /// Caught up: write the cursor and prune (a quiet moment), then wait for a wake-up, the
    /// next quick re-look, the lease's renewal, or the fallback poll.
    fn idle(&self, outbox: &mut Outbox, doorbell: &Doorbell, pace: &mut Pace, live: &Live) {
        self.progress.caught_up(now_ms());
        if let Err(e) = outbox.persist(false, true) {
            if lost(&e) {
                self.stand_by(outbox);
                return;
            }
            tracing::warn!(error = %e, "writing the cursor failed; it will be retried");
        }
        let mut wait = pace
            .recheck
            .unwrap_or(live.config.tail.poll_interval)
            .min(outbox.lease.renew_in().max(Duration::from_millis(1)));
        if outbox.persist_pending() {
            wait = wait.min(PERSIST_EVERY);
        }
        let rung = doorbell.wait(wait);
        pace.recheck = match pace.recheck {
            _ if rung => Some(RECHECK_FIRST),
            Some(wait) if wait < RECHECK_LIMIT => Some(wait * 2),
            _ => None,
        };
    }

    /// The first try for the lease, before the daemon serves: a daemon alone on its database is
    /// active from its first request (else it starts as a standby and the tail keeps trying).
    pub fn first_take_over(&self, outbox: &mut Outbox) -> bool {
        outbox.use_lease(self.registry.config().tail.lease);
        match self.take_over(outbox) {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(error = %Escaped(&e), "taking the lease failed; retrying");
                false
            }
        }
    }

    /// Takes the lease if it is free; on success, continues from the durable cursor.
    fn take_over(&self, outbox: &mut Outbox) -> Result<bool, TailError> {
        if !outbox.try_acquire_lease()? {
            return Ok(false);
        }
        let prepared = (|| {
            outbox.reopen()?;
            let head = outbox.head()?;
            if !self.claim_epoch(outbox)? {
                return Ok(false);
            }
            self.applier.cache().take_over(outbox.cursor(), head)?;
            Ok::<_, TailError>(true)
        })();
        match prepared {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) => {
                outbox.release_lease();
                return Err(e);
            }
        }
        let epoch = outbox.lease.epoch().unwrap_or(0);
        self.progress.applied(outbox.cursor());
        self.progress.set_active(true);
        tracing::info!(
            holder = outbox.lease.holder(),
            epoch,
            cursor = outbox.cursor(),
            "holding the lease: applying the outbox"
        );
        Ok(true)
    }

    /// Claims the epoch just taken in the cache (Redis) before anything is applied. If Redis has
    /// seen one at or above it (the lease row was deleted or reset, e.g. by `uninstall` and
    /// `install` while daemons ran), the row's epoch is raised above it, while this daemon still
    /// holds the row at the epoch it took, and claimed again: the daemon never waits for epochs
    /// to climb past Redis's, and no two daemons ever apply under one epoch. False: the lease was
    /// lost meanwhile.
    fn claim_epoch(&self, outbox: &mut Outbox) -> Result<bool, TailError> {
        for _ in 0..CLAIM_TRIES {
            let Some(epoch) = outbox.lease.epoch() else {
                return Ok(false);
            };
            let claimed = u64::try_from(epoch).unwrap_or(0);
            let Some(seen) = self.applier.cache().claim_epoch(claimed)? else {
                return Ok(true);
            };
            let above = i64::try_from(seen)
                .unwrap_or(i64::MAX - 1)
                .saturating_add(1);
            tracing::warn!(
                epoch,
                cache_epoch = seen,
                raised_to = above,
                "redis has seen a lease epoch at or above this one (the lease row was deleted or reset, e.g. by `uninstall` and `install` while daemons ran): raising the lease's epoch above it"
            );
            if !outbox.raise_lease_epoch(above)? {
                return Ok(false);
            }
        }
        Err(TailError::EpochRace(CLAIM_TRIES))
    }

    /// This daemon lost the lease: it applies nothing from now on, and serves as a standby.
    fn stand_by(&self, outbox: &mut Outbox) {
        if self.progress.set_active(false) {
            tracing::warn!(
                holder = outbox.lease.holder(),
                "lost the lease (another daemon took over): applying nothing, standing by"
            );
        }
        outbox.use_lease(self.registry.config().tail.lease);
    }

    /// Reads, plans and applies one batch; returns how many changes it applied.
    pub fn step(&self, live: &Live, outbox: &mut Outbox) -> Result<usize, TailError> {
        if let Some(report) = outbox.recheck_capture(&live.config)? {
            self.note_reinstall(&report, outbox)?;
        }
        let epoch = u64::try_from(outbox.lease.epoch().unwrap_or(0)).unwrap_or(0);
        let cursor = outbox.cursor();
        let cache = self.applier.cache();
        cache.before_batch(live, cursor, || outbox.head(), epoch)?;
        let changes = match outbox.read_batch(live.config.tail.batch_size)? {
            Read::Changes(changes) => changes,
            Read::Rebuilt(rebuilt) => return self.restart_after_rebuild(outbox, rebuilt),
        };
        let Some(last) = changes.last().map(|c| c.position) else {
            return Ok(0);
        };
        let planning = Instant::now();
        let mut plan = rules::plan(&live.config, &changes);
        let watched = self.feed.watched();
        let looking = Instant::now();
        let outcomes = lookups::resolve(
            &mut plan,
            &live.config,
            outbox.conn(),
            (last, outbox.deadline()),
            watched,
        );
        lookups::guard_direct_ties(&mut plan, &live.config, outbox.conn(), last);
        let applying = Instant::now();
        let renewer = outbox.renewer();
        self.applier.apply(
            (&plan, &changes),
            live,
            outbox.conn(),
            (cursor, last, epoch),
            &|| renewer.renew_if_due(),
        )?;
        let apply = (looking - planning) + applying.elapsed();
        self.counters
            .record_batch(apply, applying - looking, outcomes.counts());
        self.record_freshness(&changes);
        self.note_unreadable(&changes);
        self.feed.publish(&live.config, &changes, &outcomes);
        for (&index, &(invalidations, recomputes)) in &plan.per_rule {
            if let Some(rule) = live.rules.get(index) {
                rule.invalidations.add(invalidations);
                rule.recomputes.add(recomputes);
            }
        }
        outbox.advance(last);
        self.progress.applied(last);
        self.counters.events.add(changes.len() as u64);
        self.counters.batches.inc();
        match outbox.persist(false, false) {
            Ok(()) => {}
            // Another daemon holds the lease (this one was paused past it): the batch's cache
            // actions are done and harmless, but nothing more may be applied: stand by now.
            Err(e) if lost(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "writing the cursor failed; it will be retried after the next batch");
            }
        }
        Ok(changes.len())
    }

    /// The outbox was emptied or rebuilt by hand: the tail restarts after every position used,
    /// with a reset marker that drops everything cached (`Outbox::restart_after_rebuild`), which
    /// the next batch applies. Counted and logged; one row's worth of progress.
    fn restart_after_rebuild(
        &self,
        outbox: &mut Outbox,
        rebuilt: Rebuilt,
    ) -> Result<usize, TailError> {
        let applied = self.progress.reader().applied();
        let restart = outbox.restart_after_rebuild(applied)?;
        self.counters.outbox_rebuilds.inc();
        tracing::warn!(
            cursor = rebuilt.cursor,
            row_at_cursor = rebuilt.row_at_cursor,
            restart,
            "the outbox was emptied or rebuilt by hand (its ids started again below the cursor): every cached value is dropped, and the new outbox is applied from here on"
        );
        Ok(1)
    }

    /// The rows of an applied batch that could not be decoded: counted, and each logged once
    /// (when its batch is applied: a failed batch is retried without a word about them).
    fn note_unreadable(&self, changes: &[Change]) {
        for change in changes {
            if let ChangeBody::Unreadable(unreadable) = &change.body {
                self.counters.unreadable_rows.inc();
                let table = unreadable.table.as_deref();
                tracing::warn!(
                    outbox_id = change.position,
                    table,
                    reason = unreadable.reason,
                    "an outbox row could not be decoded: every cached value that depends on its table (everything, if the table is unknown) was dropped"
                );
            }
        }
    }

    /// Capture was reinstalled after start-up: counted, and noted.
    fn note_reinstall(&self, report: &InstallReport, outbox: &Outbox) -> Result<(), TailError> {
        if report.changed() || !report.flushed.is_empty() {
            self.counters.reinstalls.inc();
        }
        if self.progress.reader().is_paused() && !report.paused {
            // Capture resumed: values cached before the pause are hidden before reads use the
            // cache again (see `Cache::capture_resumed`).
            self.applier.cache().capture_resumed(outbox.head()?);
        }
        self.note_install(report);
        Ok(())
    }

    /// Records what an install found: logs it, and sets the paused flag the endpoint obeys.
    pub fn note_install(&self, report: &InstallReport) {
        if report.changed() {
            tracing::info!(created = ?report.created, dropped = ?report.dropped, "capture triggers installed");
        }
        if !report.flushed.is_empty() {
            tracing::info!(tables = ?report.flushed, "capture (re)installed: values read from these tables before are dropped");
        }
        for (table, reason) in &report.failed {
            tracing::error!(
                table,
                reason = %Escaped(reason),
                "cannot capture this table: its values are not cached until the config or the schema is fixed"
            );
        }
        self.progress.set_capture_failures(&report.failed);
        self.set_paused(report.paused);
    }

    /// Sets the paused flag the endpoint obeys (from an install, or, on a standby, from the
    /// flag in the database).
    fn set_paused(&self, paused: bool) {
        if self.progress.set_paused(paused) != paused {
            tracing::warn!(
                paused,
                "capture pause changed: while paused, reads bypass the cache"
            );
        }
    }

    /// Commit → fresh: from each change's captured write time to now, when its cache actions are
    /// done (invalidations applied, write-through values stored).
    fn record_freshness(&self, changes: &[Change]) {
        let now = unix_ms();
        let took: Vec<f64> = changes
            .iter()
            .filter_map(|c| c.written_ms)
            .map(|written| (now - written).max(0.0))
            .collect();
        self.counters.fresh.record(now as u64, &took);
    }
}

fn lost(error: &TailError) -> bool {
    matches!(
        error,
        TailError::LeaseLost | TailError::Store(StoreError::Fenced)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use rusqlite::Connection;

    /// A database with one watched table `t`, and a tail holding the lease on it.
    fn one_table(dir: &std::path::Path) -> (Connection, Outbox, Tail, Arc<Live>) {
        let app = Connection::open(dir.join("app.db")).expect("open");
        app.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL);")
            .expect("schema");
        let config = Config::parse(
            "database = \"app.db\"\n\
             [keys.\"t:{id}\"]\nquery = \"SELECT id, v FROM t WHERE id = :id\"\n\
             [[rules]]\ntable = \"t\"\nkeys = [\"t:{id}\"]\n",
            "test.toml",
            dir,
        )
        .expect("config");
        let prepared = crate::prepare(&config).expect("prepare");
        let crate::Prepared {
            mut outbox, reads, ..
        } = prepared;
        let parts = crate::daemon::build(config, reads, outbox.cursor());
        let tail = parts.tail;
        assert!(
            tail.first_take_over(&mut outbox),
            "alone: it holds the lease"
        );
        let live = parts.sources.registry.live();
        (app, outbox, tail, live)
    }

    #[test]
    fn an_emptied_outbox_restarts_the_tail_above_every_position_used() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (app, mut outbox, tail, live) = one_table(dir.path());
        let write = |n: usize| {
            for _ in 0..n {
                app.execute("INSERT INTO t (v) VALUES ('a')", [])
                    .expect("write");
            }
        };
        write(30);
        while tail.step(&live, &mut outbox).expect("a batch") > 0 {}
        let used = outbox.cursor();
        assert_eq!(used, 31, "the flush marker and 30 writes");

        // Emptied by hand, then five writes: ids 1 to 5, below the cursor.
        app.execute("DELETE FROM cachetail_outbox", [])
            .expect("empty");
        write(5);
        assert_eq!(tail.step(&live, &mut outbox).expect("the restart"), 1);
        assert_eq!(tail.counters.outbox_rebuilds.get(), 1);
        assert_eq!(
            outbox.cursor(),
            used + 1,
            "the restart's row, above every id used"
        );
        assert_eq!(outbox.durable_cursor().expect("cursor"), used + 1);
        // The reset marker is applied next: a flush of everything at its position.
        assert_eq!(tail.step(&live, &mut outbox).expect("the reset"), 1);
        assert_eq!(tail.progress.reader().applied(), used + 2);
        // From then on, the app's writes get ids above it, and are applied.
        write(2);
        assert_eq!(tail.step(&live, &mut outbox).expect("a batch"), 2);
        assert_eq!(outbox.cursor(), used + 4);
        assert_eq!(tail.step(&live, &mut outbox).expect("caught up"), 0);
        assert_eq!(tail.counters.outbox_rebuilds.get(), 1, "once");
        // Pruning crosses the gap in the ids: only the cursor's row is left.
        outbox.persist(true, true).expect("persist and prune");
        let rows: Vec<i64> = app
            .prepare("SELECT id FROM cachetail_outbox")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("rows");
        assert_eq!(rows, [used as i64 + 4]);
    }

    #[test]
    fn a_cursor_write_that_finds_the_lease_taken_ends_the_step_as_lease_lost() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (app, mut outbox, tail, live) = one_table(dir.path());
        app.execute("INSERT INTO t (v) VALUES ('a')", [])
            .expect("write");
        std::thread::sleep(PERSIST_EVERY);
        // The first batch: capture's flush marker and the write.
        let applied = tail.step(&live, &mut outbox).expect("a batch");
        assert_eq!(applied, 2);
        let durable = outbox.durable_cursor().expect("cursor");
        assert_eq!(durable, outbox.cursor(), "the cursor write was due");

        // Another daemon takes over (this one was paused past its lease), and a change comes.
        app.execute(
            "UPDATE cachetail_lease SET holder = 'elsewhere:1:0', epoch = epoch + 1",
            [],
        )
        .expect("take the lease");
        app.execute("INSERT INTO t (v) VALUES ('b')", [])
            .expect("write");
        std::thread::sleep(PERSIST_EVERY);
        let outcome = tail.step(&live, &mut outbox);
        assert!(
            matches!(outcome, Err(TailError::LeaseLost)),
            "the tail must learn at once that it lost the lease, got {outcome:?}"
        );
        assert_eq!(outbox.durable_cursor().expect("cursor"), durable);
    }

    #[test]
    fn the_backlog_ages_from_the_oldest_unapplied_write() -> rusqlite::Result<()> {
        let conn = Connection::open_in_memory()?;
        // An outbox from before write times were recorded, with a row in it.
        conn.execute_batch(
            "CREATE TABLE cachetail_outbox (id INTEGER PRIMARY KEY, capture INTEGER NOT NULL, \
                 op INTEGER NOT NULL, old TEXT, new TEXT);
             INSERT INTO cachetail_outbox (id, capture, op) VALUES (1, 0, 4);",
        )?;
        capture::ensure_schema(&conn)?;
        capture::ensure_schema(&conn)?; // idempotent
        conn.execute_batch(
            "INSERT INTO cachetail_outbox (id, capture, op, at) VALUES \
                 (2, 0, 4, julianday('now', '-5 seconds')), (3, 0, 4, julianday('now'));",
        )?;
        let now = now_ms();
        let all = backlog(&conn, 0)?;
        assert_eq!((all.head, all.events()), (3, 3));
        let waited = all.seconds(0, now);
        assert!((4.9..6.0).contains(&waited), "{waited}");
        assert!(backlog(&conn, 2)?.seconds(0, now) < 1.0);
        assert_eq!(backlog(&conn, 3)?.seconds(0, now), 0.0);
        // Rows without a time: the time since the tail was last caught up.
        conn.execute("UPDATE cachetail_outbox SET at = NULL", [])?;
        assert_eq!(backlog(&conn, 0)?.seconds(now - 2000, now), 2.0);
        Ok(())
    }
}
