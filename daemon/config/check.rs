//! Checks a config against the database it names: watched tables and the columns templates use
//! exist, every family's query prepares, only reads, and binds exactly its pattern's parameters.
//! Run by `cachetail check`, at start-up, and before a reload takes effect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};

use super::spelling::{self, FamilySpelling};
use super::{Config, ConfigError, Problems};
use crate::db::table_columns;

/// What each family's query reads, as SQLite's authorizer reported it while `check` prepared
/// the query (through views and subqueries too): what the family depends on. And how each
/// query compares its placeholders (`spelling`), which decides the keys that may be cached.
#[derive(Debug, Clone, Default)]
pub struct Reads {
    by_pattern: HashMap<String, FamilyReads>,
    spellings: HashMap<String, Arc<FamilySpelling>>,
}

/// The tables one family's query reads, and the (table, column) pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FamilyReads {
    pub tables: Vec<String>,
    pub columns: Vec<(String, String)>,
}

impl Reads {
    /// What the family written as `pattern` reads, if the authorizer told.
    pub fn of(&self, pattern: &str) -> Option<&FamilyReads> {
        self.by_pattern.get(pattern)
    }

    /// How the family written as `pattern` compares its placeholders (unanalysed when its
    /// query did not prepare).
    pub fn spelling(&self, pattern: &str) -> Arc<FamilySpelling> {
        self.spellings
            .get(pattern)
            .cloned()
            .unwrap_or_else(|| Arc::new(FamilySpelling::unanalysed()))
    }
}

impl FamilyReads {
    pub fn reads_table(&self, table: &str) -> bool {
        self.tables.iter().any(|t| t.eq_ignore_ascii_case(table))
    }
}

/// Every problem the database reveals in `config`, located in the config file; else what each
/// family's query reads.
pub fn check_database(config: &Config, conn: &mut Connection) -> Result<Reads, ConfigError> {
    let mut problems = Problems::new(&config.source);
    check_rules(config, conn, &mut problems);
    let reads = check_families(config, conn, &mut problems);
    if problems.is_empty() {
        Ok(reads)
    } else {
        Err(problems.into_error(&config.file))
    }
}

fn check_rules(config: &Config, conn: &Connection, problems: &mut Problems<'_>) {
    for rule in &config.rules {
        let columns = match table_columns(conn, &rule.table) {
            Ok(columns) => columns,
            Err(e) => {
                problems.at(
                    rule.table_span.clone(),
                    format!("cannot read table `{}`: {e}", rule.table),
                );
                continue;
            }
        };
        let is_table = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                [&rule.table],
                |row| row.get::<_, i64>(0),
            )
            .unwrap_or(0)
            > 0;
        if !is_table {
            let message = match &rule.derived_from {
                Some(family) => format!(
                    "key family `{family}` (invalidate = \"auto\"): its query reads `{}`, which is not a table in {} (a view?); auto rules cannot watch it: write [[rules]] for the tables behind it and set invalidate = \"rules\"",
                    rule.table,
                    config.database.display()
                ),
                None => format!(
                    "rule: table `{}` does not exist in {}",
                    rule.table,
                    config.database.display()
                ),
            };
            problems.at(rule.table_span.clone(), message);
            continue;
        }
        for (i, template) in rule.keys.iter().chain(&rule.tags).enumerate() {
            for param in template.params() {
                if !columns.iter().any(|c| c == param) {
                    let span = rule
                        .key_spans
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| rule.table_span.clone());
                    problems.at(
                        span,
                        format!(
                            "rule for table `{}`: `{template}` uses column `{param}`, which `{}` does not have (it has: {})",
                            rule.table,
                            rule.table,
                            columns.join(", ")
                        ),
                    );
                }
            }
        }
    }
}

fn check_families(config: &Config, conn: &mut Connection, problems: &mut Problems<'_>) -> Reads {
    // SQLite's authorizer reports every table a statement reads while it is prepared (through
    // views and subqueries too): that is what a family depends on.
    let reads = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let seen = Arc::clone(&reads);
    let watching = conn.authorizer(Some(move |context: AuthContext<'_>| {
        if let AuthAction::Read {
            table_name,
            column_name,
        } = context.action
        {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            if !seen
                .iter()
                .any(|(t, c)| t == table_name && c == column_name)
            {
                seen.push((table_name.to_owned(), column_name.to_owned()));
            }
        }
        Authorization::Allow
    }));
    // Without the authorizer, `reads` stays unknown: every flush then covers the family.
    let seen = watching.is_ok().then_some(&*reads);
    let found = check_queries(config, conn, seen, problems);
    let _ = conn.authorizer(None::<fn(AuthContext<'_>) -> Authorization>);
    found
}

fn check_queries(
    config: &Config,
    conn: &Connection,
    reads: Option<&Mutex<Vec<(String, String)>>>,
    problems: &mut Problems<'_>,
) -> Reads {
    let mut found = Reads::default();
    for family in &config.families {
        let name = family.pattern.source();
        if let Some(reads) = reads {
            reads.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        let prepared = conn.prepare(&family.query);
        if let (Some(reads), Ok(_)) = (reads, &prepared) {
            let columns = std::mem::take(&mut *reads.lock().unwrap_or_else(|e| e.into_inner()));
            let mut tables: Vec<String> = Vec::new();
            for (table, _) in &columns {
                if !tables.contains(table) {
                    tables.push(table.clone());
                }
            }
            found
                .by_pattern
                .insert(name.to_owned(), FamilyReads { tables, columns });
        }
        if prepared.is_ok() {
            let spelling = spelling::analyse(&family.pattern, &family.query, conn);
            found.spellings.insert(name.to_owned(), Arc::new(spelling));
        }
        let stmt = match prepared {
            Ok(stmt) => stmt,
            Err(e) => {
                problems.at(
                    family.query_span.clone(),
                    format!("key family `{name}`: the query does not prepare: {e}"),
                );
                continue;
            }
        };
        if !stmt.readonly() {
            problems.at(
                family.query_span.clone(),
                format!("key family `{name}`: the query must only read (SELECT)"),
            );
        }
        if stmt.column_count() == 0 {
            problems.at(
                family.query_span.clone(),
                format!("key family `{name}`: the query returns no columns"),
            );
        }
        let pattern_params = family.pattern.params();
        let mut used = Vec::new();
        for index in 1..=stmt.parameter_count() {
            let Some(parameter) = stmt.parameter_name(index) else {
                problems.at(
                    family.query_span.clone(),
                    format!("key family `{name}`: parameter {index} has no name; use `:name` placeholders that the pattern's `{{name}}` fills"),
                );
                continue;
            };
            let bare = parameter.trim_start_matches([':', '@', '$']);
            if pattern_params.contains(&bare) {
                used.push(bare.to_owned());
            } else {
                problems.at(
                    family.query_span.clone(),
                    format!("key family `{name}`: the query uses `{parameter}`, but the pattern has no `{{{bare}}}`"),
                );
            }
        }
        if let (Some(warm), Some(span)) = (&family.warm, &family.warm_span) {
            check_warm(conn, name, &pattern_params, warm, span, problems);
        }
        if let Some(Err(reason)) = family.maintain.as_deref().map(|shape| shape.check(conn)) {
            problems.at(
                family.query_span.clone(),
                format!("key family `{name}`: `maintain = \"incremental\"` cannot maintain this query: {reason}"),
            );
        }
        for param in pattern_params {
            if !used.iter().any(|u| u == param) {
                problems.at(
                    family.pattern_span.clone(),
                    format!("key family `{name}`: `{{{param}}}` is not used by the query (bind it as `:{param}`)"),
                );
            }
        }
    }
    found
}

/// A family's `warm` query: it prepares, only reads, takes no parameters, and its columns name
/// the pattern's placeholders (or, for a pattern with one, it returns one column).
fn check_warm(
    conn: &Connection,
    name: &str,
    params: &[&str],
    warm: &str,
    span: &std::ops::Range<usize>,
    problems: &mut Problems<'_>,
) {
    let stmt = match conn.prepare(warm) {
        Ok(stmt) => stmt,
        Err(e) => {
            problems.at(
                span.clone(),
                format!("key family `{name}`: the warm query does not prepare: {e}"),
            );
            return;
        }
    };
    if !stmt.readonly() || stmt.parameter_count() > 0 {
        problems.at(
            span.clone(),
            format!("key family `{name}`: the warm query must only read, without parameters"),
        );
    }
    let columns: Vec<&str> = stmt.column_names().collect();
    let covered = params.iter().all(|p| columns.contains(p));
    let single = params.len() == 1 && columns.len() == 1;
    if !covered && !single {
        problems.at(
            span.clone(),
            format!(
                "key family `{name}`: the warm query's columns ({}) must name the pattern's placeholders ({})",
                columns.join(", "),
                params.join(", ")
            ),
        );
    }
}

/// The tracking gaps: every table a family's query reads that no rule refreshes that family for
/// (no rule on the table names a key the family's pattern matches, or a tag the family carries).
/// Needs the reads `check_database` recorded.
pub fn tracking_gaps(config: &Config, reads: &Reads) -> Vec<String> {
    let mut gaps = Vec::new();
    for family in &config.families {
        let Some(FamilyReads { columns, .. }) = reads.of(family.pattern.source()) else {
            continue;
        };
        let mut tables: Vec<&str> = Vec::new();
        for (table, _) in columns {
            if !tables.contains(&table.as_str()) {
                tables.push(table);
            }
        }
        for table in tables {
            if config.refreshes(table, family) {
                continue;
            }
            let read: Vec<String> = columns
                .iter()
                .filter(|(t, c)| t == table && !c.is_empty())
                .map(|(t, c)| format!("{t}.{c}"))
                .collect();
            let read = if read.is_empty() {
                format!("`{table}`")
            } else {
                format!("`{}`", read.join("`, `"))
            };
            gaps.push(format!(
                "key family `{}` reads {read}, but no rule refreshes `{}` when `{table}` changes",
                family.pattern, family.pattern
            ));
        }
    }
    gaps
}
