//! The states of the families kept up to date incrementally (`maintain = "incremental"`), on
//! the applying thread and its connection: fed every change of a batch to the tables each reads,
//! settled once per batch, read when a key of the family is written through.
//!
//! A state is trusted only from the position it was built at: it is built by a full run in one
//! read transaction with the outbox head, and then takes in only the changes after that head
//! (the ones before are in what the full run read). Anything that may hide a change from it — a
//! flush of a table it reads (capture reinstalled, resumed, an undecodable row), an outbox
//! rebuilt by hand, an operator's flush — drops it, and the next value builds it again.

use std::collections::HashMap;

use rusqlite::Connection;

use crate::db::{Body, read_head};
use crate::escape::Escaped;
use crate::maintain::{Shape, State};
use crate::registry::{FamilyState, Live};
use crate::types::{AdminAction, Change, ChangeBody};

/// One maintained family's state (None until a value is first needed, or after it was dropped).
struct Kept {
    state: Option<State>,
    /// The outbox head its full run read at: changes at or before it are in the state already.
    built_at: u64,
    /// Changes taken in since the last settle.
    pending: bool,
}

/// The maintained families' states, by family group (pattern and definition: a reload that
/// changes the query starts a new state).
#[derive(Default)]
pub struct Maintainer {
    kept: HashMap<String, Kept>,
}

impl Maintainer {
    /// Takes in a batch's changes: row changes of the tables each maintained family reads, and
    /// what drops states. States of families no longer configured are discarded.
    pub fn observe(&mut self, live: &Live, conn: &Connection, changes: &[Change]) {
        self.retire(live, conn);
        for family in maintained(live) {
            let kept = self.kept.entry(family.def.group.clone()).or_insert(Kept {
                state: None,
                built_at: 0,
                pending: false,
            });
            if kept.state.is_some() {
                take_in(kept, family, conn, changes);
            }
        }
    }

    /// The value of a maintained family's key, from its state (built with a full run first if
    /// it has none), in the read transaction `conn` is in.
    pub fn value(
        &mut self,
        conn: &Connection,
        family: &FamilyState,
    ) -> rusqlite::Result<Option<Body>> {
        let Some(shape) = family.def.maintain.as_deref() else {
            return Err(rusqlite::Error::InvalidQuery);
        };
        let kept = self.kept.entry(family.def.group.clone()).or_insert(Kept {
            state: None,
            built_at: 0,
            pending: false,
        });
        let outcome =
            settled(kept, family, shape, conn).and_then(|state| state.value(conn, family.def.many));
        if outcome.is_err() {
            // Never keep a state that failed half-way: the next value builds it again.
            if let Some(state) = kept.state.take() {
                state.discard(conn);
            }
        }
        outcome
    }

    /// Settles the states that took in changes no value asked for this batch (keeps what they
    /// hold pending bounded).
    pub fn settle_rest(&mut self, live: &Live, conn: &Connection) {
        for family in maintained(live) {
            let Some(kept) = self.kept.get_mut(&family.def.group) else {
                continue;
            };
            if !kept.pending {
                continue;
            }
            if kept.state.as_ref().is_some_and(State::needs_rebuild) {
                // Built again at a known head when next needed (see `settled`).
                if let Some(state) = kept.state.take() {
                    state.discard(conn);
                }
            }
            if let Some(state) = kept.state.as_mut() {
                match state.settle(conn) {
                    Ok(settled) => family.counters.note_settled(settled, state.size()),
                    Err(e) => {
                        tracing::warn!(family = %family.def.pattern, error = %Escaped(&e), "keeping a maintained value up to date failed; its state is built again when next needed");
                        if let Some(state) = kept.state.take() {
                            state.discard(conn);
                        }
                    }
                }
            }
            kept.pending = false;
        }
    }

    /// Discards the states of families no longer in the config (or changed by a reload).
    fn retire(&mut self, live: &Live, conn: &Connection) {
        let current: Vec<&str> = maintained(live).map(|f| f.def.group.as_str()).collect();
        let gone: Vec<String> = self
            .kept
            .keys()
            .filter(|group| !current.contains(&group.as_str()))
            .cloned()
            .collect();
        for group in gone {
            if let Some(state) = self.kept.remove(&group).and_then(|k| k.state) {
                state.discard(conn);
            }
        }
    }
}

/// Whether the family's values come from a state (per-key families keep none: their own query
/// is the touched group's, so they are recomputed).
pub fn keeps_state(family: &FamilyState) -> bool {
    family
        .def
        .maintain
        .as_deref()
        .is_some_and(|shape| *shape != Shape::PerKey)
}

fn maintained(live: &Live) -> impl Iterator<Item = &std::sync::Arc<FamilyState>> {
    live.families.iter().filter(|f| keeps_state(f))
}

/// Feeds one family's state the batch's changes after its build position; drops it on anything
/// that may hide a change from it.
fn take_in(kept: &mut Kept, family: &FamilyState, conn: &Connection, changes: &[Change]) {
    let Some(shape) = family.def.maintain.as_deref() else {
        return;
    };
    let tables = shape.tables();
    let reads = |table: &str| tables.iter().any(|t| t.eq_ignore_ascii_case(table));
    for change in changes.iter().filter(|c| c.position > kept.built_at) {
        let drop = match &change.body {
            ChangeBody::Row(row) if reads(&row.layout.table) => {
                if let Some(state) = kept.state.as_mut() {
                    state.apply(row);
                    kept.pending = true;
                }
                false
            }
            ChangeBody::Replaced(row) if reads(&row.layout.table) => {
                if let Some(state) = kept.state.as_mut() {
                    state.apply_replaced(row);
                    kept.pending = true;
                }
                false
            }
            ChangeBody::Row(_) | ChangeBody::Replaced(_) | ChangeBody::Marker => false,
            ChangeBody::Flush { table } => reads(table),
            ChangeBody::Unreadable(unreadable) => unreadable.table.as_deref().is_none_or(reads),
            ChangeBody::Reset => true,
            ChangeBody::Admin(AdminAction::All) => true,
            ChangeBody::Admin(AdminAction::Family(pattern)) => {
                *pattern == family.def.pattern.source()
            }
            ChangeBody::Admin(_) => false,
        };
        if drop {
            if let Some(state) = kept.state.take() {
                state.discard(conn);
            }
            kept.pending = false;
            return;
        }
    }
}

/// The family's state, settled: built with a full run when there is none (in the caller's read
/// transaction, with the outbox head it read at).
fn settled<'k>(
    kept: &'k mut Kept,
    family: &FamilyState,
    shape: &Shape,
    conn: &Connection,
) -> rusqlite::Result<&'k mut State> {
    if kept.state.as_ref().is_some_and(State::needs_rebuild) {
        // Read again at a known head rather than rescanned at a snapshot past the applied
        // position (the changes in between would then be taken in twice).
        if let Some(state) = kept.state.take() {
            state.discard(conn);
        }
    }
    if kept.state.is_none() {
        let head = read_head(conn)?;
        let Some(state) = State::build(shape, conn)? else {
            return Err(rusqlite::Error::InvalidQuery);
        };
        kept.built_at = head;
        kept.pending = false;
        family.counters.note_built(state.size());
        kept.state = Some(state);
    }
    let state = kept.state.as_mut().ok_or(rusqlite::Error::InvalidQuery)?;
    if kept.pending {
        let settled = state.settle(conn)?;
        family.counters.note_settled(settled, state.size());
        kept.pending = false;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use rusqlite::Connection;
    use rusqlite::types::Value;

    use super::Maintainer;
    use crate::config::{Config, Reads};
    use crate::registry::Registry;
    use crate::types::{Change, ChangeBody, Layout, Op, RowChange};

    fn change(layout: &Arc<Layout>, position: u64, op: Op, replaced: bool) -> Change {
        let row = RowChange {
            layout: Arc::clone(layout),
            op,
            old: (op != Op::Insert).then(|| vec![Value::Integer(1)]),
            new: (op == Op::Insert).then(|| vec![Value::Integer(1)]),
        };
        let body = if replaced {
            ChangeBody::Replaced(row)
        } else {
            ChangeBody::Row(row)
        };
        Change {
            position,
            written_ms: None,
            body,
        }
    }

    /// A scalar state whose table's rows a change left unknown (a row a conflict may have
    /// removed) must not be rescanned at a snapshot past the applied position: the changes
    /// committed in between would be counted again when their batch comes.
    #[test]
    fn a_state_read_again_mid_backlog_never_counts_the_changes_after_it_twice() {
        let conn = Connection::open_in_memory().expect("db");
        conn.execute_batch(
            "CREATE TABLE cachetail_outbox (id INTEGER PRIMARY KEY, capture, op, old, new, at);
             CREATE TABLE cachetail_meta (key TEXT PRIMARY KEY, value TEXT);
             CREATE TABLE reviews (id INTEGER PRIMARY KEY, book_id INTEGER);
             INSERT INTO reviews (book_id) VALUES (1), (1), (1);",
        )
        .expect("schema");
        let text = "database = \"x.db\"\n[keys.\"stats\"]\nquery = \"SELECT count(*) AS reviews FROM reviews\"\nmaintain = \"incremental\"\n[[rules]]\ntable = \"reviews\"\nkeys = [\"stats\"]\nstrategy = \"write-through\"\n";
        let config = Config::parse(text, "t.toml", Path::new("/tmp")).expect("config");
        let registry = Registry::new(config, Reads::default());
        let live = registry.live();
        let family = Arc::clone(&live.families[0]);
        let layout = Arc::new(Layout {
            table: Arc::from("reviews"),
            columns: vec![Arc::from("book_id")],
        });
        let mut maintainer = Maintainer::default();
        let value = |m: &mut Maintainer| {
            let body = m.value(&conn, &family).expect("value").expect("a row");
            String::from_utf8(body.into_vec()).expect("utf-8")
        };
        assert_eq!(value(&mut maintainer), "{\"reviews\":3}");
        // Position 1: an INSERT OR IGNORE that kept the row (recorded as a row a conflict may
        // have removed). Positions 2 and 3: two inserts, committed before the tail reads
        // position 1's batch (a backlog), applied in the next batch.
        conn.execute_batch(
            "INSERT INTO cachetail_outbox (id, op) VALUES (1, 6), (2, 1), (3, 1);
             INSERT INTO reviews (book_id) VALUES (1), (1);",
        )
        .expect("writes");
        maintainer.observe(&live, &conn, &[change(&layout, 1, Op::Delete, true)]);
        assert_eq!(value(&mut maintainer), "{\"reviews\":5}");
        let next = [
            change(&layout, 2, Op::Insert, false),
            change(&layout, 3, Op::Insert, false),
        ];
        maintainer.observe(&live, &conn, &next);
        assert_eq!(
            value(&mut maintainer),
            "{\"reviews\":5}",
            "the inserts at positions 2 and 3 were in what the state read at position 1"
        );
    }
}
