//! The Redis backend against a real `redis-server` the tests start: every strategy and tag,
//! values read with a plain client (`redis-cli`), kill -9 of the daemon and of Redis during a
//! change stream, a standby daemon taking over (and a paused one fenced off), and the pub/sub
//! messages for app-local caches.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::strategies::catalog_config;

const PREFIX: &str = "ct:";

/// A `redis-server` on a free loopback port, in its own folder (its snapshot file lives there);
/// killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--dbfilename",
                "dump.rdb",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        self.child = Some(child);
        eventually("redis-server answers PING", || {
            (self.cli(&["PING"]) == "PONG").then_some(())
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Runs `redis-cli` (a plain Redis client) and returns its raw output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--raw"])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The value stored under a cache key, as an app server reading Redis directly sees it.
    pub fn value(&self, key: &str) -> Option<String> {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--raw", "GET"])
            .arg(format!("{PREFIX}{key}"))
            .output()
            .expect("redis-cli runs");
        let text = String::from_utf8_lossy(&output.stdout);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        (!text.is_empty()).then(|| text.to_owned())
    }

    /// The cache keys stored (without the prefix), leaving out cachetail's bookkeeping.
    pub fn cached_keys(&self) -> Vec<String> {
        self.cli(&["--scan", "--pattern", &format!("{PREFIX}*")])
            .lines()
            .filter_map(|k| k.strip_prefix(PREFIX))
            .filter(|k| !k.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The catalog config with the Redis backend, a short lease, and the strategy to choose.
pub fn redis_config(port: u16, redis: &RedisServer, strategy: &str) -> String {
    catalog_config(port, strategy, "20ms").replace(
        "[tail]\npoll_interval = \"100ms\"",
        &format!(
            "[tail]\npoll_interval = \"100ms\"\nlease = \"1s\"\n\n[cache]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"{PREFIX}\"",
            redis.url()
        ),
    )
}

/// The value the database gives for `key` now (the endpoint with `Cache-Control: no-cache`).
fn from_database(daemon: &mut Daemon, key: &str) -> Option<String> {
    let reply = daemon.get_uncached(key);
    assert_eq!(x_cache(&reply), "bypass");
    (reply.status == 200).then(|| reply.text())
}

/// Every value in Redis equals the database's (the data must be quiet).
fn assert_redis_matches_database(redis: &RedisServer, daemon: &mut Daemon) -> usize {
    let keys = redis.cached_keys();
    for key in &keys {
        let Some(cached) = redis.value(key) else {
            continue; // expired or invalidated since the scan
        };
        assert_eq!(
            Some(cached),
            from_database(daemon, key),
            "the value of {key} in redis is stale"
        );
    }
    keys.len()
}

/// Starts a daemon and waits until it holds the lease (and has made Redis trustworthy: until
/// then its fills are not stored).
fn start_active(catalog: &Catalog, config: &str, port: u16) -> Daemon {
    let mut daemon = Daemon::start(catalog, config, port);
    eventually("the daemon holds the lease", || {
        (daemon.status()["role"] == "active").then_some(())
    });
    daemon
}

fn review_count(text: &str) -> i64 {
    serde_json::from_str::<Value>(text).expect("JSON")["review_count"]
        .as_i64()
        .expect("review_count")
}

#[test]
fn every_strategy_and_tag_keeps_redis_exactly_as_fresh_as_the_database() {
    let redis = RedisServer::start();
    for strategy in ["delete", "write-through", "write-behind"] {
        redis.cli(&["FLUSHALL"]);
        let catalog = Catalog::new();
        let port = free_port();
        let mut daemon = start_active(&catalog, &redis_config(port, &redis, strategy), port);

        let first = daemon.get("book:1");
        assert_eq!((first.status, x_cache(&first)), (200, "miss"), "{strategy}");
        let again = daemon.get("book:1");
        assert_eq!(x_cache(&again), "hit", "{strategy}: served from redis");
        assert_eq!(again.header("etag"), first.header("etag"));
        let control = again.header("cache-control").unwrap_or("");
        let max_age: u64 = control
            .strip_prefix("max-age=")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("max-age from redis's TTL: {control:?}"));
        assert!(max_age > 590 && max_age <= 600, "{control}");
        // A plain Redis client reads exactly the endpoint's JSON, with the family's TTL.
        assert_eq!(
            redis.value("book:1").as_deref(),
            Some(first.text().as_str())
        );
        let ttl: i64 = redis.cli(&["PTTL", "ct:book:1"]).parse().expect("PTTL");
        assert!(ttl > 0 && ttl <= 600_000, "{strategy}: ttl {ttl}");
        assert_eq!(review_count(&first.text()), 2);

        catalog.python(
            "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')",
        );
        match strategy {
            // Recomputed by the daemon, no read needed: Redis holds the new value.
            "write-through" | "write-behind" => {
                eventually("redis holds the recomputed value", || {
                    redis
                        .value("book:1")
                        .filter(|v| review_count(v) == 3)
                        .map(|_| ())
                });
            }
            _ => {
                eventually("the key is deleted from redis", || {
                    redis.value("book:1").is_none().then_some(())
                });
                let refilled = daemon.get("book:1");
                assert_eq!(x_cache(&refilled), "miss");
                assert_eq!(review_count(&refilled.text()), 3);
            }
        }
        assert_eq!(
            redis.value("book:1"),
            from_database(&mut daemon, "book:1"),
            "{strategy}"
        );

        // Tags: a change to books drops every key tagged `books`, here and in Redis.
        daemon.get("book:2");
        daemon.get("top-books");
        daemon.get("user:1");
        assert!(redis.value("top-books").is_some());
        catalog.sqlite_cli("UPDATE books SET title = 'Renamed' WHERE id = 2");
        eventually("the tagged keys leave redis", || {
            (redis.value("book:2").is_none() && redis.value("top-books").is_none()).then_some(())
        });
        assert!(redis.value("user:1").is_some(), "an untagged key stays");
        let renamed = daemon.get("book:2");
        assert!(renamed.text().contains("Renamed"), "{}", renamed.text());
        assert_eq!(redis.value("book:2"), Some(renamed.text()));

        // A key without a row is a 404 and is not stored.
        assert_eq!(daemon.get("book:999").status, 404);
        assert_eq!(redis.value("book:999"), None);

        daemon.wait_caught_up();
        // book:1 left with the tag change; book:2 and user:1 are cached.
        assert!(assert_redis_matches_database(&redis, &mut daemon) >= 2);
        let status = daemon.status();
        assert_eq!(status["backend"], "redis");
        assert_eq!(status["redis"]["ok"], true, "{status}");
        assert_eq!(daemon.stop().code(), Some(0));
    }
}

/// A writer process streaming `transactions` × 100 changes to reviews.
fn stream_writer(catalog: &Catalog, transactions: u32) -> Child {
    Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys, random\n\
             con = sqlite3.connect(sys.argv[1], timeout=5)\n\
             rnd = random.Random(7)\n\
             for t in range(int(sys.argv[2])):\n\
             \x20   con.executemany('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, ?, ?)', [(rnd.randint(1, 5), rnd.randint(1, 3), rnd.randint(1, 5)) for _ in range(98)])\n\
             \x20   con.execute('UPDATE reviews SET rating = ? WHERE id = (SELECT max(id) FROM reviews)', (rnd.randint(1, 5),))\n\
             \x20   con.execute('DELETE FROM reviews WHERE id = (SELECT min(id) FROM reviews)')\n\
             \x20   con.commit()\n",
        )
        .arg(catalog.db())
        .arg(transactions.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("python3 writer")
}

fn read_all_keys(daemon: &mut Daemon) {
    for key in [
        "book:1",
        "book:2",
        "book:3",
        "book:4",
        "book:5",
        "top-books",
        "user:1",
    ] {
        let reply = daemon.get(key);
        assert_eq!(reply.status, 200, "{key}: {}", reply.text());
    }
}

#[test]
fn kill_9_of_the_daemon_during_a_100k_change_stream_leaves_nothing_stale_in_redis() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let config = redis_config(port, &redis, "write-through");
    let mut daemon = Daemon::start(&catalog, &config, port);
    let mut writer = stream_writer(&catalog, 1000);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut kills = 0;
    while writer.try_wait().expect("writer").is_none() {
        read_all_keys(&mut daemon);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(50 + rng % 400));
        if kills < 10 {
            daemon.kill();
            kills += 1;
            daemon = Daemon::start_existing(&daemon.config.clone(), port);
        }
    }
    assert!(writer.wait().expect("writer").success());
    assert!(kills >= 3, "only {kills} kills happened during the stream");
    daemon.wait_caught_up();
    read_all_keys(&mut daemon);
    let checked = assert_redis_matches_database(&redis, &mut daemon);
    assert!(checked >= 7, "{checked} keys checked");
    let report = daemon.verify();
    assert_eq!(report["stale"], 0, "{report}");
}

#[test]
fn redis_restarted_mid_stream_and_from_an_old_snapshot_serves_nothing_stale() {
    let mut redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    // A slow fallback poll: after the stream, only the daemon's own checks notice the restart.
    let config = redis_config(port, &redis, "delete")
        .replace("poll_interval = \"100ms\"", "poll_interval = \"2s\"");
    let mut daemon = start_active(&catalog, &config, port);
    read_all_keys(&mut daemon);

    // Redis dies and comes back (empty) in the middle of a change stream.
    let mut writer = stream_writer(&catalog, 300);
    eventually("the stream is under way", || {
        (daemon.status()["events"].as_u64()? > 1000).then_some(())
    });
    redis.kill();
    let during = daemon.get("book:1");
    assert_eq!(
        (during.status, x_cache(&during)),
        (200, "bypass"),
        "Redis down: the database answers"
    );
    eventually("the outage shows in /v1/status", || {
        (daemon.status()["redis"]["ok"] == false).then_some(())
    });
    let cursor_during = daemon.status()["cursor"].as_u64().expect("cursor");
    redis.restart();
    assert!(writer.wait().expect("writer").success());
    eventually("the daemon reports redis back", || {
        (daemon.status()["redis"]["ok"] == true).then_some(())
    });
    assert!(daemon.status()["apply_errors"].as_u64() > Some(0));
    let status = daemon.wait_caught_up();
    assert!(status["cursor"].as_u64() > Some(cursor_during));
    read_all_keys(&mut daemon);
    assert!(assert_redis_matches_database(&redis, &mut daemon) >= 7);

    // Redis comes back from a snapshot older than the invalidations it was told of since.
    let before = redis.value("book:1").expect("cached");
    assert_eq!(redis.cli(&["SAVE"]), "OK");
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 1)')");
    eventually("the change reaches redis", || {
        redis.value("book:1").is_none().then_some(())
    });
    redis.restart();
    assert_eq!(
        redis.value("book:1"),
        Some(before.clone()),
        "the snapshot is stale"
    );
    // Whatever the moment, the endpoint never serves the snapshot's stale value, and the
    // daemon removes it without waiting for a change.
    eventually("the stale snapshot value is removed", || {
        let reply = daemon.get("book:1");
        assert_eq!(reply.status, 200);
        assert_ne!(
            reply.text(),
            before,
            "served the stale value from the old snapshot"
        );
        (redis.value("book:1").as_deref() != Some(before.as_str())).then_some(())
    });
    read_all_keys(&mut daemon);
    assert!(assert_redis_matches_database(&redis, &mut daemon) >= 7);
}

fn role(daemon: &mut Daemon) -> String {
    daemon.status()["role"].as_str().unwrap_or("").to_owned()
}

fn durable_cursor(db: &Path) -> u64 {
    python_on(
        db,
        "print(con.execute(\"SELECT position FROM cachetail_cursor\").fetchone()[0])",
    )
    .trim()
    .parse()
    .expect("cursor")
}

fn signal(daemon: &Daemon, signal: &str) {
    let pid = daemon.pid().expect("running");
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

#[test]
fn a_standby_takes_over_after_kill_9_and_a_paused_daemon_is_fenced_off() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let (port_a, port_b) = (free_port(), free_port());
    let config_a = catalog.write_config(&redis_config(port_a, &redis, "write-through"));
    let config_b = write_named(
        &catalog,
        "b.toml",
        &redis_config(port_b, &redis, "write-through"),
    );
    let mut a = Daemon::start_existing(&config_a, port_a);
    eventually("A holds the lease", || {
        (role(&mut a) == "active").then_some(())
    });
    let mut b = Daemon::start_existing(&config_b, port_b);
    assert_eq!(role(&mut b), "standby");
    // Both serve reads, from the one shared cache.
    assert_eq!(x_cache(&a.get("book:1")), "miss");
    assert_eq!(x_cache(&b.get("book:1")), "hit");

    // kill -9 of the active daemon: the standby takes over, and applies.
    a.kill();
    let killed = Instant::now();
    eventually("B takes over", || (role(&mut b) == "active").then_some(()));
    let takeover = killed.elapsed();
    eprintln!("standby takeover after kill -9: {takeover:?}");
    assert!(takeover < Duration::from_secs(3), "took {takeover:?}");
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    eventually("B applies the change", || {
        redis
            .value("book:1")
            .filter(|v| review_count(v) == 3)
            .map(|_| ())
    });

    // Fencing: B is paused past its lease; A (restarted) takes over; B resumes and must apply
    // nothing from then on.
    let mut a = Daemon::start_existing(&config_a, port_a);
    assert_eq!(role(&mut a), "standby");
    let cursor_before = durable_cursor(&catalog.db());
    signal(&b, "-STOP");
    let paused = Instant::now();
    eventually("A takes over from the paused B", || {
        (role(&mut a) == "active").then_some(())
    });
    eprintln!(
        "takeover from a paused daemon: {:?} (lease 1s)",
        paused.elapsed()
    );
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 4)')");
    eventually("A applies", || {
        redis
            .value("book:1")
            .filter(|v| review_count(v) == 4)
            .map(|_| ())
    });
    signal(&b, "-CONT");
    eventually("B notices it lost the lease", || {
        (role(&mut b) == "standby").then_some(())
    });
    let b_events = b.status()["events"].as_u64().expect("events");
    let mut last_cursor = cursor_before;
    for i in 0..20 {
        catalog.python(&format!(
            "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (2, 1, {}) ')",
            1 + i % 5
        ));
        let cursor = durable_cursor(&catalog.db());
        assert!(
            cursor >= last_cursor,
            "the cursor went back: {last_cursor} → {cursor}"
        );
        last_cursor = cursor;
    }
    a.wait_caught_up();
    assert_eq!(
        b.status()["events"].as_u64(),
        Some(b_events),
        "the fenced daemon applied nothing"
    );
    assert_eq!(role(&mut a), "active");
    // B still serves reads, from Redis, fresh.
    assert_eq!(
        b.get("book:2").text(),
        from_database(&mut a, "book:2").expect("row")
    );
    a.wait_caught_up();
    read_all_keys(&mut a);
    assert!(assert_redis_matches_database(&redis, &mut a) >= 7);
}

#[test]
fn a_standby_on_the_memory_backend_answers_from_the_database() {
    let catalog = Catalog::new();
    let (port_a, port_b) = (free_port(), free_port());
    let config_a = catalog.write_config(&catalog_config(port_a, "delete", "20ms"));
    let config_b = write_named(
        &catalog,
        "b.toml",
        &catalog_config(port_b, "delete", "20ms"),
    );
    let mut a = Daemon::start_existing(&config_a, port_a);
    eventually("A holds the lease", || {
        (role(&mut a) == "active").then_some(())
    });
    let mut b = Daemon::start_existing(&config_b, port_b);
    assert_eq!(role(&mut b), "standby");
    // Its memory would not be kept fresh, so it does not use it.
    b.get("book:1");
    assert_eq!(x_cache(&b.get("book:1")), "bypass");
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    assert_eq!(review_count(&b.get("book:1").text()), 3);
    assert_eq!(a.stop().code(), Some(0));
    // A clean stop releases the lease: B takes over and caches.
    eventually("B takes over", || (role(&mut b) == "active").then_some(()));
    b.get("book:1");
    assert_eq!(x_cache(&b.get("book:1")), "hit");
}

fn write_named(catalog: &Catalog, name: &str, text: &str) -> PathBuf {
    let path = catalog.path().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn invalidation_messages_arrive_in_order_for_app_local_caches() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = start_active(&catalog, &redis_config(port, &redis, "delete"), port);
    let mut subscriber = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/redis_subscriber.py"
        ))
        .args(["--url", &redis.url(), "--prefix", PREFIX])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the subscriber example runs");
    let stdout = subscriber.stdout.take().expect("stdout");
    let lines = lines_of(stdout);
    let first = lines
        .recv_timeout(DEADLINE)
        .expect("the subscriber subscribes");
    assert!(first.contains("subscribed"), "{first}");

    // 200 single-row commits over five books, one by one, then a tag change.
    catalog.python(
        "for i in range(200):\n\
         \x20   con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, 3)', (1 + i % 5,))\n\
         \x20   con.commit()\n\
         con.execute(\"UPDATE books SET title = 'T' WHERE id = 3\")",
    );
    daemon.wait_caught_up();
    let head = daemon.status()["head"].as_u64().expect("head");
    let mut messages: Vec<Value> = Vec::new();
    while messages.last().and_then(|m| m["position"].as_u64()) != Some(head) {
        let line = lines
            .recv_timeout(DEADLINE)
            .expect("a message up to the head");
        messages.push(serde_json::from_str(&line).expect("each message is JSON"));
    }
    let _ = subscriber.kill();
    let _ = subscriber.wait();
    let mut last = 0;
    let mut seen_books = std::collections::BTreeSet::new();
    for message in &messages {
        let position = message["position"].as_u64().expect("position");
        assert!(
            position > last,
            "positions only grow: {last} then {position}"
        );
        last = position;
        for key in message["keys"].as_array().expect("keys") {
            seen_books.insert(key.as_str().expect("a key").to_owned());
        }
    }
    for book in 1..=5 {
        assert!(
            seen_books.contains(&format!("book:{book}")),
            "{seen_books:?}"
        );
    }
    assert!(seen_books.contains("top-books"));
    assert_eq!(
        messages.last().expect("a message")["tags"],
        serde_json::json!(["books"]),
        "the last batch is the tag change"
    );
}

#[test]
fn pause_empties_redis_and_resume_refills_it_fresh() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = start_active(&catalog, &redis_config(port, &redis, "write-through"), port);
    read_all_keys(&mut daemon);
    assert!(redis.value("book:1").is_some());
    let config = catalog.path().join("config.toml");
    let cli = |verb: &str| cli_ok(verb, &config);
    cli("pause");
    // Uncaptured writes are coming: an app reading Redis directly must find nothing to trust.
    eventually("redis is emptied", || {
        redis.cached_keys().is_empty().then_some(())
    });
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 3)')");
    let reply = daemon.get("book:1");
    assert_eq!(
        (x_cache(&reply), review_count(&reply.text())),
        ("bypass", 3)
    );
    assert_eq!(
        redis.value("book:1"),
        None,
        "nothing is stored while paused"
    );

    cli("resume");
    eventually("the daemon sees the resume", || {
        (daemon.status()["paused"] == false).then_some(())
    });
    eventually("book:1 is cached again", || {
        let reply = daemon.get("book:1");
        (x_cache(&reply) == "hit").then_some(())
    });
    assert_eq!(redis.value("book:1"), from_database(&mut daemon, "book:1"));
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 2, 3)')");
    eventually("capture works again", || {
        redis
            .value("book:1")
            .filter(|v| review_count(v) == 4)
            .map(|_| ())
    });
}

#[test]
fn a_reload_that_changes_a_family_removes_its_old_values_from_redis() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let config = redis_config(port, &redis, "delete");
    let mut daemon = start_active(&catalog, &config, port);
    read_all_keys(&mut daemon);
    assert!(redis.value("book:1").is_some_and(|v| !v.contains("shape")));
    let changed = config.replace(
        "round(avg(r.rating), 2) AS avg_rating, count(r.id) AS review_count",
        "round(avg(r.rating), 2) AS avg_rating, count(r.id) AS review_count, 'v2' AS shape",
    );
    assert_ne!(changed, config);
    catalog.write_config(&changed);
    eventually("the old definition's values leave redis", || {
        redis.value("book:2").is_none().then_some(())
    });
    assert!(
        redis.value("user:1").is_some(),
        "an unchanged family keeps its values"
    );
    let reply = daemon.get("book:2");
    assert!(
        reply.text().contains("\"shape\":\"v2\""),
        "{}",
        reply.text()
    );
    assert_eq!(redis.value("book:2"), Some(reply.text()));
    assert_eq!(x_cache(&daemon.get("book:2")), "hit");
}

#[test]
fn admin_actions_remove_values_from_redis() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let token = "redis-admin-token-0123456789";
    let config = redis_config(port, &redis, "delete").replacen(
        "\n[tail]",
        &format!("\nadmin_token = \"{token}\"\n\n[tail]"),
        1,
    );
    let mut daemon = start_active(&catalog, &config, port);
    read_all_keys(&mut daemon);
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    let reply = daemon
        .request_with("DELETE", "/v1/keys/book:1", &auth)
        .expect("DELETE");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(redis.value("book:1"), None);
    assert!(redis.value("book:2").is_some());
    let reply = daemon
        .request_with("POST", "/v1/admin/flush", &auth)
        .expect("flush");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        redis.cached_keys(),
        Vec::<String>::new(),
        "everything left redis"
    );
    // Refills are stored again (the marker gave them a later position).
    daemon.get("book:2");
    assert_eq!(redis.value("book:2"), from_database(&mut daemon, "book:2"));
}
