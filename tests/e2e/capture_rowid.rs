//! Capture on a table where only the rowid can make a REPLACE remove a row: its replace trigger
//! looks only when the insert names a rowid (issue 16: an insert given no rowid cannot conflict,
//! and capture should cost what one trigger costs). Every way a writer can name the rowid, -1
//! included (which SQLite also shows a BEFORE INSERT trigger for a rowid it is still to choose),
//! leaves nothing stale; and triggers left by the previous cachetail are replaced on start
//! without losing a change written meanwhile.

use crate::common::*;

const SCHEMA: &str = "CREATE TABLE ratings (id INTEGER PRIMARY KEY, book_id INTEGER, rating INTEGER);
INSERT INTO ratings (id, book_id, rating) VALUES (1, 1, 5), (2, 1, 4), (-1, 1, 3), (5, 2, 2), (6, 3, 1);";

fn config(port: u16) -> String {
    format!(
        "database = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n[tail]\npoll_interval = \"100ms\"\n\
         [keys.\"book:{{id}}\"]\nquery = \"SELECT count(*) AS n, sum(rating) AS total FROM ratings WHERE book_id = :id\"\n\
         [[rules]]\ntable = \"ratings\"\nkeys = [\"book:{{book_id}}\"]\n"
    )
}

/// A catalog with the narrow `ratings` table and its rows.
fn narrow_catalog() -> Catalog {
    let catalog = Catalog::new();
    catalog.python(&format!("con.executescript({SCHEMA:?})"));
    catalog
}

/// Caches every book's value, runs `code` as a separate python3 writer, waits for the daemon,
/// and checks that nothing cached differs from the database.
fn write_and_check(catalog: &Catalog, daemon: &mut Daemon, code: &str) {
    for book in 1..=5 {
        assert_eq!(daemon.get(&format!("book:{book}")).status, 200);
    }
    catalog.python(code);
    daemon.wait_caught_up();
    let report = daemon.verify();
    assert_eq!(report["stale"], 0, "stale values after {code}: {report}");
    assert_eq!(report["unverified"], 0, "{report}");
}

#[test]
fn replaces_naming_the_rowid_leave_nothing_stale_minus_one_included() {
    let catalog = narrow_catalog();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &config(port), port);
    let trigger = catalog.sqlite_cli(
        "SELECT sql FROM sqlite_master WHERE name = 'cachetail_replace_insert_ratings'",
    );
    assert!(
        trigger.contains("WHEN NEW.rowid <> -1"),
        "the replace trigger looks only when the rowid is named: {trigger}"
    );

    // Row 5 moves from book 2 to book 3: book 2 must be refreshed (the replace trigger).
    write_and_check(
        &catalog,
        &mut daemon,
        "con.execute('REPLACE INTO ratings (id, book_id, rating) VALUES (5, 3, 5)')",
    );
    // Row -1 moves from book 1 to book 4. In the BEFORE INSERT trigger NEW.rowid is -1, as for
    // a rowid SQLite is to choose, so the replace trigger does not look: the insert is recorded
    // as a flush of the table instead, and book 1 is not served stale.
    write_and_check(
        &catalog,
        &mut daemon,
        "con.execute('INSERT OR REPLACE INTO ratings (id, book_id, rating) VALUES (-1, 4, 1)')",
    );
    assert_eq!(daemon.peek("book:1").status, 504, "book:1 was dropped");
    // The rowid named through its other names, an upsert, and rowids SQLite chooses.
    write_and_check(
        &catalog,
        &mut daemon,
        "con.execute('REPLACE INTO ratings (rowid, book_id, rating) VALUES (1, 5, 1)')\n\
         con.execute('INSERT OR REPLACE INTO ratings (oid, book_id, rating) VALUES (-1, 2, 2)')\n\
         con.execute('INSERT INTO ratings (id, book_id, rating) VALUES (2, 3, 3) ON CONFLICT (id) DO UPDATE SET book_id = excluded.book_id')\n\
         con.executemany('INSERT OR REPLACE INTO ratings (id, book_id, rating) VALUES (?, ?, ?)', [(None, 1, 1), (6, 1, 2), ('7', 2, 2), (7.0, 4, 4)])\n\
         con.executemany('INSERT INTO ratings (book_id, rating) VALUES (?, ?)', [(b, 1) for b in range(1, 6)])",
    );
    let status = daemon.status();
    assert_eq!(status["unreadable_rows"], 0, "{status}");
    assert_eq!(status["apply_errors"], 0, "{status}");
}

/// The trigger text the previous cachetail installed for `sql` as installed now: the time as
/// `julianday('now')`, no `WHEN` on the replace trigger, the insert's op a plain 1.
const TO_PREVIOUS: &str = "def previous(sql):\n    return sql.replace('julianday()', \"julianday('now')\").replace('WHEN NEW.rowid <> -1 ', '').replace('CASE NEW.rowid WHEN -1 THEN 0 ELSE 1 END', '1')\n";

#[test]
fn triggers_of_the_previous_version_are_replaced_without_losing_a_change() {
    let catalog = narrow_catalog();
    let port = free_port();
    let config = catalog.write_config(&config(port));
    cli_ok("install", &config);
    // What the previous cachetail left: its triggers, and changes they captured, not applied.
    catalog.python(&format!(
        "{TO_PREVIOUS}\
         rows = con.execute(\"SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'cachetail_%'\").fetchall()\n\
         assert len(rows) == 5 and any('WHEN NEW.rowid <> -1' in sql for _, sql in rows)\n\
         for name, sql in rows:\n    con.execute(f'DROP TRIGGER \"{{name}}\"')\n    con.execute(previous(sql))\n\
         con.execute('REPLACE INTO ratings (id, book_id, rating) VALUES (5, 4, 4)')\n\
         con.executemany('INSERT INTO ratings (book_id, rating) VALUES (?, ?)', [(b % 5 + 1, 1) for b in range(100)])"
    ));
    let before: i64 = catalog
        .sqlite_cli("SELECT count(*) FROM cachetail_outbox WHERE op = 1")
        .parse()
        .expect("count");
    // (They also recorded row -1 as replaced by every insert given no rowid: harmless, and what
    // the replace trigger's WHEN now spares.)
    assert_eq!(before, 101, "the previous triggers captured each insert");

    // A writer keeps writing (100-row transactions, rowids chosen by SQLite) while the daemon
    // starts and replaces the triggers in its install transaction.
    let db = catalog.db();
    let writer = std::thread::spawn(move || {
        python_on(
            &db,
            "import time\n\
             for _ in range(150):\n    con.executemany('INSERT INTO ratings (book_id, rating) VALUES (?, ?)', [(b % 5 + 1, 2) for b in range(100)])\n    con.commit()\n    time.sleep(0.01)",
        )
    });
    eventually("the writer is writing", || {
        let captured: i64 = catalog
            .sqlite_cli("SELECT count(*) FROM cachetail_outbox WHERE op = 1")
            .parse()
            .ok()?;
        (captured > 101).then_some(())
    });
    let mut daemon = Daemon::start_existing(&config, port);
    writer.join().expect("the writer finished");
    let status = daemon.wait_caught_up();
    let triggers = catalog.sqlite_cli(
        "SELECT group_concat(sql, ' ; ') FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'cachetail_%'",
    );
    assert!(
        triggers.contains("WHEN NEW.rowid <> -1") && !triggers.contains("julianday('now')"),
        "the daemon replaced the previous triggers: {triggers}"
    );
    assert_eq!(status["unreadable_rows"], 0, "{status}");
    assert_eq!(status["apply_errors"], 0, "{status}");
    // Every change was captured, before, during and after the replacement: one outbox row per
    // row written (the 101 before, 15,000 meanwhile), applied.
    let written = 101 + 15_000;
    assert!(
        status["events"].as_u64() >= Some(written),
        "{written} changes applied: {status}"
    );
    let per_book: Vec<String> = (1..=5)
        .map(|book| {
            let reply = daemon.get(&format!("book:{book}"));
            assert_eq!(reply.status, 200);
            json(&reply)["n"].to_string()
        })
        .collect();
    let expected: Vec<String> = (1..=5)
        .map(|book| {
            catalog.sqlite_cli(&format!(
                "SELECT count(*) FROM ratings WHERE book_id = {book}"
            ))
        })
        .collect();
    assert_eq!(per_book, expected);
    assert_eq!(daemon.verify()["stale"], 0);
}
