//! The app's database, as cachetail touches it: connections set up in one place, the capped pool
//! of read connections requests use, and running a family's query into its JSON value.
//!
//! cachetail shares the app's database file, so its connections are chosen to never hurt the app:
//! a busy timeout (it waits for the app, never the other way round for long), WAL so its reads do
//! not block the app's writers, and short transactions everywhere else in the code.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

mod deadline;
mod pool;
mod query;

pub use deadline::Deadline;
pub use pool::{ReadError, ReadPool, is_interrupted, open_reader};
#[allow(unused_imports)] // encode_rows: for maintain/ (issue 17, in progress)
pub use query::{
    Body, Bound, Computed, bound, compute, compute_with, encode_rows, read_head,
    read_head_and_pause, real_key_text,
};

/// How long the daemon's statements wait for a lock held by the app before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a read-write connection to the app's database. The file must exist: cachetail never
/// creates the app's database (a typo in `database` must not silently watch an empty file).
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // The daemon writes only its cursor: losing the last update on power loss means replaying a
    // batch (at-least-once), never skipping one.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Reads through a memory map instead of a read() call per page: the outbox is read
    // sequentially and often. Per connection; the database file is not changed by it.
    conn.pragma_update(None, "mmap_size", 256 * 1024 * 1024)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Opens the connection cachetail writes with (cursor, prune, capture). An app writing in a
/// tight loop holds the write lock almost all the time; SQLite's default busy handler sleeps in
/// growing steps (up to 100 ms) and keeps missing the short gaps between the app's transactions.
/// This one looks again every 100 µs, for up to `BUSY_TIMEOUT`, so cachetail's short writes get
/// their turn without the app ever waiting on them for long.
pub fn open_writer(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = open(path)?;
    conn.busy_handler(Some(retry_quickly))?;
    Ok(conn)
}

fn retry_quickly(attempt: i32) -> bool {
    const STEP: Duration = Duration::from_micros(100);
    let waited = STEP * u32::try_from(attempt).unwrap_or(u32::MAX).min(1 << 20);
    if waited >= BUSY_TIMEOUT {
        return false;
    }
    std::thread::sleep(STEP);
    true
}

/// Puts the database in WAL mode (persistent, and what every reader-beside-a-writer wants):
/// readers then never block the app's writers, and the daemon wakes on the `-wal` file.
pub fn ensure_wal(conn: &Connection) -> rusqlite::Result<String> {
    conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
}

/// Quotes an identifier for SQL: `"name"` with inner quotes doubled.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether an error means "another connection holds the lock".
pub fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// The column names of a table, in declaration order.
pub fn table_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    stmt.query_map([table], |row| row.get(0))?.collect()
}

/// A column's declared type and default collation, as SQLite describes it (`rowid` included);
/// None when the table (or view) has no such column.
pub fn column_semantics(conn: &Connection, table: &str, column: &str) -> Option<(String, String)> {
    let (declared, collation, ..) = conn.column_metadata(None, table, column).ok()?;
    let text = |c: Option<std::ffi::CString>| {
        c.map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Some((text(declared), text(collation)))
}
