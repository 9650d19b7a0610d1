//! The live change feed: `GET /v1/events` (Server-Sent Events). Each applied change is sent with
//! what it did to the cache (its table, operation, the row's captured columns, and the keys,
//! tags and strategies it mapped to), and a status snapshot every second. Nothing is computed
//! for the feed while nobody listens.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use rusqlite::types::Value;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};

use crate::config::Config;
use crate::rules;
use crate::state::Shared;
use crate::tail::{Change, ChangeBody};

/// Changes described per batch, at most (a burst of 100k rows sends a summary for the rest).
const MAX_PER_BATCH: usize = 200;

/// The feed's sending side, kept in `Shared`.
pub type Feed = broadcast::Sender<Arc<str>>;

pub fn feed() -> Feed {
    broadcast::channel(1024).0
}

/// Describes an applied batch on the feed, if anyone listens.
pub fn publish(shared: &Shared, config: &Config, changes: &[Change]) {
    if shared.events.receiver_count() == 0 {
        return;
    }
    for change in changes.iter().take(MAX_PER_BATCH) {
        let plan = rules::plan(config, std::slice::from_ref(change));
        let mut keys: Vec<_> = plan
            .keys
            .iter()
            .map(|(key, action)| (key, action.strategy.name()))
            .collect();
        keys.sort();
        let keys: Vec<_> = keys
            .into_iter()
            .map(|(key, strategy)| json!({"key": key, "strategy": strategy}))
            .collect();
        let mut tags: Vec<&String> = plan.tags.keys().collect();
        tags.sort();
        let event = match &change.body {
            ChangeBody::Row(row) => {
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
                json!({
                    "type": "change", "position": change.position, "table": &*row.layout.table,
                    "op": row.op.name(), "row": columns, "keys": keys, "tags": tags,
                    "flush": plan.flush_all.is_some(),
                })
            }
            ChangeBody::Flush { table } => json!({
                "type": "change", "position": change.position, "table": &**table, "op": "flush",
                "row": {}, "keys": [], "tags": [], "flush": true,
            }),
            ChangeBody::Unreadable(reason) => json!({
                "type": "change", "position": change.position, "op": "unreadable",
                "error": reason, "keys": [], "tags": [], "flush": true,
            }),
            ChangeBody::Marker => continue,
        };
        let _ = shared.events.send(Arc::from(event.to_string()));
    }
    if changes.len() > MAX_PER_BATCH {
        let skipped = json!({"type": "skipped", "count": changes.len() - MAX_PER_BATCH});
        let _ = shared.events.send(Arc::from(skipped.to_string()));
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

/// The body of `GET /v1/events`: fed by a task that ends when the client goes or the daemon
/// stops.
pub struct EventBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// Starts a subscriber's stream: a status at once and every second, each change as applied.
pub fn subscribe(shared: &Arc<Shared>) -> EventBody {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut changes = shared.events.subscribe();
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut stopping = shared.stopping.subscribe();
        // Browsers' EventSource reconnects after this many milliseconds when the daemon goes.
        if tx
            .send(Bytes::from_static(b"retry: 1000\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let received = tokio::select! {
                _ = tick.tick() => None,
                received = changes.recv() => Some(received),
                _ = stopping.wait_for(|&s| s) => break,
            };
            let event = match received {
                None => crate::status::live(&shared).await.to_string(),
                Some(Ok(event)) => event.to_string(),
                Some(Err(broadcast::error::RecvError::Lagged(n))) => {
                    json!({"type": "skipped", "count": n}).to_string()
                }
                Some(Err(broadcast::error::RecvError::Closed)) => break,
            };
            let frame = Bytes::from(format!("data: {event}\n\n"));
            if tx.send(frame).await.is_err() {
                break; // the client went away
            }
        }
    });
    EventBody { rx }
}
