//! kill -9 at random moments while a writer streams 100k changes; kill -9 inside the install
//! transaction (hundreds of watched tables make it long); a start while an app writer holds the
//! database's write lock.

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

/// A catalog with `TABLES` more tables, each watched by a rule: the one install transaction then
/// creates thousands of triggers and takes long enough (about half a second) to be killed in the
/// middle of. The database is in WAL mode already, so the install is the daemon's first write.
struct ManyTables {
    template: Catalog,
}

impl ManyTables {
    const TABLES: usize = 500;

    fn new() -> ManyTables {
        let template = Catalog::new();
        template.python(&format!(
            "con.execute('PRAGMA journal_mode = WAL')\n\
             con.executescript('BEGIN;' + ''.join(f'CREATE TABLE t{{i}} (id INTEGER PRIMARY KEY, v INTEGER);' for i in range({})) + 'COMMIT;')",
            Self::TABLES
        ));
        ManyTables { template }
    }

    /// Every table a rule watches: the catalog's three and the many.
    fn watched() -> u64 {
        Self::TABLES as u64 + 3
    }

    /// A fresh copy of the database (no capture yet) and its config, listening on `port`.
    fn copy(&self, port: u16) -> (Catalog, std::path::PathBuf) {
        let catalog = Catalog {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        std::fs::copy(self.template.db(), catalog.db()).expect("copy the database");
        let mut config = catalog_config(port, "delete", "50ms");
        config.push_str(
            "\n[keys.\"row:{table}:{id}\"]\nquery = \"SELECT :table AS tbl, :id AS id\"\n",
        );
        for i in 0..Self::TABLES {
            config.push_str(&format!(
                "\n[[rules]]\ntable = \"t{i}\"\nkeys = [\"row:t{i}:{{id}}\"]\n"
            ));
        }
        let config = catalog.write_config(&config);
        (catalog, config)
    }
}

/// Starts `cachetail run` quietly (its log would list thousands of triggers).
fn spawn_quiet(config: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cachetail")
}

/// Whether another connection (the daemon) holds the database's write lock: `BEGIN IMMEDIATE`
/// with no busy timeout fails with "database is locked" exactly then. The probe's own
/// transaction is rolled back at once.
fn write_locked(probe: &rusqlite::Connection) -> bool {
    match probe.execute_batch("BEGIN IMMEDIATE; ROLLBACK;") {
        Ok(()) => false,
        Err(e)
            if matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ) =>
        {
            true
        }
        Err(e) => panic!("the lock probe failed: {e}"),
    }
}

fn lock_probe(catalog: &Catalog) -> rusqlite::Connection {
    let probe = rusqlite::Connection::open(catalog.db()).expect("open the probe");
    probe.busy_timeout(Duration::ZERO).expect("no busy timeout");
    probe
}

/// What a kill left in the database: capture triggers, cachetail's tables, capture layouts,
/// flush markers above the cursor, the outbox head, the cursor.
#[derive(Debug, Default)]
struct Installed {
    triggers: u64,
    tables: u64,
    layouts: u64,
    above_cursor: u64,
    head: u64,
    cursor: u64,
}

fn installed(catalog: &Catalog) -> Installed {
    let conn = rusqlite::Connection::open(catalog.db()).expect("open");
    let count = |sql: &str| {
        conn.query_row(sql, [], |row| row.get::<_, i64>(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}")) as u64
    };
    let triggers = count(
        "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'cachetail_%'",
    );
    let tables = count(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name LIKE 'cachetail_%'",
    );
    if tables == 0 {
        return Installed {
            triggers,
            ..Installed::default()
        };
    }
    Installed {
        triggers,
        tables,
        layouts: count("SELECT count(*) FROM cachetail_capture"),
        above_cursor: count(
            "SELECT count(*) FROM cachetail_outbox WHERE op = 0 AND id > (SELECT position FROM cachetail_cursor)",
        ),
        head: count("SELECT coalesce(max(id), 0) FROM cachetail_outbox"),
        cursor: count("SELECT position FROM cachetail_cursor"),
    }
}

#[test]
fn a_crash_during_installation_leaves_no_half_installed_capture() {
    let many = ManyTables::new();
    let watched = ManyTables::watched();

    // A whole install: how long it holds the write lock here, and what it leaves behind.
    let port = free_port();
    let (catalog, config) = many.copy(port);
    let probe = lock_probe(&catalog);
    let mut child = spawn_quiet(&config);
    eventually("the daemon takes the write lock to install capture", || {
        write_locked(&probe).then_some(())
    });
    let locked_at = Instant::now();
    let mut client = Client::new(format!("127.0.0.1:{port}").parse().expect("address"));
    eventually("the daemon serves once installed", || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the daemon exited with {status}");
        }
        client.get("/healthz").ok().filter(|r| r.status == 200)
    });
    let mut install_took = locked_at.elapsed();
    child.kill().expect("kill");
    child.wait().expect("reaped");
    let whole = installed(&catalog);
    assert!(
        whole.triggers >= 3 * watched && whole.layouts == watched,
        "a whole install captures every watched table: {whole:?}"
    );
    eprintln!(
        "crash test: the install of {watched} tables ({} triggers) took {install_took:?}",
        whole.triggers
    );

    // kill -9 at moments through the install transaction, each on a fresh copy. A moment the
    // install is already over at (the machine got faster) shortens the estimate for the next.
    let mut inside = Vec::new();
    for percent in [10u32, 30, 50, 70, 90] {
        let port = free_port();
        let (catalog, config) = many.copy(port);
        let probe = lock_probe(&catalog);
        let mut child = spawn_quiet(&config);
        eventually("the daemon takes the write lock to install capture", || {
            write_locked(&probe).then_some(())
        });
        let locked_at = Instant::now();
        std::thread::sleep((install_took * percent / 100).saturating_sub(locked_at.elapsed()));
        let still_locked = write_locked(&probe);
        let at = locked_at.elapsed();
        child.kill().expect("kill -9");
        child.wait().expect("reaped");
        drop(probe);

        let left = installed(&catalog);
        eprintln!(
            "crash test: kill -9 {at:?} into the install (the lock still held: {still_locked}): {left:?}"
        );
        assert_eq!(catalog.sqlite_cli("PRAGMA integrity_check"), "ok");
        if left.triggers == 0 {
            assert_eq!(
                left.tables, 0,
                "no trigger, so nothing of the install may be left: {left:?}"
            );
            if still_locked {
                inside.push(at);
            }
        } else {
            assert_eq!(
                left.triggers, whole.triggers,
                "all triggers or none, after a kill -9 {at:?} into the install: {left:?}"
            );
            assert_eq!(
                left.layouts, watched,
                "a layout per watched table: {left:?}"
            );
            assert!(
                left.head == watched && left.cursor <= left.head,
                "a flush marker per watched table, the cursor at most there: {left:?}"
            );
            assert_eq!(
                left.above_cursor,
                left.head - left.cursor,
                "every marker above the cursor is kept: {left:?}"
            );
            install_took = install_took.min(at);
        }

        if percent == 90 {
            // A restart installs capture, and captures.
            let mut child = spawn_quiet(&config);
            let mut client = Client::new(format!("127.0.0.1:{port}").parse().expect("address"));
            catalog.python(
                "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (2, 2, 2)')",
            );
            let review_count = |client: &mut Client| {
                let reply = client.get("/v1/keys/book:2").ok()?;
                json(&reply)["review_count"].as_u64()
            };
            eventually("capture works after the crash", || {
                (review_count(&mut client) == Some(2)).then_some(())
            });
            assert_eq!(installed(&catalog).triggers, whole.triggers);
            catalog.python(
                "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (2, 3, 4)')",
            );
            eventually("a later review is captured", || {
                (review_count(&mut client) == Some(3)).then_some(())
            });
            child.kill().expect("kill");
            child.wait().expect("reaped");
        }
    }
    assert!(
        inside.len() >= 3,
        "only {} of 5 kills landed inside the install transaction ({inside:?})",
        inside.len()
    );
}
