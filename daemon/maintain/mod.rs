//! Incrementally maintained families (`maintain = "incremental"`): a value brought up to date
//! from the changes themselves instead of re-running its whole query.
//!
//! Three shapes, analysed from the query when the config is read (anything else is refused with
//! the reason):
//! - **per key** (`book:{id}`): the query is already restricted by the key's placeholders, so the
//!   key's own query is the touched group's query: maintaining it is recomputing that key
//!   (write-through as before); nothing to keep.
//! - **grouped** (`grouped`): `GROUP BY` (a join to display tables, `HAVING`, `ORDER BY`,
//!   `LIMIT`), no placeholder: one row per group kept in a table of the applying connection's
//!   `temp` schema; a change re-runs the query restricted to the groups it touches, and the value
//!   is read from that table in the query's order. SQLite computes every number.
//! - **scalar** (`scalar`): whole-table aggregates, alone or as scalar subqueries side by side:
//!   counts and exact integer sums kept from the row deltas, the final expressions evaluated by
//!   SQLite from them; what cannot be kept exact falls back to re-running that one aggregate.
//!
//! The state lives on the applying (tail) thread and its connection, and is rebuilt with a full
//! run whenever it cannot be trusted: at start, after a flush of a table it reads, a reload that
//! changes the query, a takeover.

pub mod grouped;
pub mod scalar;

use rusqlite::Connection;

use crate::db::Body;
use crate::types::RowChange;

/// What `analyse` found a family's query to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    PerKey,
    Grouped(grouped::Plan),
    Scalar(scalar::Plan),
}

/// Analyses a family's query for `maintain = "incremental"`. `has_params`: the pattern has
/// placeholders. Err: why it cannot be maintained (shown by `check` at the query).
pub fn analyse(query: &str, has_params: bool) -> Result<Shape, String> {
    if has_params {
        return Ok(Shape::PerKey);
    }
    if let Some(plan) = grouped::analyse(query)? {
        return Ok(Shape::Grouped(plan));
    }
    if let Some(plan) = scalar::analyse(query)? {
        return Ok(Shape::Scalar(plan));
    }
    Err("only per-key queries, GROUP BY queries and whole-table aggregates can be maintained incrementally".to_owned())
}

impl Shape {
    /// Its name in status and explain.
    pub fn name(&self) -> &'static str {
        match self {
            Shape::PerKey => "per-key",
            Shape::Grouped(_) => "grouped",
            Shape::Scalar(_) => "scalar",
        }
    }

    /// How values of this shape are kept up to date, for `check`.
    pub fn describe(&self) -> &'static str {
        match self {
            Shape::PerKey => {
                "per key: a change recomputes the keys it touches (the key's query is its group's)"
            }
            Shape::Grouped(_) => {
                "grouped: one row per group kept; a change re-runs only the groups it touches"
            }
            Shape::Scalar(_) => {
                "scalar: counts and sums kept from the row changes; SQLite evaluates the final expressions"
            }
        }
    }

    /// The columns each table's capture must record for this shape: (table, column).
    pub fn columns(&self) -> Vec<(String, String)> {
        match self {
            Shape::PerKey => Vec::new(),
            Shape::Grouped(plan) => plan.columns(),
            Shape::Scalar(plan) => plan.columns(),
        }
    }

    /// What `analyse` cannot see without the database: for grouped families, that every column
    /// read outside aggregates is one value per group (a primary key among the group keys) and
    /// that the state can be typed like the group keys. Err: why it cannot be maintained (for
    /// `check`, beside `analyse`'s reasons). A state built anyway runs its query for each value.
    pub fn check(&self, conn: &Connection) -> Result<(), String> {
        match self {
            Shape::PerKey | Shape::Scalar(_) => Ok(()),
            Shape::Grouped(plan) => plan.check(conn),
        }
    }

    /// The tables the query reads (lower case).
    pub fn tables(&self) -> Vec<String> {
        match self {
            Shape::PerKey => Vec::new(),
            Shape::Grouped(plan) => plan.tables(),
            Shape::Scalar(plan) => plan.tables(),
        }
    }
}

/// A maintained family's state, on the applying connection.
pub enum State {
    Grouped(grouped::State),
    Scalar(scalar::State),
}

/// How much a state holds: rows (groups, aggregates) and an estimate of the bytes they take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size {
    pub rows: u64,
    pub bytes: u64,
}

/// What one `settle` did: changes applied from their row images, and changes for which part of
/// the state was re-run in full instead (a fallback: a change the shape cannot follow, a deleted
/// extreme of `min`/`max`, a non-integer sum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    pub incremental: u64,
    pub recomputed: u64,
}

impl State {
    /// Builds the state with one full run of the query (`None` for per-key families).
    pub fn build(shape: &Shape, conn: &Connection) -> rusqlite::Result<Option<State>> {
        Ok(match shape {
            Shape::PerKey => None,
            Shape::Grouped(plan) => Some(State::Grouped(grouped::State::build(plan, conn)?)),
            Shape::Scalar(plan) => Some(State::Scalar(scalar::State::build(plan, conn)?)),
        })
    }

    /// Takes in one row change of a table the query reads (in outbox order; cheap: what needs
    /// SQL waits for `settle`).
    pub fn apply(&mut self, change: &RowChange) {
        match self {
            State::Grouped(state) => state.apply(change),
            State::Scalar(state) => state.apply(change),
        }
    }

    /// Takes in a row a conflict may have removed (`ChangeBody::Replaced`: removed by `REPLACE`,
    /// kept by `OR IGNORE` or an upsert; the change does not say which).
    pub fn apply_replaced(&mut self, change: &RowChange) {
        match self {
            // Its group is re-run from the database either way.
            State::Grouped(state) => state.apply(change),
            State::Scalar(state) => state.apply_replaced(change),
        }
    }

    /// Brings the state up to date with the changes taken in since the last call (once per
    /// batch, after its changes, before `value`).
    pub fn settle(&mut self, conn: &Connection) -> rusqlite::Result<Settled> {
        match self {
            State::Grouped(state) => state.settle(conn),
            State::Scalar(state) => state.settle(conn),
        }
    }

    /// The value, encoded exactly as running the query would (`db::encode_rows`).
    pub fn value(&mut self, conn: &Connection, many: bool) -> rusqlite::Result<Option<Body>> {
        match self {
            State::Grouped(state) => state.value(conn, many),
            State::Scalar(state) => state.value(conn, many),
        }
    }

    /// Whether part of the state must be read again from the database (a scalar state's table
    /// whose rows a change left unknown). Its deltas could not be trusted after such a read at a
    /// later snapshot than the applied position (the changes in between would be counted twice),
    /// so the owner builds the whole state again instead, at a known outbox head.
    pub fn needs_rebuild(&self) -> bool {
        match self {
            State::Grouped(_) => false,
            State::Scalar(state) => state.needs_rescan(),
        }
    }

    pub fn size(&self) -> Size {
        match self {
            State::Grouped(state) => state.size(),
            State::Scalar(state) => state.size(),
        }
    }

    /// Removes what the state keeps on the connection (its temp tables).
    pub fn discard(self, conn: &Connection) {
        match self {
            State::Grouped(state) => state.discard(conn),
            State::Scalar(state) => state.discard(conn),
        }
    }
}
