//! `?fresh=1` across a pause: writes made while capture is paused have no outbox row, so no
//! wait for the apply covers them; a fresh read must find the pause itself, not rely on the
//! daemon having noticed it yet.

use std::time::Instant;

use crate::common::*;

#[test]
fn a_fresh_read_after_a_pause_the_daemon_has_not_noticed_yet_answers_from_the_database() {
    let (catalog, config, mut daemon) = paused_behind_a_busy_tail();
    let asked = Instant::now();
    let reply = daemon.get_path("/v1/keys/item:1?fresh=1");
    eprintln!(
        "fresh read answered in {:?}: {} {}",
        asked.elapsed(),
        reply.status,
        reply.text()
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        reply.text().contains("\"v\":2"),
        "?fresh=1 after the write answered {} ({:?})",
        reply.text(),
        reply.header("x-cache")
    );
    assert_eq!(reply.header("x-cachetail-bypass"), Some("paused"));
    cli_ok("resume", &catalog.write_config(&config));
}

/// The same through a multi-get: each key is looked up after the one wait, and none may be
/// served from memory when that wait found capture paused (the hot path served the cached
/// `{"id":1,"v":1}` as a hit; seen as stale `?fresh=1` multi-get answers by the randomized
/// checker, each sent just before a pause).
#[test]
fn a_fresh_multi_get_after_a_pause_the_daemon_has_not_noticed_yet_answers_from_the_database() {
    let (catalog, config, daemon) = paused_behind_a_busy_tail();
    let mut client = Client::new(daemon.address);
    let reply = client
        .request(
            "POST",
            "/v1/keys?fresh=1",
            &[("Content-Type", "application/json")],
            br#"["item:1"]"#,
        )
        .expect("POST /v1/keys?fresh=1");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer = reply.json().expect("json");
    let entry = &answer["results"][0];
    assert_eq!(
        entry["value"]["v"], 2,
        "?fresh=1 multi-get after the write answered {entry}"
    );
    assert_eq!(entry["cache"], "bypass", "{entry}");
    cli_ok("resume", &catalog.write_config(&config));
}

/// A daemon with `item:1` cached as `{"id":1,"v":1}`, its tail busy in a slow write-through
/// recompute, capture paused meanwhile (before the daemon could notice), and `item:1` then
/// updated to `v = 2` with no outbox row.
fn paused_behind_a_busy_tail() -> (Catalog, String, Daemon) {
    let catalog = Catalog::new();
    catalog.sqlite_cli(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, v INTEGER NOT NULL);
         CREATE TABLE slow (id INTEGER PRIMARY KEY, spin INTEGER NOT NULL);
         INSERT INTO items VALUES (1, 1);
         INSERT INTO slow VALUES (1, 0);",
    );
    let port = free_port();
    let config = format!(
        r#"database = "catalog.db"
listen = "127.0.0.1:{port}"
fresh_timeout = "20s"

[keys."item:{{id}}"]
query = "SELECT id, v FROM items WHERE id = :id"

[keys."slow:{{id}}"]
query = """WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s
             WHERE i < (SELECT spin FROM slow WHERE id = :id))
           SELECT :id AS id, (SELECT count(*) FROM s) AS spun"""

[[rules]]
table = "items"
keys = ["item:{{id}}"]

[[rules]]
table = "slow"
keys = ["slow:{{id}}"]
strategy = "write-through"
"#
    );
    let mut daemon = Daemon::start(&catalog, &config, port);
    assert!(daemon.get("item:1").text().contains("\"v\":1"));
    assert_eq!(x_cache(&daemon.get("item:1")), "hit");

    // Keep the tail busy: slow:1's write-through recompute spins for a while.
    catalog.sqlite_cli("UPDATE slow SET spin = 3000000 WHERE id = 1");
    eventually("the tail is inside slow:1's recompute", || {
        let status = daemon.status();
        (status["lag"].as_u64()? > 0).then_some(())
    });
    // Meanwhile: capture paused, and a write that no trigger records.
    cli_ok("pause", &catalog.write_config(&config));
    catalog.sqlite_cli("UPDATE items SET v = 2 WHERE id = 1");
    (catalog, config, daemon)
}
