//! kill -9 at random moments while a writer streams 100k changes; a crash during trigger
//! installation; a start while an app writer holds the database's write lock.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::strategies::catalog_config;

fn number(catalog: &Catalog, sql: &str) -> u64 {
    catalog
        .sqlite_cli(sql)
        .parse()
        .unwrap_or_else(|_| panic!("a number from {sql}"))
}

/// The outbox rows above the durable cursor are all there: none lost, no gap.
fn assert_outbox_whole(catalog: &Catalog) -> (u64, u64) {
    // One statement: one snapshot, while the writer keeps committing.
    let row = catalog.sqlite_cli(
        "SELECT position, (SELECT coalesce(max(id), 0) FROM cachetail_outbox), \
                (SELECT count(*) FROM cachetail_outbox WHERE id > position) FROM cachetail_cursor",
    );
    let numbers: Vec<u64> = row
        .split('|')
        .map(|n| n.parse().expect("a number"))
        .collect();
    let (cursor, head, above) = (numbers[0], numbers[1], numbers[2]);
    assert_eq!(
        above,
        head - cursor,
        "every row above the cursor ({cursor}) up to the head ({head}) is kept"
    );
    assert_eq!(catalog.sqlite_cli("PRAGMA integrity_check"), "ok");
    (cursor, head)
}

#[test]
fn kill_9_at_random_moments_during_a_100k_change_stream_skips_nothing() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "write-through", "50ms");
    catalog.write_config(&config);
    // 100k changes: 1,000 transactions of 100 rows each (inserts, then an update and a delete
    // per transaction), from a separate process.
    let writer = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys, random\n\
             con = sqlite3.connect(sys.argv[1], timeout=5)\n\
             rnd = random.Random(5)\n\
             for t in range(1000):\n\
             \x20   con.executemany('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, ?, ?)', [(rnd.randint(1, 5), rnd.randint(1, 3), rnd.randint(1, 5)) for _ in range(98)])\n\
             \x20   con.execute('UPDATE reviews SET rating = ? WHERE id = (SELECT max(id) FROM reviews)', (rnd.randint(1, 5),))\n\
             \x20   con.execute('DELETE FROM reviews WHERE id = (SELECT min(id) FROM reviews)')\n\
             \x20   con.commit()\n",
        )
        .arg(catalog.db())
        .stdout(Stdio::null())
        .spawn()
        .expect("writer");
    let mut writer = writer;
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let mut restarts = 0;
    let mut last_cursor = 0;
    let started = Instant::now();
    while writer.try_wait().expect("writer state").is_none() {
        let mut daemon = Daemon::start_existing(&catalog.path().join("config.toml"), port);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // A random moment to crash at: the point of this test, not a synchronisation.
        std::thread::sleep(Duration::from_millis(20 + seed % 300));
        daemon.kill();
        restarts += 1;
        let (cursor, _) = assert_outbox_whole(&catalog);
        assert!(
            cursor >= last_cursor,
            "the durable cursor never goes back ({last_cursor} → {cursor})"
        );
        last_cursor = cursor;
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the writer takes too long"
        );
    }
    assert!(writer.wait().expect("writer").success());
    assert!(restarts >= 3, "only {restarts} crashes during the stream");

    let mut daemon = Daemon::start_existing(&catalog.path().join("config.toml"), port);
    let status = daemon.wait_caught_up();
    wait_persisted(&catalog.db());
    let (cursor, head) = assert_outbox_whole(&catalog);
    assert_eq!(cursor, head);
    assert_eq!(status["cursor"].as_u64(), Some(head));
    // Outbox ids are never reused: they count every change ever captured (100k) plus the flush
    // markers of the first install (one per watched table).
    assert_eq!(head, 100_000 + 3, "one outbox id per change");

    for book in 1..=5 {
        let expected = number(
            &catalog,
            &format!("SELECT count(*) FROM reviews WHERE book_id = {book}"),
        );
        assert_eq!(
            json(&daemon.get(&format!("book:{book}")))["review_count"].as_u64(),
            Some(expected)
        );
    }
    assert_eq!(daemon.verify()["stale"], 0);
    eprintln!("crash test: {restarts} kill -9 restarts during 100k changes");
}

/// Holds the database's write lock from another process for `seconds`.
fn hold_write_lock(catalog: &Catalog, seconds: f64) -> std::process::Child {
    let child = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3, sys, time\ncon = sqlite3.connect(sys.argv[1], isolation_level=None)\ncon.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\ntime.sleep({seconds})\ncon.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 1, 5)')\ncon.execute('COMMIT')\n"
        ))
        .arg(catalog.db())
        .stdout(Stdio::piped())
        .spawn()
        .expect("lock holder");
    let mut child = child;
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "locked");
    child
}

#[test]
fn a_daemon_started_while_a_writer_holds_the_lock_waits_and_then_serves() {
    let catalog = Catalog::new();
    let port = free_port();
    // Longer than the 5 s busy timeout: start-up must keep waiting, not give up.
    let mut holder = hold_write_lock(&catalog, 7.0);
    let mut daemon = Daemon::start(&catalog, &catalog_config(port, "delete", "50ms"), port);
    assert!(
        holder.wait().expect("holder").success(),
        "the app's writer was not hurt"
    );
    // The review committed by the lock holder is there (written before capture existed).
    assert_eq!(json(&daemon.get("book:1"))["review_count"], 3);
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 2, 2)')");
    eventually("capture works", || {
        (json(&daemon.get("book:1"))["review_count"] == 4).then_some(())
    });
}

#[test]
fn a_crash_during_installation_leaves_no_half_installed_capture() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog.write_config(&catalog_config(port, "delete", "50ms"));
    let mut holder = hold_write_lock(&catalog, 2.0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    std::thread::sleep(Duration::from_millis(500)); // the daemon is now waiting to install
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    assert!(holder.wait().expect("holder").success());
    let triggers = number(
        &catalog,
        "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'cachetail_%'",
    );
    assert!(
        triggers == 0 || triggers == 15,
        "all or nothing: {triggers} triggers"
    );
    assert_eq!(catalog.sqlite_cli("PRAGMA integrity_check"), "ok");
    let mut daemon = Daemon::start_existing(&config, port);
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (2, 2, 2)')");
    eventually("capture works after the crash", || {
        (json(&daemon.get("book:2"))["review_count"] == 2).then_some(())
    });
}
