//! What the CLI's verbs other than `run` do: check a config against its database, install or
//! remove capture, pause and resume it for a migration, explain what a change would do.

use std::path::Path;

use rusqlite::Connection;

use crate::config::{Config, check};
use crate::{Error, capture, db};

pub use crate::explain::{ExplainError, Explanation, Looked, explain};

/// `cachetail explain`: the change mapped through the rules, derived rules' lookups run on the
/// database (read only) when it can be opened, else only listed.
pub fn explain_change(
    config: &Config,
    table: &str,
    change: (Op, Option<&str>, Option<&str>),
) -> Result<Explanation, ExplainError> {
    let conn = config
        .database
        .exists()
        .then(|| db::open_reader(&config.database).ok())
        .flatten();
    explain(config, table, change, conn.as_ref())
}
pub use crate::types::{Op, Strategy};

/// Opens the app's database for cachetail's writes; it must exist (cachetail never creates it).
pub fn open_existing(path: &Path) -> Result<Connection, Error> {
    if !path.exists() {
        return Err(Error::NoDatabase(path.to_path_buf()));
    }
    db::open_writer(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// What `cachetail check` found, besides problems (which are an error).
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Each rule `invalidate = "auto"` derived, and each family `maintain = "incremental"`, as a
    /// line.
    pub derived: Vec<String>,
    /// Tables a family reads that no rule refreshes it for.
    pub gaps: Vec<String>,
    /// Things worth knowing now that are not config problems (Redis not answering, keys a
    /// collation keeps out of the cache).
    pub warnings: Vec<String>,
}

/// Checks `config` against its database: tables, columns, queries (reported all at once, with
/// `file:line:column`), the derived rules, the tracking gaps, and whether Redis answers.
pub fn check(config: &Config) -> Result<CheckReport, Error> {
    let mut conn = open_existing(&config.database)?;
    let reads = check::check_database(config, &mut conn)?;
    let mut report = CheckReport {
        gaps: check::tracking_gaps(config, &reads),
        ..CheckReport::default()
    };
    report
        .warnings
        .extend(crate::cache::unreachable(&config.cache));
    for family in &config.families {
        let pattern = family.pattern.source();
        for note in reads.spelling(pattern).notes() {
            report
                .warnings
                .push(format!("key family `{pattern}`: {note}"));
        }
    }
    for family in &config.families {
        let Some(shape) = family.maintain.as_deref() else {
            continue;
        };
        let pattern = family.pattern.source();
        report.derived.push(format!(
            "maintained (maintain = \"incremental\" on `{pattern}`): {}",
            shape.describe()
        ));
        if let Err(e) = try_build(&conn, shape) {
            report.warnings.push(format!(
                "key family `{pattern}`: maintain = \"incremental\": its state cannot be built ({e}); its values would be dropped on each change instead"
            ));
        }
    }
    for rule in config.rules.iter().filter(|r| r.derived_from.is_some()) {
        let mut names: Vec<String> = rule.keys.iter().map(|k| k.source().to_owned()).collect();
        names.extend(rule.tags.iter().map(|t| t.source().to_owned()));
        names.extend(
            rule.lookups
                .iter()
                .map(|l| format!("{} via {}", l.key.source(), l.lookup.via)),
        );
        report.derived.push(format!(
            "derived (invalidate = \"auto\" on `{}`): a change to `{}` → {} ({})",
            rule.derived_from.as_deref().unwrap_or(""),
            rule.table,
            if rule.keys.is_empty() && rule.lookups.is_empty() {
                "every key of the family".to_owned()
            } else {
                names.join(", ")
            },
            rule.strategy.name()
        ));
    }
    report.warnings.extend(unusable_lookups(config, &conn));
    report
        .warnings
        .extend(crate::config::lookup_scans::lookup_scans(config, &conn));
    Ok(report)
}

/// A warning per lookup whose columns compare their values otherwise than the lookup would:
/// its rule drops the whole family instead.
fn unusable_lookups(config: &Config, conn: &Connection) -> Vec<String> {
    let mut warnings = Vec::new();
    for rule in &config.rules {
        if let (Some(family), Some(reason)) = (
            &rule.derived_from,
            crate::apply::lookups::differ(conn, &rule.alike),
        ) {
            warnings.push(format!(
                "a change to `{}` drops every key of `{family}`, not just the keys it names: {reason}",
                rule.table
            ));
        }
        for l in &rule.lookups {
            if let Some(reason) = crate::apply::lookups::incomparable(conn, &l.lookup) {
                warnings.push(format!(
                    "a change to `{}` drops every key of `{}`, not just those found via {}: {reason}",
                    rule.table,
                    l.key.source(),
                    l.lookup.via
                ));
            }
        }
    }
    warnings
}

/// Builds a maintained family's state (one full run, in a read transaction) and discards it.
fn try_build(conn: &Connection, shape: &crate::maintain::Shape) -> rusqlite::Result<()> {
    let tx = conn.unchecked_transaction()?;
    if let Some(state) = crate::maintain::State::build(shape, &tx)? {
        state.discard(&tx);
    }
    tx.rollback()
}

/// Installs (or adjusts) the outbox and the triggers, as the daemon does at start.
pub fn install(config: &Config) -> Result<(), Error> {
    crate::prepare(config).map(|_| ())
}

/// Removes every trigger and table cachetail installed; returns how many triggers there were.
pub fn uninstall(config: &Config) -> Result<usize, Error> {
    let mut conn = open_existing(&config.database)?;
    Ok(capture::uninstall(&mut conn)?)
}

/// Pauses capture for a migration (the triggers removed; a running daemon serves from the
/// database); returns how many triggers were removed.
pub fn pause(config: &Config) -> Result<usize, Error> {
    let mut conn = open_existing(&config.database)?;
    Ok(capture::pause(&mut conn)?)
}

/// What `resume` did: triggers installed, and the tables whose values read before are dropped.
#[derive(Debug)]
pub struct Resumed {
    pub triggers: usize,
    pub flushed: Vec<String>,
}

/// Ends a pause: checks the config against the migrated database, then reinstalls capture.
pub fn resume(config: &Config) -> Result<Resumed, Error> {
    let mut conn = open_existing(&config.database)?;
    check::check_database(config, &mut conn)?;
    let report = capture::resume(&mut conn, config)?;
    Ok(Resumed {
        triggers: report.created.len(),
        flushed: report.flushed,
    })
}
