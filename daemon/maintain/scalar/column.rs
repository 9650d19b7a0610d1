//! What the row deltas say of one column, how SQLite finalizes a sum of integers from it, and
//! what a full scan of a table checks first (a table, the columns there, their collation).

use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OptionalExtension, ffi};

use super::{Func, TablePlan};
use crate::db::{column_semantics, table_columns};

/// What the row deltas say of one column.
#[derive(Debug, Clone, Default)]
pub(super) struct ColumnState {
    pub(super) non_null: i64,
    /// Non-NULL values that are not integers (REAL, TEXT, BLOB): SQLite's sum goes approximate.
    pub(super) non_integer: i64,
    /// REALs with no fraction (`4.0`, `-0.0`): equal to an integer or to another such REAL
    /// without being the same value, so which one `min`/`max` returns depends on the scan order.
    pub(super) integral_reals: i64,
    /// The integers' sum, positive and negative parts apart: while each fits an i64, no running
    /// sum in any order overflows.
    pub(super) positive: i128,
    pub(super) negative: i128,
    /// A change came without this column's value: rescanned at the next settle.
    pub(super) lost: bool,
    /// Its texts compare by bytes (BINARY collation, UTF-8 database).
    pub(super) binary_text: bool,
}

impl ColumnState {
    pub(super) fn add(&mut self, value: ValueRef<'_>, sign: i64) {
        match value {
            ValueRef::Null => {}
            ValueRef::Integer(i) => {
                self.non_null += sign;
                let delta = i128::from(i) * i128::from(sign);
                if i > 0 {
                    self.positive += delta;
                } else {
                    self.negative += delta;
                }
            }
            ValueRef::Real(r) => {
                self.non_null += sign;
                self.non_integer += sign;
                if r == r.trunc() {
                    self.integral_reals += sign;
                }
            }
            ValueRef::Text(_) | ValueRef::Blob(_) => {
                self.non_null += sign;
                self.non_integer += sign;
            }
        }
    }

    /// The integer sum SQLite's `sumStep` reaches in any order, when it is exact (only integers,
    /// no running sum overflows).
    pub(super) fn exact_sum(&self) -> Option<i64> {
        if self.lost || self.non_integer != 0 {
            return None;
        }
        let positive = i64::try_from(self.positive).ok()?;
        let negative = i64::try_from(self.negative).ok()?;
        positive.checked_add(negative)
    }
}

/// `sumFinalize`, `totalFinalize`, `avgFinalize` over integers only (`count` non-NULL values
/// summing exactly to `sum`).
pub(super) fn integer_finalize(func: Func, sum: i64, count: i64) -> Value {
    match func {
        Func::Sum if count == 0 => Value::Null,
        Func::Sum => Value::Integer(sum),
        Func::Avg if count == 0 => Value::Null,
        Func::Avg => Value::Real(sum as f64 / count as f64),
        _ => Value::Real(sum as f64),
    }
}

/// A table of the main database (a view's or a virtual table's changes are never captured).
pub(super) fn require_table(conn: &Connection, name: &str) -> rusqlite::Result<()> {
    let kind: Option<String> = conn
        .query_row(
            "SELECT type FROM sqlite_schema WHERE name = ?1 COLLATE NOCASE \
             AND sql NOT LIKE 'CREATE VIRTUAL%'",
            [name],
            |row| row.get(0),
        )
        .optional()?;
    if kind.as_deref() == Some("table") {
        return Ok(());
    }
    Err(rusqlite::Error::SqliteFailure(
        ffi::Error::new(ffi::SQLITE_ERROR),
        Some(format!(
            "{name} is not a table of the main database: its changes are not captured"
        )),
    ))
}

/// The table's columns' states before a scan: none counted, each with its collation.
pub(super) fn empty_columns(
    conn: &Connection,
    plan: &TablePlan,
) -> rusqlite::Result<Vec<ColumnState>> {
    let present = table_columns(conn, &plan.name)?;
    let utf8 = utf8(conn)?;
    let mut columns = Vec::with_capacity(plan.columns.len());
    for name in &plan.columns {
        if !present.iter().any(|p| p.eq_ignore_ascii_case(name)) {
            return Err(rusqlite::Error::InvalidColumnName(format!(
                "{}.{name}",
                plan.name
            )));
        }
        let collation = column_semantics(conn, &plan.name, name).map(|(_, c)| c);
        let binary_text = utf8 && collation.is_some_and(|c| c.eq_ignore_ascii_case("BINARY"));
        columns.push(ColumnState {
            binary_text,
            ..ColumnState::default()
        });
    }
    Ok(columns)
}

/// The database stores text as UTF-8 (BINARY then compares as Rust compares bytes).
fn utf8(conn: &Connection) -> rusqlite::Result<bool> {
    let encoding: String = conn.query_row("PRAGMA encoding", [], |row| row.get(0))?;
    Ok(encoding.eq_ignore_ascii_case("UTF-8"))
}
