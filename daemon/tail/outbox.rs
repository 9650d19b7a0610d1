//! The outbox as the tail reads it: rows after the cursor, in id order, in batches (each in one
//! short read transaction), decoded into `Change`s; the cursor, written at most every 100 ms
//! together with the pruning of applied rows, in short fenced transactions; and the backlog
//! (head, lag) others report.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, params};

use super::TailError;
use super::lease::Lease;
use crate::capture::{self, DecodeError, InstallReport, RecordedLayout};
use crate::config::Config;
use crate::db::read_head;
use crate::types::{Change, ChangeBody, Layout, Op, RowChange, Unreadable};

/// Rows deleted per pruning transaction: small, so the app's writers never wait long.
const PRUNE_CHUNK: u64 = 2_000;
/// How often the durable cursor is written at most, while changes keep coming.
pub(super) const PERSIST_EVERY: Duration = Duration::from_millis(100);
const PERSIST_EVENTS: u64 = 50_000;
/// Applied rows left unpruned while busy, at most.
const PRUNE_BACKLOG: u64 = 100_000;

/// The daemon's handle on the outbox: its connection, the capture layouts, and the cursor.
pub struct Outbox {
    conn: Connection,
    layouts: HashMap<i64, RecordedLayout>,
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
    pub(super) lease: Lease,
    pub(super) fencing: bool,
}

impl Outbox {
    pub fn open(path: &Path) -> Result<Outbox, TailError> {
        let conn = crate::db::open_writer(path)?;
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
        })
    }

    /// From now on the cursor moves only under a lease of this duration (see `lease`).
    pub fn use_lease(&mut self, duration: Duration) {
        self.lease = Lease::new(duration);
        self.fencing = true;
    }

    /// Takes the lease if it is free (see `Lease::try_acquire`).
    pub(super) fn try_acquire_lease(&mut self) -> rusqlite::Result<bool> {
        self.lease.try_acquire(&self.conn)
    }

    /// Renews the lease when due; false when it was lost (see `Lease::keep`).
    pub(super) fn keep_lease(&mut self) -> rusqlite::Result<bool> {
        self.lease.keep(&self.conn)
    }

    /// Gives the lease up, so a standby takes over at once.
    pub(super) fn release_lease(&mut self) {
        self.lease.release(&self.conn);
    }

    /// Reads the durable cursor again (after taking over from another daemon: its progress is
    /// what the database says), and where pruning stands.
    pub(super) fn reopen(&mut self) -> Result<(), TailError> {
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
        Ok(())
    }

    /// The durable cursor as the database has it now (a standby follows it).
    pub(super) fn durable_cursor(&self) -> rusqlite::Result<u64> {
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

    /// Reads up to `limit` changes after the cursor, in id order.
    pub fn read_batch(&mut self, limit: usize) -> Result<Vec<Change>, TailError> {
        let mut raw = Vec::with_capacity(limit.min(4096));
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, capture, op, old, new, at FROM cachetail_outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![self.cursor as i64, limit as i64])?;
            while let Some(row) = rows.next()? {
                raw.push(RawRow::read(row)?);
            }
        }
        let mut changes = Vec::with_capacity(raw.len());
        for row in raw {
            if let Ok(layout) = row.layout
                && !self.layouts.contains_key(&layout)
            {
                // Capture was reinstalled (a reload changed the columns): learn the new layouts.
                self.layouts = capture::load_layouts(&self.conn)?;
            }
            changes.push(Change {
                position: u64::try_from(row.id).unwrap_or(0),
                written_ms: row.at.map(capture::julian_to_unix_ms),
                body: self.decode(&row),
            });
        }
        Ok(changes)
    }

    /// What an outbox row records. A row that does not decode is `Unreadable`, with its table
    /// when the layout it names tells which.
    fn decode(&self, row: &RawRow) -> ChangeBody {
        if row.op == Ok(capture::MARKER_OP) {
            return ChangeBody::Marker;
        }
        let id = row.id;
        let unreadable = |table: Option<&Arc<str>>, reason: String| {
            ChangeBody::Unreadable(Unreadable {
                table: table.cloned(),
                reason,
            })
        };
        let layout = match row.layout {
            Ok(layout) => self.layouts.get(&layout).ok_or(layout),
            Err(what) => {
                return unreadable(
                    None,
                    format!("outbox row {id} has {what} as its capture layout"),
                );
            }
        };
        let flush = row.op == Ok(capture::FLUSH_OP);
        match layout {
            Ok(Ok(layout)) if flush => ChangeBody::Flush {
                table: Arc::clone(&layout.table),
            },
            Ok(Ok(layout)) => match decode_row(row, layout) {
                Ok(change) => ChangeBody::Row(change),
                Err(reason) => unreadable(Some(&layout.table), format!("outbox row {id} {reason}")),
            },
            Ok(Err(Unreadable {
                table: Some(table), ..
            })) if flush => ChangeBody::Flush {
                table: Arc::clone(table),
            },
            Ok(Err(bad)) => unreadable(
                bad.table.as_ref(),
                format!("outbox row {id}: {}", bad.reason),
            ),
            Err(layout) => unreadable(
                None,
                format!("outbox row {id} names unknown capture layout {layout}"),
            ),
        }
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

/// An outbox row as stored. Whatever an app or a hand edit put in its columns reads: what does
/// not fit (a layout or op that is not an integer, text that is not UTF-8, a value that is not
/// text) is kept as what it was, for `decode` to report.
struct RawRow {
    id: i64,
    layout: Result<i64, &'static str>,
    op: Result<i64, &'static str>,
    old: Result<Option<String>, &'static str>,
    new: Result<Option<String>, &'static str>,
    at: Option<f64>,
}

impl RawRow {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
        let integer = |value: ValueRef<'_>| match value {
            ValueRef::Integer(i) => Ok(i),
            _ => Err("a value that is not an integer"),
        };
        let text = |value: ValueRef<'_>| match value {
            ValueRef::Null => Ok(None),
            ValueRef::Text(_) => capture::utf8_text(value)
                .map(|t| Some(t.to_owned()))
                .ok_or("text that is not valid UTF-8"),
            _ => Err("a value that is not text"),
        };
        Ok(RawRow {
            id: row.get(0)?,
            layout: integer(row.get_ref(1)?),
            op: integer(row.get_ref(2)?),
            old: text(row.get_ref(3)?),
            new: text(row.get_ref(4)?),
            at: row.get::<_, Option<f64>>(5).ok().flatten(),
        })
    }
}

/// A row change of `layout`, or why it does not decode (completing "outbox row {id} ...").
fn decode_row(row: &RawRow, layout: &Arc<Layout>) -> Result<RowChange, String> {
    let op = match row.op {
        Ok(code) => Op::from_code(code).ok_or_else(|| format!("has unknown op {code}"))?,
        Err(what) => return Err(format!("has {what} as its op")),
    };
    let values = |which: &str, stored: &Result<Option<String>, &'static str>| match stored {
        Err(what) => Err(format!("has {what} in `{which}`")),
        Ok(None) if layout.columns.is_empty() => Ok(Some(Vec::new())),
        Ok(None) => Ok(None),
        Ok(Some(text)) => match capture::decode_values(text) {
            Ok(values) if values.len() == layout.columns.len() => Ok(Some(values)),
            Ok(_) | Err(DecodeError::Malformed) => {
                Err(format!("has malformed values in `{which}`: {text:?}"))
            }
            Err(DecodeError::TextWithNul) => Err(format!(
                "has a text value holding a NUL character in `{which}`: no key can be rendered from it"
            )),
        },
    };
    let (old, new) = match op {
        Op::Insert => (None, values("new", &row.new)?),
        Op::Delete => (values("old", &row.old)?, None),
        Op::Update => (values("old", &row.old)?, values("new", &row.new)?),
    };
    Ok(RowChange {
        layout: Arc::clone(layout),
        op,
        old,
        new,
    })
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
