//! Tail: reads the outbox in id order, in batches, each in one short read transaction; hands
//! each batch to the rules and the applier; then advances the durable cursor and prunes.
//!
//! The cursor moves only after a batch's cache actions are done, so a crash replays the batch
//! (at-least-once) and never skips one. Wake-ups come from file notifications (the `Doorbell`),
//! with a fallback poll, because notifications are a doorbell, not the truth.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params};

use crate::capture::{self, CaptureError, Layout};
use crate::config::{Config, Op};
use crate::lease::Lease;
use crate::state::Shared;
use crate::{apply, rules, sqlite};

/// The quick re-looks after a wake-up: 0.1, 0.2, 0.4, ... ms, up to the limit.
const RECHECK_FIRST: Duration = Duration::from_micros(100);
const RECHECK_LIMIT: Duration = Duration::from_millis(64);

/// Rows deleted per pruning transaction: small, so the app's writers never wait long.
const PRUNE_CHUNK: u64 = 2_000;
/// How often the durable cursor is written at most, while changes keep coming.
const PERSIST_EVERY: Duration = Duration::from_millis(100);
const PERSIST_EVENTS: u64 = 50_000;
/// Applied rows left unpruned while busy, at most.
const PRUNE_BACKLOG: u64 = 100_000;

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
    Redis(#[from] crate::resp::RedisError),
    #[error("this daemon lost the lease: another daemon applies the outbox now")]
    LeaseLost,
}

/// One captured row change.
#[derive(Debug)]
pub struct RowChange {
    pub layout: Arc<Layout>,
    pub op: Op,
    pub old: Option<Vec<Value>>,
    pub new: Option<Vec<Value>>,
}

/// What one outbox row records.
#[derive(Debug)]
pub enum ChangeBody {
    /// A row of a watched table changed.
    Row(RowChange),
    /// Changes to this table may have gone uncaptured (capture was just installed, reinstalled
    /// after a migration, resumed, or cannot be installed): drop what was read from it before.
    Flush { table: Arc<str> },
    /// The row could not be read: the applier drops everything rather than leave anything stale.
    Unreadable(String),
    /// A position marker (an admin action's): nothing to apply.
    Marker,
}

/// An outbox row: its position and what it records.
#[derive(Debug)]
pub struct Change {
    pub position: u64,
    /// When the write ran (unix ms, SQLite's clock), if the capture recorded it.
    pub written_ms: Option<f64>,
    pub body: ChangeBody,
}

/// The daemon's handle on the outbox: its connection, the capture layouts, and the cursor.
pub struct Outbox {
    conn: Connection,
    layouts: HashMap<i64, Arc<Layout>>,
    cursor: u64,
    pruned_below: u64,
    /// The cursor as last written to the database, when, and how far pruning has gone.
    persisted: u64,
    persisted_at: Instant,
    /// `PRAGMA schema_version` when capture was last checked: a change means a migration may
    /// have dropped triggers (rebuilt tables do).
    schema_version: i64,
    /// The config capture was last installed for (the tail owns capture: a reload swaps the
    /// config, the tail installs the triggers it needs, so two installers never undo each other).
    installed_for: usize,
    /// Which daemon applies; with `fencing`, the cursor moves only while this one holds it.
    lease: Lease,
    fencing: bool,
    /// Redis was emptied for the pause in force.
    flushed_for_pause: bool,
}

impl Outbox {
    pub fn open(path: &Path) -> Result<Outbox, TailError> {
        let conn = sqlite::open_writer(path)?;
        let cursor: Option<i64> = conn
            .query_row(
                "SELECT position FROM cachetail_cursor WHERE consumer = 'main'",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(_, Some(ref m)) if m.contains("no such table") => {
                    TailError::NotInstalled
                }
                other => TailError::Sqlite(other),
            })?;
        let cursor = cursor.ok_or(TailError::NotInstalled)?;
        let layouts = capture::load_layouts(&conn)?;
        let schema_version = schema_version(&conn)?;
        let oldest: i64 = conn.query_row(
            "SELECT coalesce(min(id), 0) FROM cachetail_outbox",
            [],
            |row| row.get(0),
        )?;
        Ok(Outbox {
            conn,
            layouts,
            cursor: u64::try_from(cursor).unwrap_or(0),
            pruned_below: u64::try_from(oldest).unwrap_or(0),
            persisted: u64::try_from(cursor).unwrap_or(0),
            persisted_at: Instant::now(),
            schema_version,
            installed_for: 0,
            lease: Lease::new(Duration::from_secs(5)),
            fencing: false,
            flushed_for_pause: false,
        })
    }

    /// From now on the cursor moves only under a lease of this duration (see `lease`).
    pub fn use_lease(&mut self, duration: Duration) {
        self.lease = Lease::new(duration);
        self.fencing = true;
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Reads the durable cursor again (after taking over from another daemon: its progress is
    /// what the database says), and where pruning stands.
    fn reopen(&mut self) -> Result<(), TailError> {
        let cursor: i64 = self.conn.query_row(
            "SELECT position FROM cachetail_cursor WHERE consumer = 'main'",
            [],
            |row| row.get(0),
        )?;
        let oldest: i64 = self.conn.query_row(
            "SELECT coalesce(min(id), 0) FROM cachetail_outbox",
            [],
            |row| row.get(0),
        )?;
        let cursor = u64::try_from(cursor).unwrap_or(0);
        self.cursor = cursor;
        self.persisted = cursor;
        self.persisted_at = Instant::now();
        self.pruned_below = u64::try_from(oldest).unwrap_or(0);
        self.layouts = capture::load_layouts(&self.conn)?;
        self.schema_version = -1;
        self.flushed_for_pause = false;
        Ok(())
    }

    /// The durable cursor as the database has it now (a standby follows it).
    fn durable_cursor(&self) -> rusqlite::Result<u64> {
        let cursor: i64 = self
            .conn
            .prepare_cached("SELECT position FROM cachetail_cursor WHERE consumer = 'main'")?
            .query_row([], |row| row.get(0))?;
        Ok(u64::try_from(cursor).unwrap_or(0))
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Reinstalls capture if the schema changed since the last look (a migration rebuilt a
    /// table, dropped or created one, altered columns, or someone paused or resumed capture).
    pub fn recheck_capture(
        &mut self,
        shared: &Shared,
        config: &Arc<Config>,
    ) -> Result<(), TailError> {
        let config_id = Arc::as_ptr(config) as usize;
        if self.installed_for == 0 {
            // The config `prepare` installed for.
            self.installed_for = config_id;
        }
        let version = schema_version(&self.conn)?;
        if version == self.schema_version && config_id == self.installed_for {
            return Ok(());
        }
        let report = capture::install(&mut self.conn, config)?;
        self.schema_version = schema_version(&self.conn)?;
        self.installed_for = config_id;
        if report.changed() || !report.flushed.is_empty() {
            shared.stats.reinstalls.fetch_add(1, Ordering::Relaxed);
        }
        if shared.redis.is_none() && shared.paused.load(Ordering::Acquire) && !report.paused {
            // Capture resumed. Values cached before the pause may have gone stale meanwhile:
            // the flush markers this install wrote hide them, but only once this tail applies
            // them; reads use the cache again as soon as the pause is lifted, so hide them now.
            shared.cache.flush_all(self.head()?);
        }
        note_install(shared, &report);
        Ok(())
    }

    /// The newest outbox id (0 when nothing was ever captured).
    pub fn head(&self) -> rusqlite::Result<u64> {
        head(&self.conn)
    }

    /// Reads up to `limit` changes after the cursor, in id order.
    pub fn read_batch(&mut self, limit: usize) -> Result<Vec<Change>, TailError> {
        let mut raw = Vec::with_capacity(limit.min(4096));
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, capture, op, old, new, at FROM cachetail_outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![self.cursor as i64, limit as i64])?;
            while let Some(row) = rows.next()? {
                raw.push((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, Option<String>>(3)?,
                    row.get::<_, Option<String>>(4)?,
                    row.get::<_, Option<f64>>(5).ok().flatten(),
                ));
            }
        }
        let mut changes = Vec::with_capacity(raw.len());
        for (id, layout, op, old, new, at) in raw {
            if !self.layouts.contains_key(&layout) {
                // Capture was reinstalled (a reload changed the columns): learn the new layouts.
                self.layouts = capture::load_layouts(&self.conn)?;
            }
            let body = self.decode(id, layout, op, old.as_deref(), new.as_deref());
            changes.push(Change {
                position: u64::try_from(id).unwrap_or(0),
                written_ms: at.map(capture::julian_to_unix_ms),
                body,
            });
        }
        Ok(changes)
    }

    fn decode(
        &self,
        id: i64,
        layout: i64,
        op: i64,
        old: Option<&str>,
        new: Option<&str>,
    ) -> ChangeBody {
        if op == capture::MARKER_OP {
            return ChangeBody::Marker;
        }
        match self.layouts.get(&layout) {
            Some(l) if op == capture::FLUSH_OP => ChangeBody::Flush {
                table: Arc::clone(&l.table),
            },
            _ => match self.decode_row(id, layout, op, old, new) {
                Ok(row) => ChangeBody::Row(row),
                Err(reason) => ChangeBody::Unreadable(reason),
            },
        }
    }

    fn decode_row(
        &self,
        id: i64,
        layout: i64,
        op: i64,
        old: Option<&str>,
        new: Option<&str>,
    ) -> Result<RowChange, String> {
        let layout = self
            .layouts
            .get(&layout)
            .ok_or_else(|| format!("outbox row {id} names unknown capture layout {layout}"))?;
        let op = Op::from_code(op).ok_or_else(|| format!("outbox row {id} has unknown op {op}"))?;
        let values = |text: Option<&str>| -> Result<Option<Vec<Value>>, String> {
            match text {
                None if layout.columns.is_empty() => Ok(Some(Vec::new())),
                None => Ok(None),
                Some(text) => capture::decode_values(text)
                    .filter(|v| v.len() == layout.columns.len())
                    .map(Some)
                    .ok_or_else(|| format!("outbox row {id} has malformed values {text:?}")),
            }
        };
        let (old, new) = match op {
            Op::Insert => (None, values(new)?),
            Op::Delete => (values(old)?, None),
            Op::Update => (values(old)?, values(new)?),
        };
        Ok(RowChange {
            layout: Arc::clone(layout),
            op,
            old,
            new,
        })
    }

    /// Records that every change up to `position` has been applied. The durable cursor follows
    /// in `persist`: at most every `PERSIST_EVERY`, so a sustained app write load does not meet a
    /// cursor write after each of its commits (a crash replays the unpersisted batches:
    /// at-least-once).
    pub fn advance(&mut self, position: u64) {
        self.cursor = position;
    }

    /// Writes the cursor and prunes what it covers, in one short transaction, if due (or `now`).
    /// Only rows at or below the durable cursor are pruned, and never the newest row, so
    /// `max(id)` never goes down and ids are never reused.
    ///
    /// Pruning waits for a quiet moment (`idle`) unless `PRUNE_BACKLOG` applied rows pile up:
    /// while a backlog drains, deleting what was just applied would cost as much as applying it.
    pub fn persist(&mut self, now: bool, idle: bool) -> Result<(), TailError> {
        let due = self.cursor > self.persisted
            && (now
                || self.persisted_at.elapsed() >= PERSIST_EVERY
                || self.cursor - self.persisted >= PERSIST_EVENTS);
        let prune = idle || self.persisted.saturating_sub(self.pruned_below) >= PRUNE_BACKLOG;
        let prune_pending = prune && self.pruned_below < self.persisted;
        if !due && !prune_pending {
            return Ok(());
        }
        self.persist_chunk(due, prune)?;
        // The rest of the backlog, a chunk per transaction: the app's writers wait for one
        // chunk at most.
        while prune && self.pruned_below < self.persisted {
            self.persist_chunk(false, true)?;
        }
        Ok(())
    }

    fn persist_chunk(&mut self, due: bool, prune: bool) -> Result<(), TailError> {
        let fence = match (self.fencing, self.lease.epoch()) {
            (false, _) => None,
            (true, None) => return Err(TailError::LeaseLost),
            (true, Some(epoch)) => Some((self.lease.holder().to_owned(), epoch)),
        };
        // IMMEDIATE: the write lock first (waiting for it through the busy handler). A deferred
        // transaction that reads the lease row and then writes would fail outright, without
        // waiting, whenever an app commit landed in between.
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )?;
        // Fencing: in the same transaction that moves the cursor or prunes, check that this
        // daemon still holds the lease. A daemon paused past its lease finds it gone here.
        if let Some((holder, epoch)) = &fence {
            let holds: Option<i64> = tx
                .prepare_cached(
                    "SELECT 1 FROM cachetail_lease WHERE name = 'main' AND holder = ?1 AND epoch = ?2",
                )?
                .query_row(params![holder, epoch], |row| row.get(0))
                .optional()?;
            if holds.is_none() {
                return Err(TailError::LeaseLost);
            }
        }
        if due {
            let updated = tx
                .prepare_cached(
                    "UPDATE cachetail_cursor SET position = ?1, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE consumer = 'main'",
                )?
                .execute([self.cursor as i64])?;
            if updated == 0 {
                return Err(TailError::NotInstalled);
            }
        }
        let durable = if due { self.cursor } else { self.persisted };
        let end = if prune {
            (self.pruned_below + PRUNE_CHUNK).min(durable)
        } else {
            self.pruned_below
        };
        if end > self.pruned_below {
            tx.prepare_cached("DELETE FROM cachetail_outbox WHERE id >= ?1 AND id < ?2")?
                .execute(params![self.pruned_below as i64, end as i64])?;
        }
        tx.commit()?;
        self.persisted = durable;
        self.pruned_below = self.pruned_below.max(end);
        if due {
            self.persisted_at = Instant::now();
        }
        Ok(())
    }

    /// The durable cursor lags the applied one: persisting is pending.
    pub fn persist_pending(&self) -> bool {
        self.cursor > self.persisted || self.pruned_below < self.persisted
    }
}

fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA schema_version", [], |row| row.get(0))
}

/// Records what an install found: logs it, and sets the paused flag the endpoint obeys.
pub fn note_install(shared: &Shared, report: &capture::InstallReport) {
    if report.changed() {
        tracing::info!(created = ?report.created, dropped = ?report.dropped, "capture triggers installed");
    }
    if !report.flushed.is_empty() {
        tracing::info!(tables = ?report.flushed, "capture (re)installed: values read from these tables before are dropped");
    }
    for (table, reason) in &report.failed {
        tracing::error!(
            table,
            reason,
            "cannot capture this table: its values are not cached until the config or the schema is fixed"
        );
    }
    shared
        .capture_failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone_from(&report.failed);
    set_paused(shared, report.paused);
}

/// Sets the paused flag the endpoint obeys (from an install, or, on a standby, from the flag in
/// the database).
fn set_paused(shared: &Shared, paused: bool) {
    let was_paused = shared.paused.swap(paused, Ordering::AcqRel);
    if was_paused != paused {
        tracing::warn!(
            paused,
            "capture pause changed: while paused, reads bypass the cache"
        );
    }
}

/// How far the outbox is ahead of the applied position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// The newest outbox id.
    pub head: u64,
    /// The applied position it was read against.
    pub cursor: u64,
    /// When the oldest change not applied yet was written (unix ms), if any and recorded.
    pub oldest_written_ms: Option<f64>,
}

impl Backlog {
    /// Changes committed but not applied yet.
    pub fn events(&self) -> u64 {
        self.head.saturating_sub(self.cursor)
    }

    /// How long the oldest unapplied change has waited; for outbox rows written before capture
    /// recorded times, the time since the tail was last caught up (`caught_up_ms`).
    pub fn seconds(&self, caught_up_ms: u64, now_ms: u64) -> f64 {
        if self.events() == 0 {
            return 0.0;
        }
        match self.oldest_written_ms {
            Some(written) => ((now_ms as f64 - written) / 1000.0).max(0.0),
            None if caught_up_ms == 0 => 0.0,
            None => now_ms.saturating_sub(caught_up_ms) as f64 / 1000.0,
        }
    }
}

/// The backlog after `cursor`: one indexed read.
pub fn backlog(conn: &Connection, cursor: u64) -> rusqlite::Result<Backlog> {
    let (head, oldest): (i64, Option<f64>) = conn
        .prepare_cached(
            "SELECT (SELECT coalesce(max(id), 0) FROM cachetail_outbox), \
                    (SELECT at FROM cachetail_outbox WHERE id > ?1 AND at IS NOT NULL ORDER BY id LIMIT 1)",
        )?
        .query_row([cursor as i64], |row| {
            Ok((row.get(0)?, row.get::<_, Option<f64>>(1).ok().flatten()))
        })?;
    Ok(Backlog {
        head: u64::try_from(head).unwrap_or(0),
        cursor,
        oldest_written_ms: oldest.map(capture::julian_to_unix_ms),
    })
}

/// The newest outbox id.
pub fn head(conn: &Connection) -> rusqlite::Result<u64> {
    let id: i64 = conn
        .prepare_cached("SELECT coalesce(max(id), 0) FROM cachetail_outbox")?
        .query_row([], |row| row.get(0))?;
    Ok(u64::try_from(id).unwrap_or(0))
}

/// A wake-up signal that is never lost: a ring while nobody waits is kept for the next wait.
#[derive(Default)]
pub struct Doorbell {
    rung: Mutex<bool>,
    bell: Condvar,
}

impl Doorbell {
    pub fn ring(&self) {
        *self.rung.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.bell.notify_all();
    }

    /// Waits until rung or `timeout` passes; returns whether it was rung.
    pub fn wait(&self, timeout: Duration) -> bool {
        let rung = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        let (mut rung, _) = self
            .bell
            .wait_timeout_while(rung, timeout, |rung| !*rung)
            .unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *rung, false)
    }
}

/// How often a standby looks at the lease (and follows the durable cursor).
const STANDBY_POLL: Duration = Duration::from_millis(200);

/// The applying loop: batch after batch until `stop`, while this daemon holds the lease; a
/// standby until then. Runs on its own thread (SQLite is blocking).
pub fn run(
    shared: Arc<Shared>,
    mut outbox: Outbox,
    doorbell: Arc<Doorbell>,
    stop: Arc<AtomicBool>,
) {
    if !outbox.fencing {
        outbox.use_lease(shared.config().tail.lease);
    }
    let mut backoff = Duration::from_millis(20);
    // After a wake-up that found nothing, look again a few times, quickly: a notification fires
    // when the app writes the `-wal` file, a moment before the commit is published in the
    // `-shm` index (which gives no notification), so the first look can be too early.
    let mut recheck: Option<Duration> = None;
    let mut announced_standby = false;
    while !stop.load(Ordering::Acquire) {
        if !outbox.lease.held() {
            match take_over(&shared, &mut outbox) {
                Ok(true) => {
                    announced_standby = false;
                    recheck = Some(RECHECK_FIRST);
                }
                Ok(false) => {
                    if !announced_standby {
                        tracing::info!(holder = ?Lease::current(outbox.conn()).ok().flatten().map(|h| h.holder), "another daemon holds the lease: standing by (serving reads)");
                        announced_standby = true;
                    }
                    if let Ok(cursor) = outbox.durable_cursor() {
                        shared.applied.send_if_modified(|applied| {
                            let moved = cursor > *applied;
                            *applied = (*applied).max(cursor);
                            moved
                        });
                    }
                    // A standby installs nothing, so it learns of a pause from the flag.
                    if let Ok(paused) = capture::is_paused(outbox.conn()) {
                        set_paused(&shared, paused);
                    }
                    doorbell.wait(STANDBY_POLL);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "taking the lease failed; retrying");
                    doorbell.wait(STANDBY_POLL);
                }
            }
            continue;
        }
        match outbox.lease.keep(&outbox.conn) {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                stand_by(&shared, &mut outbox);
                continue;
            }
        }
        let config = shared.config();
        // A bug in one batch must not silently stop the daemon from applying: it is logged,
        // counted, and the batch retried like any other failure (the cursor did not move).
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step(&shared, &config, &mut outbox)
        }))
        .unwrap_or_else(|_| Err(TailError::Panicked));
        match outcome {
            Ok(0) => {
                shared
                    .stats
                    .caught_up_at_ms
                    .store(crate::latency::now_ms(), Ordering::Relaxed);
                if let Err(e) = outbox.persist(false, true) {
                    if lost(&e) {
                        stand_by(&shared, &mut outbox);
                        continue;
                    }
                    tracing::warn!(error = %e, "writing the cursor failed; it will be retried");
                }
                let mut wait = recheck
                    .unwrap_or(config.tail.poll_interval)
                    .min(outbox.lease.renew_in().max(Duration::from_millis(1)));
                if outbox.persist_pending() {
                    wait = wait.min(PERSIST_EVERY);
                }
                let rung = doorbell.wait(wait);
                recheck = match recheck {
                    _ if rung => Some(RECHECK_FIRST),
                    Some(wait) if wait < RECHECK_LIMIT => Some(wait * 2),
                    _ => None,
                };
            }
            Ok(_) => {
                backoff = Duration::from_millis(20);
                recheck = Some(RECHECK_FIRST);
            }
            Err(e) if lost(&e) => stand_by(&shared, &mut outbox),
            Err(e) => {
                shared.stats.apply_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?backoff, "applying the outbox failed; the cursor stays, the batch will be retried");
                doorbell.wait(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    if outbox.lease.held() {
        if let Err(e) = outbox.persist(true, true) {
            tracing::warn!(error = %e, "writing the cursor at shutdown failed; the last batches will be applied again");
        }
        outbox.lease.release(&outbox.conn);
    }
    tracing::info!(cursor = outbox.cursor(), "tail stopped");
}

/// Commit → fresh: from each change's captured write time to now, when its cache actions are
/// done (invalidations applied, write-through values stored).
fn record_freshness(shared: &Shared, changes: &[Change]) {
    let now = crate::latency::unix_ms();
    let took: Vec<f64> = changes
        .iter()
        .filter_map(|c| c.written_ms)
        .map(|written| (now - written).max(0.0))
        .collect();
    for ms in &took {
        shared.stats.fresh_seconds.observe(ms / 1000.0);
    }
    shared.stats.fresh_recent.record(now as u64, &took);
}

fn lost(error: &TailError) -> bool {
    matches!(
        error,
        TailError::LeaseLost | TailError::Redis(crate::resp::RedisError::Fenced)
    )
}

/// The first try for the lease, before the daemon serves: a daemon alone on its database is
/// active from its first request (else it starts as a standby and the tail keeps trying).
pub fn first_take_over(shared: &Shared, outbox: &mut Outbox) -> bool {
    outbox.use_lease(shared.config().tail.lease);
    match take_over(shared, outbox) {
        Ok(taken) => taken,
        Err(e) => {
            tracing::warn!(error = %e, "taking the lease failed; retrying");
            false
        }
    }
}

/// Takes the lease if it is free; on success, continues from the durable cursor.
fn take_over(shared: &Shared, outbox: &mut Outbox) -> Result<bool, TailError> {
    if !outbox.lease.try_acquire(&outbox.conn)? {
        return Ok(false);
    }
    let prepared = (|| {
        outbox.reopen()?;
        let head = outbox.head()?;
        if let Some(redis) = &shared.redis {
            redis.reconcile(outbox.cursor, Some(head))?;
        } else {
            // Values this daemon cached before (as a standby it cached nothing; after losing
            // the lease it may have) are not trusted: nothing older than now is served.
            shared.cache.flush_all(head);
        }
        Ok::<_, TailError>(())
    })();
    if let Err(e) = prepared {
        outbox.lease.release(&outbox.conn);
        return Err(e);
    }
    let epoch = outbox.lease.epoch().unwrap_or(0);
    shared
        .epoch
        .store(u64::try_from(epoch).unwrap_or(0), Ordering::Release);
    shared.applied.send_replace(outbox.cursor);
    shared.active.store(true, Ordering::Release);
    tracing::info!(
        holder = outbox.lease.holder(),
        epoch,
        cursor = outbox.cursor,
        "holding the lease: applying the outbox"
    );
    Ok(true)
}

/// This daemon lost the lease: it applies nothing from now on, and serves as a standby.
fn stand_by(shared: &Shared, outbox: &mut Outbox) {
    if shared.active.swap(false, Ordering::AcqRel) {
        tracing::warn!(
            holder = outbox.lease.holder(),
            "lost the lease (another daemon took over): applying nothing, standing by"
        );
    }
    outbox.lease = Lease::new(shared.config().tail.lease);
}

/// Reads, plans and applies one batch; returns how many changes it applied.
pub fn step(
    shared: &Shared,
    config: &Arc<Config>,
    outbox: &mut Outbox,
) -> Result<usize, TailError> {
    outbox.recheck_capture(shared, config)?;
    if let Some(redis) = &shared.redis {
        redis.heal(outbox.cursor)?;
        let paused = shared.paused.load(Ordering::Acquire);
        if paused && !outbox.flushed_for_pause {
            apply::flush_redis_for_pause(shared, config, outbox.cursor, outbox.head()?)?;
            tracing::info!("capture is paused: the values in redis were removed");
        }
        outbox.flushed_for_pause = paused;
    }
    apply::retire_families(shared, outbox.cursor)?;
    let changes = outbox.read_batch(config.tail.batch_size)?;
    let Some(last) = changes.last().map(|c| c.position) else {
        return Ok(0);
    };
    let plan = rules::plan(config, &changes);
    apply::apply(shared, config, &plan, outbox.conn(), outbox.cursor, last)?;
    record_freshness(shared, &changes);
    crate::events::publish(shared, config, &changes);
    for (&index, &(invalidations, recomputes)) in &plan.per_rule {
        if let Some(rule) = config.rules.get(index) {
            rule.invalidations
                .fetch_add(invalidations, Ordering::Relaxed);
            rule.recomputes.fetch_add(recomputes, Ordering::Relaxed);
        }
    }
    outbox.advance(last);
    shared.applied.send_replace(last);
    shared
        .stats
        .events
        .fetch_add(changes.len() as u64, Ordering::Relaxed);
    shared.stats.batches.fetch_add(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_write_that_finds_the_lease_taken_ends_the_step_as_lease_lost() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("app.db");
        let app = Connection::open(&db).expect("open");
        app.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL);")
            .expect("schema");
        let config = Config::parse(
            "database = \"app.db\"\n\
             [keys.\"t:{id}\"]\nquery = \"SELECT id, v FROM t WHERE id = :id\"\n\
             [[rules]]\ntable = \"t\"\nkeys = [\"t:{id}\"]\n",
            "test.toml",
            dir.path(),
        )
        .expect("config");
        let (mut outbox, _) = crate::prepare(&config).expect("prepare");
        let shared = Shared::new(config, outbox.cursor());
        assert!(
            first_take_over(&shared, &mut outbox),
            "alone: it holds the lease"
        );
        let config = shared.config();
        app.execute("INSERT INTO t (v) VALUES ('a')", [])
            .expect("write");
        std::thread::sleep(PERSIST_EVERY);
        // The first batch: capture's flush marker and the write.
        let applied = step(&shared, &config, &mut outbox).expect("a batch");
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
        let outcome = step(&shared, &config, &mut outbox);
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
        let now = crate::latency::now_ms();
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
