//! `invalidate = "auto"`: rules derived from a family's query, so nobody has to write them.
//!
//! Every table the query reads gets a rule. Where the query ties each placeholder of the pattern
//! to a column of that table — directly (`WHERE r.book_id = :id`) or through equi-joins
//! (`b.id = :id ... r.book_id = b.id`) — the rule names just the matching key
//! (`book:{book_id}`); otherwise it drops the whole family (through a tag its values carry).
//!
//! A tie is taken only where it is sound, i.e. where a row of the table that fails it cannot
//! change the result: equalities joined by AND at the top of the WHERE clause and of inner join
//! conditions, and of a LEFT JOIN's condition for a row of the joined table (which is in a
//! result row only where its condition held; and a column equal to another is not NULL, so the
//! other column's table is in that result row too, with its own LEFT JOIN condition held); in a
//! plain SELECT (no UNION). A correlated subquery (scalar, `EXISTS`, `IN (SELECT ...)`) is read
//! the same way, its equalities joined to the outer ones it is compared with (`scopes.rs` says
//! why that is sound). Anything else drops the family: too much, never too little.
//!
//! Where a one-placeholder pattern's placeholder is tied to a column of another table that the
//! changed table reaches through a chain of such equalities (reviews → `books.id =
//! reviews.book_id` → `books.author_id = :id`), the rule carries a *lookup* instead: a small
//! query over the chain's tables, run at apply time with the changed rows' values bound, that
//! finds the keys they reach (`SELECT DISTINCT b.id, b.author_id FROM books b WHERE b.id IN
//! (...)`). Each chain is its first hop followed by the next table's own reach (its direct tie
//! or its lookup), so every table on a chain carries, in its own rule, the rest of that chain:
//! what the soundness argument in ARCHITECTURE.md relies on.

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{Statement, visit_relations};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;

use super::template::{Template, escape_braces};

mod scopes;

use scopes::{Node, Scopes, Ties, last_part};

/// One derived rule: a change to `table` invalidates `keys` (templates over its columns) and the
/// keys its `lookups` find, or, when `flush`, the whole family.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    pub table: String,
    pub keys: Vec<String>,
    pub lookups: Vec<Lookup>,
    pub flush: bool,
    /// The column pairs its direct keys rely on: the key is rendered from the changed table's
    /// column, while the query compares the placeholder with the other; only where the two
    /// compare values alike (the same affinity and collation, which only the schema tells) is
    /// the rendered key the one a reader's value is cached under.
    pub alike: Vec<[(String, String); 2]>,
}

/// The keys a changed row reaches through other tables: `sql` followed by a list of bound
/// values (`?, ?, ...)`) selects, for those values of the changed table's `input` column, the
/// distinct values of the pattern's one placeholder, `param` (its second column).
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    pub input: String,
    pub param: String,
    /// `SELECT DISTINCT "b"."id", "b"."author_id" FROM "books" AS "b" WHERE "b"."id" IN (`.
    pub sql: String,
    /// The tables the lookup reads (the chain), lowercase.
    pub tables: Vec<String>,
    /// For people: `books.author_id where books.id = reviews.book_id`.
    pub via: String,
    /// The column equalities the lookup relies on, as `(table, column)` pairs, the changed
    /// table's first: the lookup finds what the query joins only where each pair compares its
    /// values alike (the same affinity and collation), which only the schema tells.
    pub equal: Vec<[(String, String); 2]>,
}

/// One step of a chain: the table (under its alias in the query) entered by `input`, left by
/// `output` (the next step's tie, or the placeholder's column on the last step).
#[derive(Debug, Clone, PartialEq)]
struct Hop {
    alias: String,
    table: String,
    input: String,
    output: String,
}

/// How an alias reaches the one placeholder: a column tied to it, or a column tied to the next
/// table of a chain.
#[derive(Debug, Clone, PartialEq)]
enum Reach {
    Direct(String),
    Via { column: String, hops: Vec<Hop> },
}

/// The tag an auto family's values carry, so that a rule can drop them all (a template text:
/// braces escaped).
pub fn family_tag(pattern: &str) -> String {
    escape_braces(&format!("auto:{pattern}"))
}

/// The rules `query` implies for the family `pattern`.
pub fn derive(pattern: &Template, query: &str) -> Result<Vec<Derived>, String> {
    let statements = Parser::parse_sql(&SQLiteDialect {}, query).map_err(|e| e.to_string())?;
    let [Statement::Query(query)] = statements.as_slice() else {
        return Err("the query must be one SELECT".to_owned());
    };
    let ctes: Vec<String> = query
        .with
        .as_ref()
        .map(|with| {
            with.cte_tables
                .iter()
                .map(|cte| cte.alias.name.value.to_lowercase())
                .collect()
        })
        .unwrap_or_default();
    // Every table read, with how many times it is named anywhere (subqueries included).
    let mut tables: Vec<(String, usize)> = Vec::new();
    let _ = visit_relations(query.as_ref(), |name| {
        if let Some(table) = last_part(name)
            && !ctes.contains(&table)
        {
            match tables.iter_mut().find(|(t, _)| *t == table) {
                Some((_, named)) => *named += 1,
                None => tables.push((table, 1)),
            }
        }
        ControlFlow::<()>::Continue(())
    });
    tables.sort();
    let scopes = Scopes::read(query, &ctes);
    let relations = scopes.relations();
    let params = pattern.params();
    let ties: HashMap<String, Ties> = relations
        .iter()
        .map(|(alias, _)| (alias.clone(), scopes.known_for(alias)))
        .collect();
    let reaches = match params.as_slice() {
        [param] if scopes.plain_joins => reaches(&relations, &ties, param),
        _ => HashMap::new(),
    };
    let mut derived = Vec::new();
    for (table, named) in tables {
        let aliases: Vec<&String> = relations
            .iter()
            .filter(|(_, t)| *t == table)
            .map(|(alias, _)| alias)
            .collect();
        let mut rule = Derived {
            table: table.clone(),
            keys: Vec::new(),
            lookups: Vec::new(),
            flush: false,
            alike: Vec::new(),
        };
        if params.is_empty() {
            // One key, the pattern itself: naming it is exact.
            rule.keys.push(escape_braces(pattern.source()));
            derived.push(rule);
            continue;
        }
        // A table also read in a subquery is not tied there: its changes drop the family.
        let mut tied = !aliases.is_empty() && aliases.len() == named;
        for alias in &aliases {
            let Some(ties) = ties.get(*alias) else {
                tied = false;
                continue;
            };
            let direct = direct_key(pattern, ties, alias);
            match (direct, reaches.get(*alias)) {
                (Some(key), _) => {
                    if !rule.keys.contains(&key) {
                        rule.keys.push(key);
                    }
                    for pair in alike(&relations, ties, alias) {
                        if !rule.alike.contains(&pair) {
                            rule.alike.push(pair);
                        }
                    }
                }
                (None, Some(Reach::Via { column, hops })) => {
                    let lookup = lookup(&table, column, hops, params[0]);
                    if !rule.lookups.contains(&lookup) {
                        rule.lookups.push(lookup);
                    }
                }
                (None, _) => tied = false,
            }
        }
        if !tied {
            rule.keys.clear();
            rule.lookups.clear();
            rule.flush = true;
        }
        derived.push(rule);
    }
    Ok(derived)
}

/// The key template naming `alias`'s own columns where `ties` make each of them equal to a
/// placeholder, when every placeholder has one.
fn direct_key(pattern: &Template, ties: &Ties, alias: &str) -> Option<String> {
    let columns: Vec<String> = ties
        .parent
        .keys()
        .filter_map(|n| match n {
            Node::Column(a, c) if a == alias => Some(c.clone()),
            _ => None,
        })
        .collect();
    pattern.rename_params(|param| {
        let target = ties.find(&Node::Param(param.to_owned()));
        let mut tied: Vec<&String> = columns
            .iter()
            .filter(|c| ties.find(&Node::Column(alias.to_owned(), (*c).clone())) == target)
            .collect();
        tied.sort();
        tied.first().map(|c| (*c).clone())
    })
}

/// For a direct key of `alias`: each of its columns tied to a placeholder, paired with every
/// other table's column tied to the same placeholder.
fn alike(relations: &[(String, String)], ties: &Ties, alias: &str) -> Vec<[(String, String); 2]> {
    let table_of = |a: &str| {
        relations
            .iter()
            .find(|(x, _)| x == a)
            .map(|(_, t)| t.clone())
    };
    let Some(table) = table_of(alias) else {
        return Vec::new();
    };
    let params: Vec<Node> = ties
        .parent
        .keys()
        .filter(|n| matches!(n, Node::Param(_)))
        .map(|n| ties.find(n))
        .collect();
    let mut pairs = Vec::new();
    for column in columns_of(ties, alias) {
        let root = ties.find(&Node::Column(alias.to_owned(), column.clone()));
        if !params.contains(&root) {
            continue;
        }
        for node in ties.parent.keys() {
            if let Node::Column(other, other_column) = node
                && other != alias
                && ties.find(node) == root
                && let Some(other_table) = table_of(other)
            {
                let pair = [
                    (table.clone(), column.clone()),
                    (other_table, other_column.clone()),
                ];
                if !pairs.contains(&pair) {
                    pairs.push(pair);
                }
            }
        }
    }
    pairs.sort();
    pairs
}

/// How each alias reaches `param`: directly, or through a chain whose first hop is an equality
/// known for it and whose rest is the next alias's own reach (shortest first, then the
/// query's order of tables: the result does not depend on a hash order).
fn reaches(
    relations: &[(String, String)],
    ties: &HashMap<String, Ties>,
    param: &str,
) -> HashMap<String, Reach> {
    let target = Node::Param(param.to_owned());
    let mut reach: HashMap<String, Reach> = HashMap::new();
    for (alias, _) in relations {
        let Some(t) = ties.get(alias) else { continue };
        let root = t.find(&target);
        let mut columns = columns_of(t, alias);
        columns.retain(|c| t.find(&Node::Column(alias.clone(), c.clone())) == root);
        if let Some(column) = columns.first() {
            reach.insert(alias.clone(), Reach::Direct(column.clone()));
        }
    }
    for _ in 0..relations.len() {
        let known = reach.clone();
        for (alias, _) in relations {
            if known.contains_key(alias) {
                continue;
            }
            let Some(t) = ties.get(alias) else { continue };
            if let Some(found) = first_hop(relations, t, alias, &known) {
                reach.insert(alias.clone(), found);
            }
        }
        if reach.len() == known.len() {
            break;
        }
    }
    reach
}

/// The first equality (known for `alias`) from one of its columns to a column of an alias that
/// `known` already reaches, with that alias's reach after it.
fn first_hop(
    relations: &[(String, String)],
    ties: &Ties,
    alias: &str,
    known: &HashMap<String, Reach>,
) -> Option<Reach> {
    for column in columns_of(ties, alias) {
        let root = ties.find(&Node::Column(alias.to_owned(), column.clone()));
        for (next, table) in relations {
            let Some(rest) = known.get(next).filter(|_| next != alias) else {
                continue;
            };
            let Some(input) = columns_of(ties, next)
                .into_iter()
                .find(|c| ties.find(&Node::Column(next.clone(), c.clone())) == root)
            else {
                continue;
            };
            let (output, after) = match rest {
                Reach::Direct(c) => (c.clone(), Vec::new()),
                Reach::Via { column, hops } => (column.clone(), hops.clone()),
            };
            if after.iter().any(|h| h.alias == alias) {
                continue;
            }
            let mut hops = vec![Hop {
                alias: next.clone(),
                table: table.clone(),
                input,
                output,
            }];
            hops.extend(after);
            return Some(Reach::Via { column, hops });
        }
    }
    None
}

/// The columns of `alias` that `ties` mention, sorted.
fn columns_of(ties: &Ties, alias: &str) -> Vec<String> {
    let mut columns: Vec<String> = ties
        .parent
        .keys()
        .filter_map(|n| match n {
            Node::Column(a, c) if a == alias => Some(c.clone()),
            _ => None,
        })
        .collect();
    columns.sort();
    columns.dedup();
    columns
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The lookup for a change to `table` whose `column` enters the chain `hops`.
fn lookup(table: &str, column: &str, hops: &[Hop], param: &str) -> Lookup {
    let col = |hop: &Hop, c: &str| format!("{}.{}", quoted(&hop.alias), quoted(c));
    let (first, last) = (&hops[0], &hops[hops.len() - 1]);
    let mut sql = format!(
        "SELECT DISTINCT {}, {} FROM {} AS {}",
        col(first, &first.input),
        col(last, &last.output),
        quoted(&first.table),
        quoted(&first.alias)
    );
    let mut wheres = vec![format!(
        "{}.{} = {table}.{column}",
        first.table, first.input
    )];
    let mut equal = vec![[
        (table.to_owned(), column.to_owned()),
        (first.table.clone(), first.input.clone()),
    ]];
    for pair in hops.windows(2) {
        let (from, to) = (&pair[0], &pair[1]);
        sql.push_str(&format!(
            " JOIN {} AS {} ON {} = {}",
            quoted(&to.table),
            quoted(&to.alias),
            col(to, &to.input),
            col(from, &from.output)
        ));
        wheres.push(format!(
            "{}.{} = {}.{}",
            to.table, to.input, from.table, from.output
        ));
        equal.push([
            (from.table.clone(), from.output.clone()),
            (to.table.clone(), to.input.clone()),
        ]);
    }
    sql.push_str(&format!(" WHERE {} IN (", col(first, &first.input)));
    wheres.reverse();
    Lookup {
        input: column.to_owned(),
        param: param.to_owned(),
        sql,
        tables: hops.iter().map(|h| h.table.clone()).collect(),
        via: format!("{}.{} where {}", last.table, last.output, wheres.join(", ")),
        equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derived(pattern: &str, query: &str) -> Vec<(String, Vec<String>, bool)> {
        let pattern = Template::parse(pattern, false).expect("pattern");
        derive(&pattern, query)
            .expect("derived")
            .into_iter()
            .map(|d| (d.table, d.keys, d.flush))
            .collect()
    }

    fn key(table: &str, key: &str) -> (String, Vec<String>, bool) {
        (table.to_owned(), vec![key.to_owned()], false)
    }

    fn flush(table: &str) -> (String, Vec<String>, bool) {
        (table.to_owned(), Vec::new(), true)
    }

    #[test]
    fn a_direct_tie_names_the_key() {
        assert_eq!(
            derived(
                "book:{id}:reviews",
                "SELECT id, rating FROM reviews WHERE book_id = :id ORDER BY id DESC LIMIT 20"
            ),
            [key("reviews", "book:{book_id}:reviews")]
        );
    }

    #[test]
    fn an_equi_join_carries_the_tie() {
        assert_eq!(
            derived(
                "book:{id}",
                "SELECT b.id, count(r.id) FROM books b LEFT JOIN reviews r ON r.book_id = b.id WHERE b.id = :id GROUP BY b.id"
            ),
            [key("books", "book:{id}"), key("reviews", "book:{book_id}")]
        );
        assert_eq!(
            derived(
                "book:{id}",
                "SELECT b.id FROM books AS b JOIN reviews AS r ON r.book_id = b.id JOIN users u ON u.id = r.user_id WHERE b.id = :id"
            ),
            [
                key("books", "book:{id}"),
                key("reviews", "book:{book_id}"),
                // A user's reviews name the books: a lookup.
                ("users".to_owned(), Vec::new(), false)
            ]
        );
    }

    #[test]
    fn anything_unsound_drops_the_family() {
        // OR: the equality does not restrict the rows.
        assert_eq!(
            derived(
                "book:{id}",
                "SELECT id FROM books WHERE id = :id OR year > 2000"
            ),
            [flush("books")]
        );
        // A LEFT JOIN condition does not filter the left table (every book is listed), though
        // it does the joined one.
        assert_eq!(
            derived(
                "book:{id}",
                "SELECT b.id FROM books b LEFT JOIN reviews r ON r.book_id = b.id AND b.id = :id"
            ),
            [flush("books"), key("reviews", "book:{book_id}")]
        );
        assert_eq!(
            derived(
                "book:{id}",
                "SELECT b.id FROM books b LEFT JOIN reviews r ON r.book_id = b.id AND r.book_id = :id"
            ),
            [flush("books"), key("reviews", "book:{book_id}")]
        );
        // A subquery that is not correlated: every row counts for every key.
        assert_eq!(
            derived(
                "user:{id}",
                "SELECT u.id, (SELECT count(*) FROM reviews) AS n FROM users u WHERE u.id = :id"
            ),
            [flush("reviews"), key("users", "user:{id}")]
        );
    }

    #[test]
    fn a_correlated_subquery_carries_the_tie() {
        let user = |query: &str| derived("user:{id}", query);
        let tied = [key("reviews", "user:{user_id}"), key("users", "user:{id}")];
        // A scalar subquery, an unqualified column being its own table's.
        assert_eq!(
            user(
                "SELECT u.id, (SELECT count(*) FROM reviews WHERE user_id = u.id) AS n FROM users u WHERE u.id = :id"
            ),
            tied
        );
        // EXISTS and NOT EXISTS, beside other conditions.
        for exists in ["EXISTS", "NOT EXISTS"] {
            assert_eq!(
                user(&format!(
                    "SELECT u.id FROM users u WHERE u.id = :id AND {exists} (SELECT 1 FROM reviews r WHERE r.rating = 5 AND r.user_id = u.id)"
                )),
                tied,
                "{exists}"
            );
        }
        // IN (SELECT ...) joined by AND: its column is compared with the outer one.
        assert_eq!(
            user(
                "SELECT u.id FROM users u WHERE u.id = :id AND u.id IN (SELECT r.user_id FROM reviews r WHERE r.rating = 5)"
            ),
            tied
        );
        // Under an OR too: the subquery's own condition picks the rows that count.
        assert_eq!(
            user(
                "SELECT u.id FROM users u WHERE u.id = :id AND (u.id = 1 OR EXISTS (SELECT 1 FROM reviews r WHERE r.user_id = u.id))"
            ),
            tied
        );
        // The same name inside and outside: the inner one is the subquery's own.
        assert_eq!(
            derived(
                "book:{id}",
                "SELECT r.id, (SELECT count(*) FROM reviews r WHERE r.user_id = 3) FROM reviews r WHERE r.book_id = :id"
            ),
            [flush("reviews")]
        );
        // A nested join inside may name a `b` of its own: not taken for the outer `b`.
        assert_eq!(
            derived(
                "book:{id}",
                "SELECT b.id, (SELECT count(*) FROM reviews rv, (users x JOIN json_each('[1, 2]') AS b ON 1) WHERE rv.book_id = b.id) FROM books b WHERE b.id = :id"
            ),
            [
                key("books", "book:{id}"),
                flush("json_each"),
                flush("reviews"),
                flush("users")
            ]
        );
        // Nested: the inner subquery reaches the placeholder through both scopes.
        assert_eq!(
            user(
                "SELECT u.id FROM users u WHERE u.id = :id AND EXISTS (SELECT 1 FROM books b WHERE b.id = 1 AND EXISTS (SELECT 1 FROM reviews r WHERE r.book_id = b.id AND r.user_id = u.id))"
            ),
            [
                flush("books"),
                key("reviews", "user:{user_id}"),
                key("users", "user:{id}")
            ]
        );
    }

    #[test]
    fn a_subquery_not_tied_drops_the_family() {
        let user = |query: &str| derived("user:{id}", query);
        let untied = [flush("reviews"), key("users", "user:{id}")];
        for query in [
            // NOT IN: a NULL in the list changes every row's answer.
            "SELECT u.id FROM users u WHERE u.id = :id AND u.id NOT IN (SELECT r.user_id FROM reviews r)",
            // IN answered as a value (0 or NULL), not as a filter.
            "SELECT u.id, u.id IN (SELECT r.user_id FROM reviews r) FROM users u WHERE u.id = :id",
            // Correlated by something else than an equality.
            "SELECT u.id, (SELECT count(*) FROM reviews r WHERE r.user_id > u.id) FROM users u WHERE u.id = :id",
            // A derived table, a UNION.
            "SELECT u.id, (SELECT count(*) FROM (SELECT * FROM reviews) r WHERE r.user_id = u.id) FROM users u WHERE u.id = :id",
            "SELECT u.id, (SELECT r.id FROM reviews r WHERE r.user_id = u.id UNION SELECT 1) FROM users u WHERE u.id = :id",
        ] {
            assert_eq!(user(query), untied, "{query}");
        }
        // The outer equality under an OR: nothing ties the outer row either.
        assert_eq!(
            user(
                "SELECT u.id FROM users u WHERE u.id = :id OR EXISTS (SELECT 1 FROM reviews r WHERE r.user_id = u.id)"
            ),
            [flush("reviews"), flush("users")]
        );
    }

    #[test]
    fn a_subquery_reaches_through_a_lookup() {
        let found = lookups(
            "author:{id}",
            "SELECT a.id, (SELECT count(*) FROM books b JOIN reviews r ON r.book_id = b.id WHERE b.author_id = a.id) FROM authors a WHERE a.id = :id",
        );
        assert_eq!(
            found[2],
            (
                "reviews".to_owned(),
                vec![(
                    "book_id".to_owned(),
                    r#"SELECT DISTINCT "b#1"."id", "b#1"."author_id" FROM "books" AS "b#1" WHERE "b#1"."id" IN ("#.to_owned(),
                    "books.author_id where books.id = reviews.book_id".to_owned()
                )]
            )
        );
        assert_eq!(
            derived(
                "author:{id}",
                "SELECT a.id, (SELECT count(*) FROM books b JOIN reviews r ON r.book_id = b.id WHERE b.author_id = a.id) FROM authors a WHERE a.id = :id"
            )[1],
            key("books", "author:{author_id}")
        );
    }

    /// Per table: each lookup's input column, SQL and description.
    type Found = Vec<(String, Vec<(String, String, String)>)>;

    fn lookups(pattern: &str, query: &str) -> Found {
        let pattern = Template::parse(pattern, false).expect("pattern");
        derive(&pattern, query)
            .expect("derived")
            .into_iter()
            .map(|d| {
                let found = d.lookups.into_iter().map(|l| (l.input, l.sql, l.via));
                (d.table, found.collect())
            })
            .collect()
    }

    const AUTHOR: &str = "SELECT a.id, count(r.id) FROM authors a LEFT JOIN books b ON b.author_id = a.id LEFT JOIN reviews r ON r.book_id = b.id WHERE a.id = :id GROUP BY a.id";

    #[test]
    fn a_chain_of_equi_joins_gives_a_lookup() {
        assert_eq!(
            derived("author:{id}", AUTHOR),
            [
                key("authors", "author:{id}"),
                key("books", "author:{author_id}"),
                ("reviews".to_owned(), Vec::new(), false)
            ]
        );
        let found = lookups("author:{id}", AUTHOR);
        assert_eq!(
            found[2].1,
            [(
                "book_id".to_owned(),
                r#"SELECT DISTINCT "b"."id", "b"."author_id" FROM "books" AS "b" WHERE "b"."id" IN ("#.to_owned(),
                "books.author_id where books.id = reviews.book_id".to_owned()
            )]
        );
        // Two hops: each is the next table's own reach.
        let found = lookups(
            "author:{id}",
            "SELECT a.id FROM authors a JOIN series s ON s.author_id = a.id JOIN books b ON b.series_id = s.id JOIN reviews r ON r.book_id = b.id WHERE a.id = :id",
        );
        assert_eq!(
            found[2],
            (
                "reviews".to_owned(),
                vec![(
                    "book_id".to_owned(),
                    r#"SELECT DISTINCT "b"."id", "s"."author_id" FROM "books" AS "b" JOIN "series" AS "s" ON "s"."id" = "b"."series_id" WHERE "b"."id" IN ("#.to_owned(),
                    "series.author_id where series.id = books.series_id, books.id = reviews.book_id".to_owned()
                )]
            )
        );
        assert_eq!(
            found[1].1[0].2,
            "series.author_id where series.id = books.series_id"
        );
    }

    #[test]
    fn no_lookup_where_the_chain_is_not_sound() {
        // The books' tie to the author sits in the reviews' LEFT JOIN condition: it holds only
        // where a review joined, so a book change drops the family; the reviews still look up.
        let found = derived(
            "author:{id}",
            "SELECT a.id FROM authors a LEFT JOIN books b ON 1 LEFT JOIN reviews r ON r.book_id = b.id AND b.author_id = a.id WHERE a.id = :id",
        );
        assert_eq!(found[1], flush("books"));
        // Two placeholders: no lookups.
        let found = derived(
            "author:{id}:{year}",
            "SELECT a.id FROM authors a JOIN books b ON b.author_id = a.id JOIN reviews r ON r.book_id = b.id WHERE a.id = :id AND b.year = :year",
        );
        assert_eq!(found[2], flush("reviews"));
        // A table also read in a subquery.
        let found = derived(
            "author:{id}",
            "SELECT a.id, (SELECT count(*) FROM reviews) FROM authors a JOIN books b ON b.author_id = a.id JOIN reviews r ON r.book_id = b.id WHERE a.id = :id",
        );
        assert_eq!(found[2], flush("reviews"));
        // A RIGHT join.
        let found = derived(
            "author:{id}",
            "SELECT a.id FROM authors a JOIN books b ON b.author_id = a.id RIGHT JOIN reviews r ON r.book_id = b.id WHERE a.id = :id",
        );
        assert_eq!(found[2], flush("reviews"));
    }

    #[test]
    fn a_pattern_without_placeholders_names_itself() {
        assert_eq!(
            derived(
                "top-books",
                "SELECT b.id FROM books b JOIN reviews r ON r.book_id = b.id GROUP BY b.id"
            ),
            [key("books", "top-books"), key("reviews", "top-books")]
        );
    }
}
