//! Reading a query as whole-table aggregates: either one SELECT over one table whose result
//! columns are expressions over its aggregates, or a SELECT without FROM whose result columns are
//! expressions over scalar subqueries, each `(SELECT <expression over aggregates> FROM <table>)`.
//!
//! Each aggregate call becomes a numbered parameter (`round(avg(rating), 3)` → `round(?4, 3)`),
//! and a scalar subquery loses its FROM (`(SELECT round(?4, 3))`): the rewritten result columns
//! are evaluated by SQLite from the values the state keeps, exactly as the aggregates' results
//! would be.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Distinct, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident,
    ObjectName, ObjectNamePart, Query, Select, SelectItem, SetExpr, Statement, TableFactor,
    TableWithJoins, Value, Visit, VisitMut, Visitor, VisitorMut,
};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;

use super::{Aggregate, Func, MAX_AGGREGATES, Plan, ScopePlan, TablePlan};

/// Aggregates SQLite (and its bundled extensions) knows that this shape does not keep.
const OTHER_AGGREGATES: &[&str] = &[
    "group_concat",
    "string_agg",
    "json_group_array",
    "json_group_object",
    "jsonb_group_array",
    "jsonb_group_object",
    "median",
    "percentile",
    "percentile_cont",
    "percentile_disc",
];

pub(super) fn analyse(query: &str) -> Result<Option<Plan>, String> {
    let Ok(mut statements) = Parser::parse_sql(&SQLiteDialect {}, query) else {
        return Ok(None);
    };
    let [Statement::Query(top)] = statements.as_mut_slice() else {
        return Ok(None);
    };
    if !mentions_aggregate(top) || is_grouped(top) {
        return Ok(None);
    }
    refuse_placeholders(top)?;
    let mut plan = Builder::default();
    let select = plain_select(top, "the query")?;
    let items = match select.from.as_slice() {
        [] => side_by_side(select, &mut plan)?,
        [from] => {
            let table = plan.table(from)?;
            let items = aggregate_items(select, table, &mut plan)?;
            if plan.aggregates.is_empty() {
                return Err(
                    "no aggregate among the result columns: a whole-table aggregate \
                            query reads count(*), sum(col), ... of its table"
                        .to_owned(),
                );
            }
            items
        }
        _ => {
            return Err(
                "FROM names several tables: each whole-table aggregate reads one table \
                        (write each as a scalar subquery: SELECT (SELECT count(*) FROM a), \
                        (SELECT count(*) FROM b))"
                    .to_owned(),
            );
        }
    };
    if plan.aggregates.len() > MAX_AGGREGATES {
        return Err(format!(
            "more than {MAX_AGGREGATES} distinct aggregates in one query"
        ));
    }
    Ok(Some(Plan {
        query: query.to_owned(),
        tables: plan.tables,
        scopes: plan.scopes,
        aggregates: plan.aggregates,
        items,
    }))
}

/// The tables, SELECTs and aggregates found so far (each aggregate once per SELECT: its
/// parameter is its position).
#[derive(Default)]
struct Builder {
    tables: Vec<TablePlan>,
    scopes: Vec<ScopePlan>,
    aggregates: Vec<Aggregate>,
}

impl Builder {
    /// The table a FROM clause names (one plain table, no join), added once; a new SELECT
    /// reading it.
    fn table(&mut self, from: &TableWithJoins) -> Result<Scope, String> {
        if !from.joins.is_empty() {
            return Err("a join: each whole-table aggregate reads one table".to_owned());
        }
        let TableFactor::Table {
            name,
            alias,
            args,
            with_hints,
            ..
        } = &from.relation
        else {
            return Err(
                "FROM reads a subquery or a function: a whole-table aggregate reads \
                        one table"
                    .to_owned(),
            );
        };
        if args.is_some() || !with_hints.is_empty() {
            return Err(format!("FROM {name}: a table-valued function"));
        }
        let table = table_name(name)?;
        let lower = table.to_lowercase();
        let index = match self.tables.iter().position(|t| t.lower == lower) {
            Some(index) => index,
            None => {
                self.tables.push(TablePlan {
                    name: table.clone(),
                    lower: lower.clone(),
                    columns: Vec::new(),
                });
                self.tables.len() - 1
            }
        };
        // Once aliased, SQLite knows the table by its alias only.
        let qualifier = match alias {
            Some(alias) if !alias.columns.is_empty() => {
                return Err(format!("FROM {name}: an alias with column names"));
            }
            Some(alias) => alias.name.value.to_lowercase(),
            None => lower,
        };
        self.scopes.push(ScopePlan {
            from: from.to_string(),
            aggregates: Vec::new(),
        });
        Ok(Scope {
            table: index,
            qualifier,
            scope: self.scopes.len() - 1,
        })
    }

    /// The parameter number of an aggregate (1-based), added once per SELECT (`call`: as the
    /// query writes it).
    fn aggregate(
        &mut self,
        func: Func,
        source: &Scope,
        column: Option<&str>,
        call: String,
    ) -> usize {
        let table = source.table;
        let column = column.map(|name| {
            let columns = &mut self.tables[table].columns;
            match columns.iter().position(|c| c.eq_ignore_ascii_case(name)) {
                Some(index) => index,
                None => {
                    columns.push(name.to_owned());
                    columns.len() - 1
                }
            }
        });
        let same = |a: &Aggregate| {
            a.func == func && a.table == table && a.column == column && a.scope == source.scope
        };
        if let Some(index) = self.aggregates.iter().position(same) {
            return index + 1;
        }
        self.aggregates.push(Aggregate {
            func,
            table,
            column,
            scope: source.scope,
            call,
        });
        self.scopes[source.scope]
            .aggregates
            .push(self.aggregates.len() - 1);
        self.aggregates.len()
    }
}

/// One SELECT's table, the name its columns may be qualified with, and the SELECT's number.
struct Scope {
    table: usize,
    qualifier: String,
    scope: usize,
}

fn table_name(name: &ObjectName) -> Result<String, String> {
    let parts: Vec<&Ident> = name
        .0
        .iter()
        .filter_map(|part| match part {
            ObjectNamePart::Identifier(ident) => Some(ident),
            ObjectNamePart::Function(_) => None,
        })
        .collect();
    match parts.as_slice() {
        [table] => Ok(table.value.clone()),
        [schema, table] if schema.value.eq_ignore_ascii_case("main") => Ok(table.value.clone()),
        _ => Err(format!(
            "FROM {name}: a table of another schema (only the main database is captured)"
        )),
    }
}

/// Whether the query calls an aggregate anywhere (else it is not this shape).
fn mentions_aggregate(query: &Query) -> bool {
    struct Finder;
    impl Visitor for Finder {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            match expr {
                Expr::Function(f) if is_aggregate_name(f) || f.over.is_some() => {
                    ControlFlow::Break(())
                }
                _ => ControlFlow::Continue(()),
            }
        }
    }
    query.visit(&mut Finder).is_break()
}

/// A GROUP BY at the top: the grouped shape's, not this one.
fn is_grouped(query: &Query) -> bool {
    match query.body.as_ref() {
        SetExpr::Select(select) => has_group_by(select),
        _ => false,
    }
}

fn has_group_by(select: &Select) -> bool {
    match &select.group_by {
        GroupByExpr::All(_) => true,
        GroupByExpr::Expressions(exprs, _) => !exprs.is_empty(),
    }
}

fn refuse_placeholders(query: &Query) -> Result<(), String> {
    struct Finder;
    impl Visitor for Finder {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            match expr {
                Expr::Value(v) if matches!(v.value, Value::Placeholder(_)) => {
                    ControlFlow::Break(())
                }
                _ => ControlFlow::Continue(()),
            }
        }
    }
    if query.visit(&mut Finder).is_break() {
        return Err("a placeholder in a query whose key has no parameter".to_owned());
    }
    Ok(())
}

/// The query's one SELECT, with nothing this shape cannot follow (`what`: how the reason names
/// it).
fn plain_select<'q>(query: &'q mut Query, what: &str) -> Result<&'q mut Select, String> {
    if query.with.is_some() {
        return Err(format!("{what} has a WITH clause"));
    }
    if query.order_by.is_some() || query.limit_clause.is_some() || query.fetch.is_some() {
        return Err(format!(
            "{what} has ORDER BY, LIMIT or OFFSET: a whole-table aggregate is one row"
        ));
    }
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Err(format!("{what} is a compound SELECT (UNION, VALUES, ...)"));
    };
    let select = select.as_mut();
    let refusal = if select.distinct.is_some() {
        Some(match select.distinct {
            Some(Distinct::Distinct) => "SELECT DISTINCT",
            _ => "SELECT ALL/DISTINCT ON",
        })
    } else if select.selection.is_some() {
        Some(
            "WHERE (only whole-table aggregates are kept: a WHERE would need each changed row tested exactly as SQLite does)",
        )
    } else if has_group_by(select) {
        Some("GROUP BY")
    } else if select.having.is_some() {
        Some("HAVING")
    } else if !select.named_window.is_empty() || select.qualify.is_some() {
        Some("WINDOW")
    } else if select.top.is_some()
        || select.into.is_some()
        || select.prewhere.is_some()
        || !select.lateral_views.is_empty()
        || !select.connect_by.is_empty()
        || !select.cluster_by.is_empty()
        || !select.distribute_by.is_empty()
        || !select.sort_by.is_empty()
        || select.exclude.is_some()
    {
        Some("a clause SQLite does not have")
    } else {
        None
    };
    match refusal {
        Some(clause) => Err(format!("{what} has {clause}")),
        None => Ok(select),
    }
}

/// Rewrites the result columns of `SELECT <expressions over aggregates> FROM <table>`.
fn aggregate_items(
    select: &mut Select,
    scope: Scope,
    plan: &mut Builder,
) -> Result<Vec<String>, String> {
    let mut items = Vec::new();
    for item in &mut select.projection {
        let expr = item_expr(item)?;
        let mut rewriter = Aggregates::new(&scope, plan);
        if let ControlFlow::Break(reason) = expr.visit(&mut rewriter) {
            return Err(reason);
        }
        items.push(expr.to_string());
    }
    Ok(items)
}

/// Rewrites the result columns of `SELECT (SELECT ... FROM a), (SELECT ... FROM b), ...`.
fn side_by_side(select: &mut Select, plan: &mut Builder) -> Result<Vec<String>, String> {
    let mut items = Vec::new();
    for item in &mut select.projection {
        let expr = item_expr(item)?;
        let mut rewriter = Subqueries { plan, inside: 0 };
        if let ControlFlow::Break(reason) = expr.visit(&mut rewriter) {
            return Err(reason);
        }
        items.push(expr.to_string());
    }
    if plan.aggregates.is_empty() {
        return Err("no aggregate subquery among the result columns".to_owned());
    }
    Ok(items)
}

fn item_expr(item: &mut SelectItem) -> Result<&mut Expr, String> {
    match item {
        SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } => Ok(expr),
        _ => Err("SELECT * in a whole-table aggregate query".to_owned()),
    }
}

/// Rewrites one scalar subquery `(SELECT <expression over aggregates> FROM <table>)` into
/// `(SELECT <expression over parameters>)`.
fn rewrite_subquery(query: &mut Query, plan: &mut Builder) -> Result<(), String> {
    let what = "a scalar subquery";
    let select = plain_select(query, what)?;
    let scope = match select.from.as_slice() {
        [from] => plan.table(from)?,
        [] => return Err(format!("{what} without FROM")),
        _ => return Err(format!("{what} reads several tables")),
    };
    let [item] = select.projection.as_mut_slice() else {
        return Err(format!("{what} returns several columns"));
    };
    let expr = item_expr(item)?;
    let mut rewriter = Aggregates::new(&scope, plan);
    if let ControlFlow::Break(reason) = expr.visit(&mut rewriter) {
        return Err(reason);
    }
    if rewriter.replaced == 0 {
        return Err(format!(
            "{what} with no aggregate ({expr}): its value is a row of the table, not a whole-table aggregate"
        ));
    }
    select.from.clear();
    Ok(())
}

/// Rewrites the aggregates of one table's expression into parameters; refuses a column outside
/// an aggregate, a subquery, an aggregate it does not keep.
struct Aggregates<'a> {
    scope: &'a Scope,
    plan: &'a mut Builder,
    /// How many aggregate calls it replaced.
    replaced: usize,
}

impl VisitorMut for Aggregates<'_> {
    type Break = String;

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<String> {
        ControlFlow::Break(format!(
            "a subquery inside an aggregate expression ({query})"
        ))
    }

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<String> {
        match expr {
            Expr::Function(f) => {
                if let Some(func) = supported(f) {
                    match self.argument(f, func) {
                        Ok(column) => {
                            let call = f.to_string();
                            let index =
                                self.plan
                                    .aggregate(func, self.scope, column.as_deref(), call);
                            *expr = parameter(index);
                            self.replaced += 1;
                            ControlFlow::Continue(())
                        }
                        Err(reason) => ControlFlow::Break(reason),
                    }
                } else if is_aggregate_name(f) || f.over.is_some() {
                    ControlFlow::Break(format!(
                        "{f}: only count, sum, total, avg, min and max over a column are kept"
                    ))
                } else {
                    ControlFlow::Continue(())
                }
            }
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => ControlFlow::Break(format!(
                "the column {expr} outside an aggregate: its value would be one arbitrary row's"
            )),
            _ => ControlFlow::Continue(()),
        }
    }
}

impl<'a> Aggregates<'a> {
    fn new(scope: &'a Scope, plan: &'a mut Builder) -> Self {
        Aggregates {
            scope,
            plan,
            replaced: 0,
        }
    }

    /// The column an aggregate reads (None: count(*)): a plain column of the scope's table.
    fn argument(&self, f: &Function, func: Func) -> Result<Option<String>, String> {
        let FunctionArguments::List(list) = &f.args else {
            return Err(format!("{f}: an aggregate without an argument list"));
        };
        if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
            return Err(format!("{f}: DISTINCT or ORDER BY inside an aggregate"));
        }
        let column = match list.args.as_slice() {
            [] | [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)] if func == Func::CountRows => {
                return Ok(None);
            }
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Identifier(column)))] => column,
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::CompoundIdentifier(parts)))] => {
                match parts.as_slice() {
                    [qualifier, column]
                        if qualifier.value.to_lowercase() == self.scope.qualifier =>
                    {
                        column
                    }
                    _ => {
                        return Err(format!(
                            "{f}: a column of another table (or not named as FROM names it)"
                        ));
                    }
                }
            }
            _ => {
                return Err(format!(
                    "{f}: the argument must be a plain column of the table (no expression, no constant)"
                ));
            }
        };
        if ["rowid", "oid", "_rowid_"]
            .iter()
            .any(|r| column.value.eq_ignore_ascii_case(r))
        {
            return Err(format!(
                "{f}: the rowid is not captured; name the table's INTEGER PRIMARY KEY column"
            ));
        }
        Ok(Some(column.value.clone()))
    }
}

/// Rewrites the scalar subqueries of a FROM-less SELECT; refuses a column or aggregate outside
/// them, and any other kind of subquery.
struct Subqueries<'a> {
    plan: &'a mut Builder,
    /// Depth inside a rewritten subquery (already checked: nothing to look at there).
    inside: usize,
}

impl VisitorMut for Subqueries<'_> {
    type Break = String;

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<String> {
        if self.inside == 0 {
            return ControlFlow::Break(format!(
                "a subquery other than a scalar aggregate subquery ({query})"
            ));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<String> {
        if self.inside > 0 {
            if matches!(expr, Expr::Subquery(_)) {
                self.inside += 1;
            }
            return ControlFlow::Continue(());
        }
        match expr {
            Expr::Subquery(query) => {
                if let Err(reason) = rewrite_subquery(query, self.plan) {
                    return ControlFlow::Break(reason);
                }
                self.inside += 1;
                ControlFlow::Continue(())
            }
            Expr::Function(f) if is_aggregate_name(f) || f.over.is_some() => ControlFlow::Break(
                format!("{f} outside a subquery: write it as (SELECT {f} FROM <table>)"),
            ),
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                ControlFlow::Break(format!("the column {expr} outside a subquery"))
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<String> {
        if self.inside > 0 && matches!(expr, Expr::Subquery(_)) {
            self.inside -= 1;
        }
        ControlFlow::Continue(())
    }
}

/// `?N`: the aggregate numbered `index`, bound by the state.
fn parameter(index: usize) -> Expr {
    Expr::value(Value::Placeholder(format!("?{index}")))
}

fn function_name(f: &Function) -> Option<String> {
    match f.name.0.as_slice() {
        [ObjectNamePart::Identifier(ident)] => Some(ident.value.to_lowercase()),
        _ => None,
    }
}

fn argument_count(f: &Function) -> usize {
    match &f.args {
        FunctionArguments::List(list) => list.args.len(),
        FunctionArguments::None => 0,
        FunctionArguments::Subquery(_) => 1,
    }
}

/// An aggregate call (of any aggregate SQLite knows): `min`/`max` with one argument are
/// aggregates, with more they are scalar functions.
fn is_aggregate_name(f: &Function) -> bool {
    let Some(name) = function_name(f) else {
        return false;
    };
    match name.as_str() {
        "count" | "sum" | "total" | "avg" => true,
        "min" | "max" => argument_count(f) == 1,
        other => OTHER_AGGREGATES.contains(&other),
    }
}

/// The aggregate this shape keeps, when `f` is one (a plain call: no FILTER, window, ...).
fn supported(f: &Function) -> Option<Func> {
    if f.over.is_some()
        || f.filter.is_some()
        || f.null_treatment.is_some()
        || !f.within_group.is_empty()
        || f.uses_odbc_syntax
        || !matches!(f.parameters, FunctionArguments::None)
    {
        return None;
    }
    let count = argument_count(f);
    Some(match (function_name(f)?.as_str(), count) {
        ("count", 0) => Func::CountRows,
        ("count", 1) => {
            let star = matches!(&f.args, FunctionArguments::List(list)
                if matches!(list.args.as_slice(), [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)]));
            if star { Func::CountRows } else { Func::Count }
        }
        ("sum", 1) => Func::Sum,
        ("total", 1) => Func::Total,
        ("avg", 1) => Func::Avg,
        ("min", 1) => Func::Min,
        ("max", 1) => Func::Max,
        _ => return None,
    })
}
