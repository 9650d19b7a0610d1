//! Capture: the outbox tables (`schema.sql`) and the triggers that fill them, installed in the
//! app's own database.
//!
//! Triggers use only core SQLite (`quote()` and `||`), so every writer in every language is
//! captured without loading anything. Each trigger records the columns the rules need, not the
//! whole row: capture is paid on every app write. The values are stored as `quote()`d SQL
//! literals, which decode back to exactly the value that was written (integer, real, text, blob,
//! NULL), commas and quotes included.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::config::{Config, Op};
use crate::sqlite::{ensure_wal, quote_identifier};

/// The outbox, capture-layout and cursor tables, as installed.
pub const SCHEMA: &str = include_str!("../schema.sql");

/// Every trigger cachetail installs has a name starting with this.
pub const TRIGGER_PREFIX: &str = "cachetail_";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("table `{0}` named by a rule does not exist in the database")]
    MissingTable(String),
    #[error("column `{table}.{column}` used by a rule's template does not exist in the database")]
    MissingColumn { table: String, column: String },
    #[error("capture layout {0} in the outbox is unknown: the outbox was edited by hand?")]
    UnknownLayout(i64),
    #[error("outbox row {id} is malformed ({what}): {text:?}")]
    Malformed {
        id: i64,
        what: &'static str,
        text: String,
    },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// One capture layout: the table and the columns its triggers record, in stored order.
#[derive(Debug)]
pub struct Layout {
    pub id: i64,
    pub table: Arc<str>,
    pub columns: Vec<Arc<str>>,
}

impl Layout {
    /// The value of `column` in a decoded row of this layout.
    pub fn value<'r>(&self, row: &'r [Value], column: &str) -> Option<&'r Value> {
        let index = self.columns.iter().position(|c| &**c == column)?;
        row.get(index)
    }
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

/// The outbox op code of a position marker (an admin action's): it changes nothing; it gives
/// the action a position of its own, so values read before it can be told from values read after.
pub const MARKER_OP: i64 = 4;

/// Writes a position marker into the outbox and returns its position. Blocking; a short write.
pub fn write_marker(conn: &Connection) -> rusqlite::Result<u64> {
    conn.execute(
        &format!("INSERT INTO cachetail_outbox (id, capture, op, at) VALUES ((SELECT coalesce(max(id), 0) + 1 FROM cachetail_outbox), 0, ?1, {WRITTEN_AT})"),
        [MARKER_OP],
    )?;
    Ok(u64::try_from(conn.last_insert_rowid()).unwrap_or(0))
}

/// What a capture trigger stores in `cachetail_outbox.at`: the write's time as SQLite's clock
/// tells it (a Julian day, millisecond precision, the same for every row of one statement).
/// `julianday` exists in every SQLite the app may link, unlike `unixepoch('subsec')`.
const WRITTEN_AT: &str = "julianday('now')";

/// A Julian day (`cachetail_outbox.at`) as unix milliseconds.
pub fn julian_to_unix_ms(day: f64) -> f64 {
    (day - 2_440_587.5) * 86_400_000.0
}

/// Creates cachetail's tables if missing, and brings an older outbox up to date (the `at`
/// column came later: rows written before it have none).
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

/// Every capture layout recorded in the database, by id.
pub fn load_layouts(conn: &Connection) -> Result<HashMap<i64, Arc<Layout>>, CaptureError> {
    let mut stmt = conn.prepare("SELECT id, tbl, columns FROM cachetail_capture")?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    })?;
    let mut layouts = HashMap::new();
    for row in rows {
        let (id, table, columns) = row?;
        let columns: Vec<String> =
            serde_json::from_str(&columns).map_err(|_| CaptureError::Malformed {
                id,
                what: "capture layout columns",
                text: columns.clone(),
            })?;
        layouts.insert(
            id,
            Arc::new(Layout {
                id,
                table: table.into(),
                columns: columns.into_iter().map(Arc::from).collect(),
            }),
        );
    }
    Ok(layouts)
}

/// Decodes the `old`/`new` text of an outbox row: `quote()`d literals separated by commas.
pub fn decode_values(text: &str) -> Option<Vec<Value>> {
    let bytes = text.as_bytes();
    let mut values = Vec::new();
    let mut i = 0;
    loop {
        let (value, next) = decode_one(text, i)?;
        values.push(value);
        match bytes.get(next) {
            None => return Some(values),
            Some(b',') => i = next + 1,
            Some(_) => return None,
        }
    }
}

fn decode_one(text: &str, start: usize) -> Option<(Value, usize)> {
    let bytes = text.as_bytes();
    match bytes.get(start)? {
        b'\'' => {
            let mut out = String::new();
            let mut i = start + 1;
            loop {
                let rel = text[i..].find('\'')?;
                out.push_str(&text[i..i + rel]);
                i += rel + 1;
                if bytes.get(i) == Some(&b'\'') {
                    out.push('\'');
                    i += 1;
                } else {
                    return Some((Value::Text(out), i));
                }
            }
        }
        b'X' | b'x' if bytes.get(start + 1) == Some(&b'\'') => {
            let body_start = start + 2;
            let len = text[body_start..].find('\'')?;
            let hex = &text[body_start..body_start + len];
            if !hex.len().is_multiple_of(2) {
                return None;
            }
            let blob = (0..hex.len())
                .step_by(2)
                .map(|j| u8::from_str_radix(&hex[j..j + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            Some((Value::Blob(blob), body_start + len + 1))
        }
        _ => {
            let end = text[start..]
                .find(',')
                .map_or(text.len(), |rel| start + rel);
            let token = &text[start..end];
            let value = if token == "NULL" {
                Value::Null
            } else if let Ok(i) = token.parse::<i64>() {
                Value::Integer(i)
            } else if let Ok(r) = token.parse::<f64>() {
                Value::Real(r)
            } else {
                match token {
                    "Inf" => Value::Real(f64::INFINITY),
                    "-Inf" => Value::Real(f64::NEG_INFINITY),
                    _ => return None,
                }
            };
            Some((value, end))
        }
    }
}

fn check_columns(conn: &Connection, table: &str, columns: &[String]) -> Result<(), CaptureError> {
    let exists: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1",
            [table],
            |row| row.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return Err(CaptureError::MissingTable(table.to_owned()));
    }
    let present = table_columns(conn, table)?;
    for column in columns {
        if !present.iter().any(|c| c == column) {
            return Err(CaptureError::MissingColumn {
                table: table.to_owned(),
                column: column.clone(),
            });
        }
    }
    Ok(())
}

/// The column names of a table, in declaration order.
pub fn table_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    stmt.query_map([table], |row| row.get(0))?.collect()
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

/// Drops every cachetail trigger; returns how many there were.
fn drop_all_triggers(conn: &Connection) -> rusqlite::Result<usize> {
    let triggers = installed_triggers(conn)?;
    for name in triggers.keys() {
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {}",
            quote_identifier(name)
        ))?;
    }
    Ok(triggers.len())
}

fn installed_triggers(conn: &Connection) -> rusqlite::Result<BTreeMap<String, String>> {
    let mut stmt = conn.prepare(
        "SELECT name, sql FROM sqlite_schema WHERE type = 'trigger' AND substr(name, 1, length(?1)) = ?1",
    )?;
    stmt.query_map([TRIGGER_PREFIX], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect()
}

fn trigger_name(table: &str, kind: &str) -> String {
    format!("{TRIGGER_PREFIX}{kind}_{table}")
}

/// What the replace triggers need to know of a table: its unique keys and whether it has rowids.
struct TableShape {
    without_rowid: bool,
    /// Each UNIQUE constraint or index (and a WITHOUT ROWID table's primary key): its columns
    /// with their collations. Expression indexes are left out (SQLite cannot name their values
    /// from a trigger).
    unique_keys: Vec<Vec<(String, String)>>,
    primary_key: Vec<String>,
}

impl TableShape {
    fn read(conn: &Connection, table: &str) -> rusqlite::Result<TableShape> {
        let without_rowid: bool = conn
            .query_row(
                "SELECT wr FROM pragma_table_list WHERE name = ?1 AND schema = 'main'",
                [table],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(false);
        let mut primary_key: Vec<(i64, String)> = conn
            .prepare("SELECT pk, name FROM pragma_table_info(?1) WHERE pk > 0")?
            .query_map([table], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        primary_key.sort();
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM pragma_index_list(?1) WHERE \"unique\" = 1")?
            .query_map([table], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut unique_keys = Vec::new();
        for index in indexes {
            let columns: Vec<(i64, Option<String>, Option<String>)> = conn
                .prepare("SELECT cid, name, coll FROM pragma_index_xinfo(?1) WHERE key = 1 ORDER BY seqno")?
                .query_map([&index], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            if columns
                .iter()
                .any(|(cid, name, _)| *cid < 0 || name.is_none())
            {
                continue;
            }
            unique_keys.push(
                columns
                    .into_iter()
                    .map(|(_, name, coll)| {
                        (
                            name.unwrap_or_default(),
                            coll.unwrap_or_else(|| "BINARY".to_owned()),
                        )
                    })
                    .collect(),
            );
        }
        Ok(TableShape {
            without_rowid,
            unique_keys,
            primary_key: primary_key.into_iter().map(|(_, name)| name).collect(),
        })
    }

    /// `row` conflicts with the NEW row on some unique key (rowid included).
    fn conflict(&self, row: &str) -> String {
        let mut alternatives: Vec<String> = self
            .unique_keys
            .iter()
            .map(|key| {
                let terms: Vec<String> = key
                    .iter()
                    .map(|(column, coll)| {
                        let c = quote_identifier(column);
                        format!("{row}.{c} = NEW.{c} COLLATE {}", quote_identifier(coll))
                    })
                    .collect();
                format!("({})", terms.join(" AND "))
            })
            .collect();
        if !self.without_rowid {
            alternatives.push(format!("{row}.rowid = NEW.rowid"));
        }
        alternatives.join(" OR ")
    }

    /// `row` is the OLD row itself.
    fn is_old_row(&self, row: &str) -> String {
        if self.without_rowid {
            let terms: Vec<String> = self
                .primary_key
                .iter()
                .map(|c| {
                    let c = quote_identifier(c);
                    format!("{row}.{c} IS OLD.{c}")
                })
                .collect();
            format!("({})", terms.join(" AND "))
        } else {
            format!("{row}.rowid = OLD.rowid")
        }
    }

    /// A unique key's column changes in this UPDATE (only then can it replace another row).
    fn unique_column_changes(&self) -> String {
        let mut columns: Vec<&str> = self
            .unique_keys
            .iter()
            .flatten()
            .map(|(c, _)| c.as_str())
            .collect();
        columns.sort_unstable();
        columns.dedup();
        let mut terms: Vec<String> = columns
            .iter()
            .map(|c| {
                let c = quote_identifier(c);
                format!("NEW.{c} IS NOT OLD.{c}")
            })
            .collect();
        if !self.without_rowid {
            terms.push("NEW.rowid IS NOT OLD.rowid".to_owned());
        }
        terms.join(" OR ")
    }
}

/// The capture triggers of one table, by name: AFTER INSERT / UPDATE / DELETE, and BEFORE INSERT /
/// UPDATE ones that record a row about to be replaced (REPLACE, `INSERT OR REPLACE`, `UPDATE OR
/// REPLACE` fire no delete trigger for it unless the writer turned `recursive_triggers` on).
fn table_triggers(
    table: &str,
    layout: i64,
    columns: &[String],
    shape: &TableShape,
) -> Vec<(String, String)> {
    let values = |row: &str| -> String {
        if columns.is_empty() {
            return "NULL".to_owned();
        }
        columns
            .iter()
            .map(|c| format!("quote({row}.{})", quote_identifier(c)))
            .collect::<Vec<_>>()
            .join(" || ',' || ")
    };
    let t = quote_identifier(table);
    let named = |kind: &str, body: String| -> (String, String) {
        let name = trigger_name(table, kind);
        let sql = format!("CREATE TRIGGER {} {body}", quote_identifier(&name));
        (name, sql)
    };
    let outbox = "INSERT INTO cachetail_outbox";
    let (insert, update, delete) = (Op::Insert.code(), Op::Update.code(), Op::Delete.code());
    let replaced = "cachetail_replaced";
    vec![
        named(
            "insert",
            format!(
                "AFTER INSERT ON {t} BEGIN {outbox} (capture, op, new, at) VALUES ({layout}, {insert}, {}, {WRITTEN_AT}); END",
                values("NEW")
            ),
        ),
        named(
            "update",
            format!(
                "AFTER UPDATE ON {t} BEGIN {outbox} (capture, op, old, new, at) VALUES ({layout}, {update}, {}, {}, {WRITTEN_AT}); END",
                values("OLD"),
                values("NEW")
            ),
        ),
        named(
            "delete",
            format!(
                "AFTER DELETE ON {t} BEGIN {outbox} (capture, op, old, at) VALUES ({layout}, {delete}, {}, {WRITTEN_AT}); END",
                values("OLD")
            ),
        ),
        named(
            "replace_insert",
            format!(
                "BEFORE INSERT ON {t} BEGIN {outbox} (capture, op, old, at) SELECT {layout}, {delete}, {}, {WRITTEN_AT} FROM {t} AS {replaced} WHERE {}; END",
                values(replaced),
                shape.conflict(replaced)
            ),
        ),
        named(
            "replace_update",
            format!(
                "BEFORE UPDATE ON {t} WHEN {} BEGIN {outbox} (capture, op, old, at) SELECT {layout}, {delete}, {}, {WRITTEN_AT} FROM {t} AS {replaced} WHERE ({}) AND NOT {}; END",
                shape.unique_column_changes(),
                values(replaced),
                shape.conflict(replaced),
                shape.is_old_row(replaced)
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_decode_to_what_sqlite_stored() {
        let conn = Connection::open_in_memory().expect("memory db");
        let text: String = conn
            .query_row(
                "SELECT quote(42) || ',' || quote(-7.25) || ',' || quote('it''s, a {key}:/é') || ',' || quote(NULL) || ',' || quote(x'00ff') || ',' || quote(1e300)",
                [],
                |row| row.get(0),
            )
            .expect("quote");
        let values = decode_values(&text).expect("decodes");
        assert_eq!(
            values,
            vec![
                Value::Integer(42),
                Value::Real(-7.25),
                Value::Text("it's, a {key}:/é".into()),
                Value::Null,
                Value::Blob(vec![0, 255]),
                Value::Real(1e300),
            ]
        );
        assert_eq!(decode_values("'unterminated"), None);
        assert_eq!(decode_values("1 2"), None);
    }
}
