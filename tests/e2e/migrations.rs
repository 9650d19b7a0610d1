//! App migrations while the daemon runs: rebuilt tables, altered columns, dropped and created
//! tables, and `cachetail pause` / `resume` around a migration that touches a captured column.

use crate::common::*;
use crate::strategies::catalog_daemon;

fn capture_installed(catalog: &Catalog) -> bool {
    catalog.sqlite_cli("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name = 'cachetail_insert_reviews'") == "1"
}

fn review_count(daemon: &mut Daemon, key: &str) -> i64 {
    json(&daemon.get(key))["review_count"]
        .as_i64()
        .expect("review_count")
}

#[test]
fn a_table_rebuilt_by_a_migration_tool_gets_capture_back_and_its_keys_flushed() {
    let (catalog, mut daemon) = catalog_daemon("write-through", "50ms");
    assert_eq!(review_count(&mut daemon, "book:1"), 2);
    assert_eq!(json(&daemon.get("user:1"))["name"], "user1");

    // What sqlite-utils `transform`, Django and Alembic batch mode do: create new, copy, drop old,
    // rename. Dropping the old table drops cachetail's triggers with it; the review posted in the
    // same transaction is never captured.
    catalog.python(
        "con.executescript('''
BEGIN;
CREATE TABLE reviews_new (id INTEGER PRIMARY KEY, book_id INTEGER NOT NULL, user_id INTEGER NOT NULL,
                          rating INTEGER NOT NULL, body TEXT NOT NULL DEFAULT '', created TEXT);
INSERT INTO reviews_new (id, book_id, user_id, rating, body) SELECT id, book_id, user_id, rating, body FROM reviews;
DROP TABLE reviews;
ALTER TABLE reviews_new RENAME TO reviews;
INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5);
COMMIT;
''')",
    );
    eventually("capture is reinstalled on the rebuilt table", || {
        capture_installed(&catalog).then_some(())
    });
    daemon.wait_caught_up();
    assert_eq!(
        daemon.peek("book:1").status,
        504,
        "a value read from the old table is dropped"
    );
    assert_eq!(
        review_count(&mut daemon, "book:1"),
        3,
        "the uncaptured review shows"
    );
    assert_eq!(
        daemon.peek("user:1").status,
        200,
        "user:1 does not read reviews: kept"
    );

    // And the rebuilt table is captured again.
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 2, 1)')");
    eventually("a later review shows", || {
        (review_count(&mut daemon, "book:1") == 4).then_some(())
    });
    assert_eq!(daemon.verify()["stale"], 0);
}

#[test]
fn altering_columns_the_rules_do_not_capture_just_works() {
    let (catalog, mut daemon) = catalog_daemon("delete", "50ms");
    review_count(&mut daemon, "book:2");
    catalog.python("con.execute('ALTER TABLE reviews ADD COLUMN helpful INTEGER DEFAULT 0')");
    catalog.python("con.execute('ALTER TABLE reviews RENAME COLUMN body TO text')");
    // Dropping a column cachetail does not capture must succeed.
    catalog.python("con.execute('ALTER TABLE reviews DROP COLUMN text')");
    catalog.python("con.execute('INSERT INTO reviews (book_id, user_id, rating, helpful) VALUES (2, 2, 4, 1)')");
    eventually("the review shows", || {
        (review_count(&mut daemon, "book:2") == 2).then_some(())
    });
    assert!(capture_installed(&catalog));
    let status = daemon.status();
    assert_eq!(
        status["capture_failures"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
}

#[test]
fn a_dropped_and_recreated_table_is_reported_then_captured_again() {
    let (catalog, mut daemon) = catalog_daemon("delete", "50ms");
    assert_eq!(json(&daemon.get("user:2"))["name"], "user2");
    catalog.python("con.execute('DROP TABLE users')");
    let failures = eventually("the dropped table is reported", || {
        let status = daemon.status();
        let failures = status["capture_failures"].as_array()?.clone();
        (!failures.is_empty()).then_some(failures)
    });
    assert_eq!(failures[0]["table"], "users");
    // The install that found the table gone wrote a flush marker in the same transaction; once
    // the daemon has applied it (like any change, a moment after it was committed), the values
    // that read the table are gone.
    daemon.wait_caught_up();
    let peeked = daemon.peek("user:2");
    assert_eq!(
        peeked.status,
        504,
        "its values are not served from the cache: {}",
        peeked.text()
    );

    catalog.python("con.execute('CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)')\ncon.execute(\"INSERT INTO users VALUES (2, 'again')\")");
    eventually("the recreated table is captured", || {
        let status = daemon.status();
        status["capture_failures"]
            .as_array()?
            .is_empty()
            .then_some(())
    });
    assert_eq!(json(&daemon.get("user:2"))["name"], "again");
    catalog.sqlite_cli("UPDATE users SET name = 'later' WHERE id = 2;");
    eventually("changes to it are captured", || {
        (json(&daemon.get("user:2"))["name"] == "later").then_some(())
    });
}

#[test]
fn pause_serves_from_the_database_and_resume_flushes() {
    let (catalog, mut daemon) = catalog_daemon("write-through", "50ms");
    assert_eq!(review_count(&mut daemon, "book:1"), 2);
    let config = daemon.config.clone();
    let cli = |verb: &str| cli_ok(verb, &config);

    cli("pause");
    eventually("the daemon sees the pause", || {
        (daemon.status()["paused"] == true).then_some(())
    });
    assert!(
        !capture_installed(&catalog),
        "pause removes the triggers, and the daemon leaves them out"
    );
    // A migration that drops a column a rule captures would now succeed; meanwhile every read
    // comes from the database, so nothing stale is served even though nothing is captured.
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 3)')");
    let reply = daemon.get("book:1");
    assert_eq!(
        (x_cache(&reply), json(&reply)["review_count"].as_i64()),
        ("bypass", Some(3))
    );

    cli("resume");
    eventually("the daemon sees the resume", || {
        (daemon.status()["paused"] == false).then_some(())
    });
    assert!(capture_installed(&catalog));
    assert_eq!(review_count(&mut daemon, "book:1"), 3);
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 2, 3)')");
    eventually("capture works again", || {
        (review_count(&mut daemon, "book:1") == 4).then_some(())
    });
    assert_eq!(daemon.verify()["stale"], 0);
}

#[test]
fn an_outbox_from_before_write_times_is_upgraded_in_place() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog.write_config(&reference_config(port));
    cli_ok("install", &config);
    // Turn the install into what an older cachetail left: no `at` column, triggers without it,
    // and a change captured that way, waiting to be applied.
    catalog.python(
        "rows = con.execute(\"SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'cachetail_%'\").fetchall()\n\
         assert rows and all(\"julianday()\" in sql for _, sql in rows)\n\
         for name, _ in rows: con.execute(f'DROP TRIGGER \"{name}\"')\n\
         con.execute('CREATE TABLE old_outbox (id INTEGER PRIMARY KEY, capture INTEGER NOT NULL, op INTEGER NOT NULL, old TEXT, new TEXT)')\n\
         con.execute('INSERT INTO old_outbox SELECT id, capture, op, old, new FROM cachetail_outbox')\n\
         con.execute('DROP TABLE cachetail_outbox')\n\
         con.execute('ALTER TABLE old_outbox RENAME TO cachetail_outbox')\n\
         for _, sql in rows: con.execute(sql.replace(', at)', ')').replace(', julianday()', ''))\n\
         con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (2, 3, 1)')",
    );
    assert_eq!(
        catalog.sqlite_cli(
            "SELECT count(*) FROM pragma_table_info('cachetail_outbox') WHERE name = 'at'"
        ),
        "0"
    );
    let mut daemon = Daemon::start_existing(&config, port);
    let status = daemon.wait_caught_up();
    assert_eq!(status["apply_errors"], 0, "the old row decodes: {status}");
    assert_eq!(
        catalog.sqlite_cli(
            "SELECT count(*) FROM pragma_table_info('cachetail_outbox') WHERE name = 'at'"
        ),
        "1",
        "the column is added"
    );
    assert_eq!(review_count(&mut daemon, "book:2"), 2);
    let timed = |daemon: &mut Daemon| {
        daemon.status()["latency"]["commit_to_fresh"]["count"]
            .as_u64()
            .expect("count")
    };
    let before = timed(&mut daemon);
    catalog.sqlite_cli("INSERT INTO reviews (book_id, user_id, rating) VALUES (2, 2, 4)");
    eventually("the new trigger records the write time", || {
        (timed(&mut daemon) > before).then_some(())
    });
    assert_eq!(review_count(&mut daemon, "book:2"), 3);
    assert_eq!(daemon.verify()["stale"], 0);
}
