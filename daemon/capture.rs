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
}

impl InstallReport {
    pub fn changed(&self) -> bool {
        !self.created.is_empty() || !self.dropped.is_empty()
    }
}

/// Installs the outbox and the triggers the config's rules need, idempotently and in one
/// transaction: triggers already right are left alone (so the schema does not change for
/// nothing), stale ones are dropped, missing ones created.
pub fn install(conn: &mut Connection, config: &Config) -> Result<InstallReport, CaptureError> {
    ensure_wal(conn)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;

    let mut desired: BTreeMap<String, String> = BTreeMap::new();
    for (table, columns) in config.captured_columns() {
        check_columns(&tx, &table, &columns)?;
        let layout = layout_id(&tx, &table, &columns)?;
        for op in Op::ALL {
            let (name, sql) = trigger_sql(&table, op, layout, &columns);
            desired.insert(name, sql);
        }
    }

    let existing = installed_triggers(&tx)?;
    let mut report = InstallReport::default();
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
    tx.commit()?;
    Ok(report)
}

/// Removes every trigger and table cachetail installed. The app's own tables are not touched.
pub fn uninstall(conn: &mut Connection) -> Result<usize, CaptureError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let triggers = installed_triggers(&tx)?;
    for name in triggers.keys() {
        tx.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {}",
            quote_identifier(name)
        ))?;
    }
    tx.execute_batch(
        "DROP TABLE IF EXISTS cachetail_outbox;
         DROP TABLE IF EXISTS cachetail_capture;
         DROP TABLE IF EXISTS cachetail_cursor;",
    )?;
    tx.commit()?;
    Ok(triggers.len())
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

fn installed_triggers(conn: &Connection) -> rusqlite::Result<BTreeMap<String, String>> {
    let mut stmt = conn.prepare(
        "SELECT name, sql FROM sqlite_schema WHERE type = 'trigger' AND substr(name, 1, length(?1)) = ?1",
    )?;
    stmt.query_map([TRIGGER_PREFIX], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect()
}

/// The name and `CREATE TRIGGER` text of one capture trigger.
fn trigger_sql(table: &str, op: Op, layout: i64, columns: &[String]) -> (String, String) {
    let name = format!("{TRIGGER_PREFIX}{}_{}", op.name(), table);
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
    let (event, targets, exprs) = match op {
        Op::Insert => ("INSERT", "new", values("NEW")),
        Op::Delete => ("DELETE", "old", values("OLD")),
        Op::Update => (
            "UPDATE",
            "old, new",
            format!("{}, {}", values("OLD"), values("NEW")),
        ),
    };
    let sql = format!(
        "CREATE TRIGGER {} AFTER {event} ON {} BEGIN INSERT INTO cachetail_outbox (capture, op, {targets}) VALUES ({layout}, {}, {exprs}); END",
        quote_identifier(&name),
        quote_identifier(table),
        op.code(),
    );
    (name, sql)
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
