//! The SQL walking the grouped analysis stands on: parsing, the top-level relations and their
//! aliases, the equalities among their columns (a union-find), aggregates and what an expression
//! reads.

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArguments, JoinConstraint, JoinOperator, ObjectName,
    ObjectNamePart, Query, Statement, TableFactor, Value, Visit, Visitor,
};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;

use super::analysis::Column;

pub(super) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(super) const AGGREGATES: [&str; 10] = [
    "count",
    "sum",
    "total",
    "avg",
    "min",
    "max",
    "group_concat",
    "string_agg",
    "json_group_array",
    "json_group_object",
];

pub(super) fn function_name(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(ObjectNamePart::as_ident)
        .map(|i| i.value.to_lowercase())
        .unwrap_or_default()
}

pub(super) fn argument_count(args: &FunctionArguments) -> usize {
    match args {
        FunctionArguments::List(list) => list.args.len(),
        _ => 0,
    }
}

pub(super) fn is_aggregate(expr: &Expr) -> bool {
    let Expr::Function(f) = expr else {
        return false;
    };
    let name = function_name(&f.name);
    // min(a, b) and max(a, b) are scalar functions.
    let scalar_extreme = (name == "min" || name == "max") && argument_count(&f.args) > 1;
    (AGGREGATES.contains(&name.as_str()) && !scalar_extreme) || f.filter.is_some()
}

/// What one walk over an expression found, at the top level (not inside subqueries).
#[derive(Default)]
pub(super) struct Scan {
    pub(super) query_depth: usize,
    pub(super) aggregate_depth: usize,
    /// (qualifier, column, inside an aggregate)
    pub(super) columns: Vec<(Option<String>, String, bool)>,
    pub(super) subquery: bool,
    pub(super) window: bool,
    pub(super) aggregate: bool,
    pub(super) nondeterministic: Option<String>,
    pub(super) ordered: Option<String>,
    pub(super) placeholder: bool,
    pub(super) collate: bool,
}

impl Visitor for Scan {
    type Break = ();

    fn pre_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
        self.query_depth += 1;
        self.subquery = true;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
        self.query_depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if self.query_depth > 0 {
            return ControlFlow::Continue(());
        }
        if is_aggregate(expr) {
            self.aggregate_depth += 1;
            self.aggregate = true;
        }
        let inside = self.aggregate_depth > 0;
        match expr {
            Expr::Identifier(ident) => {
                self.columns
                    .push((None, ident.value.to_lowercase(), inside));
            }
            Expr::CompoundIdentifier(parts) => {
                let n = parts.len();
                let qualifier = (n >= 2).then(|| parts[n - 2].value.to_lowercase());
                if let Some(last) = parts.last() {
                    self.columns
                        .push((qualifier, last.value.to_lowercase(), inside));
                }
            }
            Expr::Function(f) => {
                if f.over.is_some() {
                    self.window = true;
                }
                let name = function_name(&f.name);
                if [
                    "random",
                    "randomblob",
                    "changes",
                    "last_insert_rowid",
                    "total_changes",
                ]
                .contains(&name.as_str())
                {
                    self.nondeterministic = Some(name);
                } else if [
                    "group_concat",
                    "string_agg",
                    "json_group_array",
                    "json_group_object",
                ]
                .contains(&name.as_str())
                {
                    self.ordered = Some(name);
                }
            }
            Expr::Value(value) if matches!(value.value, Value::Placeholder(_)) => {
                self.placeholder = true;
            }
            Expr::Collate { .. } => self.collate = true,
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if self.query_depth == 0 && is_aggregate(expr) {
            self.aggregate_depth -= 1;
        }
        ControlFlow::Continue(())
    }
}

pub(super) fn scan(expr: &Expr) -> Scan {
    let mut scan = Scan::default();
    let _ = expr.visit(&mut scan);
    scan
}

/// The query's top-level relations: alias → table, and whether a LEFT JOIN makes it nullable.
pub(super) struct Relations {
    pub(super) list: Vec<(String, String, bool)>,
}

impl Relations {
    pub(super) fn table(&self, alias: &str) -> Option<&str> {
        self.list
            .iter()
            .find(|(a, _, _)| a == alias)
            .map(|(_, t, _)| t.as_str())
    }

    pub(super) fn nullable(&self, alias: &str) -> bool {
        self.list.iter().any(|(a, _, n)| a == alias && *n)
    }

    pub(super) fn single(&self) -> Option<&(String, String, bool)> {
        match self.list.as_slice() {
            [only] => Some(only),
            _ => None,
        }
    }

    /// The column an identifier names: qualified by a known alias, or unqualified in a
    /// single-table query.
    pub(super) fn column(&self, qualifier: Option<&str>, column: &str) -> Result<Column, String> {
        match qualifier {
            Some(alias) => {
                let table = self.table(alias).ok_or_else(|| {
                    format!("`{alias}.{column}`: `{alias}` is not a table of the FROM clause")
                })?;
                Ok(Column {
                    alias: alias.to_owned(),
                    table: table.to_owned(),
                    column: column.to_owned(),
                })
            }
            None => match self.single() {
                Some((alias, table, _)) => Ok(Column {
                    alias: alias.clone(),
                    table: table.clone(),
                    column: column.to_owned(),
                }),
                None => Err(format!(
                    "column `{column}` is not qualified: in a query over several tables, write it with its table's alias (`t.{column}`) so its table is known"
                )),
            },
        }
    }
}

pub(super) fn last_part(name: &ObjectName) -> Option<String> {
    name.0
        .last()
        .and_then(ObjectNamePart::as_ident)
        .map(|i| i.value.to_lowercase())
}

pub(super) fn relation(factor: &TableFactor) -> Result<(String, String), String> {
    let TableFactor::Table {
        name, alias, args, ..
    } = factor
    else {
        return Err(format!(
            "`{factor}`: only tables can be joined (not subqueries or table functions)"
        ));
    };
    if args.is_some() {
        return Err(format!(
            "`{factor}`: table-valued functions cannot be maintained"
        ));
    }
    let table = last_part(name).ok_or_else(|| format!("`{name}`: not a table name"))?;
    let alias = alias
        .as_ref()
        .map_or_else(|| table.clone(), |a| a.name.value.to_lowercase());
    Ok((alias, table))
}

/// The ON conditions: (condition, the joined alias when it is a LEFT JOIN).
pub(super) type Conditions<'q> = Vec<(&'q Expr, Option<String>)>;

pub(super) fn relations(
    select: &sqlparser::ast::Select,
) -> Result<(Relations, Conditions<'_>), String> {
    let mut list = Vec::new();
    let mut conditions = Vec::new();
    for from in &select.from {
        let (alias, table) = relation(&from.relation)?;
        list.push((alias, table, false));
        for join in &from.joins {
            let (alias, table) = relation(&join.relation)?;
            let left = match &join.join_operator {
                JoinOperator::Join(c) | JoinOperator::Inner(c) | JoinOperator::CrossJoin(c) => {
                    push_on(c, None, &mut conditions)?;
                    false
                }
                JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => {
                    push_on(c, Some(alias.clone()), &mut conditions)?;
                    true
                }
                _ => {
                    return Err(format!(
                        "the join of `{alias}`: only inner joins and LEFT JOINs can be maintained (not RIGHT, FULL or others)"
                    ));
                }
            };
            if list.iter().any(|(a, _, _)| *a == alias) {
                return Err(format!("alias `{alias}` is used twice"));
            }
            list.push((alias, table, left));
        }
    }
    Ok((Relations { list }, conditions))
}

pub(super) fn push_on<'q>(
    constraint: &'q JoinConstraint,
    left: Option<String>,
    conditions: &mut Conditions<'q>,
) -> Result<(), String> {
    match constraint {
        JoinConstraint::On(on) => {
            conditions.push((on, left));
            Ok(())
        }
        JoinConstraint::None => Ok(()),
        JoinConstraint::Using(_) | JoinConstraint::UsingAlias(..) | JoinConstraint::Natural => Err(
            "joins with USING or NATURAL cannot be maintained: write the join condition with ON"
                .to_owned(),
        ),
    }
}

/// Union-find over the columns the query's equalities make equal.
#[derive(Default, Clone)]
pub(super) struct Ties {
    pub(super) parent: HashMap<Column, Column>,
}

impl Ties {
    pub(super) fn find(&self, column: &Column) -> Column {
        let mut current = column.clone();
        while let Some(parent) = self.parent.get(&current) {
            if *parent == current {
                break;
            }
            current = parent.clone();
        }
        current
    }

    pub(super) fn union(&mut self, a: Column, b: Column) {
        let (ra, rb) = (self.find(&a), self.find(&b));
        self.parent.entry(a).or_insert_with(|| ra.clone());
        self.parent.entry(b).or_insert_with(|| rb.clone());
        if ra != rb {
            self.parent.insert(ra, rb);
        }
    }

    pub(super) fn class(&self, column: &Column) -> Vec<Column> {
        let root = self.find(column);
        let mut class: Vec<Column> = self
            .parent
            .keys()
            .filter(|c| self.find(c) == root)
            .cloned()
            .collect();
        if !class.contains(column) {
            class.push(column.clone());
        }
        class.sort_by(|a, b| (&a.alias, &a.column).cmp(&(&b.alias, &b.column)));
        class
    }
}

/// The column equalities joined by AND at the top of `expr`.
pub(super) fn equalities(expr: &Expr, relations: &Relations, pairs: &mut Vec<(Column, Column)>) {
    match expr {
        Expr::Nested(inner) => equalities(inner, relations, pairs),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            equalities(left, relations, pairs);
            equalities(right, relations, pairs);
        }
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => {
            if let (Some(a), Some(b)) = (column_of(left, relations), column_of(right, relations)) {
                pairs.push((a, b));
            }
        }
        _ => {}
    }
}

pub(super) fn column_of(expr: &Expr, relations: &Relations) -> Option<Column> {
    match expr {
        Expr::Nested(inner) => column_of(inner, relations),
        Expr::Identifier(ident) => relations.column(None, &ident.value.to_lowercase()).ok(),
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [alias, column] => relations
                .column(
                    Some(&alias.value.to_lowercase()),
                    &column.value.to_lowercase(),
                )
                .ok(),
            _ => None,
        },
        _ => None,
    }
}

pub(super) fn parse(query: &str) -> Result<Box<Query>, String> {
    let statements = Parser::parse_sql(&SQLiteDialect {}, query).map_err(|e| e.to_string())?;
    match statements.into_iter().collect::<Vec<_>>().as_mut_slice() {
        [Statement::Query(query)] => Ok(query.clone()),
        _ => Err("the query must be one SELECT".to_owned()),
    }
}
