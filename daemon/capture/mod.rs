//! Capture: the outbox tables (`schema.sql`) and the triggers that fill them, installed in the
//! app's own database.
//!
//! Triggers use only core SQLite (`quote()`, `||`, `typeof`, `instr`, `char`), so every writer in
//! every language is captured without loading anything. Each trigger records the columns the
//! rules need, not the whole row: capture is paid on every app write. The values are stored as
//! `quote()`d SQL literals, which decode back to exactly the value that was written (integer,
//! real, text, blob, NULL), commas and quotes included; text holding a NUL, which `quote()` would
//! cut short, is recorded as a word that does not decode.
//!
//! What a trigger costs the app's write (issue 16, measured with callgrind on SQLite 3.40): the
//! sub-program of each trigger that fires (a frame allocated and released per row, even when its
//! `WHEN` is false), the outbox row, and a statement journal: SQLite keeps one for a statement
//! inside a transaction whenever anything it may run can fail after a change was made, and any
//! function call (`quote()`, `julianday()`) or `NOT NULL` column in a trigger's body counts, so
//! every page the statement changes is copied first. The replace trigger of a table whose only
//! unique key is the rowid has a `WHEN` that is false for an insert given no rowid (see
//! `triggers::table_triggers`).

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::config::Config;
use crate::db::{ensure_wal, quote_identifier, table_columns};
use crate::types::{AdminAction, ChangeBody, Unreadable};

mod decode;
mod triggers;

pub use decode::{DecodeError, Layouts, decode_values, julian_to_unix_ms, load_layouts, utf8_text};
use triggers::{TableShape, drop_all_triggers, installed_triggers, table_triggers, trigger_name};

/// The outbox, capture-layout and cursor tables, as installed.
pub const SCHEMA: &str = include_str!("../../schema.sql");

/// Every trigger cachetail installs has a name starting with this.
pub const TRIGGER_PREFIX: &str = "cachetail_";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("table `{0}` named by a rule does not exist in the database")]
    MissingTable(String),
    #[error("column `{table}.{column}` used by a rule's template does not exist in the database")]
    MissingColumn { table: String, column: String },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// What an install changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InstallReport {
    pub created: Vec<String>,
    pub dropped: Vec<String>,
    pub unchanged: usize,
    /// Tables that had no capture before this install (new, rebuilt by a migration, resumed, or
    /// failing): a flush marker was written for each, so values read before are not served.
    pub flushed: Vec<String>,
    /// Tables that cannot be captured now (dropped, or a captured column is gone), with why.
    pub failed: Vec<(String, String)>,
    /// Capture is paused (`cachetail pause`): no trigger is installed.
    pub paused: bool,
}

impl InstallReport {
    pub fn changed(&self) -> bool {
        !self.created.is_empty() || !self.dropped.is_empty()
    }
}

/// The outbox op code of a flush marker: "changes to this table may have gone uncaptured".
pub const FLUSH_OP: i64 = 0;

/// The outbox op code of a position marker: an admin action (JSON in `new`), which gives the
/// action a position of its own, so values read before it can be told from values read after,
/// and has the daemon that applies the outbox carry it out, whichever daemon received it.
pub const MARKER_OP: i64 = 4;

/// The outbox op code of a reset marker: the outbox was emptied or rebuilt by hand, so changes
/// may have gone unseen: everything cached is dropped at its position (see `tail::outbox`).
pub const RESET_OP: i64 = 5;

/// The outbox op code of a row a conflict may remove, recorded by the `BEFORE INSERT/UPDATE`
/// replace triggers before SQLite resolves the conflict: `REPLACE` removes it, but `OR IGNORE`,
/// `ON CONFLICT DO NOTHING` and `DO UPDATE` keep it (a trigger cannot tell which). Rules treat it
/// as a delete (too much, never too little); a maintained state checks it.
pub const REPLACED_OP: i64 = 6;

/// Writes an admin action into the outbox and returns its position. Blocking; a short write.
pub fn write_admin_marker(conn: &Connection, action: &AdminAction) -> rusqlite::Result<u64> {
    let text = serde_json::to_string(action)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.execute(
        &format!("INSERT INTO cachetail_outbox (id, capture, op, new, at) VALUES ((SELECT coalesce(max(id), 0) + 1 FROM cachetail_outbox), 0, ?1, ?2, {WRITTEN_AT})"),
        params![MARKER_OP, text],
    )?;
    Ok(u64::try_from(conn.last_insert_rowid()).unwrap_or(0))
}

/// What a position marker's row records: its admin action, none (a marker an older cachetail
/// wrote), or why it cannot be read.
pub fn read_marker(id: i64, new: Option<&str>) -> ChangeBody {
    match new.map(serde_json::from_str::<AdminAction>) {
        None => ChangeBody::Marker,
        Some(Ok(action)) => ChangeBody::Admin(action),
        Some(Err(e)) => ChangeBody::Unreadable(Unreadable {
            table: None,
            reason: format!(
                "outbox row {id} is an admin action that cannot be read ({e}): {new:?}"
            ),
        }),
    }
}

/// What a capture trigger stores in `cachetail_outbox.at`: the write's time as SQLite's clock
/// tells it (a Julian day, millisecond precision, the same for every row of one statement).
/// `julianday` exists in every SQLite the app may link, unlike `unixepoch('subsec')`; without an
/// argument it is 'now', without parsing that word on every captured row.
pub(crate) const WRITTEN_AT: &str = "julianday()";

/// Creates cachetail's tables if missing, and brings older ones up to date (the outbox's `at`
/// column came later: rows written before it have none; so did the cursor's `row_id` and
/// `row_at`).
pub fn ensure_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    let has_at: bool = conn.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info('cachetail_outbox') WHERE name = 'at'",
        [],
        |row| row.get(0),
    )?;
    if !has_at {
        conn.execute_batch("ALTER TABLE cachetail_outbox ADD COLUMN at REAL")?;
    }
    let has_row_at: bool = conn.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info('cachetail_cursor') WHERE name = 'row_at'",
        [],
        |row| row.get(0),
    )?;
    if !has_row_at {
        conn.execute_batch(
            "ALTER TABLE cachetail_cursor ADD COLUMN row_id INTEGER;
             ALTER TABLE cachetail_cursor ADD COLUMN row_at REAL;",
        )?;
    }
    Ok(())
}

/// Installs the outbox and the triggers the config's rules need, idempotently and in one
/// transaction: triggers already right are left alone (so the schema does not change for
/// nothing), stale ones are dropped, missing ones created. A table that had no capture before
/// gets a flush marker in the outbox, in the same transaction: whatever was written while it had
/// none must not be served from the cache. A table that cannot be captured (gone, or a captured
/// column is gone) is reported in `failed` and flushed; the others are installed all the same.
pub fn install(conn: &mut Connection, config: &Config) -> Result<InstallReport, CaptureError> {
    ensure_wal(conn)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let report = install_in(&tx, config)?;
    tx.commit()?;
    Ok(report)
}

/// `install`, inside the caller's write transaction.
fn install_in(tx: &Connection, config: &Config) -> Result<InstallReport, CaptureError> {
    ensure_schema(tx)?;
    let mut report = InstallReport {
        paused: is_paused(tx)?,
        ..InstallReport::default()
    };

    let mut desired: BTreeMap<String, String> = BTreeMap::new();
    let mut layouts: BTreeMap<String, i64> = BTreeMap::new();
    for (table, columns) in config.captured_columns() {
        if let Err(e) = check_columns(tx, &table, &columns) {
            layouts.insert(table.clone(), layout_id(tx, &table, &[])?);
            report.failed.push((table, e.to_string()));
            continue;
        }
        let layout = layout_id(tx, &table, &columns)?;
        layouts.insert(table.clone(), layout);
        if report.paused {
            continue;
        }
        let shape = TableShape::read(tx, &table)?;
        for (name, sql) in table_triggers(&table, layout, &columns, &shape) {
            desired.insert(name, sql);
        }
    }

    let existing = installed_triggers(tx)?;
    for (name, sql) in &existing {
        if desired.get(name) != Some(sql) {
            tx.execute_batch(&format!(
                "DROP TRIGGER IF EXISTS {}",
                quote_identifier(name)
            ))?;
            report.dropped.push(name.clone());
        }
    }
    for (name, sql) in &desired {
        if existing.get(name) == Some(sql) {
            report.unchanged += 1;
        } else {
            tx.execute_batch(sql)?;
            report.created.push(name.clone());
        }
    }

    let captured_before = |table: &str| {
        existing
            .keys()
            .any(|name| name == &trigger_name(table, "insert"))
    };
    for (table, layout) in &layouts {
        let failed = report.failed.iter().any(|(t, _)| t == table);
        if failed || (!report.paused && !captured_before(table)) {
            tx.execute(
                &format!(
                    "INSERT INTO cachetail_outbox (capture, op, at) VALUES (?1, ?2, {WRITTEN_AT})"
                ),
                params![layout, FLUSH_OP],
            )?;
            report.flushed.push(table.clone());
        }
    }
    Ok(report)
}

/// Pauses capture (for a migration that drops or rewrites a captured column): removes the
/// triggers and records the pause, so that a running daemon does not reinstall them and serves
/// reads from the database, bypassing the cache, until `resume`.
pub fn pause(conn: &mut Connection) -> Result<usize, CaptureError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    ensure_schema(&tx)?;
    tx.execute(
        "INSERT OR REPLACE INTO cachetail_meta (key, value) VALUES ('paused', '1')",
        [],
    )?;
    let triggers = drop_all_triggers(&tx)?;
    tx.commit()?;
    Ok(triggers)
}

/// Ends a pause: clears the flag and reinstalls capture, in one transaction (a write committed
/// between the two would go uncaptured while the flag already says capture is on); every watched
/// table gets a flush marker.
pub fn resume(conn: &mut Connection, config: &Config) -> Result<InstallReport, CaptureError> {
    ensure_wal(conn)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    ensure_schema(&tx)?;
    tx.execute("DELETE FROM cachetail_meta WHERE key = 'paused'", [])?;
    let report = install_in(&tx, config)?;
    tx.commit()?;
    Ok(report)
}

/// Whether capture is paused (`cachetail pause`), as the database says.
pub fn is_paused(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM cachetail_meta WHERE key = 'paused' AND value = '1'",
        [],
        |row| row.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// Removes every trigger and table cachetail installed. The app's own tables are not touched.
pub fn uninstall(conn: &mut Connection) -> Result<usize, CaptureError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let triggers = drop_all_triggers(&tx)?;
    tx.execute_batch(
        "DROP TABLE IF EXISTS cachetail_outbox;
         DROP TABLE IF EXISTS cachetail_capture;
         DROP TABLE IF EXISTS cachetail_cursor;
         DROP TABLE IF EXISTS cachetail_meta;
         DROP TABLE IF EXISTS cachetail_lease;",
    )?;
    tx.commit()?;
    Ok(triggers)
}

fn check_columns(conn: &Connection, table: &str, columns: &[String]) -> Result<(), CaptureError> {
    let exists: Option<i64> = conn
        .query_row(
            // SQLite's names are case-insensitive (a query may write `Reviews.Rating`).
            "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1 COLLATE NOCASE",
            [table],
            |row| row.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return Err(CaptureError::MissingTable(table.to_owned()));
    }
    let present = table_columns(conn, table)?;
    for column in columns {
        if !present.iter().any(|c| c.eq_ignore_ascii_case(column)) {
            return Err(CaptureError::MissingColumn {
                table: table.to_owned(),
                column: column.clone(),
            });
        }
    }
    Ok(())
}

fn layout_id(conn: &Connection, table: &str, columns: &[String]) -> Result<i64, CaptureError> {
    let columns_json = serde_json::to_string(columns).unwrap_or_else(|_| "[]".to_owned());
    conn.execute(
        "INSERT OR IGNORE INTO cachetail_capture (tbl, columns) VALUES (?1, ?2)",
        params![table, columns_json],
    )?;
    Ok(conn.query_row(
        "SELECT id FROM cachetail_capture WHERE tbl = ?1 AND columns = ?2",
        params![table, columns_json],
        |row| row.get(0),
    )?)
}
