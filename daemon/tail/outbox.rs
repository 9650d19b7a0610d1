//! The outbox as the tail reads it: rows after the cursor, in id order, in batches (each in one
//! short read transaction), decoded into `Change`s; the cursor, written at most every 100 ms
//! together with the pruning of applied rows, in short fenced transactions; and the backlog
//! (head, lag) others report.
//!
//! Pruning keeps the row at the cursor, and the cursor remembers that row's write time (in
//! memory, and beside the durable cursor), so each batch read, which starts at the cursor's own
//! row, also checks that it is still the row applied last. If it is gone or another row has its
//! id, the outbox was emptied or rebuilt by hand and its ids started again below the cursor: the
//! tail restarts after every position ever used (`restart_after_rebuild`), with a reset marker
//! that drops everything cached, rather than skip every change until the ids pass the cursor.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};

use super::TailError;
use super::lease::{Lease, Renewer};
use super::rows::RawRow;
use crate::capture::{self, InstallReport, Layouts};
use crate::config::Config;
use crate::db::read_head;
use crate::types::Change;

/// Rows deleted per pruning transaction: small, so the app's writers never wait long.
const PRUNE_CHUNK: u64 = 2_000;
/// How often the durable cursor is written at most, while changes keep coming.
pub(super) const PERSIST_EVERY: Duration = Duration::from_millis(100);
const PERSIST_EVENTS: u64 = 50_000;
/// How many SQLite virtual machine steps the tail's connection runs between two looks at the
/// lease (`Renewer::renew_if_due`: a clock read, and a renewal when a third of it has passed).
const STEPS_BETWEEN_RENEWALS: i32 = 10_000;
/// Applied rows left unpruned while busy, at most; while a backlog drains (each batch read full),
/// at most `PRUNE_BACKLOG_BEHIND`: the backlog is applied first, pruned when the tail catches up.
const PRUNE_BACKLOG: u64 = 100_000;
const PRUNE_BACKLOG_BEHIND: u64 = 1_000_000;

/// The daemon's handle on the outbox: its connection, the capture layouts, and the cursor.
pub struct Outbox {
    conn: Connection,
    layouts: Layouts,
    cursor: u64,
    /// What the row at the cursor must be (see `CursorRow`), and the last row read, which the
    /// cursor moves to when its batch is applied.
    cursor_row: CursorRow,
    last_read: Option<(u64, Option<f64>)>,
    /// The last batch read was full: a backlog is draining (see `persist`).
    behind: bool,
    /// The highest durable cursor this daemon has seen: it never goes back, unless cachetail's
    /// tables were dropped and installed again.
    durable_seen: u64,
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
    pub(super) lease: Lease,
    pub(super) fencing: bool,
    /// The connection the lease is renewed through from inside a batch (see `Renewer`).
    lease_conn: Arc<Mutex<Connection>>,
    /// Interrupts a statement on `conn` that runs past it (a derived rule's lookup), from the
    /// same progress handler that renews the lease.
    deadline: crate::db::Deadline,
}

impl Outbox {
    pub fn open(path: &Path) -> Result<Outbox, TailError> {
        let mut conn = crate::db::open_writer(path)?;
        let (cursor, cursor_row) = read_durable(&conn)
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(_, Some(ref m)) if m.contains("no such table") => {
                    TailError::NotInstalled
                }
                other => TailError::Sqlite(other),
            })?
            .ok_or(TailError::NotInstalled)?;
        let layouts = capture::load_layouts(&conn)?;
        let schema_version = schema_version(&conn)?;
        let lease_conn = Renewer::connection(path)?;
        let oldest: i64 = conn.query_row(
            "SELECT coalesce(min(id), 0) FROM cachetail_outbox",
            [],
            |row| row.get(0),
        )?;
        let deadline = crate::db::Deadline::default();
        if let Err(e) = deadline.watch(&mut conn) {
            tracing::warn!(error = %e, "watching the tail's queries failed: lookups run without their time bound");
        }
        Ok(Outbox {
            conn,
            layouts,
            cursor,
            cursor_row,
            last_read: None,
            behind: false,
            durable_seen: cursor,
            pruned_below: u64::try_from(oldest).unwrap_or(0),
            persisted: cursor,
            persisted_at: Instant::now(),
            schema_version,
            installed_for: 0,
            lease: Lease::new(Duration::from_secs(5)),
            fencing: false,
            lease_conn,
            deadline,
        })
    }

    /// From now on the cursor moves only under a lease of this duration (see `lease`), a new
    /// one (after this daemon lost the lease: another holder name). SQLite's progress handler
    /// on the tail's connection renews it while a query runs long.
    pub fn use_lease(&mut self, duration: Duration) {
        self.lease = Lease::new(duration);
        self.fencing = true;
        let renewer = self.renewer();
        let deadline = self.deadline.clone();
        let watching = self.conn.progress_handler(
            STEPS_BETWEEN_RENEWALS,
            Some(move || {
                renewer.renew_if_due();
                deadline.passed()
            }),
        );
        if let Err(e) = watching {
            tracing::warn!(error = %e, "watching the tail's queries failed: the lease is renewed between write-through recomputes and batches only");
        }
    }

    /// Renews the lease from inside a batch (see `Renewer`).
    pub(super) fn renewer(&self) -> Renewer {
        self.lease.renewer(Arc::clone(&self.lease_conn))
    }

    /// Takes the lease if it is free (see `Lease::try_acquire`).
    pub(super) fn try_acquire_lease(&mut self) -> rusqlite::Result<bool> {
        self.lease.try_acquire(&self.conn)
    }

    /// Renews the lease when due; false when it was lost (see `Lease::keep`).
    pub(super) fn keep_lease(&mut self) -> rusqlite::Result<bool> {
        self.lease.keep(&self.conn)
    }

    /// Raises the held lease's epoch (see `Lease::raise_epoch`); false when it was lost.
    pub(super) fn raise_lease_epoch(&mut self, to: i64) -> rusqlite::Result<bool> {
        self.lease.raise_epoch(&self.conn, to)
    }

    /// Gives the lease up, so a standby takes over at once.
    pub(super) fn release_lease(&mut self) {
        self.lease.release(&self.conn);
    }

    /// Reads the durable cursor again (after taking over from another daemon: its progress is
    /// what the database says), and where pruning stands. A durable cursor below one seen
    /// before means cachetail's tables were dropped and installed again: the next batch read
    /// restarts after every position used (`CursorRow::Gone`).
    pub(super) fn reopen(&mut self) -> Result<(), TailError> {
        let (cursor, cursor_row) = read_durable(&self.conn)?.ok_or(TailError::NotInstalled)?;
        let oldest: i64 = self.conn.query_row(
            "SELECT coalesce(min(id), 0) FROM cachetail_outbox",
            [],
            |row| row.get(0),
        )?;
        self.cursor_row = if cursor < self.durable_seen {
            CursorRow::Gone
        } else {
            cursor_row
        };
        self.durable_seen = self.durable_seen.max(cursor);
        self.last_read = None;
        self.behind = false;
        self.cursor = cursor;
        self.persisted = cursor;
        self.persisted_at = Instant::now();
        self.pruned_below = u64::try_from(oldest).unwrap_or(0);
        self.layouts = capture::load_layouts(&self.conn)?;
        self.schema_version = -1;
        Ok(())
    }

    /// The durable cursor as the database has it now (a standby follows it).
    pub(super) fn durable_cursor(&mut self) -> rusqlite::Result<u64> {
        let cursor: i64 = self
            .conn
            .prepare_cached("SELECT position FROM cachetail_cursor WHERE consumer = 'main'")?
            .query_row([], |row| row.get(0))?;
        let cursor = u64::try_from(cursor).unwrap_or(0);
        self.durable_seen = self.durable_seen.max(cursor);
        Ok(cursor)
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The deadline `conn`'s progress handler watches (see `db::Deadline`).
    pub fn deadline(&self) -> &crate::db::Deadline {
        &self.deadline
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Reinstalls capture if the schema changed since the last look (a migration rebuilt a
    /// table, dropped or created one, altered columns, or someone paused or resumed capture) or
    /// another config is in force. Returns what the install did, if it ran.
    pub fn recheck_capture(
        &mut self,
        config: &Arc<Config>,
    ) -> Result<Option<InstallReport>, TailError> {
        let config_id = Arc::as_ptr(config) as usize;
        if self.installed_for == 0 {
            // The config `prepare` installed for.
            self.installed_for = config_id;
        }
        let version = schema_version(&self.conn)?;
        if version == self.schema_version && config_id == self.installed_for {
            return Ok(None);
        }
        let report = capture::install(&mut self.conn, config)?;
        self.schema_version = schema_version(&self.conn)?;
        self.installed_for = config_id;
        Ok(Some(report))
    }

    /// The newest outbox id (0 when nothing was ever captured).
    pub fn head(&self) -> rusqlite::Result<u64> {
        read_head(&self.conn)
    }

    /// Reads up to `limit` changes after the cursor, in id order; or finds that the outbox was
    /// emptied or rebuilt (the row at the cursor, read in the same statement, is not the one
    /// applied last).
    pub fn read_batch(&mut self, limit: usize) -> Result<Read, TailError> {
        let mut changes = Vec::with_capacity(limit.min(4096));
        // The first row at or after the cursor (id, write time), and the last one decoded.
        let mut first = None;
        let mut last_at = None;
        {
            let Outbox {
                conn,
                layouts,
                cursor,
                ..
            } = self;
            let mut stmt = conn.prepare_cached(
                "SELECT id, capture, op, old, new, at FROM cachetail_outbox WHERE id >= ?1 ORDER BY id LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![*cursor as i64, limit as i64 + 1])?;
            while let Some(row) = rows.next()? {
                // Decoded where it is read: the row's text is borrowed from SQLite's buffers.
                let raw = RawRow::read(row)?;
                let position = u64::try_from(raw.id).unwrap_or(0);
                if first.is_none() {
                    first = Some((position, raw.at));
                    if position == *cursor {
                        continue;
                    }
                }
                if changes.len() == limit {
                    break;
                }
                if let Ok(layout) = raw.layout
                    && !layouts.contains_key(&layout)
                {
                    // Capture was reinstalled (a reload changed the columns): learn the new
                    // layouts.
                    *layouts = capture::load_layouts(conn)?;
                }
                changes.push(Change {
                    position,
                    written_ms: raw.at.map(capture::julian_to_unix_ms),
                    body: raw.decode(layouts),
                });
                last_at = raw.at;
            }
        }
        if let Some(rebuilt) = self.check_cursor_row(first) {
            return Ok(Read::Rebuilt(rebuilt));
        }
        self.behind = changes.len() == limit;
        self.last_read = changes.last().map(|c| (c.position, last_at));
        Ok(Read::Changes(changes))
    }

    /// Whether the row at the cursor is still the one the cursor was moved to (`first` is the
    /// first row at or after the cursor); if not, what was found.
    fn check_cursor_row(&self, first: Option<(u64, Option<f64>)>) -> Option<Rebuilt> {
        if self.cursor == 0 && self.cursor_row != CursorRow::Gone {
            return None;
        }
        let at_cursor = first.filter(|&(id, _)| id == self.cursor);
        match at_cursor {
            Some((_, at)) if self.cursor_row.is(at) => None,
            _ => Some(Rebuilt {
                cursor: self.cursor,
                row_at_cursor: if at_cursor.is_some() {
                    "another row"
                } else {
                    "gone"
                },
            }),
        }
    }

    /// The outbox was emptied or rebuilt by hand (`read_batch` said so): restarts after every
    /// position this daemon or the database ever used (`applied`: the highest this daemon
    /// published), in one fenced transaction: a position marker there becomes the cursor's row,
    /// and a reset marker after it drops everything cached when applied. The rows in between
    /// (the new outbox so far) are covered by the reset, and pruned like applied rows. Returns
    /// the new cursor.
    pub(super) fn restart_after_rebuild(&mut self, applied: u64) -> Result<u64, TailError> {
        let fence = self.fence()?;
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )?;
        check_fence(&tx, fence.as_ref())?;
        let head = read_head(&tx)?;
        let anchor = [
            self.cursor,
            self.persisted,
            self.durable_seen,
            applied,
            head,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
            + 1;
        let insert = format!(
            "INSERT INTO cachetail_outbox (id, capture, op, at) VALUES (?1, 0, ?2, {})",
            capture::WRITTEN_AT
        );
        tx.execute(&insert, params![anchor as i64, capture::MARKER_OP])?;
        tx.execute(&insert, params![anchor as i64 + 1, capture::RESET_OP])?;
        let at: Option<f64> = tx.query_row(
            "SELECT at FROM cachetail_outbox WHERE id = ?1",
            [anchor as i64],
            |row| row.get(0),
        )?;
        write_cursor(&tx, anchor, at)?;
        let oldest: i64 = tx.query_row(
            "SELECT coalesce(min(id), 0) FROM cachetail_outbox",
            [],
            |row| row.get(0),
        )?;
        tx.commit()?;
        self.cursor = anchor;
        self.cursor_row = CursorRow::of(at);
        self.last_read = None;
        self.persisted = anchor;
        self.persisted_at = Instant::now();
        self.durable_seen = anchor;
        self.pruned_below = u64::try_from(oldest).unwrap_or(0);
        Ok(anchor)
    }

    /// Records that every change up to `position` has been applied. The durable cursor follows
    /// in `persist`: at most every `PERSIST_EVERY`, so a sustained app write load does not meet a
    /// cursor write after each of its commits (a crash replays the unpersisted batches:
    /// at-least-once).
    pub fn advance(&mut self, position: u64) {
        self.cursor_row = match self.last_read {
            Some((last, at)) if last == position => CursorRow::of(at),
            _ => CursorRow::Exists,
        };
        self.cursor = position;
    }

    /// Writes the cursor and prunes what it covers, in one short transaction, if due (or `now`).
    /// Only rows at or below the durable cursor are pruned, and never the newest row, so
    /// `max(id)` never goes down and ids are never reused.
    ///
    /// Pruning waits for a quiet moment (`idle`) unless `PRUNE_BACKLOG` applied rows pile up
    /// (`PRUNE_BACKLOG_BEHIND` while a backlog drains): deleting what was just applied costs
    /// about as much as applying it, and a backlog's changes are worth applying first.
    pub fn persist(&mut self, now: bool, idle: bool) -> Result<(), TailError> {
        // A renewal inside the last batch may have found the lease taken.
        self.fence()?;
        let due = self.cursor > self.persisted
            && (now
                || self.persisted_at.elapsed() >= PERSIST_EVERY
                || self.cursor - self.persisted >= PERSIST_EVENTS);
        let unpruned_limit = if self.behind {
            PRUNE_BACKLOG_BEHIND
        } else {
            PRUNE_BACKLOG
        };
        let prune = idle || self.persisted.saturating_sub(self.pruned_below) >= unpruned_limit;
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
        let fence = self.fence()?;
        // IMMEDIATE: the write lock first (waiting for it through the busy handler). A deferred
        // transaction that reads the lease row and then writes would fail outright, without
        // waiting, whenever an app commit landed in between.
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )?;
        check_fence(&tx, fence.as_ref())?;
        if due {
            write_cursor(&tx, self.cursor, self.cursor_row.written_at())?;
        }
        let durable = if due { self.cursor } else { self.persisted };
        let mut start = self.pruned_below;
        if prune && start < durable {
            // Past a gap in the ids (a restart after a rebuilt outbox) in one step.
            let next: Option<i64> = tx
                .prepare_cached("SELECT min(id) FROM cachetail_outbox WHERE id >= ?1")?
                .query_row([start as i64], |row| row.get(0))?;
            start = next
                .map_or(durable, |n| u64::try_from(n).unwrap_or(0))
                .clamp(start, durable);
        }
        let end = if prune {
            (start + PRUNE_CHUNK).min(durable)
        } else {
            start
        };
        if end > start {
            tx.prepare_cached("DELETE FROM cachetail_outbox WHERE id >= ?1 AND id < ?2")?
                .execute(params![start as i64, end as i64])?;
        }
        tx.commit()?;
        self.persisted = durable;
        self.durable_seen = self.durable_seen.max(durable);
        self.pruned_below = self.pruned_below.max(end);
        if due {
            self.persisted_at = Instant::now();
        }
        Ok(())
    }

    /// The holder and epoch the cursor's transactions must find in the lease row (None: not
    /// fenced); `LeaseLost` when this daemon no longer holds the lease.
    fn fence(&self) -> Result<Option<(String, i64)>, TailError> {
        match (self.fencing, self.lease.epoch()) {
            (false, _) => Ok(None),
            (true, None) => Err(TailError::LeaseLost),
            (true, Some(epoch)) => Ok(Some((self.lease.holder().to_owned(), epoch))),
        }
    }

    /// The durable cursor lags the applied one: persisting is pending.
    pub fn persist_pending(&self) -> bool {
        self.cursor > self.persisted || self.pruned_below < self.persisted
    }
}

/// What one batch read found.
#[derive(Debug)]
pub enum Read {
    /// The changes after the cursor (none: caught up).
    Changes(Vec<Change>),
    /// The row at the cursor is gone or is another row: the outbox was emptied or rebuilt.
    Rebuilt(Rebuilt),
}

/// An outbox found emptied or rebuilt: the cursor, and what was at it (`gone`, `another row`).
#[derive(Debug, Clone, Copy)]
pub struct Rebuilt {
    pub cursor: u64,
    pub row_at_cursor: &'static str,
}

/// What the outbox row at the cursor must be: the row the cursor was moved to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum CursorRow {
    /// A row must be there; its write time is not known (the cursor was written by an older
    /// cachetail, or the row was captured before write times were recorded).
    Exists,
    /// The row written at this time (`at`, compared bit for bit: ids are reused after a
    /// rebuild, write times to the millisecond hardly ever).
    WrittenAt(f64),
    /// The durable cursor went back below one seen before (cachetail's tables were dropped
    /// and installed again): whatever is there, the cursor was not moved in this outbox.
    Gone,
}

impl CursorRow {
    fn of(at: Option<f64>) -> CursorRow {
        at.map_or(CursorRow::Exists, CursorRow::WrittenAt)
    }

    /// Whether a row written at `at` is the one.
    fn is(self, at: Option<f64>) -> bool {
        match self {
            CursorRow::Exists => true,
            CursorRow::WrittenAt(expected) => {
                at.is_some_and(|at| at.to_bits() == expected.to_bits())
            }
            CursorRow::Gone => false,
        }
    }

    fn written_at(self) -> Option<f64> {
        match self {
            CursorRow::WrittenAt(at) => Some(at),
            CursorRow::Exists | CursorRow::Gone => None,
        }
    }
}

/// The durable cursor and what its row must be (its write time is trusted only if the daemon
/// that wrote the cursor recorded it for that very row).
fn read_durable(conn: &Connection) -> rusqlite::Result<Option<(u64, CursorRow)>> {
    conn.query_row(
        "SELECT position, row_id, row_at FROM cachetail_cursor WHERE consumer = 'main'",
        [],
        |row| {
            let position: i64 = row.get(0)?;
            let row_id: Option<i64> = row.get(1).ok().flatten();
            let row_at: Option<f64> = row.get(2).ok().flatten();
            let cursor_row = match row_at {
                Some(at) if row_id == Some(position) => CursorRow::WrittenAt(at),
                _ => CursorRow::Exists,
            };
            Ok((u64::try_from(position).unwrap_or(0), cursor_row))
        },
    )
    .optional()
}

/// Moves the durable cursor to `position`, recording its row's write time beside it.
fn write_cursor(tx: &Connection, position: u64, at: Option<f64>) -> Result<(), TailError> {
    let updated = tx
        .prepare_cached(
            "UPDATE cachetail_cursor SET position = ?1, row_id = ?1, row_at = ?2, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE consumer = 'main'",
        )?
        .execute(params![position as i64, at])?;
    if updated == 0 {
        return Err(TailError::NotInstalled);
    }
    Ok(())
}

/// Fencing: in the same transaction that moves the cursor or prunes, check that this daemon
/// still holds the lease. A daemon paused past its lease finds it gone here.
fn check_fence(tx: &Connection, fence: Option<&(String, i64)>) -> Result<(), TailError> {
    let Some((holder, epoch)) = fence else {
        return Ok(());
    };
    let holds: Option<i64> = tx
        .prepare_cached(
            "SELECT 1 FROM cachetail_lease WHERE name = 'main' AND holder = ?1 AND epoch = ?2",
        )?
        .query_row(params![holder, epoch], |row| row.get(0))
        .optional()?;
    if holds.is_none() {
        return Err(TailError::LeaseLost);
    }
    Ok(())
}

fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA schema_version", [], |row| row.get(0))
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
