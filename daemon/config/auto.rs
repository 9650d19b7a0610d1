//! `invalidate = "auto"`: rules derived from a family's query, so nobody has to write them.
//!
//! Every table the query reads gets a rule. Where the query ties each placeholder of the pattern
//! to a column of that table — directly (`WHERE r.book_id = :id`) or through equi-joins
//! (`b.id = :id ... r.book_id = b.id`) — the rule names just the matching key
//! (`book:{book_id}`); otherwise it drops the whole family (through a tag its values carry).
//!
//! A tie is taken only where it is sound, i.e. where a row of the table that fails it cannot
//! change the result: equalities joined by AND at the top of the WHERE clause and of inner join
//! conditions, and of a LEFT JOIN's condition when one side is a column of the joined table; in
//! a plain SELECT (no UNION), not inside subqueries. Anything else drops the family: too much,
//! never too little.

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Expr, JoinConstraint, JoinOperator, ObjectName, ObjectNamePart, Query, SetExpr,
    Statement, TableFactor, Value, visit_relations,
};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;

use super::template::{Template, escape_braces};

/// One derived rule: a change to `table` invalidates `keys` (templates over its columns), or,
/// when `flush`, the whole family.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    pub table: String,
    pub keys: Vec<String>,
    pub flush: bool,
}

/// The tag an auto family's values carry, so that a rule can drop them all (a template text:
/// braces escaped).
pub fn family_tag(pattern: &str) -> String {
    escape_braces(&format!("auto:{pattern}"))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Node {
    Column(String, String),
    Param(String),
}

/// Union-find over columns and parameters that the query's equalities make equal.
#[derive(Default, Clone)]
struct Ties {
    parent: HashMap<Node, Node>,
}

impl Ties {
    fn find(&self, node: &Node) -> Node {
        let mut current = node.clone();
        while let Some(parent) = self.parent.get(&current) {
            if *parent == current {
                break;
            }
            current = parent.clone();
        }
        current
    }

    fn union(&mut self, a: Node, b: Node) {
        let (ra, rb) = (self.find(&a), self.find(&b));
        self.parent.entry(a).or_insert_with(|| ra.clone());
        self.parent.entry(b).or_insert_with(|| rb.clone());
        if ra != rb {
            self.parent.insert(ra, rb);
        }
    }
}

fn last_part(name: &ObjectName) -> Option<String> {
    match name.0.last()? {
        ObjectNamePart::Identifier(ident) => Some(ident.value.to_lowercase()),
        ObjectNamePart::Function(_) => None,
    }
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
    let mut tables: Vec<String> = Vec::new();
    let _ = visit_relations(query.as_ref(), |name| {
        if let Some(table) = last_part(name)
            && !ctes.contains(&table)
            && !tables.contains(&table)
        {
            tables.push(table);
        }
        ControlFlow::<()>::Continue(())
    });
    tables.sort();
    let (relations, global, left_joined) = top_level_ties(query);
    let params = pattern.params();
    let mut derived = Vec::new();
    for table in tables {
        let aliases: Vec<&String> = relations
            .iter()
            .filter(|(_, t)| *t == table)
            .map(|(alias, _)| alias)
            .collect();
        let mut keys = Vec::new();
        let mut tied = !aliases.is_empty();
        for alias in &aliases {
            // A LEFT JOIN's own condition ties its joined table only.
            let mut ties = global.clone();
            for (a, b) in left_joined.get(*alias).into_iter().flatten() {
                ties.union(a.clone(), b.clone());
            }
            let columns: Vec<String> = ties
                .parent
                .keys()
                .filter_map(|n| match n {
                    Node::Column(a, c) if a == *alias => Some(c.clone()),
                    _ => None,
                })
                .collect();
            let key = pattern.rename_params(|param| {
                let target = ties.find(&Node::Param(param.to_owned()));
                columns
                    .iter()
                    .find(|c| ties.find(&Node::Column((*alias).clone(), (*c).clone())) == target)
                    .cloned()
            });
            match key {
                Some(key) if !keys.contains(&key) => keys.push(key),
                Some(_) => {}
                None => tied = false,
            }
        }
        if params.is_empty() {
            // One key, the pattern itself: naming it is exact.
            derived.push(Derived {
                table,
                keys: vec![escape_braces(pattern.source())],
                flush: false,
            });
        } else if tied {
            derived.push(Derived {
                table,
                keys,
                flush: false,
            });
        } else {
            derived.push(Derived {
                table,
                keys: Vec::new(),
                flush: true,
            });
        }
    }
    Ok(derived)
}

/// The top-level FROM relations (alias → table), the sound equalities among their columns and
/// the parameters (WHERE and inner joins), and, per LEFT-joined alias, its join condition's
/// equalities (which constrain that table's rows only).
#[allow(clippy::type_complexity)]
fn top_level_ties(
    query: &Query,
) -> (
    Vec<(String, String)>,
    Ties,
    HashMap<String, Vec<(Node, Node)>>,
) {
    let mut relations = Vec::new();
    let mut ties = Ties::default();
    let mut left_joined: HashMap<String, Vec<(Node, Node)>> = HashMap::new();
    let SetExpr::Select(select) = query.body.as_ref() else {
        return (relations, ties, left_joined);
    };
    let relation = |factor: &TableFactor| -> Option<(String, String)> {
        let TableFactor::Table { name, alias, .. } = factor else {
            return None;
        };
        let table = last_part(name)?;
        let alias = alias
            .as_ref()
            .map_or_else(|| table.clone(), |a| a.name.value.to_lowercase());
        Some((alias, table))
    };
    let mut inner: Vec<&Expr> = Vec::new();
    let mut left: Vec<(&Expr, String)> = Vec::new();
    for from in &select.from {
        relations.extend(relation(&from.relation));
        for join in &from.joins {
            let joined = relation(&join.relation);
            if let Some(joined) = &joined {
                relations.push(joined.clone());
            }
            match &join.join_operator {
                JoinOperator::Join(JoinConstraint::On(on))
                | JoinOperator::Inner(JoinConstraint::On(on)) => inner.push(on),
                JoinOperator::Left(JoinConstraint::On(on))
                | JoinOperator::LeftOuter(JoinConstraint::On(on)) => {
                    if let Some((alias, _)) = joined {
                        left.push((on, alias));
                    }
                }
                _ => {}
            }
        }
    }
    if let Some(selection) = &select.selection {
        inner.push(selection);
    }
    let single = (relations.len() == 1).then(|| relations[0].0.clone());
    for condition in inner {
        let mut pairs = Vec::new();
        equalities(condition, single.as_deref(), &relations, &mut pairs);
        for (a, b) in pairs {
            ties.union(a, b);
        }
    }
    for (condition, alias) in left {
        let mut pairs = Vec::new();
        equalities(condition, single.as_deref(), &relations, &mut pairs);
        left_joined.entry(alias).or_default().extend(pairs);
    }
    (relations, ties, left_joined)
}

/// The equalities joined by AND at the top of `expr`.
fn equalities(
    expr: &Expr,
    single: Option<&str>,
    relations: &[(String, String)],
    pairs: &mut Vec<(Node, Node)>,
) {
    match expr {
        Expr::Nested(inner) => equalities(inner, single, relations, pairs),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            equalities(left, single, relations, pairs);
            equalities(right, single, relations, pairs);
        }
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => {
            if let (Some(a), Some(b)) = (
                node(left, single, relations),
                node(right, single, relations),
            ) {
                pairs.push((a, b));
            }
        }
        _ => {}
    }
}

fn node(expr: &Expr, single: Option<&str>, relations: &[(String, String)]) -> Option<Node> {
    match expr {
        Expr::Nested(inner) => node(inner, single, relations),
        Expr::Identifier(column) => Some(Node::Column(
            single?.to_owned(),
            column.value.to_lowercase(),
        )),
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [alias, column] => {
                let alias = alias.value.to_lowercase();
                relations
                    .iter()
                    .any(|(a, _)| *a == alias)
                    .then(|| Node::Column(alias, column.value.to_lowercase()))
            }
            _ => None,
        },
        Expr::Value(value) => match &value.value {
            Value::Placeholder(name) => Some(Node::Param(
                name.trim_start_matches([':', '@', '$']).to_owned(),
            )),
            _ => None,
        },
        _ => None,
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
                flush("users")
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
        // A table read in a subquery only.
        assert_eq!(
            derived(
                "user:{id}",
                "SELECT u.id, (SELECT count(*) FROM reviews WHERE user_id = u.id) AS n FROM users u WHERE u.id = :id"
            ),
            [flush("reviews"), key("users", "user:{id}")]
        );
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
