//! The live change feed, as the tail publishes it: each applied change with what it did to the
//! cache (its table, operation, the row's captured columns, the keys with their strategies and
//! the rule, and lookup, that reached each, the tags, the families dropped whole and why), at
//! most 200 per batch. Nothing is computed while nobody listens. `http::events`
//! streams it to clients.

use std::sync::Arc;

use rusqlite::types::Value;
use serde_json::json;
use tokio::sync::broadcast;

use crate::api::{ChangeEvent, FamilyFallback, FeedEvent, KeyChange};
use crate::apply::lookups::Outcomes;
use crate::config::Config;
use crate::rules;
use crate::types::{Change, ChangeBody, Strategy};

/// Changes described per batch, at most (a burst of 100k rows sends a summary for the rest).
const MAX_PER_BATCH: usize = 200;

/// The feed: each event as JSON text. Cloned for each subscriber.
#[derive(Clone)]
pub struct Feed(broadcast::Sender<Arc<str>>);

impl Default for Feed {
    fn default() -> Feed {
        Feed(broadcast::channel(1024).0)
    }
}

impl Feed {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.0.subscribe()
    }

    fn send(&self, event: &FeedEvent) {
        if let Ok(text) = serde_json::to_string(event) {
            let _ = self.0.send(Arc::from(text));
        }
    }

    /// Whether anyone listens (the batch's lookups then keep what they found for each value).
    pub fn watched(&self) -> bool {
        self.0.receiver_count() > 0
    }

    /// Describes an applied batch, if anyone listens; `outcomes`: what its lookups did.
    pub fn publish(&self, config: &Config, changes: &[Change], outcomes: &Outcomes) {
        if self.0.receiver_count() == 0 {
            return;
        }
        for change in changes.iter().take(MAX_PER_BATCH) {
            if let Some(event) = describe(config, change, outcomes) {
                self.send(&FeedEvent::Change(event));
            }
        }
        if changes.len() > MAX_PER_BATCH {
            let count = (changes.len() - MAX_PER_BATCH) as u64;
            self.send(&FeedEvent::Skipped { count });
        }
    }
}

/// One change as the feed describes it (None for a position marker).
fn describe(config: &Config, change: &Change, outcomes: &Outcomes) -> Option<ChangeEvent> {
    let plan = rules::plan(config, std::slice::from_ref(change));
    let (keys, fallbacks) = reached(config, change, outcomes);
    let mut tags: Vec<String> = plan.tags.keys().cloned().collect();
    tags.sort();
    let event = |table: Option<&str>, op: &str| ChangeEvent {
        position: change.position,
        table: table.map(str::to_owned),
        op: op.to_owned(),
        row: Some(serde_json::Map::new()),
        keys: Vec::new(),
        tags: Vec::new(),
        flush: true,
        fallbacks: Vec::new(),
        error: None,
    };
    match &change.body {
        ChangeBody::Row(row) | ChangeBody::Replaced(row) => {
            let image = row.new.as_ref().or(row.old.as_ref());
            let columns: serde_json::Map<String, serde_json::Value> = image
                .map(|values| {
                    row.layout
                        .columns
                        .iter()
                        .zip(values)
                        .map(|(c, v)| (c.to_string(), to_json(v)))
                        .collect()
                })
                .unwrap_or_default();
            Some(ChangeEvent {
                row: Some(columns),
                keys,
                tags,
                flush: plan.flush_all.is_some(),
                fallbacks,
                ..event(Some(&row.layout.table), row.op.name())
            })
        }
        ChangeBody::Flush { table } => Some(event(Some(table), "flush")),
        ChangeBody::Reset => Some(event(None, "reset")),
        ChangeBody::Unreadable(unreadable) => Some(ChangeEvent {
            row: None,
            error: Some(unreadable.reason.clone()),
            ..event(unreadable.table.as_deref(), "unreadable")
        }),
        ChangeBody::Marker | ChangeBody::Admin(_) => None,
    }
}

/// The keys one change reached, each with the rule (and lookup) that reached it first, sorted;
/// and the families its derived rules' lookups dropped whole instead, with why.
fn reached(
    config: &Config,
    change: &Change,
    outcomes: &Outcomes,
) -> (Vec<KeyChange>, Vec<FamilyFallback>) {
    let (mut keys, mut fallbacks) = (Vec::<(KeyChange, Strategy)>::new(), Vec::new());
    let mut add = |key: String, strategy: Strategy, rule, via: Option<&str>| match keys
        .iter_mut()
        .find(|(k, _)| k.key == key)
    {
        Some((k, most)) if *most < strategy => {
            k.strategy = strategy.name().to_owned();
            *most = strategy;
        }
        Some(_) => {}
        None => keys.push((
            KeyChange {
                key,
                strategy: strategy.name().to_owned(),
                rule: Some(rule),
                via: via.map(str::to_owned),
            },
            strategy,
        )),
    };
    for (index, plan) in rules::plan_by_rule(config, change) {
        for (key, action) in &plan.keys {
            add(key.clone(), action.strategy, index, None);
        }
        let Some(rule) = config.rules.get(index) else {
            continue;
        };
        for (number, lookup) in rule.lookups.iter().enumerate() {
            let Some(ask) = plan.lookups.get(&(index, number)) else {
                continue;
            };
            match outcomes.of(index, number) {
                Some(Ok(pairs)) => {
                    for key in lookup_keys(lookup, &ask.values, pairs) {
                        add(key, rule.strategy, index, Some(&lookup.lookup.via));
                    }
                }
                Some(Err(fallback)) => fallbacks.push(FamilyFallback {
                    family: rule.derived_from.clone().unwrap_or_default(),
                    rule: index,
                    via: lookup.lookup.via.clone(),
                    reason: fallback.reason().to_owned(),
                }),
                None => {}
            }
        }
    }
    let mut keys: Vec<KeyChange> = keys.into_iter().map(|(k, _)| k).collect();
    keys.sort_by(|a, b| (&a.key, &a.strategy).cmp(&(&b.key, &b.strategy)));
    (keys, fallbacks)
}

/// The keys a lookup found for the values one change asked (`pairs`: every (input, value) row
/// the batch's lookup read).
fn lookup_keys(
    lookup: &crate::config::RuleLookup,
    asked: &[Value],
    pairs: &[(Value, Value)],
) -> Vec<String> {
    let param = lookup.lookup.param.as_str();
    let mut keys = Vec::new();
    let mut rendered = String::new();
    for (input, value) in pairs {
        if !asked.iter().any(|a| same(a, input)) {
            continue;
        }
        if lookup
            .key
            .render_into(&mut rendered, |name| (name == param).then_some(value))
            .is_some()
            && !keys.contains(&rendered)
        {
            keys.push(rendered.clone());
        }
    }
    keys
}

/// Whether a value asked and one the lookup read are the same (the column's affinity may have
/// turned `'7'` into 7).
fn same(asked: &Value, read: &Value) -> bool {
    asked == read
        || to_json(asked).to_string().trim_matches('"')
            == to_json(read).to_string().trim_matches('"')
}

fn to_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Integer(i) => json!(i),
        Value::Real(r) => json!(r),
        Value::Text(t) => json!(t),
        Value::Blob(b) => json!(b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;
    use crate::apply::lookups::{self, tests::config, tests::review};
    use crate::db::Deadline;

    /// The batch's lookups run on `schema` (after the outbox's tables), explained.
    fn described(schema: &str, change: &Change) -> ChangeEvent {
        let config = config();
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(include_str!("../../schema.sql"))
            .expect("outbox");
        conn.execute_batch(schema).expect("schema");
        let mut plan = rules::plan(&config, std::slice::from_ref(change));
        let outcomes = lookups::resolve(&mut plan, &config, &conn, (3, &Deadline::default()), true);
        describe(&config, change, &outcomes).expect("described")
    }

    #[test]
    fn a_key_a_lookup_found_names_its_rule_and_lookup() {
        let event = described(
            "CREATE TABLE books (id INTEGER PRIMARY KEY, author_id INTEGER);
             INSERT INTO books VALUES (10, 1), (20, 2);",
            &review(20),
        );
        let keys: Vec<(&str, Option<usize>, Option<&str>)> = event
            .keys
            .iter()
            .map(|k| (k.key.as_str(), k.rule, k.via.as_deref()))
            .collect();
        assert_eq!(
            keys,
            [(
                "author:2",
                Some(2),
                Some("books.author_id where books.id = reviews.book_id")
            )]
        );
        assert!(event.fallbacks.is_empty());
    }

    #[test]
    fn a_family_dropped_because_its_lookup_failed_says_why() {
        let event = described("", &review(20));
        assert!(event.keys.is_empty());
        let fallbacks: Vec<(&str, &str)> = event
            .fallbacks
            .iter()
            .map(|f| (f.family.as_str(), f.reason.as_str()))
            .collect();
        assert_eq!(fallbacks, [("author:{id}", "the lookup failed")]);
    }
}
