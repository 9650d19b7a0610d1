//! The live change feed, as the tail publishes it: each applied change with what it did to the
//! cache (its table, operation, the row's captured columns, the keys with their strategies, the
//! tags), at most 200 per batch. Nothing is computed while nobody listens. `http::events`
//! streams it to clients.

use std::sync::Arc;

use rusqlite::types::Value;
use serde_json::json;
use tokio::sync::broadcast;

use crate::api::{ChangeEvent, FeedEvent, KeyChange};
use crate::config::Config;
use crate::rules;
use crate::types::{Change, ChangeBody};

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

    /// Describes an applied batch, if anyone listens.
    pub fn publish(&self, config: &Config, changes: &[Change]) {
        if self.0.receiver_count() == 0 {
            return;
        }
        for change in changes.iter().take(MAX_PER_BATCH) {
            if let Some(event) = describe(config, change) {
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
fn describe(config: &Config, change: &Change) -> Option<ChangeEvent> {
    let plan = rules::plan(config, std::slice::from_ref(change));
    let mut keys: Vec<KeyChange> = plan
        .keys
        .iter()
        .map(|(key, action)| KeyChange {
            key: key.clone(),
            strategy: action.strategy.name().to_owned(),
        })
        .collect();
    keys.sort_by(|a, b| (&a.key, &a.strategy).cmp(&(&b.key, &b.strategy)));
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

fn to_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Integer(i) => json!(i),
        Value::Real(r) => json!(r),
        Value::Text(t) => json!(t),
        Value::Blob(b) => json!(b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
    }
}
