//! A query read as *scopes*: the top SELECT and each subquery of a scope's expressions
//! (a scalar subquery, `EXISTS`, `IN (SELECT ...)`), each with its tables (under aliases made
//! unique across scopes: `r`, `r#1`) and the equalities known to hold for the rows that matter.
//!
//! Which rows matter, and why the equalities are known there: a row of a scope's table changes
//! a key's value only through the rows it is in, and those pass the scope's WHERE and inner join
//! conditions (their equalities joined by AND at the top), and their LEFT JOIN condition where
//! that table's row is not NULL. A subquery is evaluated for rows of the scopes around it; a row
//! of those that fails one of their own equalities is not in the result, whatever the subquery
//! answers. So a subquery's rows that matter satisfy its own equalities and, for the outer rows
//! they are compared with, the outer scope's: the closure `known_for` takes. A non-negated
//! `x IN (SELECT c ...)` joined by AND to a WHERE or ON adds `c = x` to the subquery (only rows
//! whose `c` equals `x` decide whether that row passes; a NULL `c` makes the IN NULL instead of
//! false, which excludes the row all the same). Anything else (a derived table, a CTE, a UNION,
//! a subquery elsewhere) is no scope: its tables are tied nowhere, and their changes drop the
//! family.

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Expr, InTarget, JoinConstraint, JoinOperator, ObjectName, ObjectNamePart,
    Query, Select, SelectItem, SetExpr, TableFactor, Value, Visit, Visitor,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Node {
    Column(String, String),
    Param(String),
}

/// Union-find over columns and parameters that the query's equalities make equal.
#[derive(Default, Clone)]
pub(super) struct Ties {
    pub(super) parent: HashMap<Node, Node>,
}

impl Ties {
    pub(super) fn find(&self, node: &Node) -> Node {
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

pub(super) fn last_part(name: &ObjectName) -> Option<String> {
    match name.0.last()? {
        ObjectNamePart::Identifier(ident) => Some(ident.value.to_lowercase()),
        ObjectNamePart::Function(_) => None,
    }
}

/// One SELECT whose rows are tied.
#[derive(Default)]
struct Scope {
    /// Unique alias → table.
    relations: Vec<(String, String)>,
    global: Vec<(Node, Node)>,
    left_joined: HashMap<String, Vec<(Node, Node)>>,
}

/// The query's scopes.
pub(super) struct Scopes {
    scopes: Vec<Scope>,
    /// Only inner, cross and LEFT joins in every scope (a RIGHT or FULL join makes the left
    /// side's rows optional): lookups are derived only then.
    pub(super) plain_joins: bool,
}

/// Stands among a scope's names for a FROM item whose names are not read: a qualified name not
/// found in that scope is then not looked for outside it (it may be that item's).
const UNKNOWN: &str = "*";

/// The names a scope's expressions see: per scope, innermost last, each alias with its unique
/// name (None: a derived table or a CTE, whose columns tie nothing).
type Visible = Vec<Vec<(String, Option<String>)>>;

impl Scopes {
    pub(super) fn read(query: &Query, ctes: &[String]) -> Scopes {
        let mut scopes = Scopes {
            scopes: Vec::new(),
            plain_joins: true,
        };
        if let SetExpr::Select(select) = query.body.as_ref() {
            scopes.select(select, &Vec::new(), None, ctes);
        }
        scopes
    }

    /// Every table of every scope, as (unique alias, table), in the query's order.
    pub(super) fn relations(&self) -> Vec<(String, String)> {
        self.scopes
            .iter()
            .flat_map(|s| s.relations.iter().cloned())
            .collect()
    }

    /// The equalities known to hold wherever a row of `alias` matters: its scope's, its own
    /// LEFT JOIN condition's, and, closing over them, those of every alias they make not NULL
    /// (a column equal to something is not NULL), the outer scopes' included.
    pub(super) fn known_for(&self, alias: &str) -> Ties {
        let mut pairs: Vec<&(Node, Node)> = Vec::new();
        let mut scopes_added: Vec<usize> = Vec::new();
        let mut added: Vec<String> = Vec::new();
        let mut not_null: Vec<String> = vec![alias.to_owned()];
        while let Some(next) = not_null.iter().find(|a| !added.contains(a)).cloned() {
            added.push(next.clone());
            let Some(index) = self.scope_of(&next) else {
                continue;
            };
            if !scopes_added.contains(&index) {
                scopes_added.push(index);
                pairs.extend(&self.scopes[index].global);
            }
            pairs.extend(
                self.scopes[index]
                    .left_joined
                    .get(&next)
                    .into_iter()
                    .flatten(),
            );
            for node in pairs.iter().flat_map(|(a, b)| [a, b]) {
                if let Node::Column(other, _) = node
                    && !not_null.contains(other)
                {
                    not_null.push(other.clone());
                }
            }
        }
        let mut ties = Ties::default();
        for (a, b) in pairs {
            ties.union(a.clone(), b.clone());
        }
        ties
    }

    fn scope_of(&self, alias: &str) -> Option<usize> {
        self.scopes
            .iter()
            .position(|s| s.relations.iter().any(|(a, _)| a == alias))
    }

    /// Reads `select` as a new scope inside `outer`; `tied_to`: the node a non-negated
    /// AND-joined `IN` compares its one result column with.
    fn select(&mut self, select: &Select, outer: &Visible, tied_to: Option<Node>, ctes: &[String]) {
        let index = self.scopes.len();
        self.scopes.push(Scope::default());
        let mut names: Vec<(String, Option<String>)> = Vec::new();
        let mut relation = |factor: &TableFactor, scopes: &mut Scopes| -> Option<String> {
            let (alias, table) = match factor {
                TableFactor::Table { name, alias, .. } => {
                    let table = last_part(name)?;
                    let alias = alias
                        .as_ref()
                        .map_or_else(|| table.clone(), |a| a.name.value.to_lowercase());
                    (alias, Some(table).filter(|t| !ctes.contains(t)))
                }
                TableFactor::Derived { alias, .. } => {
                    (alias.as_ref()?.name.value.to_lowercase(), None)
                }
                // A table function, a nested join, ...: names of its own that this reading does
                // not know; none of the scope's names may be taken for an outer one.
                _ => {
                    names.push((UNKNOWN.to_owned(), None));
                    return None;
                }
            };
            let unique = table.map(|table| {
                let unique = if index == 0 {
                    alias.clone()
                } else {
                    format!("{alias}#{index}")
                };
                scopes.scopes[index].relations.push((unique.clone(), table));
                unique
            });
            names.push((alias, unique.clone()));
            unique
        };
        let mut inner: Vec<&Expr> = Vec::new();
        let mut left: Vec<(&Expr, String)> = Vec::new();
        for from in &select.from {
            relation(&from.relation, self);
            for join in &from.joins {
                let joined = relation(&join.relation, self);
                match &join.join_operator {
                    JoinOperator::Join(JoinConstraint::On(on))
                    | JoinOperator::Inner(JoinConstraint::On(on)) => inner.push(on),
                    JoinOperator::Left(JoinConstraint::On(on))
                    | JoinOperator::LeftOuter(JoinConstraint::On(on)) => {
                        if let Some(alias) = joined {
                            left.push((on, alias));
                        }
                    }
                    JoinOperator::Join(_)
                    | JoinOperator::Inner(_)
                    | JoinOperator::Left(_)
                    | JoinOperator::LeftOuter(_)
                    | JoinOperator::CrossJoin(_) => {}
                    _ => self.plain_joins = false,
                }
            }
        }
        let mut visible = outer.clone();
        visible.push(names);
        let mut ins = Vec::new();
        inner.extend(&select.selection);
        for condition in &inner {
            let mut pairs = Vec::new();
            equalities(condition, &visible, &mut pairs, &mut ins);
            self.scopes[index].global.extend(pairs);
        }
        for (condition, alias) in &left {
            let mut pairs = Vec::new();
            equalities(condition, &visible, &mut pairs, &mut ins);
            let known = self.scopes[index].left_joined.entry(alias.clone());
            known.or_default().extend(pairs);
        }
        if let (Some(outer_node), [item]) = (tied_to, select.projection.as_slice()) {
            let expr = match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
                _ => None,
            };
            if let Some(column) = expr.and_then(|e| node(e, &visible)) {
                self.scopes[index].global.push((outer_node, column));
            }
        }
        self.subqueries(select, &inner, &left, &visible, &ins, ctes);
    }

    /// Reads each subquery of `select`'s expressions (not nested ones: each scope reads its
    /// own) as a scope; `ins`: the AND-joined `IN`s, by their subquery's address.
    fn subqueries(
        &mut self,
        select: &Select,
        inner: &[&Expr],
        left: &[(&Expr, String)],
        visible: &Visible,
        ins: &[(*const Query, Node)],
        ctes: &[String],
    ) {
        let mut found = Subqueries::default();
        let _ = select.projection.visit(&mut found);
        let _ = select.having.visit(&mut found);
        for condition in inner.iter().copied().chain(left.iter().map(|(c, _)| *c)) {
            let _ = condition.visit(&mut found);
        }
        for (address, query) in found.found {
            let SetExpr::Select(inner) = query.body.as_ref() else {
                continue;
            };
            if query.with.is_some() {
                continue;
            }
            let tied_to = ins
                .iter()
                .find(|(a, _)| std::ptr::eq(*a, address))
                .map(|(_, n)| n.clone());
            self.select(inner, visible, tied_to, ctes);
        }
    }
}

/// The subqueries met first while visiting some expressions (those inside them are left to
/// their own scope), with their address, to match them with an `IN`.
#[derive(Default)]
struct Subqueries {
    depth: usize,
    found: Vec<(*const Query, Query)>,
}

impl Visitor for Subqueries {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if self.depth == 0 {
            self.found.push((std::ptr::from_ref(query), query.clone()));
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }
}

/// The equalities joined by AND at the top of `expr`, and its non-negated `IN (SELECT ...)`s.
fn equalities(
    expr: &Expr,
    visible: &Visible,
    pairs: &mut Vec<(Node, Node)>,
    ins: &mut Vec<(*const Query, Node)>,
) {
    match expr {
        Expr::Nested(inner) => equalities(inner, visible, pairs, ins),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            equalities(left, visible, pairs, ins);
            equalities(right, visible, pairs, ins);
        }
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => {
            if let (Some(a), Some(b)) = (node(left, visible), node(right, visible)) {
                pairs.push((a, b));
            }
        }
        Expr::In {
            expr,
            target: InTarget::Subquery(query),
            negated: false,
            ..
        } => {
            if let Some(node) = node(expr, visible) {
                ins.push((std::ptr::from_ref(query.as_ref()), node));
            }
        }
        _ => {}
    }
}

/// A column (resolved as SQLite does: the innermost scope naming its alias; an unqualified
/// name, the innermost scope's only table) or a placeholder.
fn node(expr: &Expr, visible: &Visible) -> Option<Node> {
    match expr {
        Expr::Nested(inner) => node(inner, visible),
        Expr::Identifier(column) => match visible.last()?.as_slice() {
            [(_, Some(unique))] => Some(Node::Column(unique.clone(), column.value.to_lowercase())),
            _ => None,
        },
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [alias, column] => {
                let alias = alias.value.to_lowercase();
                let unique = visible.iter().rev().find_map(|names| {
                    let exact = names.iter().find(|(a, _)| *a == alias);
                    exact.or_else(|| names.iter().find(|(a, _)| a == UNKNOWN))
                })?;
                let unique = unique.1.clone()?;
                Some(Node::Column(unique, column.value.to_lowercase()))
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
