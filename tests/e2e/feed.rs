//! The live feed, `GET /v1/events`, read as raw Server-Sent Events over a plain TCP socket (its
//! chunked transfer encoding decoded here): at most 200 changes described per applied batch and
//! one `{"type": "skipped", "count"}` for the rest, positions in order, and a status every second
//! with the fields the README documents.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::common::*;
use crate::strategies::catalog_config;

/// The fields the README documents for the feed's status event.
const STATUS_FIELDS: &[&str] = &[
    "type",
    "role",
    "backend",
    "paused",
    "cursor",
    "head",
    "lag",
    "lag_seconds",
    "events",
    "hits",
    "misses",
    "fills",
    "fill_errors",
    "write_behind_queue",
    "latency",
    "reloads",
    "reload_failures",
    "last_reload_error",
    "families",
    "now_ms",
];

/// A subscriber of `/v1/events` on its own connection.
pub(crate) struct Subscriber {
    reader: BufReader<TcpStream>,
    /// Decoded body text not yet split into events.
    pending: String,
}

impl Subscriber {
    /// Sends the request and checks the response head: 200, `text/event-stream`, chunked.
    pub(crate) fn connect(address: SocketAddr) -> Subscriber {
        let mut stream = TcpStream::connect(address).expect("connect");
        // A missing event fails the test instead of hanging it.
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        stream
            .write_all(
                format!("GET /v1/events HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n")
                    .as_bytes(),
            )
            .expect("send the request");
        let mut reader = BufReader::new(stream);
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("a response head line");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push(line.trim_end().to_ascii_lowercase());
        }
        assert_eq!(
            head.first().map(String::as_str),
            Some("http/1.1 200 ok"),
            "{head:?}"
        );
        assert!(
            head.iter().any(|h| h == "content-type: text/event-stream"),
            "{head:?}"
        );
        assert!(
            head.iter().any(|h| h == "transfer-encoding: chunked"),
            "{head:?}"
        );
        Subscriber {
            reader,
            pending: String::new(),
        }
    }

    /// Reads one chunk of the body into `pending`.
    fn read_chunk(&mut self) {
        let mut size = String::new();
        self.reader
            .read_line(&mut size)
            .expect("a chunk size (the feed went silent or closed)");
        let size = usize::from_str_radix(size.trim(), 16)
            .unwrap_or_else(|_| panic!("a hex chunk size, got {size:?}"));
        assert!(size > 0, "the feed ended");
        let mut data = vec![0; size + 2];
        self.reader.read_exact(&mut data).expect("a chunk");
        assert!(data.ends_with(b"\r\n"), "a chunk ends with CRLF");
        data.truncate(size);
        self.pending
            .push_str(std::str::from_utf8(&data).expect("UTF-8 events"));
    }

    /// The next event's text (`retry: …` or `data: …`), without its blank line.
    pub(crate) fn next_raw(&mut self) -> String {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let event = self.pending[..end].to_owned();
                self.pending.drain(..end + 2);
                return event;
            }
            self.read_chunk();
        }
    }

    /// The next `data:` event, as JSON.
    pub(crate) fn next(&mut self) -> Value {
        let raw = self.next_raw();
        let data = raw
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("a data event, got {raw:?}"));
        // Each event is the payload `cachetail watch` parses: the library's own type.
        if let Err(e) = serde_json::from_str::<cachetail::api::FeedEvent>(data) {
            panic!("not a cachetail::api::FeedEvent ({e}): {data}");
        }
        serde_json::from_str(data).unwrap_or_else(|e| panic!("JSON data ({e}): {data}"))
    }
}

/// Reads events, keeping status events apart, until `last_position`'s change has been seen;
/// returns the change and skipped events in the order they came.
fn changes_until(
    feed: &mut Subscriber,
    statuses: &mut Vec<Value>,
    last_position: u64,
) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = feed.next();
        match event["type"].as_str() {
            Some("status") => statuses.push(event),
            Some("change") => {
                let position = event["position"].as_u64().expect("a change has a position");
                events.push(event);
                if position == last_position {
                    return events;
                }
                assert!(
                    position < last_position,
                    "change {position} came before {last_position}, or {last_position} was never described: {:?}",
                    summary(&events)
                );
            }
            Some("skipped") => events.push(event),
            _ => panic!("an event of unknown type: {event}"),
        }
    }
}

/// The events in short: runs of consecutive changes as `changes A..=B (N)`, `skipped N`.
fn summary(events: &[Value]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    let close = |run: &mut Option<(u64, u64)>, lines: &mut Vec<String>| {
        if let Some((a, b)) = run.take() {
            lines.push(format!("changes {a}..={b} ({})", b - a + 1));
        }
    };
    for event in events {
        match event["position"].as_u64() {
            Some(p) if run.is_some_and(|(_, b)| p == b + 1) => run = run.map(|(a, _)| (a, p)),
            Some(p) => {
                close(&mut run, &mut lines);
                run = Some((p, p));
            }
            None => {
                close(&mut run, &mut lines);
                lines.push(format!(
                    "{} {}",
                    event["type"].as_str().unwrap_or("?"),
                    event["count"]
                ));
            }
        }
    }
    close(&mut run, &mut lines);
    lines
}

/// The outbox head as the database has it.
fn head(catalog: &Catalog) -> u64 {
    catalog
        .sqlite_cli("SELECT coalesce(max(id), 0) FROM cachetail_outbox")
        .parse()
        .expect("a head")
}

/// Commits `n` reviews (of books 1..5) in one transaction: one batch of `n` outbox rows.
fn post_reviews(catalog: &Catalog, n: usize) {
    catalog.python(&format!(
        "con.executemany('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, 3)', \
             [(i % 5 + 1,) for i in range({n})])"
    ));
}

#[test]
fn the_feed_describes_at_most_200_changes_per_batch_and_counts_the_rest() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &catalog_config(port, "delete", "50ms"), port);
    daemon.wait_caught_up();

    let mut feed = Subscriber::connect(daemon.address);
    assert_eq!(
        feed.next_raw(),
        "retry: 1000",
        "the stream starts with the reconnect delay"
    );
    // A status comes at once: from then on, this subscriber receives every change applied.
    let first = feed.next();
    assert_eq!(first["type"], "status", "{first}");
    let mut statuses = vec![first];

    // A batch of exactly 200 changes: each described, nothing skipped. Then a batch of 500: 200
    // described and `skipped` 300. Then one more change: the feed goes on, in order. Each
    // transaction is one batch (batch_size is 10,000): the next is committed only once the
    // feed has shown the previous one.
    let start = head(&catalog);
    post_reviews(&catalog, 200);
    let mut events = changes_until(&mut feed, &mut statuses, start + 200);
    post_reviews(&catalog, 500);
    events.extend(changes_until(&mut feed, &mut statuses, start + 400));
    catalog.python("con.execute(\"UPDATE users SET name = 'renamed' WHERE id = 1\")");
    let last = start + 701;
    events.extend(changes_until(&mut feed, &mut statuses, last));
    assert_eq!(head(&catalog), last, "701 outbox rows were written");

    let expected = [
        format!("changes {}..={} (400)", start + 1, start + 400),
        "skipped 300".to_owned(),
        format!("changes {last}..={last} (1)"),
    ];
    assert_eq!(
        summary(&events),
        expected,
        "200 changes of the first batch, 200 of the second and `skipped` 300, then the last change"
    );
    let described = events.iter().filter(|e| e["type"] == "change").count() as u64;
    let skipped: u64 = events.iter().filter_map(|e| e["count"].as_u64()).sum();
    assert_eq!(
        described + skipped,
        701,
        "every change is described or counted"
    );

    // A described change says what it did.
    let review = &events[0];
    assert_eq!(
        (review["table"].as_str(), review["op"].as_str()),
        (Some("reviews"), Some("insert")),
        "{review}"
    );
    let book = review["row"]["book_id"]
        .as_i64()
        .expect("the captured book_id");
    let keys = review["keys"].as_array().expect("keys");
    assert!(
        keys.contains(
            &serde_json::json!({"key": format!("book:{book}"), "strategy": "delete", "rule": 0})
        ),
        "{review}"
    );
    assert_eq!(review["flush"], false, "{review}");
    let rename = events.last().expect("the last change");
    assert_eq!(rename["table"], "users", "{rename}");
    assert_eq!(rename["op"], "update", "{rename}");
    assert_eq!(
        rename["keys"],
        serde_json::json!([{"key": "user:1", "strategy": "delete", "rule": 2}]),
        "{rename}"
    );

    // Status events, once a second, each with the documented fields; one reports it all applied.
    let caught_up = loop {
        let event = feed.next();
        assert_eq!(event["type"], "status", "only statuses now: {event}");
        statuses.push(event);
        let latest = statuses.last().expect("a status");
        if statuses.len() >= 4 && latest["cursor"].as_u64() == Some(last) {
            break latest.clone();
        }
    };
    for status in &statuses {
        for field in STATUS_FIELDS {
            assert!(
                status.get(field).is_some(),
                "the status has no `{field}`: {status}"
            );
        }
    }
    assert_eq!(
        (
            &caught_up["role"],
            &caught_up["backend"],
            &caught_up["paused"]
        ),
        (
            &Value::from("active"),
            &Value::from("memory"),
            &Value::from(false)
        ),
        "{caught_up}"
    );
    assert_eq!(
        (caught_up["head"].as_u64(), caught_up["lag"].as_u64()),
        (Some(last), Some(0)),
        "{caught_up}"
    );
    assert!(caught_up["events"].as_u64() >= Some(701), "{caught_up}");
    assert!(
        caught_up["families"]
            .as_array()
            .is_some_and(|f| f.len() == 3),
        "{caught_up}"
    );
    let times: Vec<u64> = statuses
        .iter()
        .map(|s| s["now_ms"].as_u64().expect("now_ms"))
        .collect();
    let gaps: Vec<u64> = times
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    let mean = (times[times.len() - 1] - times[0]) as f64 / gaps.len() as f64;
    assert!(
        (900.0..=1300.0).contains(&mean) && gaps.iter().all(|&g| g <= 2000),
        "a status every second: gaps {gaps:?} ms"
    );
}
