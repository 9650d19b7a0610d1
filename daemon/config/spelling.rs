//! Which spellings of a key the rules can reach.
//!
//! Rules render keys from the values a changed row holds (`book:{book_id}` → `book:42`). A
//! family's query compares the parameters a requested key gives it with columns, and SQLite
//! compares through the column's affinity and collation: against an INTEGER column the texts
//! `042`, `+42`, `42.0`, ` 42` and `4.2e1` all become 42, and against a `COLLATE NOCASE` column
//! `RUST` equals `rust`. Such a key reads a row whose changes render another key, so no change
//! would ever refresh it: it must not be cached.
//!
//! This module finds, for each placeholder, every place the query uses it, and the column each
//! comparison is with (its declared type's affinity and its collation, asked of SQLite); then,
//! for a requested key, whether every value the comparison could match renders back exactly as
//! the key spells it. Where a placeholder is used otherwise (inside a function or an expression,
//! or compared with a column that cannot be told), only what no column could read differently
//! passes: an integer written as keys write it, and text that SQLite's numeric affinity leaves
//! alone. What a function does to a parameter (`lower(:name)`) is the query's own business and
//! is not seen through.

use std::collections::HashMap;
use std::ops::ControlFlow;

use rusqlite::Connection;
use sqlparser::ast::{
    BinaryOperator, Expr, InTarget, ObjectName, ObjectNamePart, Query, SelectItem, SetExpr,
    Statement, TableFactor, Value, ValueWithSpan, Visit, Visitor,
};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;

use super::template::Template;
use crate::db::{self, Bound};
use crate::types::Params;

/// A column's type affinity, from its declared type (SQLite's rules, "Datatypes In SQLite" 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    Integer,
    Real,
    Numeric,
    Text,
    /// BLOB, or no declared type: values are compared as they are, nothing converted.
    Blob,
}

impl Affinity {
    pub fn of_declared_type(declared: &str) -> Affinity {
        let declared = declared.to_ascii_uppercase();
        let has = |part: &str| declared.contains(part);
        if has("INT") {
            Affinity::Integer
        } else if has("CHAR") || has("CLOB") || has("TEXT") {
            Affinity::Text
        } else if has("BLOB") || declared.trim().is_empty() {
            Affinity::Blob
        } else if has("REAL") || has("FLOA") || has("DOUB") {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }

    fn is_numeric(self) -> bool {
        matches!(self, Affinity::Integer | Affinity::Real | Affinity::Numeric)
    }
}

/// A collating sequence, as SQLite names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collation {
    Binary,
    /// Folds ASCII letters.
    NoCase,
    /// Ignores trailing spaces.
    RTrim,
    /// An application-defined one: anything may compare equal.
    Other(String),
}

impl Collation {
    pub fn named(name: &str) -> Collation {
        match name.to_ascii_uppercase().as_str() {
            "BINARY" => Collation::Binary,
            "NOCASE" => Collation::NoCase,
            "RTRIM" => Collation::RTrim,
            _ => Collation::Other(name.to_owned()),
        }
    }
}

/// One place a query uses a placeholder.
#[derive(Debug, Clone, PartialEq)]
enum Use {
    /// Compared with a column: the parameter is seen through the column's affinity and the
    /// comparison's collation.
    Compared {
        column: String,
        affinity: Affinity,
        collation: Collation,
    },
    /// Anything else.
    Unknown,
}

/// How a family's query uses each placeholder, under one version of the schema.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilySpelling {
    /// `PRAGMA schema_version` when it was found (-1: never analysed).
    pub schema_version: i64,
    /// Per placeholder, its uses; None when the query could not be analysed (every placeholder
    /// is then taken as used in an unknown way).
    uses: Option<HashMap<String, Vec<Use>>>,
}

impl FamilySpelling {
    /// Nothing known: every placeholder is taken as used in an unknown way.
    pub fn unanalysed() -> FamilySpelling {
        FamilySpelling {
            schema_version: -1,
            uses: None,
        }
    }

    /// Whether both say the same of every placeholder (whatever their schema versions).
    pub fn same_uses(&self, other: &FamilySpelling) -> bool {
        self.uses == other.uses
    }

    /// What keeps whole classes of keys out of the cache, to say at `check`: a placeholder
    /// compared under a collation that makes distinct texts equal.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let mut uses: Vec<(&String, &Vec<Use>)> = self.uses.iter().flatten().collect();
        uses.sort_by_key(|(name, _)| *name);
        for (name, uses) in uses {
            for use_ in uses {
                let Use::Compared {
                    column, collation, ..
                } = use_
                else {
                    continue;
                };
                let keys = match collation {
                    Collation::Binary => continue,
                    Collation::NoCase => format!("keys whose `{{{name}}}` holds a letter"),
                    Collation::RTrim | Collation::Other(_) => {
                        format!("keys with a text `{{{name}}}`")
                    }
                };
                notes.push(format!(
                    "`{{{name}}}` is compared with `{column}` under the collation {collation:?}, which makes distinct texts equal: {keys} are answered from the database every time, never cached (a change renders the key of its row as the row spells it)"
                ));
            }
        }
        notes
    }

    /// Why a key with these parameters is not spelled the way rules render the rows it reads,
    /// if it is not (None: it may be cached).
    pub fn problem(&self, params: &Params) -> Option<String> {
        const UNKNOWN: &[Use] = &[Use::Unknown];
        params.iter().find_map(|(name, value)| {
            let uses = match &self.uses {
                Some(uses) => uses.get(name).map_or(UNKNOWN, Vec::as_slice),
                None => UNKNOWN,
            };
            uses.iter()
                .find_map(|u| use_problem(u, value))
                .map(|why| format!("`{{{name}}}` = {value:?}: {why}"))
        })
    }
}

/// Why `value`, bound as keys bind it, does not read back as itself through this use.
fn use_problem(use_: &Use, value: &str) -> Option<String> {
    let bound = db::bound(value);
    match use_ {
        Use::Unknown => match bound {
            Bound::Integer(_) => None,
            Bound::Real(_) => Some(
                "a real used where cachetail cannot tell which column it meets (its text form may differ)".to_owned(),
            ),
            Bound::Text(text) if might_be_numeric(text) => Some(
                "text SQLite may read as a number, used where cachetail cannot tell which column it meets".to_owned(),
            ),
            Bound::Text(_) => None,
        },
        Use::Compared {
            column,
            affinity,
            collation,
        } => compared_problem(column, *affinity, collation, bound),
    }
}

fn compared_problem(
    column: &str,
    affinity: Affinity,
    collation: &Collation,
    bound: Bound<'_>,
) -> Option<String> {
    match bound {
        // Numbers compare as numbers (and a row's number renders as the key writes it); against
        // a TEXT column an integer becomes its decimal text, which only RTRIM or an unknown
        // collation could match with other texts.
        Bound::Integer(i) if affinity == Affinity::Text => {
            text_collation_problem(column, collation, &i.to_string())
        }
        Bound::Integer(_) => None,
        Bound::Real(_) if affinity == Affinity::Text => Some(format!(
            "a real compared with the TEXT column `{column}` is compared as SQLite's text for it"
        )),
        Bound::Real(_) => None,
        Bound::Text(text) if affinity.is_numeric() && might_be_numeric(text) => Some(format!(
            "`{column}` has {affinity:?} affinity: SQLite reads this text as a number, whose rows render it otherwise"
        )),
        Bound::Text(text) => text_collation_problem(column, collation, text),
    }
}

/// Texts compared with `collation`: which other texts could equal `text`.
fn text_collation_problem(column: &str, collation: &Collation, text: &str) -> Option<String> {
    match collation {
        Collation::Binary => None,
        Collation::NoCase if !text.bytes().any(|b| b.is_ascii_alphabetic()) => None,
        Collation::NoCase => Some(format!(
            "`{column}` compares with NOCASE: every letter case of it reads the same rows"
        )),
        Collation::RTrim => Some(format!(
            "`{column}` compares with RTRIM: trailing spaces are ignored"
        )),
        Collation::Other(name) => Some(format!(
            "`{column}` compares with the collation {name}, which cachetail cannot see through"
        )),
    }
}

/// Whether SQLite's numeric affinity could turn `text` into a number: after the spaces it
/// skips, an optional sign, digits with at most one `.` (at least one digit), and an optional
/// exponent. A superset of what SQLite converts (an exponent without digits is not converted).
pub fn might_be_numeric(text: &str) -> bool {
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\u{b}' | '\u{c}' | '\r');
    let trimmed = text.trim_matches(is_space);
    let unsigned = trimmed.strip_prefix(['+', '-']).unwrap_or(trimmed);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], Some(&unsigned[at + 1..])),
        None => (unsigned, None),
    };
    let digits = mantissa.bytes().filter(u8::is_ascii_digit).count();
    let dots = mantissa.bytes().filter(|&b| b == b'.').count();
    let mantissa_ok = digits > 0 && dots <= 1 && digits + dots == mantissa.len();
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        e.bytes().all(|b| b.is_ascii_digit())
    });
    mantissa_ok && exponent_ok
}

/// Finds how `query` uses each placeholder of `pattern`, under the schema `conn` sees now.
pub fn analyse(pattern: &Template, query: &str, conn: &Connection) -> FamilySpelling {
    let schema_version = conn
        .query_row("PRAGMA schema_version", [], |row| row.get(0))
        .unwrap_or(-1);
    let uses = Parser::parse_sql(&SQLiteDialect {}, query)
        .ok()
        .and_then(|statements| match statements.as_slice() {
            [statement @ Statement::Query(_)] => Some(placeholder_uses(pattern, statement, conn)),
            _ => None,
        });
    FamilySpelling {
        schema_version,
        uses,
    }
}

fn placeholder_uses(
    pattern: &Template,
    statement: &Statement,
    conn: &Connection,
) -> HashMap<String, Vec<Use>> {
    let mut ctes = Ctes::default();
    let _ = statement.visit(&mut ctes);
    let mut found = Found {
        ctes: &ctes.columns,
        relations: Vec::new(),
        occurrences: HashMap::new(),
        comparisons: Vec::new(),
    };
    let _ = statement.visit(&mut found);
    let mut uses: HashMap<String, Vec<Use>> = HashMap::new();
    let mut handled: HashMap<&str, usize> = HashMap::new();
    for comparison in &found.comparisons {
        let resolved = resolve(&found.relations, comparison, conn);
        *handled.entry(comparison.param.as_str()).or_default() += 1;
        uses.entry(comparison.param.clone())
            .or_default()
            .extend(resolved);
    }
    for param in pattern.params() {
        let seen = found.occurrences.get(param).copied().unwrap_or(0);
        if seen > handled.get(param).copied().unwrap_or(0) {
            uses.entry(param.to_owned()).or_default().push(Use::Unknown);
        }
    }
    uses
}

/// A relation of the query, by the name its columns are qualified with.
#[derive(Debug)]
enum Relation {
    /// A table of the database.
    Table { alias: String, table: String },
    /// A CTE, a subquery or a table-valued function: its column names, if they can be told.
    Derived {
        alias: String,
        columns: Option<Vec<String>>,
    },
}

/// A placeholder compared with a column reference.
#[derive(Debug)]
struct Comparison {
    param: String,
    qualifier: Option<String>,
    column: String,
    /// An explicit `COLLATE` on either side.
    collation: Option<String>,
}

/// The CTEs anywhere in the statement, with their column names when they can be told.
#[derive(Default)]
struct Ctes {
    columns: HashMap<String, Option<Vec<String>>>,
}

impl Visitor for Ctes {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        for cte in query.with.iter().flat_map(|with| &with.cte_tables) {
            let columns = if cte.alias.columns.is_empty() {
                projection_names(&cte.query)
            } else {
                Some(
                    cte.alias
                        .columns
                        .iter()
                        .map(|c| lower(&c.name.value))
                        .collect(),
                )
            };
            self.columns.insert(lower(&cte.alias.name.value), columns);
        }
        ControlFlow::Continue(())
    }
}

/// What one pass over the statement finds: its relations, every placeholder it names (how many
/// times), and every comparison of a placeholder with a column reference.
struct Found<'a> {
    ctes: &'a HashMap<String, Option<Vec<String>>>,
    relations: Vec<Relation>,
    occurrences: HashMap<String, usize>,
    comparisons: Vec<Comparison>,
}

impl Visitor for Found<'_> {
    type Break = ();

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table {
                name, alias, args, ..
            } => {
                let table = last_part(name).unwrap_or_default();
                let alias_name = alias
                    .as_ref()
                    .map_or_else(|| table.clone(), |a| lower(&a.name.value));
                let relation = match (self.ctes.get(&table), args) {
                    (Some(columns), None) => Relation::Derived {
                        alias: alias_name,
                        columns: columns.clone(),
                    },
                    (None, None) => Relation::Table {
                        alias: alias_name,
                        table,
                    },
                    (_, Some(_)) => Relation::Derived {
                        alias: alias_name,
                        columns: None,
                    },
                };
                self.relations.push(relation);
            }
            TableFactor::Derived {
                subquery, alias, ..
            } => {
                let columns = match alias {
                    Some(a) if !a.columns.is_empty() => {
                        Some(a.columns.iter().map(|c| lower(&c.name.value)).collect())
                    }
                    _ => projection_names(subquery),
                };
                self.relations.push(Relation::Derived {
                    alias: alias
                        .as_ref()
                        .map_or_else(String::new, |a| lower(&a.name.value)),
                    columns,
                });
            }
            TableFactor::NestedJoin { .. } => {}
            _ => self.relations.push(Relation::Derived {
                alias: String::new(),
                columns: None,
            }),
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_value(&mut self, value: &ValueWithSpan) -> ControlFlow<()> {
        if let Value::Placeholder(name) = &value.value {
            *self.occurrences.entry(bare(name)).or_default() += 1;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::BinaryOp { left, op, right } if is_comparison(op) => {
                self.compare(left, right);
            }
            Expr::IsDistinctFrom(left, right) | Expr::IsNotDistinctFrom(left, right) => {
                self.compare(left, right);
            }
            Expr::In {
                expr,
                target: InTarget::List(list),
                ..
            } => {
                for item in list {
                    self.compare(expr, item);
                }
            }
            Expr::Between {
                expr, low, high, ..
            } => {
                self.compare(expr, low);
                self.compare(expr, high);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

impl Found<'_> {
    /// Records `a` compared with `b` when one is a placeholder and the other a column.
    fn compare(&mut self, a: &Expr, b: &Expr) {
        let (a, a_collation) = operand(a);
        let (b, b_collation) = operand(b);
        let (param, column) = match (a, b) {
            (Operand::Param(p), Operand::Column(q, c))
            | (Operand::Column(q, c), Operand::Param(p)) => (p, (q, c)),
            _ => return,
        };
        self.comparisons.push(Comparison {
            param,
            qualifier: column.0,
            column: column.1,
            // SQLite: an explicit collation on the left operand wins, then on the right.
            collation: a_collation.or(b_collation),
        });
    }
}

enum Operand {
    Param(String),
    Column(Option<String>, String),
    Other,
}

/// What an operand is, looking through parentheses and `COLLATE` (returned beside it).
fn operand(expr: &Expr) -> (Operand, Option<String>) {
    match expr {
        Expr::Nested(inner) => operand(inner),
        Expr::Collate { expr, collation } => {
            let (inner, inner_collation) = operand(expr);
            (inner, inner_collation.or_else(|| last_part(collation)))
        }
        Expr::Value(ValueWithSpan {
            value: Value::Placeholder(name),
            ..
        }) => (Operand::Param(bare(name)), None),
        Expr::Identifier(column) => (Operand::Column(None, lower(&column.value)), None),
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [.., qualifier, column] => (
                Operand::Column(Some(lower(&qualifier.value)), lower(&column.value)),
                None,
            ),
            _ => (Operand::Other, None),
        },
        _ => (Operand::Other, None),
    }
}

/// The column a comparison is with, as uses: one per table it could name (each must pass), or
/// Unknown when it names a derived relation, nothing, or something SQLite does not describe.
fn resolve(relations: &[Relation], comparison: &Comparison, conn: &Connection) -> Vec<Use> {
    let column = comparison.column.as_str();
    let mut tables: Vec<&str> = Vec::new();
    for relation in relations {
        match relation {
            Relation::Table { alias, table } => {
                let named = match &comparison.qualifier {
                    Some(q) => q == alias,
                    None => db::column_semantics(conn, table, column).is_some(),
                };
                if named && !tables.contains(&table.as_str()) {
                    tables.push(table);
                }
            }
            Relation::Derived { alias, columns } => {
                let named = match &comparison.qualifier {
                    Some(q) => q == alias,
                    None => columns
                        .as_ref()
                        .is_none_or(|c| c.iter().any(|c| c == column)),
                };
                if named {
                    return vec![Use::Unknown];
                }
            }
        }
    }
    if tables.is_empty() {
        return vec![Use::Unknown];
    }
    tables
        .into_iter()
        .map(|table| match db::column_semantics(conn, table, column) {
            Some((declared, collation)) => Use::Compared {
                column: format!("{table}.{column}"),
                affinity: Affinity::of_declared_type(&declared),
                collation: Collation::named(comparison.collation.as_deref().unwrap_or(&collation)),
            },
            None => Use::Unknown,
        })
        .collect()
}

fn is_comparison(op: &BinaryOperator) -> bool {
    matches!(
        op,
        BinaryOperator::Eq
            | BinaryOperator::NotEq
            | BinaryOperator::Lt
            | BinaryOperator::LtEq
            | BinaryOperator::Gt
            | BinaryOperator::GtEq
            | BinaryOperator::Is
            | BinaryOperator::IsNot
    )
}

/// The names a query's result columns can be referred to by; None when one cannot be told
/// (`*`), so any name may be one of them.
fn projection_names(query: &Query) -> Option<Vec<String>> {
    let SetExpr::Select(select) = first_select(&query.body)? else {
        return None;
    };
    select
        .projection
        .iter()
        .map(|item| match item {
            SelectItem::ExprWithAlias { alias, .. } => Some(lower(&alias.value)),
            SelectItem::UnnamedExpr(Expr::Identifier(column)) => Some(lower(&column.value)),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(parts)) => {
                parts.last().map(|c| lower(&c.value))
            }
            SelectItem::UnnamedExpr(other) => Some(other.to_string().to_lowercase()),
            _ => None,
        })
        .collect()
}

/// The first SELECT of a compound one (its column names are the result's).
fn first_select(body: &SetExpr) -> Option<&SetExpr> {
    match body {
        SetExpr::Select(_) => Some(body),
        SetExpr::SetOperation { left, .. } => first_select(left),
        SetExpr::Query(query) => first_select(&query.body),
        _ => None,
    }
}

fn last_part(name: &ObjectName) -> Option<String> {
    match name.0.last()? {
        ObjectNamePart::Identifier(ident) => Some(lower(&ident.value)),
        ObjectNamePart::Function(_) => None,
    }
}

fn bare(placeholder: &str) -> String {
    placeholder.trim_start_matches([':', '@', '$']).to_owned()
}

fn lower(name: &str) -> String {
    name.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Connection {
        let conn = Connection::open_in_memory().expect("memory");
        conn.execute_batch(
            "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT, price REAL, year NUMERIC, raw);
             CREATE TABLE reviews (id INTEGER PRIMARY KEY, book_id INTEGER, body TEXT);
             CREATE TABLE tags (name TEXT COLLATE NOCASE, padded TEXT COLLATE RTRIM, zip VARCHAR(10));
             CREATE VIEW titles AS SELECT id, title FROM books;",
        )
        .expect("schema");
        conn
    }

    /// Whether the key `pattern` matched to `key` may be cached for `query`.
    fn cached(query: &str, pattern: &str, key: &str) -> bool {
        let pattern = Template::parse(pattern, false).expect("pattern");
        let params = pattern.match_key(key).expect("the key matches");
        let spelling = analyse(&pattern, query, &catalog());
        spelling.problem(&params).is_none()
    }

    #[test]
    fn numbers_spelled_otherwise_than_keys_render_them_are_not_cached_against_numeric_columns() {
        let query = "SELECT b.id, count(r.id) FROM books b LEFT JOIN reviews r ON r.book_id = b.id WHERE b.id = :id GROUP BY b.id";
        assert!(cached(query, "book:{id}", "book:42"));
        assert!(cached(query, "book:{id}", "book:-7"));
        for key in [
            "book:042",
            "book:+42",
            "book:42.0",
            "book: 42",
            "book:4.2e1",
            "book:-0",
            "book:1e999",
        ] {
            assert!(!cached(query, "book:{id}", key), "{key}");
        }
        // Text that is not a number compares as text: only a row holding it matches.
        assert!(cached(query, "book:{id}", "book:abc"));
        assert!(cached(query, "book:{id}", "book:0x2A"));
        for (column, key) in [("price", "p:1.5"), ("year", "p:1999")] {
            let query = format!("SELECT id FROM books WHERE {column} = :v");
            assert!(cached(&query, "p:{v}", key), "{column} {key}");
            assert!(!cached(&query, "p:{v}", "p:1.50"), "{column}: 1.50");
        }
        // A column without affinity converts nothing: `01` and `1.50` are texts only a text
        // matches, which renders them as written.
        for key in ["p:1.5", "p:01", "p:1.50"] {
            assert!(
                cached("SELECT id FROM books WHERE raw = :v", "p:{v}", key),
                "{key}"
            );
        }
    }

    #[test]
    fn text_columns_keep_leading_zeros_and_collations_decide_the_rest() {
        for key in ["z:02134", "z:2134", "z:0262510871", "z:Boston"] {
            assert!(
                cached("SELECT * FROM tags WHERE zip = :z", "z:{z}", key),
                "{key}"
            );
        }
        // A real against a TEXT column is compared as SQLite's text for it.
        assert!(!cached(
            "SELECT * FROM tags WHERE zip = :z",
            "z:{z}",
            "z:1.5"
        ));
        // NOCASE: any letter may be any case in the row; digits are only themselves.
        assert!(!cached(
            "SELECT * FROM tags WHERE name = :n",
            "t:{n}",
            "t:rust"
        ));
        assert!(!cached(
            "SELECT * FROM tags WHERE name = :n",
            "t:{n}",
            "t:RUST"
        ));
        assert!(cached(
            "SELECT * FROM tags WHERE name = :n",
            "t:{n}",
            "t:2024"
        ));
        // An explicit COLLATE on the comparison counts, on either side.
        assert!(!cached(
            "SELECT * FROM tags WHERE zip = :z COLLATE NOCASE",
            "z:{z}",
            "z:ab"
        ));
        assert!(!cached(
            "SELECT * FROM tags WHERE :z = zip COLLATE NOCASE",
            "z:{z}",
            "z:ab"
        ));
        assert!(cached(
            "SELECT * FROM tags WHERE name = :n COLLATE BINARY",
            "t:{n}",
            "t:ab"
        ));
        // RTRIM: `ab` matches `ab  `.
        assert!(!cached(
            "SELECT * FROM tags WHERE padded = :p",
            "t:{p}",
            "t:ab"
        ));
    }

    #[test]
    fn a_placeholder_used_where_no_column_can_be_told_passes_only_what_no_column_reads_otherwise() {
        for query in [
            "SELECT id FROM books WHERE id = :id + 0",
            "SELECT id FROM books WHERE abs(id) = abs(:id)",
            "SELECT :id AS id",
            "SELECT t.id FROM (SELECT id FROM books) t WHERE t.id = :id",
            "WITH x AS (SELECT id FROM books) SELECT id FROM x WHERE id = :id",
        ] {
            assert!(cached(query, "k:{id}", "k:42"), "{query}");
            assert!(cached(query, "k:{id}", "k:abc"), "{query}");
            for key in ["k:042", "k:1.5", "k:+1"] {
                assert!(!cached(query, "k:{id}", key), "{query}: {key}");
            }
        }
        // A CTE whose columns are named does not hide a table's: `id` is books.id.
        let query = "WITH RECURSIVE spin(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM spin WHERE i < 3) \
                     SELECT id FROM books WHERE id = :id AND (SELECT count(*) FROM spin) > 0";
        assert!(!cached(query, "k:{id}", "k:042"));
        assert!(cached(query, "k:{id}", "k:42"));
        // Unparsable SQL: every placeholder is of unknown use.
        assert!(!cached(
            "SELECT id FROM books WHERE id = :id GLOB",
            "k:{id}",
            "k:042"
        ));
    }

    #[test]
    fn every_comparison_of_a_placeholder_counts() {
        let query = "SELECT id FROM books WHERE id = :id OR id IN (SELECT book_id FROM reviews r WHERE r.body = :id)";
        // books.id (numeric) rejects `042`; reviews.body (TEXT, BINARY) takes it as written.
        assert!(!cached(query, "k:{id}", "k:042"));
        assert!(cached(query, "k:{id}", "k:42"));
        let query = "SELECT id FROM books WHERE title IN (:a, 'x') AND id BETWEEN :lo AND 10";
        assert!(cached(query, "k:{a}:{lo}", "k:Dune:3"));
        assert!(!cached(query, "k:{a}:{lo}", "k:Dune:03"));
        // A view's column is compared as the view describes it (or as unknown).
        assert!(!cached(
            "SELECT id FROM titles WHERE id = :id",
            "k:{id}",
            "k:042"
        ));
        assert!(cached(
            "SELECT id FROM titles WHERE id = :id",
            "k:{id}",
            "k:42"
        ));
        // An unqualified column two tables have: both must pass.
        let query = "SELECT b.id FROM books b JOIN tags t ON 1 WHERE title = :t";
        assert!(cached(query, "k:{t}", "k:Dune"));
    }

    #[test]
    fn what_sqlite_reads_as_a_number_is_always_seen_as_possibly_numeric() {
        let conn = Connection::open_in_memory().expect("memory");
        conn.execute_batch("CREATE TABLE t (n NUMERIC)")
            .expect("table");
        let corpus = [
            "42",
            "042",
            "+42",
            "-42",
            " 42",
            "42 ",
            "\t42\n",
            "42.0",
            "4.2e1",
            "4.2E+1",
            ".5",
            "5.",
            "-0",
            "1e400",
            "9223372036854775808",
            "0.1e1",
            "\u{c}7\r",
            "1e",
            "1e+",
            "0x2A",
            "1_000",
            ".",
            "e5",
            "1 2",
            "inf",
            "nan",
            "",
            " ",
            "+",
            "-.",
            "1..2",
            "1e5.5",
            "٣",
            "12abc",
        ];
        for text in corpus {
            conn.execute("DELETE FROM t", []).expect("delete");
            conn.execute("INSERT INTO t VALUES (?1)", [text])
                .expect("insert");
            let stored: String = conn
                .query_row("SELECT typeof(n) FROM t", [], |r| r.get(0))
                .expect("typeof");
            if stored != "text" {
                assert!(might_be_numeric(text), "SQLite reads {text:?} as {stored}");
            }
        }
        for text in ["02134", "+1", " 1", "1e3"] {
            assert!(might_be_numeric(text), "{text}");
        }
        for text in ["0x2A", "1_000", "abc", "1 2", "inf", "", "e5", ".", "1..2"] {
            assert!(!might_be_numeric(text), "{text}");
        }
    }

    #[test]
    fn affinity_follows_the_declared_type() {
        for (declared, affinity) in [
            ("INTEGER", Affinity::Integer),
            ("BIGINT", Affinity::Integer),
            ("VARCHAR(10)", Affinity::Text),
            ("CLOB", Affinity::Text),
            ("BLOB", Affinity::Blob),
            ("", Affinity::Blob),
            ("DOUBLE PRECISION", Affinity::Real),
            ("DECIMAL(10,5)", Affinity::Numeric),
            ("ANY", Affinity::Numeric),
        ] {
            assert_eq!(Affinity::of_declared_type(declared), affinity, "{declared}");
        }
    }
}
