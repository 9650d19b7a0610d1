//! README claims about the config and the daemon's own behaviour, each through the real binary:
//! the tail's wake-ups (the `-wal` notification, and the poll when notifications are
//! unavailable), `listen`'s default, `max_entries` (memory, and not with Redis), write-behind
//! `workers` and `batch_size`, how key parameters are bound, read-only family queries, derived
//! rules (views, the top-level switch and the opt-out), per-rule counters across a reload, the
//! log's format and default filter, how often the durable cursor is written and how much one
//! pruning transaction deletes, an empty memory cache after a restart, and every `/v1/status`
//! field and `/metrics` series the README lists, with its type.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::redis::RedisServer;

/// The `cachetail` binary under test.
fn cachetail() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cachetail"))
}

/// `cachetail run --config CONFIG`, logging at info as the other tests' daemons do.
fn run_command(config: &Path) -> Command {
    let mut command = cachetail();
    command
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,cachetail=info");
    command
}

/// The catalog with one family, `book:{id}` (its review count), refreshed by a `delete` rule on
/// `reviews`; `settings` goes in at the top of the file (tables such as `[tail]` included).
fn book_config(port: u16, settings: &str) -> String {
    format!(
        "database = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n{settings}\n{}",
        r#"
[keys."book:{id}"]
query = """SELECT b.id, count(r.id) AS reviews FROM books b LEFT JOIN reviews r ON r.book_id = b.id
           WHERE b.id = :id GROUP BY b.id"""

[[rules]]
table = "reviews"
keys = ["book:{book_id}"]
"#
    )
}

fn reviews_of(daemon: &mut Daemon, book: u32) -> i64 {
    json(&daemon.get(&format!("book:{book}")))["reviews"]
        .as_i64()
        .expect("a review count")
}

/// Waits until the daemon has applied everything committed so far, at most `limit`; returns
/// how long that took, counted from `since`.
fn applied_within(daemon: &mut Daemon, since: Instant, limit: Duration, why: &str) -> Duration {
    let head = daemon.status()["head"].as_u64().expect("head");
    loop {
        if daemon.status()["cursor"].as_u64() >= Some(head) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "outbox position {head} was not applied within {limit:?} of its commit: {why}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for a log line containing `needle`; returns it.
fn log_line(log: &Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match log.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!(
        "no log line containing {needle:?}; the log said:\n{}",
        seen.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Tail wake-ups: "It wakes on file notifications for the database's `-wal` file and polls as a
// fallback" (How it works), "`[tail] poll_interval`: the fallback poll when no file
// notification comes" (Config reference).

#[test]
fn the_tail_wakes_on_the_wal_files_notification_not_on_the_poll() {
    let catalog = Catalog::new();
    let port = free_port();
    // A poll this long, and a lease renewed every 200 s: nothing but the notification can wake
    // the tail within seconds.
    let config = book_config(port, "[tail]\npoll_interval = \"60s\"\nlease = \"10m\"\n");
    let mut daemon = Daemon::start(&catalog, &config, port);
    daemon.wait_caught_up();
    assert_eq!(reviews_of(&mut daemon, 1), 2);
    for (round, writer) in ["python3", "the sqlite3 shell", "python3"]
        .iter()
        .enumerate()
    {
        // Idle: what came before applied, the cursor written and the outbox pruned; and the
        // tail's quick re-looks after its last wake-up (0.1 ms doubling to 64 ms, 128 ms in
        // all) over, which nothing outside shows: a pause longer than they take. Then only
        // the poll (60 s) or a notification can wake it.
        wait_persisted(&catalog.db());
        std::thread::sleep(Duration::from_millis(300));
        let sql = "INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 4)";
        if *writer == "python3" {
            catalog.python(&format!("con.execute('{sql}')"));
        } else {
            catalog.sqlite_cli(&format!("{sql};"));
        }
        let committed = Instant::now();
        let took = applied_within(
            &mut daemon,
            committed,
            // Far below the 60 s poll; generous for a machine loaded by the rest of the suite
            // (3 s was missed once at a load average of 17 on 2 cores).
            Duration::from_secs(10),
            "the -wal file's notification did not wake the tail (its poll is 60 s)",
        );
        eprintln!("round {round} ({writer}): applied {took:?} after the commit");
        assert_eq!(reviews_of(&mut daemon, 1), 3 + round as i64);
    }
}

/// `cachetail run` where the kernel refuses inotify: a user namespace whose limit on inotify
/// instances is 0 (as on a machine whose instances are used up), so `notify` cannot start.
fn run_without_inotify(config: &Path) -> Command {
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "sh", "-c"])
        .arg("echo 0 > /proc/sys/user/max_inotify_instances")
        .output()
        .expect("unshare runs (util-linux)");
    assert!(
        probe.status.success(),
        "this test needs `unshare --user` (a user namespace, to set its own inotify limit): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let mut command = Command::new("unshare");
    command
        .args(["--user", "--map-root-user", "sh", "-c"])
        .arg("echo 0 > /proc/sys/user/max_inotify_instances && exec \"$0\" run --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_cachetail"))
        .arg(config)
        .env("RUST_LOG", "warn,cachetail=info");
    command
}

#[test]
fn without_file_notifications_the_poll_applies_each_change_within_its_interval() {
    let catalog = Catalog::new();
    let port = free_port();
    let poll = Duration::from_millis(500);
    let config = catalog.write_config(&book_config(
        port,
        "[tail]\npoll_interval = \"500ms\"\nlease = \"10m\"\n",
    ));
    let (mut daemon, log) = Daemon::start_logged(run_without_inotify(&config), &config, port);
    log_line(&log, "file notifications unavailable; polling only");
    daemon.wait_caught_up();
    wait_persisted(&catalog.db());
    let mut took = Vec::new();
    for round in 0..4 {
        catalog.python(
            "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (2, 3, 4)')",
        );
        let committed = Instant::now();
        took.push(applied_within(
            &mut daemon,
            committed,
            poll + Duration::from_millis(1500),
            "the fallback poll (every 500ms) did not apply it",
        ));
        assert_eq!(reviews_of(&mut daemon, 2), 2 + round);
    }
    eprintln!("applied after {took:?} (poll_interval 500ms, no notifications)");
}

// ---------------------------------------------------------------------------------------------
// `listen` defaults to "127.0.0.1:8080" (loopback).

#[test]
fn listen_defaults_to_port_8080_on_loopback() {
    let catalog = Catalog::new();
    let config =
        catalog.write_config(&book_config(0, "").replace("listen = \"127.0.0.1:0\"\n", ""));
    assert!(
        !std::fs::read_to_string(&config)
            .expect("config")
            .contains("listen")
    );
    // Deterministic whatever else runs here: with 127.0.0.1:8080 taken (by this test, or by
    // someone else), the daemon must fail to bind exactly that address.
    let held = std::net::TcpListener::bind("127.0.0.1:8080");
    let refused = run_command(&config).output().expect("cachetail runs");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "it could not listen: {said}");
    assert!(
        said.contains("cannot listen on 127.0.0.1:8080"),
        "the default address is 127.0.0.1:8080: {said}"
    );
    let Ok(held) = held else {
        eprintln!(
            "127.0.0.1:8080 is in use on this machine: only the bind attempt was checked, not a daemon serving there"
        );
        return;
    };
    // Free again: the daemon serves there, and on loopback's 127.0.0.1 only (not every
    // address: 127.0.0.2 is another local address an unspecified bind would take too).
    drop(held);
    let mut daemon = Daemon::start_existing(&config, 8080);
    assert_eq!(daemon.status()["role"], "active");
    let other = std::net::TcpStream::connect_timeout(
        &"127.0.0.2:8080".parse().expect("address"),
        Duration::from_secs(2),
    );
    assert!(
        other.is_err(),
        "the daemon must not listen beyond 127.0.0.1"
    );
}

// ---------------------------------------------------------------------------------------------
// `[cache] max_entries`: "the bound on cached values"; "With Redis, `max_entries` does not
// apply: bound Redis with its own `maxmemory`".

/// A family needing no table: `n:{x}` is `x` and twice `x`.
fn numbers_config(port: u16, cache: &str) -> String {
    format!(
        "database = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n\n[cache]\nmax_entries = 20\n{cache}\n{}",
        r#"
[keys."n:{x}"]
query = "SELECT :x AS x, :x * 2 AS doubled"
"#
    )
}

fn assert_number(daemon: &mut Daemon, x: i64) -> String {
    let reply = daemon.get(&format!("n:{x}"));
    assert_eq!(reply.status, 200, "n:{x}: {}", reply.text());
    let value = json(&reply);
    assert_eq!(value["x"], x, "n:{x}: {value}");
    assert_eq!(value["doubled"], 2 * x, "n:{x}: {value}");
    x_cache(&reply).to_owned()
}

#[test]
fn max_entries_bounds_the_memory_cache() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &numbers_config(port, ""), port);
    for x in 1..=200 {
        assert_eq!(assert_number(&mut daemon, x), "miss");
    }
    let entries = daemon.status()["entries"].as_u64().expect("entries");
    assert!(
        (1..=20).contains(&entries),
        "200 distinct keys read, max_entries = 20: {entries} cached"
    );
    // Every value is still answered correctly; at most the bound of them from the cache.
    let hits = (1..=200)
        .filter(|&x| assert_number(&mut daemon, x) == "hit")
        .count();
    assert!(hits <= 20, "{hits} hits with at most 20 values cached");
    let entries = daemon.status()["entries"].as_u64().expect("entries");
    assert!(entries <= 20, "{entries} cached after a second pass");
}

#[test]
fn with_redis_max_entries_does_not_cap_what_redis_holds() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let backend = format!(
        "backend = \"redis\"\nurl = \"{}\"\nprefix = \"ct:\"\n",
        redis.url()
    );
    let mut daemon = Daemon::start(&catalog, &numbers_config(port, &backend), port);
    for x in 1..=100 {
        assert_eq!(assert_number(&mut daemon, x), "miss");
    }
    let mut stored = redis.cached_keys();
    stored.sort_by_key(|k| k[2..].parse::<i64>().unwrap_or(0));
    let expected: Vec<String> = (1..=100).map(|x| format!("n:{x}")).collect();
    assert_eq!(
        stored, expected,
        "max_entries = 20 does not cap Redis: all 100 values are there"
    );
    assert_eq!(daemon.status()["entries"], 100);
    for x in 1..=100 {
        assert_eq!(assert_number(&mut daemon, x), "hit", "n:{x}");
    }
}

// ---------------------------------------------------------------------------------------------
// `[write_behind] workers`: "recomputes running at once, at most"; `[tail] batch_size`: "outbox
// rows read and applied per batch, at most".

#[test]
fn write_behind_workers_bound_the_recomputes_running_at_once() {
    let catalog = Catalog::new();
    let port = free_port();
    // A costly family (a recursive count to a million: about 0.2 s) recomputed write-behind.
    let config = format!(
        "database = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n{}",
        r#"
[write_behind]
delay = "10ms"
workers = 1

[keys."slow:{id}"]
query = """WITH RECURSIVE spin(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM spin WHERE i < 1000000)
           SELECT :id AS id, (SELECT count(*) FROM reviews WHERE book_id = :id) AS reviews,
                  (SELECT count(*) FROM spin) AS spun"""

[[rules]]
table = "reviews"
keys = ["slow:{book_id}"]
strategy = "write-behind"
"#
    );
    let mut daemon = Daemon::start(&catalog, &config, port);
    daemon.wait_caught_up();
    let before = daemon.status();
    let count = |status: &Value, name: &str| status[name].as_u64().expect(name);
    // Four keys queued at once.
    catalog.python("con.executemany('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, 3)', [(1,), (2,), (3,), (4,)])");
    // Running now = recomputes started - fills finished (no reads meanwhile). `recomputes` is
    // read before `fills`, so this never overcounts.
    let mut most = 0;
    let mut samples = 0;
    let started = Instant::now();
    loop {
        let status = daemon.status();
        let begun = count(&status, "recomputes") - count(&before, "recomputes");
        let done = count(&status, "fills") - count(&before, "fills");
        most = most.max(begun.saturating_sub(done));
        samples += 1;
        if done >= 4 {
            assert_eq!(begun, 4);
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "4 recomputes did not finish: {status}"
        );
        std::thread::sleep(Duration::from_millis(3));
    }
    eprintln!(
        "4 recomputes in {:?}, at most {most} at once ({samples} samples)",
        started.elapsed()
    );
    assert_eq!(
        most, 1,
        "workers = 1: the recomputes run one at a time, never {most} at once"
    );
    // A recompute is counted as a fill a moment before its value is stored: wait for each,
    // from the cache only (a read that filled the key itself would hide a missing recompute).
    for id in 1..=4 {
        eventually(&format!("slow:{id} was recomputed and stored"), || {
            (daemon.peek(&format!("slow:{id}")).status == 200).then_some(())
        });
    }
}

#[test]
fn batch_size_bounds_the_outbox_rows_per_batch() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(
        &catalog,
        &book_config(port, "[tail]\nbatch_size = 10\n"),
        port,
    );
    let before = daemon.wait_caught_up();
    // 95 changes committed at once: all are in the outbox when the tail reads.
    catalog.python("con.executemany('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, 3)', [(1 + i % 5,) for i in range(95)])");
    let after = daemon.wait_caught_up();
    let delta = |name: &str| after[name].as_u64().expect(name) - before[name].as_u64().expect(name);
    assert_eq!(delta("events"), 95);
    assert_eq!(
        delta("batches"),
        10,
        "95 rows at most 10 per batch: 10 batches"
    );
    assert_eq!(reviews_of(&mut daemon, 1), 2 + 19);
}

// ---------------------------------------------------------------------------------------------
// Key families: "A value written the way a key renders a number is bound as that number: a
// canonical integer (`42`, not `042` or `+42`) as an integer, a canonical real (`1.5`, not `1.50`
// or `1e3`) as a real; anything else as text."

#[test]
fn a_canonical_number_in_a_key_is_bound_as_a_number_anything_else_as_text() {
    let catalog = Catalog::new();
    // A column without affinity keeps each value's own type: 42 and '42' are different values.
    catalog.python(
        "con.execute('CREATE TABLE vals (v)')\n\
         con.executemany('INSERT INTO vals (v) VALUES (?)', [(42,), ('42',), ('042',), (1.5,), ('1.5',), ('1.50',), ('abc',)])",
    );
    let port = free_port();
    let config = format!(
        "database = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n{}",
        r#"
[keys."v:{v}"]
query = """SELECT typeof(:v) AS bound, count(*) AS matches, group_concat(typeof(v)) AS matched
           FROM vals WHERE v = :v"""

[[rules]]
table = "vals"
keys = ["v:{v}"]
"#
    );
    let mut daemon = Daemon::start(&catalog, &config, port);
    for (key, bound, matched) in [
        ("v:42", "integer", Some("integer")),
        ("v:-7", "integer", None),
        ("v:042", "text", Some("text")),
        ("v:+42", "text", None),
        ("v:1.5", "real", Some("real")),
        ("v:1.50", "text", Some("text")),
        ("v:1e3", "text", None),
        ("v:abc", "text", Some("text")),
    ] {
        let value = json(&daemon.get(key));
        assert_eq!(value["bound"], bound, "{key} is bound as {bound}: {value}");
        match matched {
            Some(kind) => {
                assert_eq!(value["matches"], 1, "{key} matches one row: {value}");
                assert_eq!(value["matched"], kind, "{key}: {value}");
            }
            None => assert_eq!(value["matches"], 0, "{key}: {value}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// "The query must only read (`cachetail check` refuses one that writes); it runs on a
// `query_only` connection in any case." (The connection is tested in `daemon/fill.rs`: no
// config the daemon accepts reaches it with a writing query.)

#[test]
fn check_and_run_refuse_a_family_query_that_writes() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog.write_config(&format!(
        "database = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n{}",
        r#"
[keys."gone:{id}"]
query = "DELETE FROM reviews WHERE id = :id RETURNING id"

[keys."renamed:{id}"]
query = "UPDATE books SET title = 'x' WHERE id = :id RETURNING title"
"#
    ));
    for verb in ["check", "run"] {
        let out = cachetail()
            .arg(verb)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("cachetail runs");
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{verb}: {said}");
        for (line, family) in [(5, "gone:{id}"), (8, "renamed:{id}")] {
            assert!(
                said.contains(&format!(
                    "config.toml:{line}:9: key family `{family}`: the query must only read (SELECT)"
                )),
                "{verb} names both writing queries with their location: {said}"
            );
        }
    }
    assert_eq!(catalog.sqlite_cli("SELECT count(*) FROM reviews"), "3");
    assert_eq!(
        catalog.sqlite_cli("SELECT count(*) FROM books WHERE title = 'x'"),
        "0"
    );
}

// ---------------------------------------------------------------------------------------------
// Derived rules: "A query reading a view cannot be derived (there is no table to watch): `check`
// says so; write `[[rules]]` for the tables behind it." and "`invalidate = "auto"` ... or at the
// top of the file, for every family ("rules" opts one out)".

#[test]
fn check_says_a_query_reading_a_view_cannot_be_derived() {
    let catalog = Catalog::new();
    catalog.python("con.execute('CREATE VIEW book_titles AS SELECT id, title FROM books')");
    let family = r#"
[keys."title:{id}"]
query = "SELECT title FROM book_titles WHERE id = :id"
"#;
    let config = catalog.write_config(&format!(
        "database = \"catalog.db\"\n{family}invalidate = \"auto\"\n"
    ));
    let out = cachetail()
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("check runs");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("config.toml:4:9: key family `title:{id}` (invalidate = \"auto\"): its query reads `book_titles`, which is not a table"),
        "{said}"
    );
    assert!(
        said.contains("write [[rules]] for the tables behind it"),
        "{said}"
    );
    // Doing as it says passes.
    let config = catalog.write_config(&format!(
        "database = \"catalog.db\"\n{family}\n[[rules]]\ntable = \"books\"\nkeys = [\"title:{{id}}\"]\n"
    ));
    let out = cachetail()
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("check runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn top_level_auto_derives_rules_for_every_family_and_rules_opts_one_out() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = format!(
        "invalidate = \"auto\"\ndatabase = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n{}",
        r#"
[keys."book:{id}"]
query = """SELECT b.id, count(r.id) AS reviews FROM books b LEFT JOIN reviews r ON r.book_id = b.id
           WHERE b.id = :id GROUP BY b.id"""

[keys."reviews-of:{id}"]
query = "SELECT count(*) AS reviews FROM reviews WHERE book_id = :id"
invalidate = "rules"
"#
    );
    let path = catalog.write_config(&config);
    let out = cachetail()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check runs");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let derived: Vec<&str> = printed
        .lines()
        .filter(|l| l.starts_with("derived"))
        .collect();
    assert_eq!(
        derived,
        [
            "derived (invalidate = \"auto\" on `book:{id}`): a change to `books` → book:{id} (delete)",
            "derived (invalidate = \"auto\" on `book:{id}`): a change to `reviews` → book:{book_id} (delete)",
        ],
        "only the family that did not opt out: {printed}"
    );

    let mut daemon = Daemon::start(&catalog, &config, port);
    let rules = daemon.status()["config"]["rules"].clone();
    let from: Vec<&Value> = rules
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| &r["derived_from"])
        .collect();
    assert_eq!(
        from,
        [&Value::from("book:{id}"), &Value::from("book:{id}")],
        "{rules}"
    );
    assert_eq!(json(&daemon.get("book:1"))["reviews"], 2);
    assert_eq!(json(&daemon.get("reviews-of:1"))["reviews"], 2);
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    daemon.wait_caught_up();
    assert_eq!(
        daemon.peek("book:1").status,
        504,
        "dropped by its derived rule"
    );
    assert_eq!(json(&daemon.get("book:1"))["reviews"], 3);
    let kept = daemon.peek("reviews-of:1");
    assert_eq!(
        (kept.status, json(&kept)["reviews"].clone()),
        (200, Value::from(2)),
        "invalidate = \"rules\" and no [[rules]]: nothing refreshes it"
    );
}

// ---------------------------------------------------------------------------------------------
// `/metrics` and `/v1/status`, parsed.

/// One metric family as the Prometheus project's OpenMetrics parser reads it.
struct Family {
    kind: String,
    /// (sample name, labels, value)
    samples: Vec<(String, serde_json::Map<String, Value>, f64)>,
}

/// `/metrics` parsed by `prometheus_client`'s OpenMetrics parser (python3): family name →
/// its type and samples.
fn scrape(daemon: &mut Daemon) -> std::collections::HashMap<String, Family> {
    let reply = daemon.get_path("/metrics");
    assert_eq!(reply.status, 200);
    let mut parser = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, json\n\
             from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
             out = {}\n\
             for family in text_string_to_metric_families(sys.stdin.read()):\n\
             \x20   out[family.name] = {'type': family.type, 'samples': [[s.name, s.labels, s.value] for s in family.samples]}\n\
             print(json.dumps(out))\n",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (pip install prometheus-client)");
    std::io::Write::write_all(&mut parser.stdin.take().expect("stdin"), &reply.body)
        .expect("write");
    let out = parser.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "the metrics do not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: serde_json::Map<String, Value> =
        serde_json::from_slice(&out.stdout).expect("parsed metrics");
    parsed
        .into_iter()
        .map(|(name, family)| {
            let samples = family["samples"]
                .as_array()
                .expect("samples")
                .iter()
                .map(|s| {
                    (
                        s[0].as_str().expect("name").to_owned(),
                        s[1].as_object().expect("labels").clone(),
                        s[2].as_f64().expect("value"),
                    )
                })
                .collect();
            let kind = family["type"].as_str().expect("type").to_owned();
            (name, Family { kind, samples })
        })
        .collect()
}

/// The value of the counter `{family}_total` whose labels include `labels`.
fn sample(
    metrics: &std::collections::HashMap<String, Family>,
    family: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let family_metrics = metrics
        .get(family)
        .unwrap_or_else(|| panic!("no {family} in /metrics"));
    family_metrics
        .samples
        .iter()
        .find(|(name, l, _)| {
            name == &format!("{family}_total")
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k) == Some(&Value::from(*v)))
        })
        .map(|(_, _, value)| *value)
        .unwrap_or_else(|| panic!("no {family}_total{labels:?} in /metrics"))
}

#[test]
fn per_rule_counters_start_again_from_zero_after_a_reload() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = book_config(port, "").replace(
        "keys = [\"book:{book_id}\"]",
        "keys = [\"book:{book_id}\"]\nstrategy = \"write-through\"",
    );
    let mut daemon = Daemon::start(&catalog, &config, port);
    let rule = [
        ("rule", "0"),
        ("table", "reviews"),
        ("strategy", "write-through"),
    ];
    let review = "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')";
    let counts = |daemon: &mut Daemon| {
        let m = scrape(daemon);
        (
            sample(&m, "cachetail_rule_invalidations", &rule),
            sample(&m, "cachetail_rule_recomputes", &rule),
        )
    };
    catalog.python(review);
    catalog.python(review);
    daemon.wait_caught_up();
    assert_eq!(
        counts(&mut daemon),
        (2.0, 2.0),
        "two reviews, each naming book:1"
    );

    let text = std::fs::read_to_string(&daemon.config).expect("config");
    catalog.write_config(&format!("{text}\n# saved again\n"));
    eventually("the reload", || {
        (daemon.status()["config"]["reloads"] == 1).then_some(())
    });
    assert_eq!(counts(&mut daemon), (0.0, 0.0), "reset by the reload");
    catalog.python(review);
    daemon.wait_caught_up();
    assert_eq!(counts(&mut daemon), (1.0, 1.0), "counting again from zero");
}

// ---------------------------------------------------------------------------------------------
// "`--log-format json` writes JSON log lines; `RUST_LOG` filters (default `info`)."

/// Runs the daemon with `flags` before `run` and `RUST_LOG` set to `filter` (None: unset) until it
/// serves, stops it, and returns its whole log.
fn log_of_a_run(flags: &[&str], filter: Option<&str>) -> Vec<String> {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog.write_config(&book_config(port, ""));
    let mut command = cachetail();
    command.args(flags).args(["run", "--config"]).arg(&config);
    match filter {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    let (mut daemon, log) = Daemon::start_logged(command, &config, port);
    daemon.get("book:1");
    assert!(daemon.stop().success());
    // The log ends when the process does.
    log.iter().collect()
}

#[test]
fn json_log_lines_and_info_unless_rust_log_says_otherwise() {
    let lines = log_of_a_run(&["--log-format", "json"], None);
    let mut levels = std::collections::BTreeSet::new();
    for line in &lines {
        let entry: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
        levels.insert(entry["level"].as_str().expect("a level").to_owned());
    }
    let serving = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON"))
        .find(|e| e["fields"]["message"] == "cachetail serving")
        .unwrap_or_else(|| panic!("no `cachetail serving` line in {lines:#?}"));
    assert_eq!(serving["level"], "INFO");
    assert!(
        serving["fields"]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    );
    assert!(
        levels
            .iter()
            .all(|l| ["INFO", "WARN", "ERROR"].contains(&l.as_str())),
        "RUST_LOG unset: info and above only, got {levels:?}"
    );

    // RUST_LOG filters both ways: down to warnings, up to every trace event (which the default
    // leaves out: a run has them, from mio and notify).
    let quiet = log_of_a_run(&[], Some("warn"));
    assert!(
        quiet.iter().all(|l| !l.contains("INFO")),
        "RUST_LOG=warn: no info lines, got {quiet:#?}"
    );
    let loud = log_of_a_run(&[], Some("trace"));
    assert!(
        loud.iter().any(|l| l.contains("TRACE")),
        "RUST_LOG=trace shows what the default hides"
    );
}

// ---------------------------------------------------------------------------------------------
// "cachetail's writes are its cursor (at most every 100 ms) and the pruning of applied rows,
// 2,000 at most per transaction" (The guarantee, and its limits).

#[test]
fn the_durable_cursor_is_written_at_most_every_100ms_while_changes_keep_coming() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &book_config(port, ""), port);
    daemon.wait_caught_up();
    // An app committing a review every ~2 ms for 1.5 s, from its own process.
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys, time\n\
             con = sqlite3.connect(sys.argv[1], timeout=5)\n\
             end = time.time() + 1.5\n\
             while time.time() < end:\n\
             \x20   con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 1, 3)')\n\
             \x20   con.commit()\n\
             \x20   time.sleep(0.002)\n",
        )
        .arg(catalog.db())
        .spawn()
        .expect("python3 writer");
    // The cursor row, sampled from this process every 2 ms: each distinct write's time (ms).
    let conn = rusqlite::Connection::open(catalog.db()).expect("open");
    let mut writes: Vec<(i64, String, i64)> = Vec::new();
    let mut stopped_at = None;
    while stopped_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_millis(300)) {
        let row: (i64, String, i64) = conn
            .query_row(
                "SELECT position, updated_at, strftime('%s', updated_at) * 1000 + CAST(substr(updated_at, 21, 3) AS INTEGER) FROM cachetail_cursor WHERE consumer = 'main'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("the cursor row");
        if writes.last().is_none_or(|last| last.1 != row.1) {
            writes.push(row);
        }
        if stopped_at.is_none() && writer.try_wait().expect("writer").is_some() {
            stopped_at = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(writer.wait().expect("writer").success());
    let commits: i64 = catalog
        .sqlite_cli("SELECT count(*) FROM reviews")
        .parse()
        .expect("count");
    let writes = &writes[1..]; // the one before the stream
    eprintln!(
        "{} cursor writes for {} commits over the stream",
        writes.len(),
        commits - 3
    );
    assert!(
        writes.len() >= 5,
        "the cursor kept moving during the stream: {writes:?}"
    );
    for pair in writes.windows(2) {
        let gap = pair[1].2 - pair[0].2;
        assert!(
            gap >= 98,
            "two cursor writes {gap} ms apart ({} at {}, {} at {})",
            pair[0].0,
            pair[0].1,
            pair[1].0,
            pair[1].1
        );
    }
}

/// The WAL index's transaction counter (`iChange`, offset 8 of the `-shm` file's header, native
/// byte order; SQLite's file format, "WAL-Index Format"): every commit to the database adds one.
fn commits_so_far(shm: &Path) -> u32 {
    let bytes = std::fs::read(shm).expect("the -shm file");
    u32::from_ne_bytes(bytes[8..12].try_into().expect("4 bytes"))
}

#[test]
fn pruning_deletes_at_most_2000_rows_per_transaction() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &book_config(port, ""), port);
    daemon.wait_caught_up();
    wait_persisted(&catalog.db());
    let shm = catalog.path().join("catalog.db-shm");
    // A backlog of 30,000 rows, committed at once by the app.
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             con = sqlite3.connect(sys.argv[1], timeout=20)\n\
             con.executemany('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, 3)', [(1 + i % 5,) for i in range(30000)])\n\
             con.commit()\n",
        )
        .arg(catalog.db())
        .spawn()
        .expect("python3 writer");
    // From this process, holding the write lock for each look (so no commit lands in the middle
    // of one): the outbox's size and newest id, and how many commits the database has seen.
    let mut conn = rusqlite::Connection::open(catalog.db()).expect("open");
    // Waiting for the lock, try again at once (not after SQLite's sleeps): the look then lands
    // between two of the daemon's pruning transactions more often.
    conn.busy_handler(Some(|_| {
        std::thread::yield_now();
        true
    }))
    .expect("busy handler");
    let look = || -> (i64, i64, u32) {
        conn.execute_batch("BEGIN IMMEDIATE")
            .expect("the write lock");
        let (rows, newest) = conn
            .query_row(
                "SELECT count(*), coalesce(max(id), 0) FROM cachetail_outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("the outbox");
        let commits = commits_so_far(&shm);
        conn.execute_batch("COMMIT").expect("commit");
        (rows, newest, commits)
    };
    let mut looks = vec![look()];
    let started = Instant::now();
    let mut written = false;
    loop {
        std::thread::sleep(Duration::from_millis(1));
        let now = look();
        looks.push(now);
        written = written || writer.try_wait().expect("writer").is_some();
        if written && now.0 <= 1 && now.1 >= looks[0].1 + 30_000 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the backlog was not pruned: {now:?}"
        );
    }
    assert!(writer.wait().expect("writer").success());
    // Between two looks, the rows deleted (rows before + rows added - rows after) cannot exceed
    // 2,000 per commit made meanwhile.
    let mut deleted_total = 0;
    let mut steps = Vec::new();
    for pair in looks.windows(2) {
        let ((rows_a, newest_a, commits_a), (rows_b, newest_b, commits_b)) = (pair[0], pair[1]);
        let deleted = rows_a + (newest_b - newest_a) - rows_b;
        let commits = i64::from(commits_b.wrapping_sub(commits_a));
        assert!(
            deleted <= 2_000 * commits,
            "{deleted} rows deleted in {commits} transactions (looks {:?} → {:?})",
            pair[0],
            pair[1]
        );
        if deleted > 0 {
            steps.push(format!("{deleted} rows in {commits} transactions"));
        }
        deleted_total += deleted;
    }
    eprintln!(
        "{deleted_total} rows pruned, seen in {} looks: {}",
        looks.len(),
        steps.join(", ")
    );
    assert!(deleted_total >= 30_000, "{deleted_total}");
    assert_eq!(daemon.status()["lag"], 0);
}

// ---------------------------------------------------------------------------------------------
// "The memory backend's cache starts empty after a restart."

#[test]
fn the_memory_cache_starts_empty_after_a_restart() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = book_config(port, "").replace(
        "[[rules]]",
        "[keys.\"reviews-total\"]\nquery = \"SELECT count(*) AS n FROM reviews\"\n\n[[rules]]",
    );
    let mut daemon = Daemon::start(&catalog, &config, port);
    for key in ["reviews-total", "book:1"] {
        assert_eq!(x_cache(&daemon.get(key)), "miss");
        assert_eq!(x_cache(&daemon.get(key)), "hit");
    }
    assert_eq!(daemon.status()["entries"], 2);
    assert!(daemon.stop().success());

    let mut daemon = Daemon::start_existing(&daemon.config.clone(), port);
    eventually("warm start is over", || {
        (daemon.status()["warm"]["finished"] == true).then_some(())
    });
    assert_eq!(
        daemon.status()["entries"],
        0,
        "nothing cached after the restart"
    );
    for key in ["reviews-total", "book:1"] {
        assert_eq!(daemon.peek(key).status, 504, "{key} is not cached");
        assert_eq!(x_cache(&daemon.get(key)), "miss", "{key}");
    }
}

// ---------------------------------------------------------------------------------------------
// Every `/v1/status` field and `/metrics` series the README lists ("HTTP API"), with its type.

#[derive(Clone, Copy, Debug)]
enum Kind {
    Count,
    Number,
    NumberOrNull,
    Text,
    TextOrNull,
    Flag,
    Null,
    List,
    Object,
}

fn is(kind: Kind, value: &Value) -> bool {
    match kind {
        Kind::Count => value.is_u64(),
        Kind::Number => value.is_number(),
        Kind::NumberOrNull => value.is_number() || value.is_null(),
        Kind::Text => value.is_string(),
        Kind::TextOrNull => value.is_string() || value.is_null(),
        Kind::Flag => value.is_boolean(),
        Kind::Null => value.is_null(),
        Kind::List => value.is_array(),
        Kind::Object => value.is_object(),
    }
}

/// The fields both backends report (JSON pointers), with their type.
const STATUS_FIELDS: &[(&str, Kind)] = &[
    ("/role", Kind::Text),
    ("/backend", Kind::Text),
    ("/cursor", Kind::Count),
    ("/head", Kind::Count),
    ("/lag", Kind::Count),
    ("/lag_seconds", Kind::Number),
    ("/latency", Kind::Object),
    ("/latency/window_seconds", Kind::Count),
    ("/latency/commit_to_fresh/count", Kind::Count),
    ("/latency/commit_to_fresh/p50_ms", Kind::Number),
    ("/latency/commit_to_fresh/p99_ms", Kind::Number),
    ("/latency/commit_to_fresh/max_ms", Kind::Number),
    ("/latency/fill/count", Kind::Count),
    ("/latency/fill/p50_ms", Kind::Number),
    ("/latency/fill/p99_ms", Kind::Number),
    ("/latency/fill/max_ms", Kind::Number),
    ("/events", Kind::Count),
    ("/batches", Kind::Count),
    ("/invalidations", Kind::Count),
    ("/tag_invalidations", Kind::Count),
    ("/recomputes", Kind::Count),
    ("/hits", Kind::Count),
    ("/misses", Kind::Count),
    ("/fills", Kind::Count),
    ("/fill_errors", Kind::Count),
    ("/apply_errors", Kind::Count),
    ("/entries", Kind::Count),
    ("/write_behind_queue", Kind::Count),
    ("/warm/total", Kind::Count),
    ("/warm/done", Kind::Count),
    ("/warm/failed", Kind::Count),
    ("/warm/finished", Kind::Flag),
    ("/paused", Kind::Flag),
    ("/capture_failures", Kind::List),
    ("/verified", Kind::Count),
    ("/stale_found", Kind::Count),
    ("/config/path", Kind::Text),
    ("/config/reloads", Kind::Count),
    ("/config/reload_failures", Kind::Count),
    ("/config/last_reload_error", Kind::TextOrNull),
    ("/config/families/0/pattern", Kind::Text),
    ("/config/families/0/hits", Kind::Count),
    ("/config/families/0/misses", Kind::Count),
    ("/config/families/0/fills", Kind::Count),
    ("/config/families/0/mean_fill_ms", Kind::NumberOrNull),
    ("/config/rules/0/table", Kind::Text),
    ("/config/rules/0/derived_from", Kind::TextOrNull),
    ("/config/tracking_gaps", Kind::List),
];

/// On memory, `redis` is null.
const MEMORY_STATUS_FIELDS: &[(&str, Kind)] = &[("/redis", Kind::Null)];

/// On Redis, what `redis` holds.
const REDIS_STATUS_FIELDS: &[(&str, Kind)] = &[
    ("/redis/address", Kind::Text),
    ("/redis/prefix", Kind::Text),
    ("/redis/ok", Kind::Flag),
    ("/redis/down_since", Kind::NumberOrNull),
    ("/redis/last_error", Kind::TextOrNull),
    ("/redis/outages", Kind::Count),
];

/// Every `/metrics` family the README lists, its type, and the labels of its samples.
const METRICS: &[(&str, &str, &[&str])] = &[
    ("cachetail_events_applied", "counter", &[]),
    ("cachetail_batches_applied", "counter", &[]),
    ("cachetail_lag_events", "gauge", &[]),
    ("cachetail_lag_seconds", "gauge", &[]),
    ("cachetail_cursor", "gauge", &[]),
    ("cachetail_invalidations", "counter", &[]),
    ("cachetail_tag_invalidations", "counter", &[]),
    ("cachetail_recomputes", "counter", &[]),
    (
        "cachetail_rule_invalidations",
        "counter",
        &["rule", "strategy", "table"],
    ),
    (
        "cachetail_rule_recomputes",
        "counter",
        &["rule", "strategy", "table"],
    ),
    ("cachetail_hits", "counter", &["family"]),
    ("cachetail_misses", "counter", &["family"]),
    ("cachetail_fills", "counter", &["family"]),
    ("cachetail_fill_errors", "counter", &[]),
    ("cachetail_fill_duration_seconds", "histogram", &[]),
    ("cachetail_commit_to_fresh_seconds", "histogram", &[]),
    ("cachetail_write_behind_queue_depth", "gauge", &[]),
    ("cachetail_apply_errors", "counter", &[]),
    ("cachetail_reloads", "counter", &[]),
    ("cachetail_reload_failures", "counter", &[]),
    ("cachetail_capture_reinstalls", "counter", &[]),
    ("cachetail_active", "gauge", &[]),
    ("cachetail_paused", "gauge", &[]),
];

const REDIS_METRICS: &[(&str, &str, &[&str])] = &[("cachetail_redis_up", "gauge", &[])];

/// Every problem with `status` against `fields`, each naming the field.
fn status_problems(status: &Value, fields: &[(&str, Kind)]) -> Vec<String> {
    fields
        .iter()
        .filter_map(|&(pointer, kind)| match status.pointer(pointer) {
            None => Some(format!("{pointer}: missing")),
            Some(value) if !is(kind, value) => Some(format!("{pointer}: {value} is not {kind:?}")),
            Some(_) => None,
        })
        .collect()
}

/// Every problem with the scraped metrics against `expected`, each naming the series.
fn metrics_problems(
    metrics: &std::collections::HashMap<String, Family>,
    expected: &[(&str, &str, &[&str])],
) -> Vec<String> {
    let mut problems = Vec::new();
    for &(name, kind, labels) in expected {
        let Some(family) = metrics.get(name) else {
            problems.push(format!("{name}: missing"));
            continue;
        };
        if family.kind != kind {
            problems.push(format!("{name}: a {}, not a {kind}", family.kind));
        }
        let sample_name = match kind {
            "counter" => format!("{name}_total"),
            "histogram" => format!("{name}_count"),
            _ => name.to_owned(),
        };
        let Some((_, sample_labels, _)) = family.samples.iter().find(|(n, _, _)| *n == sample_name)
        else {
            problems.push(format!("{name}: no {sample_name} sample"));
            continue;
        };
        let mut got: Vec<&str> = sample_labels.keys().map(String::as_str).collect();
        got.sort_unstable();
        if got != labels {
            problems.push(format!("{name}: labels {got:?}, not {labels:?}"));
        }
    }
    problems
}

/// A daemon on the catalog with some of everything done: reads, a write-through change, a
/// write-behind recompute, a tag, a verify; a watched table dropped (a capture failure).
fn busy_daemon(catalog: &Catalog, port: u16, cache: &str) -> Daemon {
    catalog.python("con.execute('CREATE TABLE shelf (id INTEGER PRIMARY KEY, name TEXT)')");
    let config = format!(
        "database = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n[cache]\n{cache}\n[write_behind]\ndelay = \"10ms\"\n{}",
        r#"
[keys."book:{id}"]
query = "SELECT b.id, count(r.id) AS reviews FROM books b LEFT JOIN reviews r ON r.book_id = b.id WHERE b.id = :id GROUP BY b.id"
tags = ["books"]

[keys."user:{id}"]
query = "SELECT id, name FROM users WHERE id = :id"

[[rules]]
table = "reviews"
keys = ["book:{book_id}"]
strategy = "write-through"

[[rules]]
table = "reviews"
keys = ["user:{user_id}"]
strategy = "write-behind"

[[rules]]
table = "books"
tags = ["books"]

[[rules]]
table = "shelf"
keys = ["book:{id}"]
"#
    );
    let mut daemon = Daemon::start(catalog, &config, port);
    daemon.get("book:1");
    daemon.get("book:1");
    daemon.get("user:3");
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    catalog.python("con.execute(\"UPDATE books SET title = 'Dune' WHERE id = 2\")");
    daemon.wait_caught_up();
    eventually("the write-behind recompute", || {
        (daemon.status()["recomputes"].as_u64()? >= 2).then_some(())
    });
    daemon.verify();
    catalog.python("con.execute('DROP TABLE shelf')");
    eventually("the dropped table is reported", || {
        let status = daemon.status();
        (status["capture_failures"].as_array()?.len() == 1).then_some(())
    });
    daemon
}

#[test]
fn every_status_field_and_metric_the_readme_lists_is_there_with_its_type() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = busy_daemon(&catalog, port, "");
    let status = daemon.status();
    let mut problems = status_problems(&status, STATUS_FIELDS);
    problems.extend(status_problems(&status, MEMORY_STATUS_FIELDS));
    let failure = &status["capture_failures"][0];
    if failure["table"] != "shelf" || failure["error"].as_str().is_none_or(str::is_empty) {
        problems.push(format!(
            "/capture_failures/0: not the dropped table, with why: {failure}"
        ));
    }
    let metrics = scrape(&mut daemon);
    problems.extend(metrics_problems(&metrics, METRICS));
    if metrics.contains_key("cachetail_redis_up") {
        problems.push("cachetail_redis_up: reported on the memory backend".to_owned());
    }
    assert!(
        problems.is_empty(),
        "not as the README lists:\n{}\n--- status ---\n{status:#}",
        problems.join("\n")
    );
}

#[test]
fn on_redis_the_status_and_metrics_add_what_the_readme_lists_for_redis() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let backend = format!(
        "backend = \"redis\"\nurl = \"{}\"\nprefix = \"ct:\"\n",
        redis.url()
    );
    let mut daemon = busy_daemon(&catalog, port, &backend);
    let status = daemon.status();
    let mut problems = status_problems(&status, STATUS_FIELDS);
    problems.extend(status_problems(&status, REDIS_STATUS_FIELDS));
    if status["redis"]["ok"] != true || status["redis"]["prefix"] != "ct:" {
        problems.push(format!(
            "/redis: not up, or another prefix: {}",
            status["redis"]
        ));
    }
    let metrics = scrape(&mut daemon);
    problems.extend(metrics_problems(&metrics, METRICS));
    problems.extend(metrics_problems(&metrics, REDIS_METRICS));
    assert!(
        problems.is_empty(),
        "not as the README lists:\n{}\n--- status ---\n{status:#}",
        problems.join("\n")
    );
}
