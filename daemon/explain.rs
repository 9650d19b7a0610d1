//! `cachetail explain`: what a change would do to the cache under a config, without a daemon: the
//! keys (with their strategy) and tags the rules map it to, and the lookups derived rules would
//! run, with the keys they find when the database is at hand.

use std::sync::Arc;

use rusqlite::Connection;
use rusqlite::types::Value;

use crate::apply::lookups::{self, Fallback};
use crate::config::Config;
use crate::db::Deadline;
use crate::rules;
use crate::types::{Change, ChangeBody, Layout, Op, Plan, RowChange, Strategy};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("no rule watches table `{0}` (the rules watch: {1})")]
    NotWatched(String, String),
    #[error("`--{0}` is not a JSON object of column values: {1}")]
    BadRow(&'static str, String),
    #[error("an {0} needs `--{1}` (the row's column values as a JSON object)")]
    MissingRow(&'static str, &'static str),
}

/// What one change maps to.
#[derive(Debug, PartialEq)]
pub struct Explanation {
    /// Keys, sorted, each with the strategy applied to it.
    pub keys: Vec<(String, Strategy)>,
    pub tags: Vec<String>,
    /// The change cannot be mapped (a template needs a column capture does not record).
    pub flush_all: bool,
    /// Templates that named no key because a column they need was not given.
    pub not_shown: Vec<String>,
    /// Families `maintain = "incremental"` whose state takes the change in: (pattern, shape).
    pub maintained: Vec<(String, &'static str)>,
    /// The lookups derived rules ask for the change: (key template, via, the values asked, what
    /// running it on the database gave: the keys found, or why the family is dropped instead;
    /// None without a database).
    pub lookups: Vec<Looked>,
}

/// One lookup a change asks for, and what it gave.
#[derive(Debug, PartialEq)]
pub struct Looked {
    pub key: String,
    pub via: String,
    pub values: Vec<String>,
    pub outcome: Option<Result<Vec<String>, &'static str>>,
}

/// Maps a change of `table` (`old` / `new`: JSON objects of column values) through the rules;
/// with `conn` (the database, read), derived rules' lookups are run on it as the tail would.
pub fn explain(
    config: &Config,
    table: &str,
    (op, old, new): (Op, Option<&str>, Option<&str>),
    conn: Option<&Connection>,
) -> Result<Explanation, ExplainError> {
    let captured = config.captured_columns();
    let Some(columns) = captured.get(table) else {
        let watched: Vec<&str> = captured.keys().map(String::as_str).collect();
        return Err(ExplainError::NotWatched(
            table.to_owned(),
            watched.join(", "),
        ));
    };
    let layout = Arc::new(Layout {
        table: Arc::from(table),
        columns: columns.iter().map(|c| Arc::from(c.as_str())).collect(),
    });
    let missing = std::cell::RefCell::new(Vec::<String>::new());
    let row =
        |name: &'static str, text: Option<&str>| -> Result<Option<Vec<Value>>, ExplainError> {
            let Some(text) = text else {
                return Ok(None);
            };
            let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
                .map_err(|e| ExplainError::BadRow(name, e.to_string()))?;
            let mut values = Vec::with_capacity(columns.len());
            for column in columns {
                values.push(match object.get(column) {
                    Some(value) => to_sqlite(value),
                    None => {
                        // Not given: the templates that need it name no key (as with NULL); said.
                        for template in config
                            .rules_for(table)
                            .flat_map(|r| r.keys.iter().chain(&r.tags))
                            .filter(|t| t.params().contains(&column.as_str()))
                        {
                            let note = format!(
                                "`{}` needs column `{column}` of the {name} row",
                                template.source()
                            );
                            if !missing.borrow().contains(&note) {
                                missing.borrow_mut().push(note);
                            }
                        }
                        Value::Null
                    }
                });
            }
            Ok(Some(values))
        };
    let (old, new) = match op {
        Op::Insert => (
            None,
            Some(row("new", new)?.ok_or(ExplainError::MissingRow("insert", "new"))?),
        ),
        Op::Delete => (
            Some(row("old", old)?.ok_or(ExplainError::MissingRow("delete", "old"))?),
            None,
        ),
        Op::Update => (
            Some(row("old", old)?.ok_or(ExplainError::MissingRow("update", "old"))?),
            Some(row("new", new)?.ok_or(ExplainError::MissingRow("update", "new"))?),
        ),
    };
    let change = Change {
        position: 1,
        written_ms: None,
        body: ChangeBody::Row(RowChange {
            layout,
            op,
            old,
            new,
        }),
    };
    let mut plan = rules::plan(config, std::slice::from_ref(&change));
    let lookups = run_lookups(config, &mut plan, conn);
    let mut keys: Vec<(String, Strategy)> = plan
        .keys
        .into_iter()
        .map(|(key, action)| (key, action.strategy))
        .collect();
    keys.sort();
    let mut tags: Vec<String> = plan.tags.into_keys().collect();
    tags.sort();
    let maintained = config
        .families
        .iter()
        .filter_map(|f| Some((f.pattern.source(), f.maintain.as_deref()?)))
        .filter(|(_, shape)| shape.tables().iter().any(|t| t.eq_ignore_ascii_case(table)))
        .map(|(pattern, shape)| (pattern.to_owned(), shape.name()))
        .collect();
    Ok(Explanation {
        keys,
        tags,
        flush_all: plan.flush_all.is_some(),
        not_shown: missing.into_inner(),
        maintained,
        lookups,
    })
}

/// The lookups `plan` asks for; run on `conn` when given (their keys then join the plan's).
fn run_lookups(config: &Config, plan: &mut Plan, conn: Option<&Connection>) -> Vec<Looked> {
    let mut asked: Vec<((usize, usize), Looked)> = plan
        .lookups
        .iter()
        .filter_map(|(&(index, number), ask)| {
            let lookup = config.rules.get(index)?.lookups.get(number)?;
            let values = ask.values.iter().map(shown).collect();
            let looked = Looked {
                key: lookup.key.source().to_owned(),
                via: lookup.lookup.via.clone(),
                values,
                outcome: None,
            };
            Some(((index, number), looked))
        })
        .collect();
    asked.sort_by_key(|a| a.0);
    let Some(conn) = conn else {
        return asked.into_iter().map(|(_, l)| l).collect();
    };
    // As the tail does, at the database's present (no change after it to look at).
    let outcomes = lookups::resolve(plan, config, conn, (u64::MAX, &Deadline::default()), true);
    for ((index, number), looked) in &mut asked {
        looked.outcome = outcomes.of(*index, *number).map(|outcome| {
            outcome
                .map(|pairs| pairs.iter().map(|(_, found)| shown(found)).collect())
                .map_err(Fallback::reason)
        });
    }
    asked.into_iter().map(|(_, l)| l).collect()
}

/// A value as SQL would write it.
fn shown(value: &Value) -> String {
    match value {
        Value::Null => "NULL".to_owned(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => r.to_string(),
        Value::Text(t) => format!("'{}'", t.replace('\'', "''")),
        Value::Blob(b) => format!(
            "X'{}'",
            b.iter().map(|x| format!("{x:02X}")).collect::<String>()
        ),
    }
}

/// A JSON value as SQLite would store it (objects and arrays as their JSON text).
fn to_sqlite(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Integer(i64::from(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::Text(s.clone()),
        other => Value::Text(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn an_update_moving_a_review_maps_to_both_books() {
        let config = Config::parse(
            "database = \"x.db\"\n\
             [keys.\"book:{id}\"]\nquery = \"SELECT :id AS id\"\n\
             [[rules]]\ntable = \"reviews\"\nkeys = [\"book:{book_id}\", \"top\"]\nstrategy = \"write-through\"\n\
             [[rules]]\ntable = \"reviews\"\ntags = [\"user:{user_id}\"]\n",
            "test.toml",
            Path::new("."),
        )
        .expect("valid");
        let explained = explain(
            &config,
            "reviews",
            (
                Op::Update,
                Some(r#"{"book_id": 3, "user_id": 1}"#),
                Some(r#"{"book_id": 5, "user_id": 1}"#),
            ),
            None,
        )
        .expect("explained");
        assert_eq!(
            explained.keys,
            [
                ("book:3".to_owned(), Strategy::WriteThrough),
                ("book:5".to_owned(), Strategy::WriteThrough),
                ("top".to_owned(), Strategy::WriteThrough),
            ]
        );
        assert_eq!(explained.tags, ["user:1"]);
        let partial = explain(
            &config,
            "reviews",
            (Op::Insert, None, Some(r#"{"book_id": 3}"#)),
            None,
        )
        .expect("explained");
        assert!(partial.tags.is_empty());
        assert_eq!(
            partial.not_shown,
            ["`user:{user_id}` needs column `user_id` of the new row"]
        );
        assert!(matches!(
            explain(&config, "books", (Op::Insert, None, Some("{}")), None),
            Err(ExplainError::NotWatched(..))
        ));
    }
}
