//! An outbox emptied or rebuilt by hand (`DELETE FROM cachetail_outbox`, `DROP TABLE` and
//! `cachetail install`), so that its ids start again below the daemon's cursor: the daemon
//! notices (the row at its cursor is gone, or is another row), says so (a warning, and
//! `outbox_rebuilds` in `/v1/status` and `/metrics`), drops everything it caches, and applies
//! the new outbox from there on, instead of skipping every change until the ids pass the old
//! cursor. Also when the app wrote more rows than the old cursor before the daemon looked, and
//! when it happened while the daemon was stopped (Redis keeps its values across the restart).

use std::path::Path;
use std::process::Command;
use std::sync::mpsc::Receiver;

use serde_json::Value;

use crate::common::*;
use crate::redis::RedisServer;

fn start_logged(config: &Path, port: u16) -> (Daemon, Receiver<String>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cachetail"));
    command
        .args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,cachetail=info");
    Daemon::start_logged(command, config, port)
}

/// `GET /v1/keys/{key}?fresh=1`.
fn fresh(daemon: &mut Daemon, key: &str) -> Reply {
    daemon.get_path(&format!("/v1/keys/{}?fresh=1", encode_key(key)))
}

fn review_count(reply: &Reply) -> i64 {
    assert_eq!(reply.status, 200, "{}", reply.text());
    json(reply)["review_count"].as_i64().expect("review_count")
}

/// `book:1` read with `?fresh=1`: every change committed before is reflected.
fn fresh_reviews_of_book_1(daemon: &mut Daemon) -> i64 {
    review_count(&fresh(daemon, "book:1"))
}

/// `book:1`, cached (the second read is a hit), with its review count.
fn cache_book_1(daemon: &mut Daemon) -> i64 {
    daemon.get("book:1");
    let reply = daemon.get("book:1");
    assert_eq!(x_cache(&reply), "hit");
    review_count(&reply)
}

/// Thirty reviews of book 3, in their own transactions: the cursor moves well past 30.
fn history(catalog: &Catalog) {
    catalog.python(
        "for i in range(30):\n    con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (3, 2, 4)')\n    con.commit()",
    );
}

fn review_of_book_1() -> &'static str {
    "INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 1)"
}

/// In one transaction: the outbox emptied, a review of book 1 (outbox id 1), then more rows than
/// the old cursor (changes to user 3, which `book:1` does not read): the outbox's row at the old
/// cursor exists again, but it is another row.
fn rebuild_past(catalog: &Catalog, cursor: u64) {
    catalog.python(&format!(
        "con.execute('DELETE FROM cachetail_outbox')\n\
         con.execute('{}')\n\
         for i in range({}):\n    con.execute('UPDATE users SET name = name WHERE id = 3')",
        review_of_book_1(),
        cursor + 10
    ));
}

fn rebuilds(daemon: &mut Daemon) -> Value {
    daemon.status()["outbox_rebuilds"].clone()
}

fn warned_rebuilt(log: &Receiver<String>, seen: &mut Vec<Value>, times: usize) {
    eventually("the daemon warns that the outbox was rebuilt", || {
        seen.extend(log.try_iter().filter_map(|l| serde_json::from_str(&l).ok()));
        let warned = seen
            .iter()
            .filter(|line| line["level"] == "WARN")
            .filter(|line| {
                line["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("outbox was emptied or rebuilt"))
            })
            .count();
        (warned >= times).then_some(())
    });
}

#[test]
fn an_outbox_emptied_or_rebuilt_by_hand_is_detected_and_no_later_change_is_skipped() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog.write_config(&reference_config(port));
    let (mut daemon, log) = start_logged(&config, port);
    let mut seen = Vec::new();
    history(&catalog);
    daemon.wait_caught_up();
    wait_persisted(&catalog.db());
    assert_eq!(cache_book_1(&mut daemon), 2);

    // Emptied: the next change gets outbox id 1, far below the cursor.
    catalog.sqlite_cli("DELETE FROM cachetail_outbox");
    catalog.sqlite_cli(review_of_book_1());
    assert_eq!(
        fresh_reviews_of_book_1(&mut daemon),
        3,
        "the review written after the outbox was emptied must not be skipped"
    );
    warned_rebuilt(&log, &mut seen, 1);
    assert_eq!(rebuilds(&mut daemon), 1);
    let metrics = daemon.get_path("/metrics").text();
    assert!(
        metrics.contains("cachetail_outbox_rebuilds_total 1\n"),
        "{metrics}"
    );
    // From then on, changes apply as usual.
    catalog.sqlite_cli(review_of_book_1());
    assert_eq!(fresh_reviews_of_book_1(&mut daemon), 4);
    assert_eq!(cache_book_1(&mut daemon), 4);

    // Emptied, and refilled past the old cursor before the daemon looked.
    let cursor = daemon.wait_caught_up()["cursor"].as_u64().expect("cursor");
    rebuild_past(&catalog, cursor);
    assert_eq!(
        fresh_reviews_of_book_1(&mut daemon),
        5,
        "the review written first in the new outbox (below the old cursor {cursor}) must not be skipped"
    );
    assert_eq!(rebuilds(&mut daemon), 2);
    assert_eq!(cache_book_1(&mut daemon), 5);

    // Dropped and installed again.
    catalog.sqlite_cli("DROP TABLE cachetail_outbox");
    cli_ok("install", &config);
    catalog.sqlite_cli(review_of_book_1());
    assert_eq!(fresh_reviews_of_book_1(&mut daemon), 6);
    assert_eq!(rebuilds(&mut daemon), 3);
    warned_rebuilt(&log, &mut seen, 3);

    // Nothing stale anywhere, and pruning still works from the new ids.
    daemon.get("user:3");
    daemon.get("catalog-stats");
    let verified = daemon.verify();
    assert_eq!(verified["stale"], 0, "{verified}");
    wait_persisted(&catalog.db());
}

#[test]
fn on_redis_an_outbox_rebuilt_while_the_daemon_was_stopped_is_detected_at_start() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let config = reference_config(port).replace(
        "[cache]\n",
        &format!(
            "[cache]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"ct:\"\n",
            redis.url()
        ),
    );
    let config = catalog.write_config(&config);
    let (mut daemon, _log) = start_logged(&config, port);
    eventually("the daemon holds the lease", || {
        (daemon.status()["role"] == "active").then_some(())
    });
    history(&catalog);
    daemon.wait_caught_up();
    assert_eq!(cache_book_1(&mut daemon), 2);
    assert!(daemon.stop().success());
    let cursor: u64 = catalog
        .sqlite_cli("SELECT position FROM cachetail_cursor")
        .parse()
        .expect("cursor");
    assert!(redis.value("book:1").is_some(), "book:1 stays in Redis");

    // While no daemon runs: the outbox emptied and refilled past the durable cursor.
    rebuild_past(&catalog, cursor);
    let (mut daemon, log) = start_logged(&config, port);
    eventually("the daemon holds the lease", || {
        (daemon.status()["role"] == "active").then_some(())
    });
    assert_eq!(
        fresh_reviews_of_book_1(&mut daemon),
        3,
        "Redis must not serve book:1 from before the review (outbox id 1, below the cursor {cursor})"
    );
    if let Some(value) = redis.value("book:1") {
        assert!(value.contains("\"review_count\":3"), "{value}");
    }
    warned_rebuilt(&log, &mut Vec::new(), 1);
    assert_eq!(rebuilds(&mut daemon), 1);
    let verified = daemon.verify();
    assert_eq!(verified["stale"], 0, "{verified}");
}
