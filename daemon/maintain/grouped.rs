//! Grouped families (`GROUP BY`, joins to display tables, `HAVING`, `ORDER BY`, `LIMIT`), kept
//! as one row per group in a table of the applying connection's `temp` schema: the group key
//! columns, the result columns, the ORDER BY values.
//!
//! A row change of a table whose columns are tied by equalities to every group key names the
//! groups it touches (from its old and new images); `settle` deletes those groups' rows and
//! re-runs the query restricted to them (`AND key IN (...)`, bound values), so SQLite computes
//! every number, and a group that no longer qualifies (HAVING, emptied) is simply not re-added.
//! A change anything else follows re-runs the whole query (counted as recomputed). The value is
//! read from the state table in the query's order, through an index matching it, with the
//! query's LIMIT/OFFSET, the columns named as the query names them: the same bytes.
//!
//! Invariant: after `settle`, the state table holds exactly the rows the query without ORDER BY
//! and LIMIT returns (one per group), because every group whose rows a change could alter is
//! deleted and re-run, and the ORDER BY includes every group key, so no two rows tie.

mod analysis;
mod schema;
mod sql;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::types::Value;
use rusqlite::{Connection, params_from_iter};
use sqlparser::ast::{BinaryOperator, Expr, SetExpr};

use self::analysis::{Analysis, column_expr};
use self::sql::quote;
use super::{Settled, Size};
use crate::db::Body;
use crate::types::{Op, RowChange};

/// Past this many distinct values of one group key in a batch, the whole query is re-run.
const MAX_TOUCHED: usize = 512;

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    analysis: Analysis,
}

/// Ok(None): the query is not of this shape. Err: it is, but cannot be maintained (why).
pub fn analyse(query: &str) -> Result<Option<Plan>, String> {
    Ok(analysis::analyse(query)?.map(|analysis| Plan { analysis }))
}

impl Plan {
    /// The columns the capture must record: the ones that name groups, and every column the
    /// query reads of each table (an update changing none of them is skipped).
    pub fn columns(&self) -> Vec<(String, String)> {
        let mut columns = Vec::new();
        for trace in &self.analysis.traces {
            let ties = trace.ties.iter().flatten().map(|(c, _)| c);
            for column in ties.chain(trace.read.iter().flatten()) {
                let pair = (trace.table.clone(), column.clone());
                if !columns.contains(&pair) {
                    columns.push(pair);
                }
            }
        }
        columns
    }

    pub fn tables(&self) -> Vec<String> {
        self.analysis
            .traces
            .iter()
            .map(|t| t.table.clone())
            .collect()
    }

    /// What needs the schema: columns read outside aggregates must be one value per group (its
    /// table's primary key is a group key). Err: why the family cannot be maintained (for
    /// `check`, which has the database; `State::build` falls back to running the query).
    pub fn check(&self, conn: &Connection) -> Result<(), String> {
        schema::check(conn, &self.analysis).map(|_| ())
    }
}

/// The distinct values one group key was touched with since the last settle.
#[derive(Default)]
struct Touched {
    values: Vec<Value>,
    seen: HashSet<String>,
    null: bool,
}

impl Touched {
    fn add(&mut self, value: &Value) {
        if *value == Value::Null {
            self.null = true;
        } else if self.seen.insert(format!("{value:?}")) {
            self.values.push(value.clone());
        }
    }

    fn is_empty(&self) -> bool {
        self.values.is_empty() && !self.null
    }
}

/// How a change to one table is followed.
struct Trace {
    /// Per group key, the column naming it (None: re-run everything).
    ties: Option<Vec<String>>,
    /// Every column of the table the query reads (None: unknown).
    read: Option<Vec<String>>,
}

/// The statements of one state table.
struct Statements {
    table: String,
    fill: String,
    value: String,
    /// Per shape of the touched set (per key: values, NULL touched): (delete, re-run).
    restricted: HashMap<Vec<(usize, bool)>, (String, String)>,
    /// Bytes a row takes, about (measured at each full run).
    row_bytes: u64,
}

/// A grouped family's state (boxed: it is large, and kept beside small ones).
pub struct State(Box<Kept>);

impl State {
    pub fn build(plan: &Plan, conn: &Connection) -> rusqlite::Result<State> {
        Kept::build(plan, conn).map(|kept| State(Box::new(kept)))
    }

    pub fn apply(&mut self, change: &RowChange) {
        self.0.apply(change);
    }

    pub fn settle(&mut self, conn: &Connection) -> rusqlite::Result<Settled> {
        self.0.settle(conn)
    }

    pub fn value(&mut self, conn: &Connection, many: bool) -> rusqlite::Result<Option<Body>> {
        self.0.value(conn, many)
    }

    pub fn size(&self) -> Size {
        self.0.size()
    }

    pub fn discard(self, conn: &Connection) {
        self.0.discard(conn);
    }
}

struct Kept {
    plan: Plan,
    /// None: the query cannot be kept as groups (see `Plan::check`): each value runs it.
    statements: Option<Statements>,
    traces: HashMap<String, Trace>,
    touched: Vec<Touched>,
    full: bool,
    pending: u64,
    rows: u64,
}

static NEXT_TABLE: AtomicU64 = AtomicU64::new(1);

impl Kept {
    fn build(plan: &Plan, conn: &Connection) -> rusqlite::Result<Kept> {
        let mut state = Kept {
            plan: plan.clone(),
            statements: None,
            traces: HashMap::new(),
            touched: plan
                .analysis
                .keys
                .iter()
                .map(|_| Touched::default())
                .collect(),
            full: true,
            pending: 0,
            rows: 0,
        };
        match schema::check(conn, &plan.analysis) {
            Ok(checked) => {
                state.statements = Some(create(conn, &plan.analysis, &checked)?);
                for (trace, ties) in plan.analysis.traces.iter().zip(checked.ties) {
                    let read = trace.read.clone();
                    state
                        .traces
                        .insert(trace.table.clone(), Trace { ties, read });
                }
                state.fill_all(conn)?;
            }
            Err(reason) => {
                tracing::warn!(query = %plan.analysis.query, %reason, "grouped family kept by re-running its query");
            }
        }
        Ok(state)
    }

    fn apply(&mut self, change: &RowChange) {
        self.pending += 1;
        if self.full || self.statements.is_none() {
            return;
        }
        let table = change.layout.table.to_lowercase();
        let Some(trace) = self.traces.get(&table) else {
            return;
        };
        if unchanged(trace, change) {
            return;
        }
        let Some(columns) = &trace.ties else {
            self.full = true;
            return;
        };
        for image in [&change.old, &change.new].into_iter().flatten() {
            for (touched, column) in self.touched.iter_mut().zip(columns) {
                match captured(change, image, column) {
                    Some(value) => touched.add(value),
                    None => {
                        self.full = true;
                        return;
                    }
                }
            }
        }
        if self.touched.iter().any(|t| t.values.len() > MAX_TOUCHED) {
            self.full = true;
        }
    }

    fn settle(&mut self, conn: &Connection) -> rusqlite::Result<Settled> {
        let pending = std::mem::take(&mut self.pending);
        if self.statements.is_none() {
            return Ok(Settled {
                incremental: 0,
                recomputed: pending,
            });
        }
        let full = self.full;
        if !full && self.touched.iter().all(Touched::is_empty) {
            return Ok(Settled {
                incremental: pending,
                recomputed: 0,
            });
        }
        let result = if full {
            self.fill_all(conn)
        } else {
            self.fill_touched(conn)
        };
        if let Err(e) = result {
            // Whatever was done was rolled back: the next settle re-runs everything.
            self.full = true;
            self.pending += pending;
            return Err(e);
        }
        Ok(if full {
            Settled {
                incremental: 0,
                recomputed: pending,
            }
        } else {
            Settled {
                incremental: pending,
                recomputed: 0,
            }
        })
    }

    fn value(&mut self, conn: &Connection, many: bool) -> rusqlite::Result<Option<Body>> {
        let sql = match &self.statements {
            Some(statements) => &statements.value,
            None => &self.plan.analysis.query,
        };
        let mut stmt = conn.prepare_cached(sql)?;
        crate::db::encode_rows(&mut stmt, many)
    }

    fn size(&self) -> Size {
        let row_bytes = self.statements.as_ref().map_or(0, |s| s.row_bytes);
        Size {
            rows: self.rows,
            bytes: self.rows * row_bytes,
        }
    }

    fn discard(self, conn: &Connection) {
        if let Some(statements) = &self.statements {
            let sql = format!("DROP TABLE IF EXISTS temp.{}", statements.table);
            if let Err(e) = conn.execute_batch(&sql) {
                tracing::warn!(error = %e, "dropping a grouped family's state failed");
            }
        }
    }

    /// Re-runs the whole query into the state table.
    fn fill_all(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let Some(statements) = &mut self.statements else {
            return Ok(());
        };
        let rows = in_savepoint(conn, || {
            conn.execute(&format!("DELETE FROM temp.{}", statements.table), [])?;
            let rows = conn.execute(&statements.fill, [])?;
            statements.row_bytes = measure(conn, &statements.table)?;
            Ok(rows)
        })?;
        self.rows = rows as u64;
        self.full = false;
        self.touched
            .iter_mut()
            .for_each(|t| *t = Touched::default());
        Ok(())
    }

    /// Deletes the touched groups' rows and re-runs the query restricted to them.
    fn fill_touched(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let Some(statements) = &mut self.statements else {
            return Ok(());
        };
        // Padded to a power of two (with a repeated value) so few statements are prepared.
        let mut values: Vec<Value> = Vec::new();
        let mut shape = Vec::new();
        for touched in &self.touched {
            let n = touched.values.len();
            let padded = if n == 0 { 0 } else { n.next_power_of_two() };
            values.extend(touched.values.iter().cloned());
            if let Some(first) = touched.values.first() {
                values.extend(std::iter::repeat_n(first.clone(), padded - n));
            }
            shape.push((padded, touched.null));
        }
        let (delete, rerun) = match statements.restricted.get(&shape) {
            Some(pair) => pair.clone(),
            None => {
                let pair = restricted(&self.plan.analysis, &statements.table, &shape)
                    .map_err(sql_error)?;
                statements.restricted.insert(shape.clone(), pair.clone());
                pair
            }
        };
        let (deleted, inserted) = in_savepoint(conn, || {
            let deleted = conn
                .prepare_cached(&delete)?
                .execute(params_from_iter(values.iter()))?;
            let inserted = conn
                .prepare_cached(&rerun)?
                .execute(params_from_iter(values.iter()))?;
            Ok((deleted, inserted))
        })?;
        self.rows = (self.rows + inserted as u64).saturating_sub(deleted as u64);
        self.touched
            .iter_mut()
            .for_each(|t| *t = Touched::default());
        Ok(())
    }
}

/// An update that changes none of the columns the query reads changes nothing it returns.
fn unchanged(trace: &Trace, change: &RowChange) -> bool {
    let (Some(read), Op::Update, Some(old), Some(new)) =
        (&trace.read, change.op, &change.old, &change.new)
    else {
        return false;
    };
    read.iter().all(|column| {
        let before = captured(change, old, column);
        before.is_some() && before == captured(change, new, column)
    })
}

/// A column's value in a row image (names compared as SQLite does, ignoring ASCII case).
fn captured<'r>(change: &RowChange, image: &'r [Value], column: &str) -> Option<&'r Value> {
    let columns = &change.layout.columns;
    let index = columns
        .iter()
        .position(|c| c.eq_ignore_ascii_case(column))?;
    image.get(index)
}

fn in_savepoint<T>(
    conn: &Connection,
    work: impl FnOnce() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.execute_batch("SAVEPOINT cachetail_grouped")?;
    match work() {
        Ok(value) => {
            conn.execute_batch("RELEASE cachetail_grouped")?;
            Ok(value)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO cachetail_grouped; RELEASE cachetail_grouped");
            Err(e)
        }
    }
}

/// Creates the state table (keys typed and collated as the group key columns, so that `IN`
/// matches them as it matches the query's; ORDER BY values collated as the query orders them)
/// and its indexes, and the statements that read and fill it.
fn create(
    conn: &Connection,
    analysis: &Analysis,
    checked: &schema::Checked,
) -> rusqlite::Result<Statements> {
    let name = format!(
        "cachetail_grouped_{}",
        NEXT_TABLE.fetch_add(1, Ordering::Relaxed)
    );
    let table = quote(&name);
    let mut columns = Vec::new();
    for (i, key) in checked.keys.iter().enumerate() {
        columns.push(format!(
            "k{i} {} COLLATE {}",
            key.affinity.declared(),
            quote(&key.collation)
        ));
    }
    columns.extend((0..analysis.items).map(|i| format!("r{i}")));
    for (i, collation) in checked.order.iter().enumerate() {
        columns.push(format!("o{i} COLLATE {}", quote(collation)));
    }
    let keys: Vec<String> = (0..checked.keys.len()).map(|i| format!("k{i}")).collect();
    let mut ddl = format!(
        "DROP TABLE IF EXISTS temp.{table}; CREATE TEMP TABLE {table} ({}); CREATE INDEX temp.{} ON {table} ({});",
        columns.join(", "),
        quote(&format!("{name}_keys")),
        keys.join(", ")
    );
    let order: Vec<String> = analysis
        .order
        .iter()
        .enumerate()
        .map(|(i, term)| format!("o{i}{}", term.direction))
        .collect();
    // An index cannot say NULLS FIRST/LAST: such an order is sorted when read.
    if analysis.order.iter().all(|term| !term.nulls) {
        ddl.push_str(&format!(
            " CREATE INDEX temp.{} ON {table} ({});",
            quote(&format!("{name}_order")),
            order.join(", ")
        ));
    }
    conn.execute_batch(&ddl)?;
    let names: Vec<String> = {
        let stmt = conn.prepare(&analysis.query)?;
        stmt.column_names().map(quote).collect()
    };
    let results: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, name)| format!("r{i} AS {name}"))
        .collect();
    let value = format!(
        "SELECT {} FROM temp.{table} ORDER BY {}{}",
        results.join(", "),
        order.join(", "),
        analysis.limit
    );
    Ok(Statements {
        fill: format!("INSERT INTO temp.{table} {}", analysis.rerun),
        table,
        value,
        restricted: HashMap::new(),
        row_bytes: 0,
    })
}

/// The delete and the re-run for one shape of touched set: per key, `IN` over its values (and
/// `IS NULL` when NULL was touched), on the state's key columns and on the query's.
fn restricted(
    analysis: &Analysis,
    table: &str,
    shape: &[(usize, bool)],
) -> Result<(String, String), String> {
    let condition = |column: &dyn Fn(usize) -> String| -> String {
        let parts: Vec<String> = shape
            .iter()
            .enumerate()
            .map(|(i, (n, null))| {
                let mut alternatives = Vec::new();
                if *n > 0 {
                    alternatives.push(format!("{} IN ({})", column(i), vec!["?"; *n].join(", ")));
                }
                if *null {
                    alternatives.push(format!("{} IS NULL", column(i)));
                }
                format!("({})", alternatives.join(" OR "))
            })
            .collect();
        parts.join(" AND ")
    };
    let delete = format!(
        "DELETE FROM temp.{table} WHERE {}",
        condition(&|i| format!("k{i}"))
    );
    let keys = &analysis.keys;
    let restriction = analysis::expression(&condition(&|i| column_expr(&keys[i]).to_string()))?;
    let mut rerun = analysis.rerun.clone();
    let SetExpr::Select(select) = rerun.body.as_mut() else {
        return Err("the query must be one SELECT".to_owned());
    };
    select.selection = Some(match select.selection.take() {
        Some(existing) => Expr::BinaryOp {
            left: Box::new(Expr::Nested(Box::new(existing))),
            op: BinaryOperator::And,
            right: Box::new(restriction),
        },
        None => restriction,
    });
    Ok((delete, format!("INSERT INTO temp.{table} {rerun}")))
}

/// The bytes a state row takes, about: its values' lengths and a row's overhead.
fn measure(conn: &Connection, table: &str) -> rusqlite::Result<u64> {
    let columns: Vec<String> = conn
        .prepare(&format!("SELECT * FROM temp.{table} LIMIT 0"))?
        .column_names()
        .map(|c| format!("coalesce(length({}), 0)", quote(c)))
        .collect();
    let average: Option<f64> = conn.query_row(
        &format!("SELECT avg({}) FROM temp.{table}", columns.join(" + ")),
        [],
        |row| row.get(0),
    )?;
    Ok(average.unwrap_or(0.0) as u64 + 16)
}

fn sql_error(reason: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
        Some(reason),
    )
}
