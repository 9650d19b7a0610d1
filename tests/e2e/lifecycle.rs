//! Starting, stopping, restarting; the CLI's check, install and uninstall; the library's `run`.

use std::process::Command;

use crate::common::*;
use crate::strategies::{catalog_config, catalog_daemon};

fn cachetail(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(args)
        .output()
        .expect("run cachetail")
}

#[test]
fn a_restart_resumes_from_the_cursor_and_skips_no_change() {
    let (catalog, mut daemon) = catalog_daemon("delete", "50ms");
    let installed = daemon.wait_caught_up()["events"].as_u64().expect("events");
    catalog.python("for i in range(50):\n    con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (3, 1, 2)')");
    let before = daemon.wait_caught_up();
    assert_eq!(before["events"].as_u64(), Some(installed + 50));
    assert!(daemon.stop().success(), "SIGTERM exits 0");
    let cursor: u64 = catalog
        .sqlite_cli("SELECT position FROM cachetail_cursor")
        .parse()
        .expect("cursor");
    assert_eq!(
        Some(cursor),
        before["cursor"].as_u64(),
        "the cursor was persisted"
    );

    // Changes made while the daemon is down are captured by the triggers all the same.
    catalog.python("for i in range(70):\n    con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (4, 1, 2)')\n    con.commit()");
    catalog.sqlite_cli("DELETE FROM reviews WHERE book_id = 3;");
    let port = daemon.address.port();
    let mut daemon = Daemon::start_existing(&daemon.config.clone(), port);
    let after = daemon.wait_caught_up();
    assert_eq!(
        after["events"], 120,
        "exactly the 70 inserts and 50 deletes made while down"
    );
    assert_eq!(after["cursor"].as_u64(), Some(cursor + 120));
    assert_eq!(json(&daemon.get("book:4"))["review_count"], 70);
    // Applied rows are pruned; the newest stays so that ids are never reused.
    assert_eq!(wait_persisted(&catalog.db()), cursor + 120);
}

#[test]
fn check_accepts_the_reference_config_and_lists_every_problem_with_its_location() {
    let catalog = Catalog::new();
    let config = catalog.write_config(&reference_config(free_port()));
    let ok = cachetail(&["check", "--config", config.to_str().expect("path")]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok"));

    let broken = reference_config(free_port())
        .replace(
            "r.book_id = b.id WHERE b.id = :id",
            "r.bookid = b.id WHERE b.id = :id",
        )
        .replace(
            "FROM users u WHERE u.id = :id",
            "FROM users u WHERE u.id = :user",
        )
        // The reference config's rules are all derived: a hand-written one naming a column the
        // table lacks.
        + "\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{uid}\"]\n";
    let config = catalog.write_config(&broken);
    let bad = cachetail(&["check", "--config", config.to_str().expect("path")]);
    assert_eq!(bad.status.code(), Some(2));
    let errors = String::from_utf8_lossy(&bad.stderr);
    let lines: Vec<&str> = errors
        .lines()
        .filter(|l| l.contains("config.toml:"))
        .collect();
    assert!(lines.len() >= 3, "every problem listed: {errors}");
    assert!(errors.contains("no such column: r.bookid"), "{errors}");
    assert!(errors.contains("uses column `uid`"), "{errors}");
    assert!(errors.contains("the pattern has no `{user}`"), "{errors}");
    assert!(
        lines.iter().all(|l| l
            .split(':')
            .nth(1)
            .is_some_and(|n| n.parse::<u32>().is_ok())),
        "{errors}"
    );

    let syntax = catalog.write_config("database = \"catalog.db\"\n[cache\n");
    let bad = cachetail(&["check", "--config", syntax.to_str().expect("path")]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("config.toml:2:"));
}

#[test]
fn install_is_idempotent_and_uninstall_leaves_the_apps_data() {
    let catalog = Catalog::new();
    let config = catalog.write_config(&reference_config(free_port()));
    let config = config.to_str().expect("path");
    assert!(cachetail(&["install", "--config", config]).status.success());
    let schema_version = catalog.sqlite_cli("PRAGMA schema_version");
    let triggers = catalog.sqlite_cli(
        "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'cachetail_%'",
    );
    assert_eq!(
        triggers, "15",
        "insert, update, delete and two replace triggers on reviews, books and users"
    );
    assert!(cachetail(&["install", "--config", config]).status.success());
    assert_eq!(
        catalog.sqlite_cli("PRAGMA schema_version"),
        schema_version,
        "a second install changes nothing"
    );
    assert_eq!(catalog.sqlite_cli("PRAGMA journal_mode"), "wal");

    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 1, 1)')");
    assert_eq!(
        catalog.sqlite_cli("SELECT count(*) FROM cachetail_outbox WHERE op <> 0"),
        "1"
    );

    assert!(
        cachetail(&["uninstall", "--config", config])
            .status
            .success()
    );
    assert_eq!(
        catalog.sqlite_cli("SELECT count(*) FROM sqlite_master WHERE name LIKE 'cachetail%'"),
        "0"
    );
    assert_eq!(
        catalog.sqlite_cli("SELECT count(*) FROM reviews"),
        "4",
        "the app's rows are untouched"
    );
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 1, 1)')");
}

#[test]
fn a_missing_database_or_table_is_a_clear_error() {
    let catalog = Catalog::new();
    let config =
        catalog.write_config(&reference_config(free_port()).replace("catalog.db", "typo.db"));
    let out = cachetail(&["run", "--config", config.to_str().expect("path")]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !catalog.path().join("typo.db").exists(),
        "the app's database is never created"
    );

    // A rule on a table the database lacks (the reference config's rules are all derived).
    let config = catalog.write_config(
        &(reference_config(free_port())
            + "\n[[rules]]\ntable = \"members\"\nkeys = [\"user:{id}\"]\n"),
    );
    let out = cachetail(&["run", "--config", config.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("table `members` does not exist"));
}

#[test]
fn the_library_runs_on_a_given_listener_and_stops_on_shutdown() {
    let catalog = Catalog::new();
    let config = catalog.write_config(&reference_config(0));
    let config = cachetail::Config::load(&config).expect("config");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = runtime.spawn(cachetail::run(config, listener, async {
        let _ = stopped.await;
    }));
    let mut client = Client::new(address);
    let book = eventually("the library serves", || client.get("/v1/keys/book:1").ok());
    assert_eq!(json(&book)["review_count"], 2);
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 3)')");
    eventually("the write-through lands", || {
        let reply = client.get("/v1/keys/book:1").ok()?;
        (json(&reply)["review_count"] == 3 && x_cache(&reply) == "hit").then_some(())
    });
    stop.send(()).expect("shutdown");
    runtime
        .block_on(daemon)
        .expect("joined")
        .expect("run returns Ok");
    assert!(
        std::net::TcpStream::connect(address).is_err(),
        "the listener is closed"
    );
}

#[test]
fn verify_finds_a_value_left_stale_by_a_missing_rule() {
    let catalog = Catalog::new();
    let port = free_port();
    // `author:{id}` reads books, but no rule watches books.author: the classic tracking gap.
    let config = catalog_config(port, "delete", "50ms")
        + "\n[keys.\"author:{id}\"]\nquery = \"SELECT author FROM books WHERE id = :id\"\n";
    let config = config.replace("[[rules]]\ntable = \"books\"\ntags = [\"books\"]\n", "");
    let mut daemon = Daemon::start(&catalog, &config, port);
    daemon.get("author:1");
    daemon.get("book:1");
    let path = daemon.config.to_str().expect("path").to_owned();
    let verify = || cachetail(&["verify", "--config", &path, "--sample", "100"]);

    let clean = verify();
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&clean.stdout).expect("a JSON report");
    assert_eq!(
        (report["checked"].as_u64(), report["stale"].as_u64()),
        (Some(2), Some(0))
    );

    catalog.python("con.execute(\"UPDATE books SET author = 'Someone Else' WHERE id = 1\")");
    daemon.wait_caught_up();
    let found = verify();
    assert_eq!(
        found.status.code(),
        Some(1),
        "stale values make verify fail"
    );
    let report: serde_json::Value = serde_json::from_slice(&found.stdout).expect("a JSON report");
    assert_eq!(report["stale"], 1);
    assert_eq!(report["stale_keys"][0], "author:1");
    assert_eq!(daemon.status()["stale_found"], 1);
}

#[test]
fn warm_start_fills_the_listed_keys_while_serving() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms")
        .replace(
            "tags = [\"books\"]\n\n[keys.\"top-books\"]",
            "tags = [\"books\"]\nwarm = \"SELECT id FROM books ORDER BY id LIMIT 3\"\n\n[keys.\"top-books\"]",
        )
        .replace("many = true\n", "many = true\nwarm = \"SELECT 1\"\n");
    assert!(config.contains("LIMIT 3") && config.contains("SELECT 1"));
    let mut daemon = Daemon::start(&catalog, &config, port);
    let warm = eventually("warm start finishes", || {
        let status = daemon.status();
        (status["warm"]["finished"] == true).then_some(status["warm"].clone())
    });
    assert_eq!(
        (warm["total"].as_u64(), warm["failed"].as_u64()),
        (Some(4), Some(0)),
        "{warm}"
    );
    for key in ["book:1", "book:2", "book:3", "top-books"] {
        assert_eq!(daemon.peek(key).status, 200, "{key} was warmed");
    }
    assert_eq!(daemon.peek("book:4").status, 504, "not listed, not warmed");

    // A warm query whose columns do not name the placeholders is a config problem.
    let bad = config.replace(
        "SELECT id FROM books ORDER BY id LIMIT 3",
        "SELECT title, year FROM books",
    );
    let path = catalog.path().join("bad.toml");
    std::fs::write(&path, bad).expect("write");
    let out = cachetail(&["check", "--config", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warm query"), "{stderr}");
}

#[test]
fn the_example_app_reads_fresh_values_without_invalidating_anything() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &reference_config(port), port);
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/catalog_app.py"
        ))
        .arg("--db")
        .arg(catalog.db())
        .args(["--url", &format!("http://{}", daemon.address), "tour", "1"])
        .output()
        .expect("python3 runs the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("posted a 5-star review"), "{stdout}");
    assert!(stdout.contains("the app invalidated nothing"), "{stdout}");
    assert_eq!(daemon.verify()["stale"], 0);
}

#[test]
fn check_finds_a_planted_tracking_gap() {
    let catalog = Catalog::new();
    let port = free_port();
    let clean = catalog_config(port, "delete", "50ms");
    let path = catalog.write_config(&clean);
    let out = cachetail(&["check", "--config", path.to_str().expect("path")]);
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "the catalog config has no gap: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A new endpoint caches review data, and nobody adds a rule for it.
    let planted = format!(
        "{clean}\n[keys.\"reviews-by-user:{{id}}\"]\nquery = \"SELECT count(*) AS n, avg(rating) AS avg FROM reviews WHERE user_id = :id\"\n"
    );
    let path = catalog.write_config(&planted);
    let out = cachetail(&["check", "--config", path.to_str().expect("path")]);
    assert!(out.status.success(), "a gap is a warning, not an error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "key family `reviews-by-user:{id}` reads `reviews.rating`, `reviews.user_id`, but no rule refreshes `reviews-by-user:{id}` when `reviews` changes"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.matches("warning").count(), 1, "{stderr}");
    let mut daemon = Daemon::start_existing(&path, port);
    let gaps = daemon.status()["config"]["tracking_gaps"].clone();
    assert_eq!(gaps.as_array().map(Vec::len), Some(1), "{gaps}");
}

#[test]
fn explain_prints_what_a_change_maps_to() {
    let catalog = Catalog::new();
    let path = catalog.write_config(&catalog_config(free_port(), "write-through", "50ms"));
    let config = path.to_str().expect("path");
    let out = cachetail(&[
        "explain",
        "--config",
        config,
        "--table",
        "reviews",
        "--op",
        "update",
        "--old",
        r#"{"book_id":3}"#,
        "--new",
        r#"{"book_id":5}"#,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<String> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        lines,
        [
            "update on reviews:",
            "key book:3 write-through",
            "key book:5 write-through",
            "key top-books write-through",
        ],
        "{stdout}"
    );
    let tag = cachetail(&[
        "explain",
        "--config",
        config,
        "--table",
        "books",
        "--op",
        "delete",
        "--old",
        r#"{"id":1}"#,
    ]);
    assert!(String::from_utf8_lossy(&tag.stdout).contains("tag  books"));
    let unknown = cachetail(&[
        "explain", "--config", config, "--table", "nope", "--op", "insert", "--new", "{}",
    ]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no rule watches table `nope`"));
}

#[test]
fn watch_prints_each_change_with_its_keys_and_survives_a_restart() {
    let (catalog, mut daemon) = catalog_daemon("write-through", "50ms");
    let mut watch = Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["watch", "--url", &format!("http://{}", daemon.address)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cachetail watch");
    let stdout = watch.stdout.take().expect("stdout");
    let lines = lines_of(stdout);
    let wait_for =
        |what: &str, lines: &std::sync::mpsc::Receiver<String>, hit: &dyn Fn(&str) -> bool| {
            let deadline = std::time::Instant::now() + DEADLINE;
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match lines.recv_timeout(left) {
                    Ok(line) if hit(&line) => return line,
                    Ok(_) => {}
                    Err(_) => panic!("timed out waiting for {what}"),
                }
            }
        };
    wait_for("a status line", &lines, &|l| {
        l.starts_with("[status] active")
    });
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (4, 2, 5)')");
    let line = wait_for("the change", &lines, &|l| l.contains("insert reviews"));
    assert!(line.contains("book_id=4"), "{line}");
    assert!(line.contains("book:4 (write-through)"), "{line}");
    assert!(line.contains("top-books (write-through)"), "{line}");
    let status = wait_for("a status line with the change timed", &lines, &|l| {
        l.starts_with("[status] active") && l.contains("commit→fresh p50 ") && !l.contains("p50 –")
    });
    assert!(status.contains(" · lag "), "{status}");

    // The daemon restarts: watch reconnects and keeps printing.
    daemon.kill();
    let mut daemon = Daemon::start_existing(&daemon.config.clone(), daemon.address.port());
    wait_for("the reconnection", &lines, &|l| {
        l.starts_with("-- following")
    });
    catalog.python("con.execute(\"UPDATE users SET name = 'Zed' WHERE id = 2\")");
    let line = wait_for("the next change", &lines, &|l| l.contains("update users"));
    assert!(line.contains("user:2 (delete)"), "{line}");
    // A stop with the feed still open ends the feed instead of waiting for it.
    let stopping = std::time::Instant::now();
    assert_eq!(daemon.stop().code(), Some(0));
    assert!(
        stopping.elapsed() < std::time::Duration::from_secs(5),
        "stopping took {:?} with a feed open",
        stopping.elapsed()
    );
    let _ = watch.kill();
    let _ = watch.wait();
}
