//! Checks a config against the database it names: watched tables and the columns templates use
//! exist, every family's query prepares, only reads, and binds exactly its pattern's parameters.
//! Run by `cachetail check`, at start-up, and before a reload takes effect.

use rusqlite::Connection;

use crate::capture::table_columns;
use crate::config::{Config, ConfigError, Problems};

/// Every problem the database reveals in `config`, located in the config file.
pub fn check_database(config: &Config, conn: &Connection) -> Result<(), ConfigError> {
    let mut problems = Problems::new(&config.source);
    check_rules(config, conn, &mut problems);
    check_families(config, conn, &mut problems);
    if problems.is_empty() {
        Ok(())
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
            problems.at(
                rule.table_span.clone(),
                format!(
                    "rule: table `{}` does not exist in {}",
                    rule.table,
                    config.database.display()
                ),
            );
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

fn check_families(config: &Config, conn: &Connection, problems: &mut Problems<'_>) {
    for family in &config.families {
        let name = family.pattern.source();
        let stmt = match conn.prepare(&family.query) {
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
        for param in pattern_params {
            if !used.iter().any(|u| u == param) {
                problems.at(
                    family.pattern_span.clone(),
                    format!("key family `{name}`: `{{{param}}}` is not used by the query (bind it as `:{param}`)"),
                );
            }
        }
    }
}
