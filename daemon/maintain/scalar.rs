//! Whole-table aggregates, maintained from the row changes (`catalog-stats`): `count(*)`,
//! `count(col)`, `sum`, `total`, `avg`, `min`, `max` of a plain column, in expressions, in one
//! `SELECT ... FROM <table>` or side by side as scalar subqueries of a FROM-less SELECT.
//!
//! What is kept is what the row deltas give exactly: per table its row count; per column its
//! non-NULL count, the exact sum of its integers (positive and negative parts apart, so that an
//! overflow of SQLite's running sum can be ruled out whatever the scan order) and the number of
//! non-NULL values that are not integers; per `min`/`max` the current extreme. From these the
//! state derives each aggregate's value as SQLite's `sumStep`/`avgFinalize`/`totalFinalize`/
//! `countStep` would (an integer sum, `(double)sum / (double)count`, NULL on no input, ...), binds
//! them as parameters of the rewritten query (`SELECT (SELECT round(?4, 3)) AS avg_rating`) and
//! lets SQLite evaluate the expressions around them. Where the state cannot be exact it re-runs
//! that one aggregate (`SELECT avg(rating) FROM reviews`), counted as recomputed: a sum over
//! values that are not all integers, a sum whose running total may overflow, a `min`/`max` whose
//! extreme was deleted or updated away, or met by an equal value of another type (which of them
//! SQLite returns depends on its scan order), or compared under a collation other than BINARY.

mod analyse;
mod column;
mod order;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::mem::size_of;

use rusqlite::types::Value;
use rusqlite::{Connection, ffi};

use super::{Settled, Size};
use crate::db::{Body, encode_rows, quote_identifier};
use crate::types::{Op, RowChange};
use column::{ColumnState, empty_columns, integer_finalize, require_table};

/// Each change's set of touched aggregates is a bit mask.
const MAX_AGGREGATES: usize = 64;

/// A whole-table aggregate query, read into the tables and aggregates it needs and its result
/// columns rewritten over parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The family's query (prepared at build for its result column names).
    query: String,
    tables: Vec<TablePlan>,
    /// The SELECTs that read a table (the query, or each scalar subquery).
    scopes: Vec<ScopePlan>,
    /// Aggregate `i` is bound as parameter `?{i + 1}`.
    aggregates: Vec<Aggregate>,
    /// The result columns, rewritten (`round(?4, 3)`, `(SELECT count(*) ...)` → `(SELECT ?1)`).
    items: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct TablePlan {
    /// As the query writes it.
    name: String,
    lower: String,
    /// The columns aggregates read, as the query writes them.
    columns: Vec<String>,
}

/// One SELECT reading a table: re-run as written (its FROM, its aggregate calls), so that SQLite
/// scans the table in the same order as in the query (the order decides a sum of reals to the
/// last bit, whether an integer sum overflows, and which of equal values `min`/`max` returns).
#[derive(Debug, Clone, PartialEq)]
struct ScopePlan {
    /// The FROM clause as written (`reviews AS r`).
    from: String,
    aggregates: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
struct Aggregate {
    func: Func,
    table: usize,
    /// Index into the table's columns (None: `count(*)`).
    column: Option<usize>,
    scope: usize,
    /// The call as the query writes it (`avg(r.rating)`).
    call: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    CountRows,
    Count,
    Sum,
    Total,
    Avg,
    Min,
    Max,
}

/// Ok(None): the query is not of this shape. Err: it is, but cannot be maintained (why).
pub fn analyse(query: &str) -> Result<Option<Plan>, String> {
    analyse::analyse(query)
}

impl Plan {
    /// (table in lower case, column as the query writes it).
    pub fn columns(&self) -> Vec<(String, String)> {
        self.tables
            .iter()
            .flat_map(|t| t.columns.iter().map(|c| (t.lower.clone(), c.clone())))
            .collect()
    }

    pub fn tables(&self) -> Vec<String> {
        self.tables.iter().map(|t| t.lower.clone()).collect()
    }

    /// The query that re-runs one SELECT's aggregates.
    fn rerun_sql(&self, scope: usize) -> String {
        let scope = &self.scopes[scope];
        let calls: Vec<&str> = scope
            .aggregates
            .iter()
            .map(|&a| self.aggregates[a].call.as_str())
            .collect();
        format!("SELECT {} FROM {}", calls.join(", "), scope.from)
    }
}

/// An error SQLite raised running an aggregate (`integer overflow` of `sum`): the query fails
/// the same way, so the value does too.
#[derive(Debug, Clone)]
struct Failure {
    error: ffi::Error,
    message: Option<String>,
}

/// Per aggregate: the extreme of a `min`/`max`, and the last re-run's outcome.
#[derive(Debug, Clone)]
struct Slot {
    /// `min`/`max`: the current extreme (NULL: no non-NULL value), when `trusted`.
    extreme: Value,
    trusted: bool,
    /// The aggregate's value from its last re-run (used while the state is not exact).
    rerun: Option<Result<Value, Failure>>,
    /// Its inputs changed since that re-run.
    stale: bool,
}

pub struct State {
    /// Boxed: the state stays small beside the other shapes' in `maintain::State`.
    plan: Box<Plan>,
    /// The rewritten query, its result columns named as the query's.
    sql: String,
    /// Rows per table.
    rows: Vec<i64>,
    /// Per table, per column of `TablePlan::columns`.
    columns: Vec<Vec<ColumnState>>,
    slots: Vec<Slot>,
    /// Per table and column: the aggregates that read it.
    readers: Vec<Vec<Vec<usize>>>,
    /// Changes taken in since the last settle, by the set of aggregates each touched.
    pending: BTreeMap<u64, u64>,
    /// Per table: a change left its rows unknown (a row a conflict may have removed): scanned
    /// again at the next settle.
    rescan: Vec<bool>,
}

impl State {
    pub fn build(plan: &Plan, conn: &Connection) -> rusqlite::Result<State> {
        let sql = rewritten_query(plan, conn)?;
        let mut readers: Vec<Vec<Vec<usize>>> = plan
            .tables
            .iter()
            .map(|t| vec![Vec::new(); t.columns.len()])
            .collect();
        for (index, aggregate) in plan.aggregates.iter().enumerate() {
            if let Some(column) = aggregate.column {
                readers[aggregate.table][column].push(index);
            }
        }
        let slot = Slot {
            extreme: Value::Null,
            trusted: false,
            rerun: None,
            stale: true,
        };
        let mut state = State {
            plan: Box::new(plan.clone()),
            sql,
            rows: vec![0; plan.tables.len()],
            columns: plan
                .tables
                .iter()
                .map(|t| {
                    let lost = ColumnState {
                        lost: true,
                        ..ColumnState::default()
                    };
                    vec![lost; t.columns.len()]
                })
                .collect(),
            slots: vec![slot; plan.aggregates.len()],
            readers,
            pending: BTreeMap::new(),
            rescan: vec![false; plan.tables.len()],
        };
        in_one_read(conn, |conn| {
            for table in 0..state.plan.tables.len() {
                state.scan(conn, table)?;
            }
            state.rerun_needed(conn)?;
            Ok(())
        })?;
        // The rewritten query must prepare now, not at the first value.
        conn.prepare_cached(&state.sql)?;
        Ok(state)
    }

    pub fn apply(&mut self, change: &RowChange) {
        let Some(table) = self.table_of(change) else {
            return;
        };
        let mut touched = 0u64;
        let sign = match change.op {
            Op::Insert => 1,
            Op::Delete => -1,
            Op::Update => 0,
        };
        if sign != 0 {
            self.rows[table] += sign;
            touched |= self.mask(|a| a.table == table && a.func == Func::CountRows);
        }
        for column in 0..self.plan.tables[table].columns.len() {
            touched |= self.apply_column(change, table, column);
        }
        *self.pending.entry(touched).or_default() += 1;
    }

    /// A table's rows are unknown (a row a conflict may have removed, a column the capture did
    /// not record): `settle` would scan it again.
    pub fn needs_rescan(&self) -> bool {
        self.rescan.contains(&true) || self.columns.iter().flatten().any(|c| c.lost)
    }

    /// A row a conflict may have removed (`REPLACE` removed it, `OR IGNORE` or an upsert kept
    /// it): the table's rows are scanned again at the next settle.
    pub fn apply_replaced(&mut self, change: &RowChange) {
        let Some(table) = self.table_of(change) else {
            return;
        };
        self.rescan[table] = true;
        *self
            .pending
            .entry(self.mask(|a| a.table == table))
            .or_default() += 1;
    }

    /// The index of the changed row's table among those the query reads.
    fn table_of(&self, change: &RowChange) -> Option<usize> {
        let table = &change.layout.table;
        self.plan
            .tables
            .iter()
            .position(|t| t.lower.eq_ignore_ascii_case(table))
    }

    pub fn settle(&mut self, conn: &Connection) -> rusqlite::Result<Settled> {
        let needs_sql = self.columns.iter().flatten().any(|c| c.lost)
            || self.rescan.contains(&true)
            || (0..self.slots.len()).any(|i| self.needs_rerun(i));
        let rerun = if needs_sql {
            in_one_read(conn, |conn| {
                let mut rescanned = 0u64;
                for table in 0..self.plan.tables.len() {
                    if self.rescan[table] || self.columns[table].iter().any(|c| c.lost) {
                        self.rescan[table] = false;
                        self.scan(conn, table)?;
                        rescanned |= self.mask(|a| a.table == table);
                    }
                }
                Ok(rescanned | self.rerun_needed(conn)?)
            })?
        } else {
            0
        };
        let mut settled = Settled::default();
        for (touched, changes) in std::mem::take(&mut self.pending) {
            if touched & rerun != 0 {
                settled.recomputed += changes;
            } else {
                settled.incremental += changes;
            }
        }
        Ok(settled)
    }

    pub fn value(&mut self, conn: &Connection, many: bool) -> rusqlite::Result<Option<Body>> {
        let mut stmt = conn.prepare_cached(&self.sql)?;
        for index in 0..self.plan.aggregates.len() {
            let value = self.aggregate_value(index)?;
            stmt.raw_bind_parameter(index + 1, value)?;
        }
        encode_rows(&mut stmt, many)
    }

    pub fn size(&self) -> Size {
        let values: usize = self
            .slots
            .iter()
            .map(|s| {
                let rerun = match &s.rerun {
                    Some(Ok(value)) => value_bytes(value),
                    _ => 0,
                };
                value_bytes(&s.extreme) + rerun
            })
            .sum();
        let columns: usize = self.columns.iter().map(Vec::len).sum();
        let bytes = size_of::<State>()
            + self.sql.len()
            + self.plan.query.len()
            + self.plan.items.iter().map(String::len).sum::<usize>()
            + self.slots.len() * (size_of::<Slot>() + size_of::<Aggregate>())
            + columns * size_of::<ColumnState>()
            + values;
        Size {
            rows: self.plan.aggregates.len() as u64,
            bytes: bytes as u64,
        }
    }

    /// Nothing is kept on the connection but the cached statement, which goes with it.
    pub fn discard(self, _conn: &Connection) {}

    /// The aggregates (as a bit mask) that `select` picks.
    fn mask(&self, select: impl Fn(&Aggregate) -> bool) -> u64 {
        self.mask_of(|state, index| select(&state.plan.aggregates[index]))
    }

    fn mask_of(&self, select: impl Fn(&State, usize) -> bool) -> u64 {
        (0..self.plan.aggregates.len())
            .filter(|&index| select(self, index))
            .fold(0, |mask, index| mask | 1 << index)
    }

    /// Takes one column's old and new values out of a change; returns the aggregates it touched.
    fn apply_column(&mut self, change: &RowChange, table: usize, column: usize) -> u64 {
        let name = &self.plan.tables[table].columns[column];
        let position = change
            .layout
            .columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name));
        let image = |row: &Option<Vec<Value>>| -> Option<Value> {
            row.as_ref().and_then(|row| row.get(position?)).cloned()
        };
        let old = matches!(change.op, Op::Update | Op::Delete).then(|| image(&change.old));
        let new = matches!(change.op, Op::Update | Op::Insert).then(|| image(&change.new));
        let readers = &self.readers[table][column];
        let touched = readers.iter().fold(0u64, |mask, i| mask | 1 << i);
        if matches!(old, Some(None)) || matches!(new, Some(None)) {
            // The capture did not record the column: rescan it at the next settle.
            self.columns[table][column].lost = true;
            return touched;
        }
        let (old, new) = (old.flatten(), new.flatten());
        if let (Some(old), Some(new)) = (&old, &new)
            && order::identical(old, new)
        {
            self.same_value(old, table, column);
            return touched;
        }
        if let Some(old) = &old {
            self.columns[table][column].add(old.into(), -1);
        }
        if let Some(new) = &new {
            self.columns[table][column].add(new.into(), 1);
        }
        for reader in 0..self.readers[table][column].len() {
            let index = self.readers[table][column][reader];
            if let Some(old) = &old {
                self.remove_extreme(index, old, table, column);
            }
            if let Some(new) = &new {
                self.add_extreme(index, new, table, column);
            }
            self.slots[index].stale = true;
        }
        touched
    }

    /// An update that kept the column's value: the row may still have moved (a new rowid), which
    /// changes SQLite's scan order: a sum of reals may round differently (re-run while inexact),
    /// and among equal values of different types `min`/`max` may return another.
    fn same_value(&mut self, value: &Value, table: usize, column: usize) {
        let ties = self.columns[table][column].integral_reals > 0;
        for reader in 0..self.readers[table][column].len() {
            let index = self.readers[table][column][reader];
            self.slots[index].stale = true;
            if ties {
                self.remove_extreme(index, value, table, column);
            }
        }
    }

    /// A `min`/`max` after `value` left the column: unchanged if it was beyond the extreme,
    /// else no longer known.
    fn remove_extreme(&mut self, index: usize, value: &Value, table: usize, column: usize) {
        let Some(keep) = self.keeps(index) else {
            return;
        };
        let binary_text = self.columns[table][column].binary_text;
        let slot = &mut self.slots[index];
        if !slot.trusted || matches!(value, Value::Null) {
            return;
        }
        // A value beyond the extreme (greater than a min) was not it; anything else may have been.
        let beyond = !matches!(slot.extreme, Value::Null)
            && order::compare(value, &slot.extreme, binary_text) == Some(keep.reverse());
        if !beyond {
            slot.trusted = false;
        }
    }

    /// A `min`/`max` after `value` entered the column: the new extreme if it is beyond the
    /// current one; unknown if it ties it with another representation or cannot be compared.
    fn add_extreme(&mut self, index: usize, value: &Value, table: usize, column: usize) {
        let Some(keep) = self.keeps(index) else {
            return;
        };
        let binary_text = self.columns[table][column].binary_text;
        let slot = &mut self.slots[index];
        if !slot.trusted || matches!(value, Value::Null) {
            return;
        }
        if matches!(slot.extreme, Value::Null) {
            slot.extreme = value.clone();
            return;
        }
        match order::compare(value, &slot.extreme, binary_text) {
            Some(o) if o == keep => slot.extreme = value.clone(),
            Some(o) if o == keep.reverse() => {}
            Some(_) if order::identical(value, &slot.extreme) => {}
            _ => slot.trusted = false,
        }
    }

    /// For a `min`, `Less` (a smaller value becomes the extreme); for a `max`, `Greater`.
    fn keeps(&self, index: usize) -> Option<std::cmp::Ordering> {
        match self.plan.aggregates[index].func {
            Func::Min => Some(std::cmp::Ordering::Less),
            Func::Max => Some(std::cmp::Ordering::Greater),
            _ => None,
        }
    }

    /// The aggregate cannot be told from the state until it is re-run.
    fn needs_rerun(&self, index: usize) -> bool {
        let aggregate = &self.plan.aggregates[index];
        let slot = &self.slots[index];
        match aggregate.func {
            Func::CountRows | Func::Count => false,
            Func::Min | Func::Max => !slot.trusted,
            Func::Sum | Func::Total | Func::Avg => {
                let column = aggregate.column.map(|c| &self.columns[aggregate.table][c]);
                column.is_some_and(|c| c.exact_sum().is_none())
                    && (slot.stale || slot.rerun.is_none())
            }
        }
    }

    /// Re-runs the SELECTs of the aggregates the state cannot tell; returns which aggregates
    /// needed it (a bit mask).
    fn rerun_needed(&mut self, conn: &Connection) -> rusqlite::Result<u64> {
        let needed = self.mask_of(|state, index| state.needs_rerun(index));
        for scope in 0..self.plan.scopes.len() {
            let aggregates = &self.plan.scopes[scope].aggregates;
            if aggregates.iter().any(|&a| needed & 1 << a != 0) {
                self.rerun_scope(conn, scope)?;
            }
        }
        Ok(needed)
    }

    fn rerun_scope(&mut self, conn: &Connection, scope: usize) -> rusqlite::Result<()> {
        let sql = self.plan.rerun_sql(scope);
        let mut stmt = conn.prepare_cached(&sql)?;
        let count = self.plan.scopes[scope].aggregates.len();
        let outcome = stmt.query_row([], |row| {
            (0..count)
                .map(|i| row.get::<_, Value>(i))
                .collect::<rusqlite::Result<Vec<Value>>>()
        });
        let values = match outcome {
            Ok(values) => Ok(values),
            // The aggregate's own error (`integer overflow`): the query fails the same way. A
            // busy database, an interrupt, an I/O error are the settle's, tried again next time.
            Err(rusqlite::Error::SqliteFailure(error, message))
                if error.code == rusqlite::ErrorCode::Unknown =>
            {
                Err(Failure { error, message })
            }
            Err(other) => return Err(other),
        };
        for (position, &index) in self.plan.scopes[scope].aggregates.iter().enumerate() {
            let outcome = match &values {
                Ok(values) => Ok(values[position].clone()),
                Err(failure) => Err(failure.clone()),
            };
            let is_extreme = self.keeps(index).is_some();
            let slot = &mut self.slots[index];
            if let (true, Ok(value)) = (is_extreme, &outcome) {
                slot.extreme = value.clone();
                slot.trusted = true;
            }
            slot.rerun = Some(outcome);
            slot.stale = false;
        }
        Ok(())
    }

    /// Reads a table's row count and its columns' states in full.
    fn scan(&mut self, conn: &Connection, table: usize) -> rusqlite::Result<()> {
        let plan = &self.plan.tables[table];
        require_table(conn, &plan.name)?;
        let quoted = quote_identifier(&plan.name);
        if plan.columns.is_empty() {
            self.rows[table] = conn
                .prepare_cached(&format!("SELECT count(*) FROM {quoted}"))?
                .query_row([], |row| row.get(0))?;
            return Ok(());
        }
        let mut columns = empty_columns(conn, plan)?;
        let list: Vec<String> = plan.columns.iter().map(|c| quote_identifier(c)).collect();
        let sql = format!("SELECT {} FROM {quoted}", list.join(", "));
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.raw_query();
        let mut count = 0i64;
        while let Some(row) = rows.next()? {
            count += 1;
            for (index, column) in columns.iter_mut().enumerate() {
                column.add(row.get_ref(index)?, 1);
            }
        }
        self.rows[table] = count;
        self.columns[table] = columns;
        for (index, aggregate) in self.plan.aggregates.iter().enumerate() {
            if aggregate.table == table && aggregate.column.is_some() {
                self.slots[index].trusted = false;
                self.slots[index].stale = true;
            }
        }
        Ok(())
    }

    /// What aggregate `index` evaluates to now (after `settle`).
    fn aggregate_value(&self, index: usize) -> rusqlite::Result<Value> {
        let aggregate = &self.plan.aggregates[index];
        let slot = &self.slots[index];
        let column = aggregate.column.map(|c| &self.columns[aggregate.table][c]);
        let exact = match (aggregate.func, column) {
            (Func::CountRows, _) => Some(Value::Integer(self.rows[aggregate.table])),
            (Func::Count, Some(c)) if !c.lost => Some(Value::Integer(c.non_null)),
            (Func::Sum | Func::Total | Func::Avg, Some(c)) => c
                .exact_sum()
                .map(|sum| integer_finalize(aggregate.func, sum, c.non_null)),
            (Func::Min | Func::Max, _) if slot.trusted => Some(slot.extreme.clone()),
            _ => None,
        };
        if let Some(value) = exact {
            return Ok(value);
        }
        match &slot.rerun {
            Some(Ok(value)) => Ok(value.clone()),
            Some(Err(failure)) => Err(rusqlite::Error::SqliteFailure(
                failure.error,
                failure.message.clone(),
            )),
            None => Err(rusqlite::Error::InvalidQuery),
        }
    }
}

fn value_bytes(value: &Value) -> usize {
    match value {
        Value::Text(text) => text.len(),
        Value::Blob(blob) => blob.len(),
        _ => 0,
    }
}

/// `SELECT <rewritten result columns>`, each named as the query names its column.
fn rewritten_query(plan: &Plan, conn: &Connection) -> rusqlite::Result<String> {
    let stmt = conn.prepare(&plan.query)?;
    let names = stmt.column_names();
    if names.len() != plan.items.len() {
        return Err(rusqlite::Error::InvalidQuery);
    }
    let items: Vec<String> = plan
        .items
        .iter()
        .zip(names)
        .map(|(item, name)| format!("{item} AS {}", quote_identifier(name)))
        .collect();
    Ok(format!("SELECT {}", items.join(", ")))
}

/// Runs `f` in one read of the database (a savepoint: a transaction of its own outside one),
/// so that the scans and re-runs see the same state.
fn in_one_read<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.execute_batch("SAVEPOINT cachetail_scalar")?;
    let result = f(conn);
    let release = conn.execute_batch("RELEASE cachetail_scalar");
    let value = result?;
    release?;
    Ok(value)
}
