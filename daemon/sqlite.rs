//! SQLite connections, set up in one place.
//!
//! cachetail shares the app's database file, so its connections are chosen to never hurt the app:
//! a busy timeout (it waits for the app, never the other way round for long), WAL so its reads do
//! not block the app's writers, and short transactions everywhere else in the code.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

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
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
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

/// Quotes a string literal for SQL: `'text'` with inner quotes doubled. Used only for DDL that
/// SQLite cannot parameterise (trigger bodies); values are always bound as parameters.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
