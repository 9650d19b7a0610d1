//! What a reload changes: a pure function of the running config and the new one. The daemon
//! applies it (keeps the state of continued families, retires the others, reinstalls capture).

use super::Config;

/// The difference between the config in force and a new one.
#[derive(Debug, Default, PartialEq)]
pub struct ConfigDiff {
    /// For each family of the new config, the index of the running family it continues (same
    /// pattern and definition: its cached values stay valid), if any.
    pub continued: Vec<Option<usize>>,
    /// Running families the new config does not continue: their values must be dropped.
    pub retired: Vec<usize>,
    /// Settings that cannot change while the daemon runs, each with why: the reload is refused.
    pub fixed: Vec<String>,
    /// The columns capture records changed: the triggers must be reinstalled.
    pub capture_changed: bool,
}

/// Compares the running config with a new one.
pub fn diff(running: &Config, new: &Config) -> ConfigDiff {
    let continued: Vec<Option<usize>> = new
        .families
        .iter()
        .map(|family| {
            running.families.iter().position(|old| {
                old.pattern.source() == family.pattern.source()
                    && old.definition == family.definition
            })
        })
        .collect();
    let retired = (0..running.families.len())
        .filter(|i| !continued.contains(&Some(*i)))
        .collect();
    ConfigDiff {
        continued,
        retired,
        fixed: fixed_settings_changed(running, new),
        capture_changed: running.captured_columns() != new.captured_columns(),
    }
}

/// The settings a reload may not change, with a message for each that differs.
fn fixed_settings_changed(running: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    if new.database != running.database {
        changed.push(format!(
            "`database` cannot change while the daemon runs (running: {}, file: {}); restart it",
            running.database.display(),
            new.database.display()
        ));
    }
    if new.cache.backend != running.cache.backend {
        changed.push(
            "`cache.backend`, `cache.url`, `cache.prefix`, `cache.publish`, `cache.max_connections`, `cache.tls_ca`, `cache.stream_max_len`, `cache.sentinels`, `cache.sentinel_master` and `cache.cluster` cannot change while the daemon runs; restart it".to_owned(),
        );
    }
    if new.listen != running.listen {
        changed.push(format!(
            "`listen` cannot change while the daemon runs (running: {}, file: {}); restart it",
            running.listen, new.listen
        ));
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(text, "config.toml", Path::new("/srv")).expect("valid")
    }

    const BASE: &str = "database = \"x.db\"\n\
        [keys.\"a:{id}\"]\nquery = \"SELECT :id AS id\"\n\
        [keys.\"b:{id}\"]\nquery = \"SELECT :id AS id, 1 AS one\"\n";

    #[test]
    fn a_family_whose_definition_changed_is_retired_and_the_others_continue() {
        let running = config(BASE);
        let new = config(&BASE.replace("1 AS one", "2 AS two"));
        let diff = diff(&running, &new);
        // Families are sorted by pattern: a, b.
        assert_eq!(diff.continued, vec![Some(0), None]);
        assert_eq!(diff.retired, vec![1]);
        assert!(diff.fixed.is_empty());
        assert!(!diff.capture_changed);
    }

    #[test]
    fn a_comment_or_a_warm_query_changes_nothing_a_new_rule_changes_capture() {
        let running = config(BASE);
        let same = config(&format!("# a comment\n{BASE}"));
        assert_eq!(diff(&running, &same).retired, Vec::<usize>::new());
        let ruled = config(&format!(
            "{BASE}[[rules]]\ntable = \"t\"\nkeys = [\"a:{{id}}\"]\n"
        ));
        let changed = diff(&running, &ruled);
        assert!(changed.capture_changed);
        assert_eq!(changed.continued, vec![Some(0), Some(1)]);
    }

    #[test]
    fn the_database_listen_address_and_backend_are_fixed() {
        let running = config(BASE);
        let moved = config(&BASE.replace("x.db", "y.db").replacen(
            "database",
            "listen = \"127.0.0.1:9999\"\ndatabase",
            1,
        ));
        assert_eq!(diff(&running, &moved).fixed.len(), 2);
    }
}
