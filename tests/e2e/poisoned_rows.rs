//! Outbox rows the daemon cannot decode, written by a careless (or hostile) app: text that is not
//! valid UTF-8, text with a NUL in it (SQLite's `quote()` would cut it there), a malformed blob
//! literal, a row naming a capture layout whose columns cannot be read. Each is handled by
//! dropping every value that reads the row's table (too much, never too little), counted
//! (`unreadable_rows`), logged once with its outbox id, and the tail moves on: later changes are
//! applied and `?fresh=1` keeps answering. On the memory backend and on Redis.

use std::path::Path;
use std::process::Command;
use std::sync::mpsc::Receiver;

use serde_json::Value;

use crate::common::*;
use crate::redis::RedisServer;

/// A family that reads `books` only: a poisoned `reviews` row must leave it cached.
const TITLES: &str = r#"
[keys."title:{id}"]
query = "SELECT id, title FROM books WHERE id = :id"

[[rules]]
table = "books"
keys = ["title:{id}"]
"#;

/// Values that read `reviews`, cached before each poisoned row. (Not `catalog-stats` or
/// `top-books`: the reference config writes them through on the `books` change that follows the
/// poisoned row, so they are cached again, fresh, by the time the test looks.)
const READING_REVIEWS: [&str; 4] = [
    "book:1:reviews",
    "user:1",
    "leaderboard:most-reviewed",
    "book:1",
];

/// `cachetail --log-format json run --config CONFIG`: its log lines come from the receiver.
fn start_logged(config: &Path, port: u16) -> (Daemon, Receiver<String>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cachetail"));
    command
        .args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,cachetail=info");
    Daemon::start_logged(command, config, port)
}

/// The JSON log lines received so far, appended to `seen`.
fn drain_log(log: &Receiver<String>, seen: &mut Vec<Value>) {
    seen.extend(log.try_iter().filter_map(|l| serde_json::from_str(&l).ok()));
}

/// The warnings about undecodable outbox row `id` logged so far.
fn warnings_about(seen: &[Value], id: u64) -> Vec<&Value> {
    seen.iter()
        .filter(|line| line["level"] == "WARN")
        .filter(|line| line["fields"]["outbox_id"].as_u64() == Some(id))
        .collect()
}

fn head(catalog: &Catalog) -> u64 {
    catalog
        .sqlite_cli("SELECT coalesce(max(id), 0) FROM cachetail_outbox")
        .parse()
        .expect("an outbox id")
}

/// Reads each key twice: the second read is a hit.
fn cache(daemon: &mut Daemon, keys: &[&str]) {
    for key in keys {
        assert_eq!(daemon.get(key).status, 200, "{key}");
        assert_eq!(x_cache(&daemon.get(key)), "hit", "{key} is cached");
    }
}

/// `GET /v1/keys/{key}?fresh=1`.
fn fresh(daemon: &mut Daemon, key: &str) -> Reply {
    daemon.get_path(&format!("/v1/keys/{}?fresh=1", encode_key(key)))
}

fn field(reply: &Reply, name: &str) -> Value {
    json(reply)[name].clone()
}

/// One poisoned row, then a valid change after it: the change must be applied (the tail moved
/// on), the values reading `reviews` dropped, `title:1` (reading `books` only) left cached, the
/// row counted and logged once with its outbox id.
fn poison_then_check(
    daemon: &mut Daemon,
    catalog: &Catalog,
    log: &Receiver<String>,
    seen: &mut Vec<Value>,
    poison: &str,
    round: u64,
) -> Value {
    cache(daemon, &READING_REVIEWS);
    cache(daemon, &["title:1"]);
    catalog.sqlite_cli(poison);
    let poisoned = head(catalog);
    let title = format!("after poison {round}");
    catalog.sqlite_cli(&format!("UPDATE books SET title = '{title}' WHERE id = 2"));
    // Later changes are applied: `?fresh=1` answers, with the change.
    let reply = fresh(daemon, "title:2");
    assert_eq!(
        reply.status,
        200,
        "round {round}: the tail must move on past the poisoned row {poisoned}: {}",
        reply.text()
    );
    assert_eq!(field(&reply, "title"), title.as_str());
    // Everything that reads `reviews` was dropped; what reads only `books` was kept.
    for key in READING_REVIEWS {
        assert_ne!(
            x_cache(&daemon.peek(key)),
            "hit",
            "round {round}: {key} reads `reviews` and must have been dropped by the poisoned row {poisoned}"
        );
    }
    assert_eq!(
        x_cache(&daemon.peek("title:1")),
        "hit",
        "round {round}: title:1 reads only `books`: a poisoned `reviews` row must not drop it"
    );
    // Counted, and logged once with its id.
    let status = daemon.status();
    assert_eq!(
        status["unreadable_rows"], round,
        "round {round}: the poisoned row is counted in /v1/status"
    );
    let metrics = daemon.get_path("/metrics").text();
    assert!(
        metrics.contains(&format!("cachetail_unreadable_rows_total {round}\n")),
        "round {round}: the poisoned row is counted in /metrics:\n{metrics}"
    );
    let warned = eventually("the poisoned row is logged", || {
        drain_log(log, seen);
        let warned = warnings_about(seen, poisoned);
        (!warned.is_empty()).then(|| warned.into_iter().cloned().collect::<Vec<_>>())
    });
    assert_eq!(warned.len(), 1, "round {round}: logged once: {warned:#?}");
    warned[0].clone()
}

fn titles_config(port: u16) -> String {
    format!("{}{TITLES}", reference_config(port))
}

#[test]
fn undecodable_rows_drop_what_reads_their_table_and_the_tail_moves_on() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog.write_config(&titles_config(port));
    let (mut daemon, log) = start_logged(&config, port);
    let mut seen = Vec::new();

    // Text that is not valid UTF-8 (any Go or C app binding raw bytes), into a captured column.
    let warned = poison_then_check(
        &mut daemon,
        &catalog,
        &log,
        &mut seen,
        "INSERT INTO reviews (book_id, user_id, rating) VALUES (CAST(X'FF' AS TEXT), 1, 5)",
        1,
    );
    assert_eq!(warned["fields"]["table"], "reviews", "{warned}");
    // The review itself is seen by the refills: one more review, for user 1.
    assert_eq!(field(&fresh(&mut daemon, "catalog-stats"), "reviews"), 4);
    assert_eq!(field(&daemon.get("user:1"), "reviews"), 3);

    // Text with a NUL: `quote()` would cut it at the NUL and render a wrong key ("book:1").
    let warned = poison_then_check(
        &mut daemon,
        &catalog,
        &log,
        &mut seen,
        "INSERT INTO reviews (book_id, user_id, rating) VALUES (CAST(X'310032' AS TEXT), 2, 3)",
        2,
    );
    let reason = warned["fields"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("NUL"), "the log says why: {warned}");

    // A malformed blob literal, written into the outbox by hand (non-ASCII inside X'...').
    poison_then_check(
        &mut daemon,
        &catalog,
        &log,
        &mut seen,
        "INSERT INTO cachetail_outbox (capture, op, new, at) \
         SELECT max(id), 1, 'X''aéb'',1', julianday('now') FROM cachetail_capture WHERE tbl = 'reviews'",
        3,
    );

    // A capture layout whose column list is not JSON, and a row naming it.
    poison_then_check(
        &mut daemon,
        &catalog,
        &log,
        &mut seen,
        "INSERT INTO cachetail_capture (tbl, columns) VALUES ('reviews', '[oops'); \
         INSERT INTO cachetail_outbox (capture, op, new, at) VALUES (last_insert_rowid(), 1, '1,1', julianday('now'))",
        4,
    );

    // Restarted with all of that still in the outbox (the cursor persisted or not): it starts,
    // and applies what comes.
    assert!(daemon.stop().success());
    let (mut daemon, _log) = start_logged(&config, port);
    catalog.sqlite_cli("UPDATE books SET title = 'after restart' WHERE id = 2");
    let reply = fresh(&mut daemon, "title:2");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(field(&reply, "title"), "after restart");
    let verified = daemon.verify();
    assert_eq!(verified["stale"], 0, "{verified}");
}

#[test]
fn on_redis_an_undecodable_row_removes_what_reads_its_table() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let config = titles_config(port).replace(
        "[cache]\n",
        &format!(
            "[cache]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"ct:\"\n",
            redis.url()
        ),
    );
    let config = catalog.write_config(&config);
    let (mut daemon, log) = start_logged(&config, port);
    eventually("the daemon holds the lease", || {
        (daemon.status()["role"] == "active").then_some(())
    });
    let mut seen = Vec::new();
    poison_then_check(
        &mut daemon,
        &catalog,
        &log,
        &mut seen,
        "INSERT INTO reviews (book_id, user_id, rating) VALUES (CAST(X'FF' AS TEXT), 1, 5)",
        1,
    );
    // In Redis itself, as an app server reading it directly sees it.
    for key in READING_REVIEWS {
        assert_eq!(redis.value(key), None, "{key} is removed from Redis");
    }
    assert!(redis.value("title:1").is_some(), "title:1 stays in Redis");
    poison_then_check(
        &mut daemon,
        &catalog,
        &log,
        &mut seen,
        "INSERT INTO reviews (book_id, user_id, rating) VALUES (CAST(X'310032' AS TEXT), 2, 3)",
        2,
    );
    for key in READING_REVIEWS {
        assert_eq!(redis.value(key), None, "{key} is removed from Redis");
    }
    assert_eq!(field(&fresh(&mut daemon, "catalog-stats"), "reviews"), 5);
    let verified = daemon.verify();
    assert_eq!(verified["stale"], 0, "{verified}");
}
