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
//! backlog is not read through for each batch), and a lookup whose query runs past `BOUND`
//! (interrupted by the connection's progress handler, `db::Deadline`). Why the keys found are enough:
//! ARCHITECTURE.md, invariant 13.

use std::collections::HashSet;

use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params_from_iter};

use crate::config::spelling::{Affinity, Collation};
use crate::config::{Config, Lookup, RuleLookup};
use crate::db::{self, Deadline};
use crate::types::{KeyAction, LookupAsk, Plan};

/// At most this many values are bound to one statement.
const CHUNK: usize = 500;

/// At most this many outbox rows after a batch are looked at for changes to a lookup's tables;
/// past that (a backlog), every lookup of the batch drops its family.
const LOOKAHEAD: usize = 4096;

/// A lookup's query (one chunk of values) running longer is interrupted, and its family dropped:
/// an index gone or a table grown past what the join can search must not stall the tail.
const BOUND: Duration = Duration::from_millis(100);

/// Why a lookup's family is dropped instead of refreshing the keys it would find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// A table the lookup reads changed after the batch (or a backlog hides whether it did).
    ChainChanged,
    /// The lookup's query failed.
    Failed,
    /// The lookup's query ran past `BOUND`.
    TimedOut,
    /// Two columns the lookup joins compare values otherwise than its `IN` would.
    Incomparable,
}

impl Fallback {
    pub fn reason(self) -> &'static str {
        match self {
            Fallback::ChainChanged => "a table of the lookup changed after the batch",
            Fallback::Failed => "the lookup failed",
            Fallback::TimedOut => "the lookup ran past its time bound",
            Fallback::Incomparable => {
                "the lookup's columns compare values differently (`cachetail check` says which)"
            }
        }
    }
}

/// Runs the lookups `plan` asks for and adds the keys they find to it (at the latest position
/// among their changes, with their rule's strategy), or, for a lookup that cannot be trusted,
/// a flush of its family. `last` is the batch's last position; `deadline` is the one `conn`'s
/// progress handler watches (each lookup query is bounded through it). What each lookup did is
/// returned for the live feed, with the values it found per value asked only when `explain`.
pub fn resolve(
    plan: &mut Plan,
    config: &Config,
    conn: &Connection,
    (last, deadline): (u64, &Deadline),
    explain: bool,
) -> Outcomes {
    if plan.lookups.is_empty() {
        return Outcomes::default();
    }
    let asks = std::mem::take(&mut plan.lookups);
    let found = match conn.unchecked_transaction().and_then(|tx| {
        run_all(&tx, config, &asks, (last, deadline), explain).map(|found| (tx, found))
    }) {
        Ok((tx, found)) => {
            let _ = tx.rollback();
            found
        }
        Err(e) => {
            tracing::warn!(error = %e, "the lookups of derived rules failed: their families are dropped");
            asks.keys()
                .map(|&k| (k, Err(Fallback::Failed), Vec::new()))
                .collect()
        }
    };
    let mut outcomes = Outcomes::default();
    for ((index, number), values, pairs) in found {
        outcomes.0.push((
            (index, number),
            values.as_ref().map(|_| pairs).map_err(|f| *f),
        ));
        let (Some(rule), Some(ask)) = (config.rules.get(index), asks.get(&(index, number))) else {
            continue;
        };
        let family = rule.derived_from.clone().unwrap_or_default();
        let values = match values {
            Ok(values) => values,
            Err(fallback) => {
                tracing::debug!(
                    family,
                    reason = fallback.reason(),
                    "a derived rule's family is dropped"
                );
                let mark = plan.flush_families.entry(family).or_insert(0);
                *mark = (*mark).max(ask.position);
                continue;
            }
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
            plan.name_key(&rendered, action);
        }
        let counts = plan.per_rule.entry(index).or_insert((0, 0));
        counts.0 += named;
        if rule.strategy != crate::types::Strategy::Delete {
            counts.1 += named;
        }
    }
    outcomes
}

/// What each lookup of a batch did, per rule and lookup (their indices in the config): the
/// (input, placeholder) value pairs it found (kept only when asked to explain), or why its
/// family was dropped. For the live feed (`tail::feed`).
#[derive(Debug, Default)]
pub struct Outcomes(Vec<((usize, usize), Outcome)>);

/// How many lookups a batch asked for, and how many of them dropped their family instead.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Resolved {
    pub asked: u64,
    pub fell_back: u64,
}

impl Outcomes {
    /// For the counters in `/v1/status` and `/metrics`.
    pub fn counts(&self) -> Resolved {
        let fell_back = self.0.iter().filter(|(_, o)| o.is_err()).count();
        Resolved {
            asked: self.0.len() as u64,
            fell_back: fell_back as u64,
        }
    }
}

/// One lookup's (input, placeholder) value pairs, or why its family was dropped.
type Outcome = Result<Vec<(Value, Value)>, Fallback>;

impl Outcomes {
    /// What the lookup `number` of rule `index` did in this batch, if it ran.
    pub fn of(&self, index: usize, number: usize) -> Option<Result<&[(Value, Value)], Fallback>> {
        self.0
            .iter()
            .find(|(at, _)| *at == (index, number))
            .map(|(_, outcome)| outcome.as_ref().map(Vec::as_slice).map_err(|f| *f))
    }
}

/// Per lookup: the values found or why not, and the (input, value) pairs when explaining.
type Found = Vec<(
    (usize, usize),
    Result<Vec<Value>, Fallback>,
    Vec<(Value, Value)>,
)>;

/// Every lookup asked, in one read transaction: the values found, or why the family must be
/// dropped (a table it reads changed after the batch, the lookup failed or ran too long).
fn run_all(
    conn: &Connection,
    config: &Config,
    asks: &std::collections::HashMap<(usize, usize), LookupAsk>,
    (last, deadline): (u64, &Deadline),
    explain: bool,
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
            found.push(((index, number), Err(Fallback::ChainChanged), Vec::new()));
            continue;
        }
        if let Some(reason) = incomparable(conn, &lookup.lookup) {
            warn_once(&lookup.lookup.via, &reason);
            found.push(((index, number), Err(Fallback::Incomparable), Vec::new()));
            continue;
        }
        let mut pairs = Vec::new();
        let keep = explain.then_some(&mut pairs);
        match run(conn, lookup, &ask.values, (deadline, keep)) {
            Ok(values) => found.push(((index, number), Ok(values), pairs)),
            Err(e) if crate::db::is_interrupted(&e) => {
                tracing::warn!(
                    via = lookup.lookup.via,
                    bound_ms = BOUND.as_millis(),
                    "a derived rule's lookup ran past its time bound: its family is dropped (does `cachetail check` warn that it scans a table?)"
                );
                found.push(((index, number), Err(Fallback::TimedOut), Vec::new()));
            }
            Err(e) => {
                tracing::warn!(
                    error = %crate::escape::Escaped(&e.to_string()),
                    via = lookup.lookup.via,
                    "a derived rule's lookup failed: its family is dropped"
                );
                found.push(((index, number), Err(Fallback::Failed), Vec::new()));
            }
        }
    }
    Ok(found)
}

/// Why `lookup` could miss a row the query joins, if it could: a pair of columns it relies on
/// whose values SQLite compares otherwise in the query's join than in the lookup's `IN` (a
/// TEXT column joined to an INTEGER one: `'07' = 7` in the join, not in `IN`; NOCASE joined to
/// BINARY). Such a lookup is not used: its family is dropped on each change instead.
pub fn incomparable(conn: &Connection, lookup: &Lookup) -> Option<String> {
    differ(conn, &lookup.equal)
}

/// The first pair of columns whose values SQLite compares otherwise (another affinity or
/// collation), said for people.
pub fn differ(conn: &Connection, pairs: &[[(String, String); 2]]) -> Option<String> {
    for [(t1, c1), (t2, c2)] in pairs {
        // A column SQLite cannot describe (gone, or a view's: a query reading a view is never
        // derived) is left to the lookup itself, which then fails and drops the family.
        let (Some((d1, k1)), Some((d2, k2))) = (
            db::column_semantics(conn, t1, c1),
            db::column_semantics(conn, t2, c2),
        ) else {
            continue;
        };
        let alike = Affinity::of_declared_type(&d1) == Affinity::of_declared_type(&d2)
            && Collation::named(&k1) == Collation::named(&k2);
        if !alike {
            let described = |d: &str, k: &str| {
                let d = if d.is_empty() { "no type" } else { d };
                format!("{d}, collation {}", if k.is_empty() { "BINARY" } else { k })
            };
            return Some(format!(
                "{t1}.{c1} ({}) and {t2}.{c2} ({}) compare their values differently: give them the same type and collation",
                described(&d1, &k1),
                described(&d2, &k2)
            ));
        }
    }
    None
}

/// A derived rule's direct key is rendered from the changed row's column, while readers' keys
/// are spelled as the query compares the placeholder with another column: where the two compare
/// values otherwise (a TEXT `reviews.book_id` holding `'07'` joined to an INTEGER `books.id`:
/// the key rendered, `book:07`, is not the `book:7` its value is cached under), the family is
/// dropped at `last` for each batch such a rule fires in, instead of trusting the key.
pub fn guard_direct_ties(plan: &mut Plan, config: &Config, conn: &Connection, last: u64) {
    for &index in plan.per_rule.keys() {
        let Some(rule) = config.rules.get(index) else {
            continue;
        };
        let (Some(family), false) = (&rule.derived_from, rule.alike.is_empty()) else {
            continue;
        };
        if let Some(reason) = differ(conn, &rule.alike) {
            warn_once(family, &reason);
            let mark = plan.flush_families.entry(family.clone()).or_insert(0);
            *mark = (*mark).max(last);
        }
    }
}

/// Says once per process why a lookup or a rule's keys are not used (asked on every batch).
fn warn_once(via: &str, reason: &str) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.len() < 1024 && !warned.iter().any(|w| w == via) {
        warned.push(via.to_owned());
        tracing::warn!(
            rule = via,
            reason,
            "a derived rule's keys cannot be trusted here: its family is dropped on each change instead"
        );
    }
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
/// Each chunk's query is interrupted past `BOUND`; with `pairs`, every (input, value) row found
/// is kept there too.
fn run(
    conn: &Connection,
    lookup: &RuleLookup,
    values: &[Value],
    (deadline, mut pairs): (&Deadline, Option<&mut Vec<(Value, Value)>>),
) -> rusqlite::Result<Vec<Value>> {
    let mut seen: HashSet<String> = HashSet::new();
    let distinct: Vec<&Value> = values.iter().filter(|v| seen.insert(identity(v))).collect();
    let mut found: Vec<Value> = Vec::new();
    let mut kept: HashSet<String> = HashSet::new();
    for chunk in distinct.chunks(CHUNK) {
        let marks = vec!["?"; chunk.len()].join(", ");
        let sql = format!("{}{marks})", lookup.lookup.sql);
        let mut statement = conn.prepare_cached(&sql)?;
        let _bounded = deadline.arm(BOUND);
        let mut rows = statement.query(params_from_iter(chunk.iter().copied()))?;
        while let Some(row) = rows.next()? {
            let value: Value = row.get(1)?;
            if let Some(pairs) = pairs.as_deref_mut() {
                pairs.push((row.get(0)?, value.clone()));
            }
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
pub(crate) mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::types::{Change, ChangeBody, Layout, Op, RowChange};

    /// `author:{id}` through authors → books → reviews, on auto: a review reaches its author
    /// through a lookup (also the feed's tests' config).
    pub(crate) fn config() -> Config {
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
    pub(crate) fn review(book: i64) -> Change {
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
        let resolved =
            resolve(&mut plan, &config, &conn, (3, &Deadline::default()), false).counts();
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
        let resolved =
            resolve(&mut plan, &config, &conn, (3, &Deadline::default()), false).counts();
        assert_eq!((resolved.asked, resolved.fell_back), (1, 1));
        assert!(plan.keys.is_empty());
        assert_eq!(plan.flush_families["author:{id}"], 3);
    }

    #[test]
    fn a_lookup_that_fails_drops_the_family() {
        let (config, conn) = (config(), database());
        conn.execute_batch("DROP TABLE books").expect("drop");
        let mut plan = crate::rules::plan(&config, &[review(20)]);
        resolve(&mut plan, &config, &conn, (3, &Deadline::default()), false);
        assert!(plan.keys.is_empty());
        assert_eq!(plan.flush_families["author:{id}"], 3);
    }
    #[test]
    fn a_lookup_past_its_time_bound_is_cut_and_drops_the_family() {
        let config = config();
        let mut conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(include_str!("../../schema.sql"))
            .expect("outbox");
        // `books` made slow: a view counting through tens of millions of rows before it
        // answers (seconds, unbounded).
        conn.execute_batch(
            "CREATE TABLE authors (id INTEGER PRIMARY KEY);
             CREATE TABLE reviews (id INTEGER PRIMARY KEY, book_id INTEGER);
             CREATE VIEW books AS WITH RECURSIVE n(i) AS
                 (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000000)
                 SELECT i AS id, i % 7 AS author_id FROM n;",
        )
        .expect("schema");
        let deadline = Deadline::default();
        deadline.watch(&mut conn).expect("watch");
        let mut plan = crate::rules::plan(&config, &[review(20)]);
        let started = std::time::Instant::now();
        let outcomes = resolve(&mut plan, &config, &conn, (3, &deadline), true);
        let took = started.elapsed();
        assert!(took < BOUND * 10, "cut after {took:?}");
        assert!(plan.keys.is_empty(), "{:?}", plan.keys);
        assert_eq!(plan.flush_families["author:{id}"], 3);
        assert!(
            outcomes
                .0
                .iter()
                .all(|(_, o)| *o == Err(Fallback::TimedOut))
        );
        // Disarmed afterwards: the connection's next statement runs to its end.
        let count: i64 = conn
            .query_row(
                "SELECT count(*) FROM (SELECT id FROM books LIMIT 999)",
                [],
                |r| r.get(0),
            )
            .expect("runs");
        assert_eq!(count, 999);
    }

    #[test]
    fn columns_that_compare_otherwise_than_the_lookup_drop_the_family() {
        // reviews.book_id is TEXT: the query's join finds book 20 for '020' (numeric affinity
        // applied to the text), `books.id IN ('020')` would not.
        for (schema, sound) in [
            ("book_id INTEGER", true),
            ("book_id TEXT", false),
            ("book_id INTEGER COLLATE NOCASE", false),
            ("book_id", false),
        ] {
            let (config, conn) = (config(), database());
            conn.execute_batch(&format!(
                "DROP TABLE reviews; CREATE TABLE reviews (id INTEGER PRIMARY KEY, {schema});"
            ))
            .expect("schema");
            let mut plan = crate::rules::plan(&config, &[review(20)]);
            resolve(&mut plan, &config, &conn, (3, &Deadline::default()), false);
            let keys: Vec<&String> = plan.keys.keys().collect();
            if sound {
                assert_eq!(keys, ["author:2"], "{schema}");
            } else {
                assert!(keys.is_empty(), "{schema}: {keys:?}");
                assert_eq!(plan.flush_families["author:{id}"], 3, "{schema}");
            }
        }
    }
}
