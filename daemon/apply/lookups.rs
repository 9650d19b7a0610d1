//! Lookups: the keys a batch's changes reach through other tables (`invalidate = "auto"`, see
//! `config::auto`), found on the applying connection before the plan is applied.
//!
//! One query per derived rule and lookup per batch, with the batch's distinct values bound (in
//! chunks of at most `CHUNK`), in one read transaction that also reads the outbox head. The
//! lookup reads the tables at that head, not at the batch's end: when a change to one of the
//! lookup's tables was committed after the batch (it is in the outbox past the batch's last
//! position), what the lookup found may already follow it, while that change's own rule (which
//! refreshes the chain's old end) is applied only with a later batch; so the family is dropped
//! instead. A lookup that fails (a table or column gone) drops the family too: too much, never
//! too little. So does every lookup of a batch with more than `LOOKAHEAD` rows after it (a
//! backlog is not read through for each batch). Why the keys found are enough:
//! ARCHITECTURE.md, invariant 13.

use std::collections::HashSet;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params_from_iter};

use crate::config::{Config, RuleLookup};
use crate::types::{KeyAction, LookupAsk, Plan};

/// At most this many values are bound to one statement.
const CHUNK: usize = 500;

/// At most this many outbox rows after a batch are looked at for changes to a lookup's tables;
/// past that (a backlog), every lookup of the batch drops its family.
const LOOKAHEAD: usize = 4096;

/// How many lookups a batch asked for, and how many of them dropped their family instead.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Resolved {
    pub asked: u64,
    pub fell_back: u64,
}

/// Runs the lookups `plan` asks for and adds the keys they find to it (at the latest position
/// among their changes, with their rule's strategy), or, for a lookup that cannot be trusted,
/// a flush of its family. `last` is the batch's last position.
pub fn resolve(plan: &mut Plan, config: &Config, conn: &Connection, last: u64) -> Resolved {
    let mut resolved = Resolved::default();
    if plan.lookups.is_empty() {
        return resolved;
    }
    let asks = std::mem::take(&mut plan.lookups);
    let found = match conn
        .unchecked_transaction()
        .and_then(|tx| run_all(&tx, config, &asks, last).map(|found| (tx, found)))
    {
        Ok((tx, found)) => {
            let _ = tx.rollback();
            found
        }
        Err(e) => {
            tracing::warn!(error = %e, "the lookups of derived rules failed: their families are dropped");
            asks.keys().map(|&k| (k, None)).collect()
        }
    };
    for ((index, number), values) in found {
        let (Some(rule), Some(ask)) = (config.rules.get(index), asks.get(&(index, number))) else {
            continue;
        };
        resolved.asked += 1;
        let family = rule.derived_from.clone().unwrap_or_default();
        let Some(values) = values else {
            resolved.fell_back += 1;
            let mark = plan.flush_families.entry(family).or_insert(0);
            *mark = (*mark).max(ask.position);
            continue;
        };
        let Some(lookup) = rule.lookups.get(number) else {
            continue;
        };
        let mut named = 0;
        let mut rendered = String::new();
        for value in &values {
            let param = lookup.lookup.param.as_str();
            let key = lookup
                .key
                .render_into(&mut rendered, |name| (name == param).then_some(value));
            if key.is_none() {
                continue;
            }
            named += 1;
            let action = KeyAction {
                strategy: rule.strategy,
                position: ask.position,
            };
            match plan.keys.get_mut(rendered.as_str()) {
                Some(a) => {
                    a.strategy = a.strategy.max(action.strategy);
                    a.position = a.position.max(action.position);
                }
                None => {
                    plan.keys.insert(rendered.clone(), action);
                }
            }
        }
        let counts = plan.per_rule.entry(index).or_insert((0, 0));
        counts.0 += named;
        if rule.strategy != crate::types::Strategy::Delete {
            counts.1 += named;
        }
    }
    resolved
}

type Found = Vec<((usize, usize), Option<Vec<Value>>)>;

/// Every lookup asked, in one read transaction: the values found, or None where the family
/// must be dropped (a table it reads changed after the batch, or the lookup failed).
fn run_all(
    conn: &Connection,
    config: &Config,
    asks: &std::collections::HashMap<(usize, usize), LookupAsk>,
    last: u64,
) -> rusqlite::Result<Found> {
    let changed = tables_changed_after(conn, last)?;
    let mut found = Vec::new();
    for (&(index, number), ask) in asks {
        let lookup = config
            .rules
            .get(index)
            .and_then(|rule| rule.lookups.get(number));
        let Some(lookup) = lookup else { continue };
        let moved = changed.as_ref().is_none_or(|changed| {
            lookup
                .lookup
                .tables
                .iter()
                .any(|t| changed.iter().any(|c| c.eq_ignore_ascii_case(t)))
        });
        if moved {
            tracing::debug!(
                via = lookup.lookup.via,
                "a table a lookup reads changed after the batch: its family is dropped"
            );
            found.push(((index, number), None));
            continue;
        }
        match run(conn, lookup, &ask.values) {
            Ok(values) => found.push(((index, number), Some(values))),
            Err(e) => {
                tracing::warn!(
                    error = %crate::escape::Escaped(&e.to_string()),
                    via = lookup.lookup.via,
                    "a derived rule's lookup failed: its family is dropped"
                );
                found.push(((index, number), None));
            }
        }
    }
    Ok(found)
}

/// The tables with an outbox row (a change, or a flush marker) after `last`, when there are at
/// most `LOOKAHEAD` such rows; None (every table may have changed) past that: a backlog is
/// not read through for each batch.
fn tables_changed_after(conn: &Connection, last: u64) -> rusqlite::Result<Option<Vec<String>>> {
    let after = i64::try_from(last).unwrap_or(i64::MAX);
    let mut statement = conn.prepare_cached(
        "SELECT capture FROM cachetail_outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let limit = i64::try_from(LOOKAHEAD)
        .unwrap_or(i64::MAX)
        .saturating_add(1);
    let mut captures: Vec<i64> = statement
        .query_map([after, limit], |row| row.get::<_, i64>(0))?
        .collect::<rusqlite::Result<_>>()?;
    if captures.len() > LOOKAHEAD {
        return Ok(None);
    }
    captures.sort_unstable();
    captures.dedup();
    let mut table = conn.prepare_cached("SELECT tbl FROM cachetail_capture WHERE id = ?1")?;
    let mut tables = Vec::new();
    for capture in captures {
        if let Some(name) = table
            .query_row([capture], |row| row.get::<_, String>(0))
            .optional()?
        {
            tables.push(name);
        }
    }
    Ok(Some(tables))
}

/// One lookup over the distinct values asked: the distinct values of the placeholder found.
fn run(conn: &Connection, lookup: &RuleLookup, values: &[Value]) -> rusqlite::Result<Vec<Value>> {
    let mut seen: HashSet<String> = HashSet::new();
    let distinct: Vec<&Value> = values.iter().filter(|v| seen.insert(identity(v))).collect();
    let mut found: Vec<Value> = Vec::new();
    let mut kept: HashSet<String> = HashSet::new();
    for chunk in distinct.chunks(CHUNK) {
        let marks = vec!["?"; chunk.len()].join(", ");
        let sql = format!("{}{marks})", lookup.lookup.sql);
        let mut statement = conn.prepare_cached(&sql)?;
        let mut rows = statement.query(params_from_iter(chunk.iter().copied()))?;
        while let Some(row) = rows.next()? {
            let value: Value = row.get(1)?;
            if value != Value::Null && kept.insert(identity(&value)) {
                found.push(value);
            }
        }
    }
    Ok(found)
}

/// A value's type and bytes, as a string: to tell distinct values apart.
fn identity(value: &Value) -> String {
    match value {
        Value::Null => "n".to_owned(),
        Value::Integer(i) => format!("i{i}"),
        Value::Real(r) => format!("r{}", r.to_bits()),
        Value::Text(t) => format!("t{t}"),
        Value::Blob(b) => format!("b{b:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::types::{Change, ChangeBody, Layout, Op, RowChange};

    fn config() -> Config {
        Config::parse(
            r#"database = "x.db"
invalidate = "auto"
[keys."author:{id}"]
query = "SELECT a.id, count(r.id) FROM authors a LEFT JOIN books b ON b.author_id = a.id LEFT JOIN reviews r ON r.book_id = b.id WHERE a.id = :id GROUP BY a.id"
"#,
            "test.toml",
            Path::new("."),
        )
        .expect("valid")
    }

    fn database() -> Connection {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(include_str!("../../schema.sql"))
            .expect("outbox");
        conn.execute_batch(
            "CREATE TABLE authors (id INTEGER PRIMARY KEY);
             CREATE TABLE books (id INTEGER PRIMARY KEY, author_id INTEGER);
             CREATE TABLE reviews (id INTEGER PRIMARY KEY, book_id INTEGER);
             INSERT INTO books VALUES (10, 1), (20, 2);
             INSERT INTO cachetail_capture (id, tbl, columns) VALUES (1, 'books', '[\"author_id\",\"id\"]');
             INSERT INTO cachetail_outbox (id, capture, op) VALUES (3, 2, 1);",
        )
        .expect("schema");
        conn
    }

    /// A review of `book` inserted at position 3.
    fn review(book: i64) -> Change {
        Change {
            position: 3,
            written_ms: None,
            body: ChangeBody::Row(RowChange {
                layout: Arc::new(Layout {
                    table: "reviews".into(),
                    columns: vec!["book_id".into()],
                }),
                op: Op::Insert,
                old: None,
                new: Some(vec![Value::Integer(book)]),
            }),
        }
    }

    #[test]
    fn a_review_reaches_its_books_author() {
        let (config, conn) = (config(), database());
        let mut plan = crate::rules::plan(&config, &[review(20)]);
        assert_eq!(plan.lookups.len(), 1);
        let resolved = resolve(&mut plan, &config, &conn, 3);
        assert_eq!((resolved.asked, resolved.fell_back), (1, 0));
        let keys: Vec<&String> = plan.keys.keys().collect();
        assert_eq!(keys, ["author:2"]);
        assert_eq!(plan.keys["author:2"].position, 3);
        assert!(plan.flush_families.is_empty());
    }

    #[test]
    fn a_change_to_the_chain_after_the_batch_drops_the_family() {
        let (config, conn) = (config(), database());
        // Book 20 moved to author 1 after the batch (position 4, not applied yet): the lookup
        // would find author 1 only, and author 2's value held the review until the move.
        conn.execute_batch(
            "UPDATE books SET author_id = 1 WHERE id = 20;
             INSERT INTO cachetail_outbox (id, capture, op) VALUES (4, 1, 2);",
        )
        .expect("move");
        let mut plan = crate::rules::plan(&config, &[review(20)]);
        let resolved = resolve(&mut plan, &config, &conn, 3);
        assert_eq!((resolved.asked, resolved.fell_back), (1, 1));
        assert!(plan.keys.is_empty());
        assert_eq!(plan.flush_families["author:{id}"], 3);
    }

    #[test]
    fn a_lookup_that_fails_drops_the_family() {
        let (config, conn) = (config(), database());
        conn.execute_batch("DROP TABLE books").expect("drop");
        let mut plan = crate::rules::plan(&config, &[review(20)]);
        resolve(&mut plan, &config, &conn, 3);
        assert!(plan.keys.is_empty());
        assert_eq!(plan.flush_families["author:{id}"], 3);
    }
}
