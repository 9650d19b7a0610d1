//! Reading a `GROUP BY` query into a plan: its relations, its group key columns, which tables'
//! changes name the groups they touch (through equalities that tie one of their columns to each
//! group key), its ORDER BY resolved to expressions, and the query re-run to fill the state
//! (result columns behind the group keys, ORDER BY values after them, no ORDER BY, no LIMIT).
//!
//! Everything here is syntax; what needs the schema (column affinities and collations, primary
//! keys) is checked when the state is built (`schema.rs`).

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, GroupByExpr, Ident, JoinConstraint, JoinOperator, LimitClause, ObjectName, OrderByKind,
    OrderBySort, Query, SelectItem, SetExpr, Value, Visit, Visitor,
};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;

use super::sql::*;

/// A column of one of the query's top-level relations.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Column {
    pub alias: String,
    pub table: String,
    pub column: String,
}

/// Where an ORDER BY term's collation comes from (SQLite's rules: an explicit `COLLATE`, else a
/// column's declared one, else BINARY).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Collation {
    Binary,
    Named(String),
    Of(Column),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct OrderTerm {
    pub collation: Collation,
    /// ` DESC`, ` ASC NULLS FIRST`, ...
    pub direction: String,
    pub nulls: bool,
}

/// How a change to one table names the groups it touches.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TableTrace {
    pub table: String,
    /// Per group key, the column of this table tied to it and the key's tie class (every column
    /// an equality makes equal to it, for the schema check). None: changes re-run everything.
    pub ties: Option<Vec<(String, Vec<Column>)>>,
    /// Every column of this table the query reads (an update that changes none of them changes
    /// nothing). None: not known (the table is read in a subquery, or the query has one).
    pub read: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Analysis {
    pub query: String,
    pub keys: Vec<Column>,
    pub items: usize,
    pub order: Vec<OrderTerm>,
    /// ` LIMIT 10 OFFSET 5` (or empty).
    pub limit: String,
    /// The re-run: group keys, result columns, ORDER BY values; no ORDER BY, no LIMIT.
    pub rerun: Box<Query>,
    pub traces: Vec<TableTrace>,
    /// Columns read outside aggregates: they must be one value per group (a column of a table
    /// whose primary key is a group key or whose INTEGER PRIMARY KEY is tied to one, or a key
    /// whose equal values are equal bytes).
    pub bare: Vec<Column>,
    /// Per group key, the INTEGER PRIMARY KEY candidates tied to it (for the bare columns).
    pub key_classes: Vec<Vec<Column>>,
}

/// Ok(None): no GROUP BY (not this shape).
pub(super) fn analyse(text: &str) -> Result<Option<Analysis>, String> {
    let query = parse(text)?;
    let SetExpr::Select(select) = query.body.as_ref() else {
        // A UNION of grouped queries is grouped, but not maintainable.
        return if text.to_lowercase().contains("group by") {
            Err("a compound SELECT (UNION, INTERSECT, EXCEPT) cannot be maintained".to_owned())
        } else {
            Ok(None)
        };
    };
    let group_by = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if !exprs.is_empty() => {
            if !modifiers.is_empty() {
                return Err("GROUP BY modifiers cannot be maintained".to_owned());
            }
            exprs
        }
        GroupByExpr::Expressions(..) => return Ok(None),
        GroupByExpr::All(_) => return Err("GROUP BY ALL cannot be maintained".to_owned()),
    };
    if query.with.is_some() {
        return Err("a query with a WITH clause cannot be maintained".to_owned());
    }
    if select.distinct.is_some() {
        return Err("SELECT DISTINCT with GROUP BY cannot be maintained".to_owned());
    }
    if query.fetch.is_some() || !query.locks.is_empty() {
        return Err("FETCH and locking clauses cannot be maintained".to_owned());
    }
    let (relations, conditions) = relations(select)?;
    let items = items(&select.projection)?;
    let keys = group_keys(group_by, &items, &relations)?;
    check_expressions(select, &items, &relations)?;
    let order = order_terms(&query, &items, &relations)?;
    check_total(&keys, &order, &relations)?;
    let limit = limit(&query)?;
    let (global, left) = ties(select, &conditions, &relations);
    for key in &keys {
        if relations.nullable(&key.alias) {
            return Err(format!(
                "GROUP BY {}.{}: a column of a LEFT JOINed table (its rows can all fall into a NULL group that no change names); group by the preserved table's column",
                key.alias, key.column
            ));
        }
    }
    let traces = traces(&query, &relations, &keys, &global, &left, select);
    if traces.iter().all(|t| t.ties.is_none()) {
        return Err(
            "no table's changes can be traced to the groups they touch: each GROUP BY column must be a column of a changed table, or tied to one by an `=` in WHERE or an ON".to_owned(),
        );
    }
    let bare = bare_columns(select, &items, &order, &keys, &relations)?;
    let key_classes = keys.iter().map(|k| global.class(k)).collect();
    let rerun = rerun(&query, &keys, &order)?;
    Ok(Some(Analysis {
        query: text.to_owned(),
        keys,
        items: items.len(),
        order: order.into_iter().map(|(term, _)| term).collect(),
        limit,
        rerun,
        traces,
        bare,
        key_classes,
    }))
}

/// The result columns: (expression, alias).
fn items(projection: &[SelectItem]) -> Result<Vec<(Expr, Option<String>)>, String> {
    projection
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(expr) => Ok((expr.clone(), None)),
            SelectItem::ExprWithAlias { expr, alias } => {
                Ok((expr.clone(), Some(alias.value.to_lowercase())))
            }
            _ => Err(format!(
                "`{item}`: list the result columns (a `*` cannot be maintained)"
            )),
        })
        .collect()
}

/// A result column by position (`1`) or alias, as SQLite resolves ORDER BY / GROUP BY terms.
fn resolve<'i>(
    expr: &Expr,
    items: &'i [(Expr, Option<String>)],
    by_alias: bool,
) -> Option<&'i Expr> {
    match expr {
        Expr::Value(value) => {
            if let Value::Number(n, _) = &value.value {
                let index: usize = n.parse().ok()?;
                return items.get(index.checked_sub(1)?).map(|(e, _)| e);
            }
            None
        }
        Expr::Identifier(ident) if by_alias => {
            let name = ident.value.to_lowercase();
            items
                .iter()
                .find(|(_, alias)| alias.as_deref() == Some(name.as_str()))
                .map(|(e, _)| e)
        }
        _ => None,
    }
}

fn group_keys(
    group_by: &[Expr],
    items: &[(Expr, Option<String>)],
    relations: &Relations,
) -> Result<Vec<Column>, String> {
    let mut keys = Vec::new();
    for expr in group_by {
        let resolved = match resolve(expr, items, false) {
            Some(item) => item,
            None => expr,
        };
        let key = match resolved {
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => column_of(resolved, relations),
            _ => None,
        };
        let Some(key) = key else {
            if let Expr::Identifier(ident) = resolved
                && relations.single().is_none()
            {
                return Err(format!(
                    "GROUP BY {ident}: qualify the column with its table's alias (`t.{ident}`) so its table is known"
                ));
            }
            return Err(format!(
                "GROUP BY {expr}: only plain columns can be group keys (group by the column, compute the expression in the result)"
            ));
        };
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Refusals over the result columns, WHERE and HAVING.
fn check_expressions(
    select: &sqlparser::ast::Select,
    items: &[(Expr, Option<String>)],
    relations: &Relations,
) -> Result<(), String> {
    let aliases: Vec<&str> = items.iter().filter_map(|(_, a)| a.as_deref()).collect();
    for (expr, _) in items {
        let found = scan(expr);
        if found.subquery {
            return Err(format!(
                "`{expr}`: a subquery in the result columns cannot be maintained (join its table instead)"
            ));
        }
        check_scan(&found, expr, relations, &[])?;
    }
    if let Some(having) = &select.having {
        let found = scan(having);
        if found.subquery {
            return Err("a subquery in HAVING cannot be maintained".to_owned());
        }
        check_scan(&found, having, relations, &aliases)?;
    }
    if let Some(selection) = &select.selection {
        let found = scan(selection);
        if found.aggregate {
            return Err("an aggregate in WHERE cannot be maintained".to_owned());
        }
        check_scan(&found, selection, relations, &aliases)?;
    }
    Ok(())
}

fn check_scan(
    found: &Scan,
    expr: &Expr,
    relations: &Relations,
    aliases: &[&str],
) -> Result<(), String> {
    if found.window {
        return Err(format!("`{expr}`: window functions cannot be maintained"));
    }
    if found.placeholder {
        return Err(format!(
            "`{expr}`: a GROUP BY query with placeholders is per key, not grouped"
        ));
    }
    if let Some(name) = &found.nondeterministic {
        return Err(format!(
            "`{name}()` gives another value on each run: such a query cannot be maintained"
        ));
    }
    if let Some(name) = &found.ordered {
        return Err(format!(
            "`{name}()` lists a group's rows in the order the engine reads them, which a re-run of some groups need not repeat: it cannot be maintained"
        ));
    }
    for (qualifier, column, _) in &found.columns {
        if qualifier.is_none() && aliases.contains(&column.as_str()) {
            continue;
        }
        relations.column(qualifier.as_deref(), column)?;
    }
    Ok(())
}

/// The ORDER BY terms with the expression each orders by (aliases and positions resolved).
fn order_terms(
    query: &Query,
    items: &[(Expr, Option<String>)],
    relations: &Relations,
) -> Result<Vec<(OrderTerm, Expr)>, String> {
    let Some(order_by) = &query.order_by else {
        return Err(
            "a GROUP BY query without ORDER BY lists its groups in the engine's order: add an ORDER BY that ends with every GROUP BY column".to_owned(),
        );
    };
    let OrderByKind::Expressions(exprs) = &order_by.kind else {
        return Err("ORDER BY ALL cannot be maintained".to_owned());
    };
    let mut terms = Vec::new();
    for term in exprs {
        if term.with_fill.is_some() {
            return Err("ORDER BY ... WITH FILL cannot be maintained".to_owned());
        }
        let (inner, explicit) = match &term.expr {
            Expr::Collate { expr, collation } => (expr.as_ref(), Some(collation.to_string())),
            other => (other, None),
        };
        // The value ordered by is the (aliased) expression's; the collation is kept on the
        // state's column.
        let expr = resolve(inner, items, true).unwrap_or(inner).clone();
        let found = scan(&expr);
        if found.subquery {
            return Err(format!(
                "ORDER BY {}: a subquery cannot be maintained",
                term.expr
            ));
        }
        check_scan(&found, &expr, relations, &[])?;
        let collation = match explicit {
            Some(name) => Collation::Named(name.trim_matches(['"', '`', '\'']).to_owned()),
            None => collation_of(&expr, relations)?,
        };
        let direction = match &term.options.sort {
            Some(OrderBySort::Asc) => " ASC",
            Some(OrderBySort::Desc) => " DESC",
            None => "",
            Some(OrderBySort::Using(_)) => {
                return Err("ORDER BY ... USING cannot be maintained".to_owned());
            }
        };
        let nulls = match term.options.nulls_first {
            Some(true) => " NULLS FIRST",
            Some(false) => " NULLS LAST",
            None => "",
        };
        let order = OrderTerm {
            collation,
            direction: format!("{direction}{nulls}"),
            nulls: term.options.nulls_first.is_some(),
        };
        terms.push((order, expr));
    }
    Ok(terms)
}

/// An ORDER BY expression's collation, as SQLite picks it: a column's declared one through
/// CAST and unary plus, BINARY for anything else (a COLLATE inside another expression is
/// refused rather than followed).
fn collation_of(expr: &Expr, relations: &Relations) -> Result<Collation, String> {
    match expr {
        Expr::Nested(inner) | Expr::Cast { expr: inner, .. } => collation_of(inner, relations),
        Expr::UnaryOp {
            op: sqlparser::ast::UnaryOperator::Plus,
            expr,
        } => collation_of(expr, relations),
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => column_of(expr, relations)
            .map(Collation::Of)
            .ok_or_else(|| format!("ORDER BY {expr}: unknown column")),
        Expr::Collate { collation, .. } => Ok(Collation::Named(
            collation
                .to_string()
                .trim_matches(['"', '`', '\''])
                .to_owned(),
        )),
        other => {
            if scan(other).collate {
                Err(format!(
                    "ORDER BY {other}: a COLLATE inside an expression cannot be maintained (put it on the whole term)"
                ))
            } else {
                Ok(Collation::Binary)
            }
        }
    }
}

/// The ORDER BY must include every group key (as itself, in its own collation), so that no two
/// groups tie and the order is the query's, not the engine's.
fn check_total(
    keys: &[Column],
    order: &[(OrderTerm, Expr)],
    relations: &Relations,
) -> Result<(), String> {
    for key in keys {
        let included = order.iter().any(|(term, expr)| {
            matches!(&term.collation, Collation::Of(c) if c == key)
                && column_of(expr, relations).as_ref() == Some(key)
        });
        if !included {
            return Err(format!(
                "ORDER BY must include every GROUP BY column (add `, {}.{}`) so the order is total: groups that tie would otherwise be listed in the engine's order",
                key.alias, key.column
            ));
        }
    }
    Ok(())
}

fn limit(query: &Query) -> Result<String, String> {
    let Some(clause) = &query.limit_clause else {
        return Ok(String::new());
    };
    let constant = |expr: &Expr| {
        let found = scan(expr);
        found.columns.is_empty() && !found.subquery && !found.placeholder
    };
    let ok = match clause {
        LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        } => {
            limit_by.is_empty()
                && limit.as_ref().is_none_or(constant)
                && offset.as_ref().is_none_or(|o| constant(&o.value))
        }
        LimitClause::OffsetCommaLimit { offset, limit } => constant(offset) && constant(limit),
    };
    if !ok {
        return Err(format!(
            "{}: LIMIT and OFFSET must be constants",
            clause.to_string().trim()
        ));
    }
    Ok(format!(" {}", clause.to_string().trim()))
}

/// The global ties (WHERE, inner ON) and each LEFT JOINed alias's own ON equalities.
fn ties(
    select: &sqlparser::ast::Select,
    conditions: &Conditions<'_>,
    relations: &Relations,
) -> (Ties, HashMap<String, Vec<(Column, Column)>>) {
    let mut global = Ties::default();
    let mut left: HashMap<String, Vec<(Column, Column)>> = HashMap::new();
    let mut inner: Vec<&Expr> = select.selection.iter().collect();
    for (condition, joined) in conditions {
        match joined {
            None => inner.push(condition),
            Some(alias) => {
                let mut pairs = Vec::new();
                equalities(condition, relations, &mut pairs);
                left.entry(alias.clone()).or_default().extend(pairs);
            }
        }
    }
    for condition in inner {
        let mut pairs = Vec::new();
        equalities(condition, relations, &mut pairs);
        for (a, b) in pairs {
            global.union(a, b);
        }
    }
    (global, left)
}

/// Per table the query reads: the columns that name the groups its changes touch, and the
/// columns it reads.
fn traces(
    query: &Query,
    relations: &Relations,
    keys: &[Column],
    global: &Ties,
    left: &HashMap<String, Vec<(Column, Column)>>,
    select: &sqlparser::ast::Select,
) -> Vec<TableTrace> {
    let mut all_tables: Vec<String> = Vec::new();
    let mut in_subqueries = false;
    let mut depth = 0usize;
    struct Tables<'a> {
        all: &'a mut Vec<String>,
        nested: &'a mut bool,
        depth: &'a mut usize,
        top: Vec<String>,
    }
    impl Visitor for Tables<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
            *self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
            *self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<()> {
            if let Some(table) = last_part(name) {
                if *self.depth > 1 {
                    *self.nested = true;
                    self.top.push(table.clone());
                }
                if !self.all.contains(&table) {
                    self.all.push(table);
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut visitor = Tables {
        all: &mut all_tables,
        nested: &mut in_subqueries,
        depth: &mut depth,
        top: Vec::new(),
    };
    let _ = query.visit(&mut visitor);
    let nested_tables = visitor.top;
    all_tables.sort();
    let read = read_columns(select, relations);
    let mut traces = Vec::new();
    for table in all_tables {
        let aliases: Vec<&String> = relations
            .list
            .iter()
            .filter(|(_, t, _)| *t == table)
            .map(|(a, _, _)| a)
            .collect();
        let ties = match aliases.as_slice() {
            [alias] if !nested_tables.contains(&table) => tie(alias, keys, global, left),
            _ => None,
        };
        let read = (!in_subqueries && aliases.len() == 1)
            .then(|| read.get(aliases[0].as_str()).cloned().unwrap_or_default());
        traces.push(TableTrace { table, ties, read });
    }
    traces
}

/// For each group key, the column of `alias` tied to it (with the key's tie class).
fn tie(
    alias: &str,
    keys: &[Column],
    global: &Ties,
    left: &HashMap<String, Vec<(Column, Column)>>,
) -> Option<Vec<(String, Vec<Column>)>> {
    let mut ties = global.clone();
    for (a, b) in left.get(alias).into_iter().flatten() {
        ties.union(a.clone(), b.clone());
    }
    keys.iter()
        .map(|key| {
            if key.alias == alias {
                return Some((key.column.clone(), ties.class(key)));
            }
            let class = ties.class(key);
            let column = class.iter().find(|c| c.alias == alias)?.column.clone();
            Some((column, class))
        })
        .collect()
}

/// Every column each alias's table is read at, at the top level.
fn read_columns(
    select: &sqlparser::ast::Select,
    relations: &Relations,
) -> HashMap<String, Vec<String>> {
    let mut read: HashMap<String, Vec<String>> = HashMap::new();
    let mut exprs: Vec<&Expr> = Vec::new();
    for item in &select.projection {
        if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = item {
            exprs.push(e);
        }
    }
    exprs.extend(select.selection.iter());
    exprs.extend(select.having.iter());
    if let GroupByExpr::Expressions(group, _) = &select.group_by {
        exprs.extend(group.iter());
    }
    for from in &select.from {
        for join in &from.joins {
            if let JoinOperator::Join(JoinConstraint::On(on))
            | JoinOperator::Inner(JoinConstraint::On(on))
            | JoinOperator::CrossJoin(JoinConstraint::On(on))
            | JoinOperator::Left(JoinConstraint::On(on))
            | JoinOperator::LeftOuter(JoinConstraint::On(on)) = &join.join_operator
            {
                exprs.push(on);
            }
        }
    }
    for expr in exprs {
        for (qualifier, column, _) in scan(expr).columns {
            if let Ok(c) = relations.column(qualifier.as_deref(), &column) {
                let columns = read.entry(c.alias).or_default();
                if !columns.contains(&c.column) {
                    columns.push(c.column);
                }
            }
        }
    }
    read
}

/// Columns read outside aggregates (result columns, HAVING, ORDER BY), group keys included: a
/// group's rows agree on a key only as its comparison does (5 and 5.0, 'A' and 'a' under
/// NOCASE), and SQLite shows the value of any one of them.
fn bare_columns(
    select: &sqlparser::ast::Select,
    items: &[(Expr, Option<String>)],
    order: &[(OrderTerm, Expr)],
    keys: &[Column],
    relations: &Relations,
) -> Result<Vec<Column>, String> {
    let aliases: Vec<&str> = items.iter().filter_map(|(_, a)| a.as_deref()).collect();
    let mut exprs: Vec<&Expr> = items.iter().map(|(e, _)| e).collect();
    exprs.extend(select.having.iter());
    // A group key ordered by as itself: the values of its rows compare equal, and order so.
    exprs.extend(
        order
            .iter()
            .map(|(_, e)| e)
            .filter(|e| column_of(e, relations).is_none_or(|c| !keys.contains(&c))),
    );
    let mut bare = Vec::new();
    for expr in exprs {
        for (qualifier, column, inside) in scan(expr).columns {
            if inside || (qualifier.is_none() && aliases.contains(&column.as_str())) {
                continue;
            }
            let column = relations.column(qualifier.as_deref(), &column)?;
            if !bare.contains(&column) {
                bare.push(column);
            }
        }
    }
    Ok(bare)
}

/// The re-run: SELECT group keys, result columns, ORDER BY values; GROUP BY positions and
/// aliases replaced by the columns (the result list grew in front); no ORDER BY, no LIMIT.
fn rerun(
    query: &Query,
    keys: &[Column],
    order: &[(OrderTerm, Expr)],
) -> Result<Box<Query>, String> {
    let mut rerun = Box::new(query.clone());
    rerun.order_by = None;
    rerun.limit_clause = None;
    let SetExpr::Select(select) = rerun.body.as_mut() else {
        return Err("the query must be one SELECT".to_owned());
    };
    let key_exprs: Vec<Expr> = keys.iter().map(column_expr).collect();
    let mut projection: Vec<SelectItem> = key_exprs
        .iter()
        .cloned()
        .map(SelectItem::UnnamedExpr)
        .collect();
    projection.extend(select.projection.iter().cloned());
    projection.extend(
        order
            .iter()
            .map(|(_, e)| SelectItem::UnnamedExpr(e.clone())),
    );
    select.projection = projection;
    select.group_by = GroupByExpr::Expressions(key_exprs, Vec::new());
    Ok(rerun)
}

pub(super) fn column_expr(column: &Column) -> Expr {
    Expr::CompoundIdentifier(vec![
        Ident::with_quote('"', column.alias.clone()),
        Ident::with_quote('"', column.column.clone()),
    ])
}

/// Parses an expression built from columns and placeholders only.
pub(super) fn expression(sql: &str) -> Result<Expr, String> {
    Parser::new(&SQLiteDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| e.to_string())
}
