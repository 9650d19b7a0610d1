//! The Redis backend against a real `redis-server` the tests start: every strategy and tag,
//! values read with a plain client (`redis-cli`), kill -9 of the daemon (over keys that go cold)
//! and of Redis during a change stream, a standby daemon taking over at once, a daemon paused in
//! the middle of applying and fenced off, two daemons started at the same moment, the standby's
//! `?fresh=1` lag, and the pub/sub messages for app-local caches.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
            (self.try_cli(&["PING"]).ok()?.trim() == "PONG").then_some(())
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Runs `redis-cli` (a plain Redis client); its raw output, or why it failed: it could not
    /// connect, or Redis answered an error (`-e` makes that a failing exit status).
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new("redis-cli")
            .args(["-e", "-p", &self.port.to_string(), "--raw"])
            .args(args)
            .output()
            .expect("redis-cli runs (apt-get install redis-tools)");
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "redis-cli {args:?} failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                String::from_utf8_lossy(&output.stdout).trim()
            ))
        }
    }

    /// Runs `redis-cli` and returns its raw output, trimmed. A failing redis-cli fails the test.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("{e}"))
            .trim()
            .to_owned()
    }

    /// The value stored under a cache key, as an app server reading Redis directly sees it (None:
    /// no such key). A failing redis-cli fails the test rather than read as "no value".
    pub fn value(&self, key: &str) -> Option<String> {
        let text = self
            .try_cli(&["GET", &format!("{PREFIX}{key}")])
            .unwrap_or_else(|e| panic!("{e}"));
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

/// Books the cold-key stream may touch, each once: more than it reaches.
const COLD_BOOKS: u64 = 40_000;
/// Books per transaction of the cold-key stream.
const COLD_WINDOW: u64 = 20;
/// How many times the daemon is killed during the cold-key stream, and how many times it is
/// frozen and looked at while it catches up after each restart.
const COLD_KILLS: u32 = 12;
const PROBES_PER_RESTART: u64 = 40;

/// A child process killed when dropped (a failing test leaves no writer or subscriber behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A writer process that, like an app, reads a window of `window` books through the endpoint
/// (one multi-get: they are cached in Redis), then adds one review to each, in one transaction:
/// each book changes once, and never again. Its reads fail while the daemon is down: it writes
/// anyway. Stops when `stop` exists; prints the first book it did not touch.
fn cold_writer(catalog: &Catalog, port: u16, stop: &Path, window: u64) -> Reaped {
    let child = Command::new("python3")
        .arg("-c")
        .arg(
            "import json, os, sqlite3, sys, time, urllib.request\n\
             db, port, stop, window, last = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])\n\
             con = sqlite3.connect(db, timeout=5)\n\
             book = 6\n\
             while not os.path.exists(stop) and book + window <= last:\n\
             \x20   keys = [f'book:{b}' for b in range(book, book + window)]\n\
             \x20   request = urllib.request.Request(f'http://127.0.0.1:{port}/v1/keys', data=json.dumps(keys).encode(), method='POST')\n\
             \x20   try:\n\
             \x20       urllib.request.urlopen(request, timeout=5).read()\n\
             \x20   except OSError:\n\
             \x20       pass\n\
             \x20   con.executemany('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, 4)', [(b,) for b in range(book, book + window)])\n\
             \x20   con.commit()\n\
             \x20   book += window\n\
             \x20   time.sleep(0.002)\n\
             print(book)\n",
        )
        .arg(catalog.db())
        .arg(port.to_string())
        .arg(stop)
        .arg(window.to_string())
        .arg((6 + COLD_BOOKS).to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 writer");
    Reaped(child)
}

/// Freezes the daemon at random moments and looks at what a crash there would leave: the
/// durable cursor, and the position Redis has applied (`{prefix}#state`). A python3 process, so
/// that a probe costs a fraction of a millisecond (a `kill` process per signal costs more than
/// the moments worth catching). Told a config file, it waits for the `cachetail run` process
/// using it to appear, then probes it COUNT times at random gaps from its very start (a daemon
/// catching up after a restart); it answers one line: `ok`, or each probe that found the
/// cursor ahead.
struct Prober {
    child: Reaped,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Prober {
    fn start(db: &Path, redis: &RedisServer) -> Prober {
        let mut child = Reaped(
            Command::new("python3")
                .arg("-c")
                .arg(
                    "import os, random, signal, socket, sqlite3, sys, time\n\
                     con = sqlite3.connect(sys.argv[1])\n\
                     sock = socket.create_connection(('127.0.0.1', int(sys.argv[2])))\n\
                     replies = sock.makefile('rb')\n\
                     key = sys.argv[3].encode()\n\
                     def applied():\n\
                     \x20   sock.sendall(b'*3\\r\\n$4\\r\\nHGET\\r\\n$%d\\r\\n%s\\r\\n$7\\r\\napplied\\r\\n' % (len(key), key))\n\
                     \x20   length = int(replies.readline()[1:])\n\
                     \x20   return None if length < 0 else int(replies.read(length + 2)[:-2])\n\
                     def daemon(config):\n\
                     \x20   deadline = time.time() + 15\n\
                     \x20   while time.time() < deadline:\n\
                     \x20       for pid in filter(str.isdigit, os.listdir('/proc')):\n\
                     \x20           try:\n\
                     \x20               args = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n\
                     \x20           except OSError:\n\
                     \x20               continue\n\
                     \x20           if b'run' in args and config in args:\n\
                     \x20               return int(pid)\n\
                     \x20   raise SystemExit('the daemon did not start')\n\
                     rnd = random.Random(3)\n\
                     for line in sys.stdin:\n\
                     \x20   config, count, gap = line.split()\n\
                     \x20   pid = daemon(config.encode())\n\
                     \x20   found = []\n\
                     \x20   for probe in range(int(count)):\n\
                     \x20       time.sleep(rnd.random() * int(gap) / 1e6)\n\
                     \x20       os.kill(pid, signal.SIGSTOP)\n\
                     \x20       try:\n\
                     \x20           cursor = con.execute(\"SELECT position FROM cachetail_cursor WHERE consumer = 'main'\").fetchone()[0]\n\
                     \x20           position = applied()\n\
                     \x20       finally:\n\
                     \x20           os.kill(pid, signal.SIGCONT)\n\
                     \x20       if position is None or position < cursor:\n\
                     \x20           found.append(f'probe {probe}: cursor {cursor}, redis applied {position}')\n\
                     \x20   print('; '.join(found) or 'ok', flush=True)\n",
                )
                .arg(db)
                .arg(redis.port.to_string())
                .arg(format!("{PREFIX}#state"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("python3 prober"),
        );
        let stdout = child.0.stdout.take().expect("stdout");
        Prober {
            child,
            lines: std::io::BufRead::lines(std::io::BufReader::new(stdout)),
        }
    }

    /// Starts probing the daemon that is about to start on `config`: `count` probes at random
    /// gaps of up to `max_gap`.
    fn watch(&mut self, config: &Path, count: u64, max_gap: Duration) {
        let stdin = self.child.0.stdin.as_mut().expect("stdin");
        let config = config.to_str().expect("a UTF-8 path");
        assert!(!config.contains(char::is_whitespace), "{config}");
        writeln!(stdin, "{config} {count} {}", max_gap.as_micros()).expect("tell the prober");
    }

    /// What the probes found wrong, if anything.
    fn found(&mut self) -> Option<String> {
        let answer = self
            .lines
            .next()
            .expect("the prober answers")
            .expect("a line");
        (answer != "ok").then_some(answer)
    }
}

/// The values of `keys` in Redis (None: not stored), read with `redis-cli MGET`.
fn redis_values(redis: &RedisServer, keys: &[String]) -> Vec<Option<String>> {
    let mut args = vec!["MGET".to_owned()];
    args.extend(keys.iter().map(|k| format!("{PREFIX}{k}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = redis.try_cli(&args).unwrap_or_else(|e| panic!("{e}"));
    let values: Vec<Option<String>> = text
        .strip_suffix('\n')
        .unwrap_or(&text)
        .split('\n')
        .map(|v| (!v.is_empty()).then(|| v.to_owned()))
        .collect();
    assert_eq!(
        values.len(),
        keys.len(),
        "MGET answered {} values",
        values.len()
    );
    values
}

/// The endpoint's answers for `keys` (one multi-get): status and value per key.
fn endpoint_values(daemon: &Daemon, keys: &[String]) -> Vec<(u64, Option<String>)> {
    let body = serde_json::to_vec(keys).expect("JSON");
    let reply = Client::new(daemon.address)
        .request(
            "POST",
            "/v1/keys",
            &[("Content-Type", "application/json")],
            &body,
        )
        .expect("multi-get");
    assert_eq!(reply.status, 200, "{}", reply.text());
    json(&reply)["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (
                r["status"].as_u64().expect("status"),
                r.get("value").map(Value::to_string),
            )
        })
        .collect()
}

/// kill -9 of the daemon at random moments of a stream over keys that go cold: each book is
/// read (cached in Redis), then changed once and never again, so a batch whose cache actions
/// were lost would not be healed by a later change. A daemon that wrote its cursor before a
/// batch's cache actions and died in between would skip the batch; Redis's own record of what
/// it applied then makes the restart empty it (so no value shows it), but app-local caches never
/// hear of the batch. So beside every key in Redis, through the endpoint, and in the subscriber's
/// messages, the test looks straight at what a crash leaves: at each kill, and at hundreds of
/// random moments while the daemon catches up after each restart (frozen with SIGSTOP), Redis
/// must have applied everything the durable cursor covers.
#[test]
fn kill_9_during_a_change_stream_over_keys_that_go_cold_leaves_nothing_stale() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    catalog.python(&format!(
        "con.executemany('INSERT INTO books (id, title, author) VALUES (?, ?, ?)', \
             [(i, f'Book {{i}}', 'A') for i in range(6, {})])",
        6 + COLD_BOOKS
    ));
    let port = free_port();
    let mut daemon = start_active(&catalog, &redis_config(port, &redis, "delete"), port);
    // An app server's local cache listens for invalidations all along.
    let mut subscriber = Reaped(
        Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/redis_subscriber.py"
            ))
            .args(["--url", &redis.url(), "--prefix", PREFIX])
            .stdout(Stdio::piped())
            .spawn()
            .expect("the subscriber example runs"),
    );
    let messages = lines_of(subscriber.0.stdout.take().expect("stdout"));
    let first = messages
        .recv_timeout(DEADLINE)
        .expect("the subscriber subscribes");
    assert!(first.contains("subscribed"), "{first}");

    let stop = catalog.path().join("stop-writer");
    let mut writer = cold_writer(&catalog, port, &stop, COLD_WINDOW);
    let db = rusqlite::Connection::open(catalog.db()).expect("open");
    let mut prober = Prober::start(&catalog.db(), &redis);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move |below: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % below
    };
    let mut ahead = Vec::new();
    let started = Instant::now();
    for kill in 0..COLD_KILLS {
        std::thread::sleep(Duration::from_micros(random(150_000)));
        // kill -9 at a random moment. Redis must hold every change the durable cursor covers,
        // as the cursor moves only after a batch's cache actions are done: a crash at any moment
        // replays, never skips.
        daemon.kill();
        let (cursor, _) = cursor_row(&db);
        let applied: Option<u64> = redis
            .cli(&["HGET", &format!("{PREFIX}#state"), "applied"])
            .parse()
            .ok();
        if applied.is_none_or(|a| a < cursor) {
            ahead.push(format!(
                "kill {kill}: cursor {cursor}, redis applied {applied:?}"
            ));
        }
        // The same look at many more moments, while the restarted daemon catches up with what
        // was written while it was down: frozen (SIGSTOP), looked at, resumed.
        let config = daemon.config.clone();
        prober.watch(&config, PROBES_PER_RESTART, Duration::from_millis(2));
        daemon = Daemon::start_existing(&config, port);
        if let Some(found) = prober.found() {
            ahead.push(format!("after restart {kill}: {found}"));
        }
    }
    let probes = u64::from(COLD_KILLS) * PROBES_PER_RESTART;
    let probing = started.elapsed();
    std::fs::write(&stop, "").expect("stop the writer");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut writer.0.stdout.take().expect("stdout"), &mut out)
        .expect("the writer's output");
    assert!(writer.0.wait().expect("writer").success());
    let end: u64 = out.trim().parse().expect("the writer's last book");
    assert!(end < 6 + COLD_BOOKS, "the writer ran out of books");
    eprintln!(
        "cold-key stream: {} books changed; {COLD_KILLS} kill -9 and {probes} SIGSTOP probes in {probing:?}; cursor ahead of redis at {} of them: {ahead:?}",
        end - 6,
        ahead.len()
    );
    assert!(
        ahead.is_empty(),
        "the durable cursor was ahead of what Redis had applied (a crash there skips those changes): {ahead:#?}"
    );
    let head = daemon.wait_caught_up()["head"].as_u64().expect("head");

    // Every book changed once: each must show its one review, in Redis (where stored) and
    // through the endpoint.
    let counts: std::collections::HashMap<u64, i64> = {
        let mut stmt = db
            .prepare("SELECT book_id, count(*) FROM reviews WHERE book_id >= 6 GROUP BY book_id")
            .expect("prepare");
        stmt.query_map([], |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("counts")
    };
    assert_eq!(counts.len() as u64, end - 6);
    let keys: Vec<String> = (6..end).map(|b| format!("book:{b}")).collect();
    let (mut in_redis, mut stale) = (0, Vec::new());
    for chunk in keys.chunks(1000) {
        let stored = redis_values(&redis, chunk);
        let answered = endpoint_values(&daemon, chunk);
        for ((key, stored), (status, answered)) in chunk.iter().zip(stored).zip(answered) {
            let book: u64 = key["book:".len()..].parse().expect("book id");
            let expected = counts.get(&book).copied().unwrap_or(0);
            assert_eq!(status, 200, "{key}");
            if let Some(value) = stored {
                in_redis += 1;
                if review_count(&value) != expected {
                    stale.push(format!("{key} in redis: {value}"));
                }
            }
            let answered = answered.expect("a value");
            if review_count(&answered) != expected {
                stale.push(format!("{key} answered: {answered}"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "{} stale values, e.g. {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );

    // The subscriber heard of every change: each book is in some message.
    let mut announced = std::collections::HashSet::new();
    loop {
        let line = messages
            .recv_timeout(DEADLINE)
            .expect("a message up to the head");
        let message: Value = serde_json::from_str(&line).expect("each message is JSON");
        for key in message["keys"].as_array().expect("keys") {
            announced.insert(key.as_str().expect("a key").to_owned());
        }
        if message["position"].as_u64() >= Some(head) {
            break;
        }
    }
    let unannounced: Vec<&String> = keys.iter().filter(|k| !announced.contains(*k)).collect();
    assert!(
        unannounced.is_empty(),
        "{} changed keys were never announced to subscribers, e.g. {:?}",
        unannounced.len(),
        &unannounced[..unannounced.len().min(5)]
    );
    eprintln!(
        "{in_redis} of {} changed keys were in redis at the end",
        keys.len()
    );
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
    refilled_fresh(&redis, &mut daemon);

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
    refilled_fresh(&redis, &mut daemon);
}

/// Reads every key until Redis stores them all again, each value equal to the database's. The
/// daemon rebuilds Redis on its own schedule (it removes the keys one SCAN page at a time, then
/// resets the state): until it is done, reads answer from the database and store nothing.
fn refilled_fresh(redis: &RedisServer, daemon: &mut Daemon) {
    eventually("redis is rebuilt and refilled", || {
        read_all_keys(daemon);
        (assert_redis_matches_database(redis, daemon) >= 7).then_some(())
    });
}

fn role(daemon: &mut Daemon) -> String {
    daemon.status()["role"].as_str().unwrap_or("").to_owned()
}

fn signal(daemon: &Daemon, signal: &str) {
    let pid = daemon.pid().expect("running");
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

/// The config with another lease (`redis_config` has "1s"; `catalog_config` the default).
fn with_lease(config: &str, lease: &str) -> String {
    let with = if config.contains("lease = \"1s\"") {
        config.replace("lease = \"1s\"", &format!("lease = \"{lease}\""))
    } else {
        config.replace(
            "[tail]\npoll_interval = \"100ms\"",
            &format!("[tail]\npoll_interval = \"100ms\"\nlease = \"{lease}\""),
        )
    };
    assert_ne!(with, config, "the lease was not set");
    with
}

/// Polls `condition` until it holds; fails if that takes `limit` or more. Returns how long it
/// took.
fn within(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if condition() {
            return start.elapsed();
        }
        let waited = start.elapsed();
        assert!(waited < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A lease far longer than any takeover the tests accept: a takeover within `AT_ONCE` cannot be
/// the lease running out.
const LONG_LEASE: &str = "30s";
const AT_ONCE: Duration = Duration::from_secs(5);

#[test]
fn a_standby_takes_over_at_once_after_kill_9_of_the_active_daemon() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let (port_a, port_b) = (free_port(), free_port());
    let config = |port| with_lease(&redis_config(port, &redis, "write-through"), LONG_LEASE);
    let configs = [
        (catalog.write_config(&config(port_a)), port_a),
        (write_named(&catalog, "b.toml", &config(port_b)), port_b),
    ];
    let mut active = Daemon::start_existing(&configs[0].0, port_a);
    eventually("A holds the lease", || {
        (role(&mut active) == "active").then_some(())
    });
    let mut standby = Daemon::start_existing(&configs[1].0, port_b);
    assert_eq!(role(&mut standby), "standby");
    // Both serve reads, from the one shared cache.
    assert_eq!(x_cache(&active.get("book:1")), "miss");
    assert_eq!(x_cache(&standby.get("book:1")), "hit");

    // kill -9 of the active daemon, three times over (the killed one comes back as the standby):
    // each time the standby takes over long before the 30 s lease runs out, since the holder's
    // process is gone, and applies.
    let mut daemons = [active, standby];
    let mut took = Vec::new();
    for round in 0..3 {
        let (killed, next) = (round % 2, 1 - round % 2);
        daemons[killed].kill();
        took.push(within(
            AT_ONCE,
            &format!(
                "round {round}: the standby takes over after kill -9 of the active daemon (lease {LONG_LEASE})"
            ),
            || role(&mut daemons[next]) == "active",
        ));
        catalog.python(&format!(
            "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, {}) ')",
            1 + round
        ));
        let expected = 3 + round as i64;
        eventually("the new active daemon applies the change", || {
            redis
                .value("book:1")
                .filter(|v| review_count(v) == expected)
                .map(|_| ())
        });
        let (config, port) = &configs[killed];
        daemons[killed] = Daemon::start_existing(config, *port);
        assert_eq!(role(&mut daemons[killed]), "standby");
    }
    eprintln!("standby takeover after kill -9 (lease {LONG_LEASE}): {took:?}");
    let [mut a, mut b] = daemons;
    let (active, standby) = if role(&mut a) == "active" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert_eq!(role(standby), "standby");
    read_all_keys(active);
    assert_eq!(standby.get("book:1").text(), active.get("book:1").text());
    assert!(assert_redis_matches_database(&redis, active) >= 7);
}

/// How far a slow `user:{id}` query counts: about a second of CPU on the project's machine, so
/// the test can catch the tail inside it.
const SPIN: u64 = 6_000_000;

/// The Redis config with `user:{id}` write-through and slow on demand: its query spins (a
/// recursive CTE counting to the user's `knobs.spin`, if the user has a row there) before it
/// reads. `knobs` is a table no rule watches: setting it invalidates nothing, and a recompute
/// reads it in its own snapshot.
fn slow_users_config(port: u16, redis: &RedisServer) -> String {
    let config = redis_config(port, redis, "write-through");
    let slow = config
        .replace(
            r#"query = "SELECT id, name FROM users WHERE id = :id""#,
            r#"query = """SELECT id, name FROM users WHERE id = :id AND (WITH RECURSIVE spin(n) AS
           (SELECT 1 UNION ALL SELECT n + 1 FROM spin WHERE n < (SELECT spin FROM knobs WHERE id = :id))
           SELECT count(*) FROM spin) > 0""""#,
        )
        .replace(
            "table = \"users\"\nkeys = [\"user:{id}\"]",
            "table = \"users\"\nkeys = [\"user:{id}\"]\nstrategy = \"write-through\"",
        );
    assert_eq!(slow.matches("knobs").count(), 1, "the slow query is in");
    assert!(slow.contains("keys = [\"user:{id}\"]\nstrategy"));
    slow
}

/// A catalog with the (unwatched) `knobs` table of `slow_users_config`: every user fast.
fn catalog_with_knobs() -> Catalog {
    let catalog = Catalog::new();
    catalog.sqlite_cli("CREATE TABLE knobs (id INTEGER PRIMARY KEY, spin INTEGER NOT NULL)");
    catalog
}

/// Makes `user:{id}`'s query spin to `spin` (0: fast again).
fn set_spin(catalog: &Catalog, id: u64, spin: u64) {
    catalog.sqlite_cli(&format!(
        "INSERT OR REPLACE INTO knobs (id, spin) VALUES ({id}, {spin})"
    ));
}

/// The thread of process `pid` named `name` (the daemon names its tail thread).
fn thread_named(pid: u32, name: &str) -> u32 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
    tasks
        .filter_map(Result::ok)
        .find(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .and_then(|task| task.file_name().to_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no thread named {name} in process {pid}"))
}

/// The CPU time (user + system) a thread has used, from /proc (in 10 ms ticks: USER_HZ is 100).
fn cpu_time(pid: u32, tid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).expect("stat");
    // After the command name in parentheses: state (field 3), ... utime (14), stime (15).
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// The cursor row: position and when it was last written.
fn try_cursor_row(conn: &rusqlite::Connection) -> rusqlite::Result<(u64, String)> {
    conn.query_row(
        "SELECT position, updated_at FROM cachetail_cursor WHERE consumer = 'main'",
        [],
        |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)),
    )
}

fn cursor_row(conn: &rusqlite::Connection) -> (u64, String) {
    try_cursor_row(conn).expect("the cursor row")
}

/// Samples the durable cursor every few milliseconds on its own thread until `stop`; returns
/// how many samples it took and every step back it saw.
fn sample_cursor(
    db: PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<(u64, u64)>)> {
    std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&db).expect("open");
        let (mut samples, mut back, mut last) = (0u64, Vec::new(), 0u64);
        while !stop.load(Ordering::Acquire) {
            if let Ok((cursor, _)) = try_cursor_row(&conn) {
                if cursor < last {
                    back.push((last, cursor));
                }
                last = last.max(cursor);
                samples += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (samples, back)
    })
}

/// A writer process committing small review changes until `stop` exists.
fn endless_writer(catalog: &Catalog, stop: &Path) -> Child {
    Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys, os, time, random\n\
             con = sqlite3.connect(sys.argv[1], timeout=5)\n\
             rnd = random.Random(11)\n\
             while not os.path.exists(sys.argv[2]):\n\
             \x20   con.executemany('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, ?, ?)', [(rnd.randint(1, 5), rnd.randint(1, 3), rnd.randint(1, 5)) for _ in range(4)])\n\
             \x20   con.execute('DELETE FROM reviews WHERE id = (SELECT min(id) FROM reviews)')\n\
             \x20   con.commit()\n\
             \x20   time.sleep(0.002)\n",
        )
        .arg(catalog.db())
        .arg(stop)
        .stdout(Stdio::null())
        .spawn()
        .expect("python3 writer")
}

#[test]
fn a_daemon_paused_in_the_middle_of_applying_is_fenced_off() {
    let redis = RedisServer::start();
    let catalog = catalog_with_knobs();
    let (port_a, port_b) = (free_port(), free_port());
    let config_a = catalog.write_config(&slow_users_config(port_a, &redis));
    let config_b = write_named(&catalog, "b.toml", &slow_users_config(port_b, &redis));
    let mut a = Daemon::start_existing(&config_a, port_a);
    eventually("A holds the lease", || {
        (role(&mut a) == "active").then_some(())
    });
    let mut b = Daemon::start_existing(&config_b, port_b);
    assert_eq!(role(&mut b), "standby");
    read_all_keys(&mut a);
    let db = rusqlite::Connection::open(catalog.db()).expect("open");

    // The durable cursor, sampled from now on: it must never go back.
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_cursor(catalog.db(), Arc::clone(&stop_sampling));

    // A stream of changes, applied by A.
    let stop_stream = catalog.path().join("stop-stream");
    let mut writer = endless_writer(&catalog, &stop_stream);
    eventually("A applies the stream", || {
        (a.status()["events"].as_u64()? > 200).then_some(())
    });

    // user:{id} turns slow, and user 1 changes: in the middle of the stream, A's tail applies
    // the batch to Redis (epoch and all), then recomputes user:1 in it.
    set_spin(&catalog, 1, SPIN);
    let pid = a.pid().expect("running");
    let tail = thread_named(pid, "cachetail-tail");
    let changed_at: u64 = catalog
        .python(
            "con.execute(\"UPDATE users SET name = 'renamed' WHERE id = 1\")\n\
             print(con.execute('SELECT max(id) FROM cachetail_outbox').fetchone()[0])",
        )
        .trim()
        .parse()
        .expect("position");
    // Inside the recompute: the applied position stays below the change while the tail thread
    // keeps burning CPU (a batch of the stream takes a few milliseconds, not 150).
    let mut last = (0, cpu_time(pid, tail));
    eventually("A's tail is inside the slow recompute", || {
        let applied = a.status()["cursor"].as_u64()?;
        let cpu = cpu_time(pid, tail);
        if applied != last.0 {
            last = (applied, cpu);
            return None;
        }
        (applied < changed_at && cpu - last.1 >= Duration::from_millis(150)).then_some(())
    });
    signal(&a, "-STOP");
    let paused = Instant::now();

    // B takes over when A's lease runs out, continues from the durable cursor with the recompute
    // fast again, applies the rest of the stream, and changes user 1 once more.
    set_spin(&catalog, 1, 0);
    eventually("B takes over from the paused A", || {
        (role(&mut b) == "active").then_some(())
    });
    let takeover = paused.elapsed();
    catalog.python("con.execute(\"UPDATE users SET name = 'renamed again' WHERE id = 1\")");
    eventually("B applies the stream past the slow change", || {
        (b.status()["cursor"].as_u64()? > changed_at + 200).then_some(())
    });
    std::fs::write(&stop_stream, "").expect("stop the stream");
    assert!(writer.wait().expect("writer").success());
    let head = b.wait_caught_up()["head"].as_u64().expect("head");
    let durable = eventually("B persists its cursor", || {
        let row = cursor_row(&db);
        (row.0 == head).then_some(row)
    });

    // A resumes inside its recompute: it finishes it, and must write no cursor (its own is far
    // behind B's), apply nothing more, and stand by.
    let cpu_paused = cpu_time(pid, tail);
    signal(&a, "-CONT");
    let resumed = Instant::now();
    eventually("A finds out it lost the lease and stands by", || {
        (role(&mut a) == "standby").then_some(())
    });
    let computed = cpu_time(pid, tail) - cpu_paused;
    eprintln!(
        "takeover from a daemon paused mid-apply: {takeover:?} (lease 1s); it stood by {:?} after it resumed, its tail computing for {computed:?} more",
        resumed.elapsed()
    );
    assert!(
        computed >= Duration::from_millis(30),
        "the test paused A after its recompute, not inside it (its tail used {computed:?} after it resumed)"
    );
    assert_eq!(
        cursor_row(&db),
        durable,
        "the resumed daemon wrote the durable cursor (B's was {durable:?})"
    );
    assert_eq!(role(&mut b), "active");
    // What A computed read user 1 before B's second change: Redis refused to store it.
    assert_eq!(
        redis.value("user:1"),
        from_database(&mut b, "user:1"),
        "the fenced daemon's late recompute landed in redis"
    );
    let a_events = a.status()["events"].as_u64().expect("events");
    catalog.python(
        "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (2, 1, 5)')\n\
         con.execute(\"UPDATE users SET name = 'third name' WHERE id = 1\")",
    );
    b.wait_caught_up();
    assert_eq!(
        a.status()["events"].as_u64(),
        Some(a_events),
        "the fenced daemon applied changes"
    );

    // Nothing stale: what both daemons answer and what Redis holds equal the database.
    for key in [
        "book:1",
        "book:2",
        "book:3",
        "book:4",
        "book:5",
        "top-books",
        "user:1",
    ] {
        let fresh = from_database(&mut b, key).expect("a row");
        assert_eq!(b.get(key).text(), fresh, "B answered {key} stale");
        assert_eq!(a.get(key).text(), fresh, "A answered {key} stale");
    }
    assert!(assert_redis_matches_database(&redis, &mut b) >= 7);
    assert_eq!(b.verify()["stale"], 0);

    // Paused while idle instead (nothing to apply when it resumes), B finds out at its lease
    // renewal: it stands by, and A applies what comes next.
    let b_events = b.status()["events"].as_u64().expect("events");
    signal(&b, "-STOP");
    eventually("A takes over from the paused B", || {
        (role(&mut a) == "active").then_some(())
    });
    signal(&b, "-CONT");
    eventually("B finds out it lost the lease and stands by", || {
        (role(&mut b) == "standby").then_some(())
    });
    catalog.sqlite_cli("UPDATE users SET name = 'fourth name' WHERE id = 1");
    eventually("A applies", || {
        redis
            .value("user:1")
            .filter(|v| v.contains("fourth name"))
            .map(|_| ())
    });
    assert_eq!(b.status()["events"].as_u64(), Some(b_events));
    assert_eq!(
        b.get("user:1").text(),
        from_database(&mut a, "user:1").expect("row")
    );

    stop_sampling.store(true, Ordering::Release);
    let (samples, back) = sampler.join().expect("sampler");
    assert!(samples > 100, "only {samples} samples of the cursor");
    assert_eq!(back, [], "the durable cursor went back ({samples} samples)");
}

#[test]
fn a_standby_on_the_memory_backend_answers_from_the_database() {
    let catalog = Catalog::new();
    let (port_a, port_b) = (free_port(), free_port());
    let config = |port| with_lease(&catalog_config(port, "delete", "20ms"), LONG_LEASE);
    let config_a = catalog.write_config(&config(port_a));
    let config_b = write_named(&catalog, "b.toml", &config(port_b));
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
    // A clean stop releases the lease: B takes over at once (not when the 30 s lease would run
    // out), and caches.
    let took = within(
        AT_ONCE,
        &format!("B takes over after A stopped cleanly (lease {LONG_LEASE})"),
        || role(&mut b) == "active",
    );
    eprintln!("standby takeover after a clean stop (lease {LONG_LEASE}): {took:?}");
    b.get("book:1");
    assert_eq!(x_cache(&b.get("book:1")), "hit");

    // On one host the standby also sees that the stopped holder's process is gone, which alone
    // gives the takeover above; the release itself shows in the lease row. With no standby
    // left, B stops: the row still names B, and has expired.
    let pid = b.pid().expect("running");
    assert_eq!(b.stop().code(), Some(0));
    let (holder, expires_at_ms, now_ms): (String, i64, i64) = rusqlite::Connection::open(catalog.db())
        .expect("open")
        .query_row(
            "SELECT holder, expires_at, CAST(unixepoch('subsec') * 1000 AS INTEGER) FROM cachetail_lease",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .expect("the lease row");
    assert!(holder.contains(&format!(":{pid}:")), "{holder}");
    assert!(
        expires_at_ms <= now_ms,
        "a clean stop must release the lease: it expires in {} ms",
        expires_at_ms - now_ms
    );
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

#[test]
fn two_daemons_started_at_the_same_moment_exactly_one_applies() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let (port_a, port_b) = (free_port(), free_port());
    // A long lease: a daemon that wrongly believed it held the lease would not find out by
    // renewing it during the test.
    let config = |port| with_lease(&redis_config(port, &redis, "delete"), LONG_LEASE);
    let configs = [
        (catalog.write_config(&config(port_a)), port_a),
        (write_named(&catalog, "b.toml", &config(port_b)), port_b),
    ];
    let mut subscriber = Reaped(
        Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/redis_subscriber.py"
            ))
            .args(["--url", &redis.url(), "--prefix", PREFIX])
            .stdout(Stdio::piped())
            .spawn()
            .expect("the subscriber example runs"),
    );
    let messages = lines_of(subscriber.0.stdout.take().expect("stdout"));
    let first = messages
        .recv_timeout(DEADLINE)
        .expect("the subscriber subscribes");
    assert!(first.contains("subscribed"), "{first}");
    for round in 1..=5 {
        // Both processes are spawned at the same moment.
        let barrier = std::sync::Barrier::new(2);
        let mut daemons: Vec<Daemon> = std::thread::scope(|scope| {
            let started: Vec<_> = configs
                .iter()
                .map(|(config, port)| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        Daemon::start_existing(config, *port)
                    })
                })
                .collect();
            started
                .into_iter()
                .map(|s| s.join().expect("started"))
                .collect()
        });
        // Exactly one applies, the other stands by, and it stays so.
        let roles =
            |daemons: &mut Vec<Daemon>| -> Vec<String> { daemons.iter_mut().map(role).collect() };
        eventually("one of the two holds the lease", || {
            roles(&mut daemons)
                .contains(&"active".to_owned())
                .then_some(())
        });
        for _ in 0..10 {
            let mut seen = roles(&mut daemons);
            seen.sort();
            assert_eq!(seen, ["active", "standby"], "round {round}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let active = usize::from(role(&mut daemons[1]) == "active");
        let standby = 1 - active;

        // A change is applied once: by the active daemon, announced once, and both serve it.
        let expected = 2 + round;
        let position: u64 = catalog
            .python(
                "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')\n\
                 print(con.execute('SELECT max(id) FROM cachetail_outbox').fetchone()[0])",
            )
            .trim()
            .parse()
            .expect("position");
        for daemon in daemons.iter_mut() {
            eventually("both serve the change", || {
                (review_count(&daemon.get("book:1").text()) == expected).then_some(())
            });
        }
        daemons[active].wait_caught_up();
        assert_eq!(
            daemons[standby].status()["events"].as_u64(),
            Some(0),
            "round {round}: the standby applied changes"
        );
        let mut announced = 0;
        loop {
            let line = messages
                .recv_timeout(DEADLINE)
                .expect("the change's message");
            let message: Value = serde_json::from_str(&line).expect("each message is JSON");
            let at = message["position"].as_u64().expect("position");
            if at >= position
                && message["keys"]
                    .as_array()
                    .expect("keys")
                    .iter()
                    .any(|k| k == "book:1")
            {
                announced += 1;
            }
            if at >= position {
                break;
            }
        }
        // Anything else published for it would be here by now.
        std::thread::sleep(Duration::from_millis(100));
        while let Ok(line) = messages.try_recv() {
            if line.contains("\"book:1\"") {
                announced += 1;
            }
        }
        assert_eq!(
            announced, 1,
            "round {round}: the change was applied {announced} times"
        );
        for mut daemon in daemons {
            assert_eq!(daemon.stop().code(), Some(0));
        }
    }
}

#[test]
fn on_a_standby_fresh_reads_wait_for_the_durable_cursor_which_follows_the_active_one_closely() {
    let redis = RedisServer::start();
    let catalog = catalog_with_knobs();
    let (port_a, port_b) = (free_port(), free_port());
    // A long lease: this test is about a standby following, not taking over. The slow recompute
    // below (half a second of CPU, seconds under load) runs between two lease renewals: it
    // outlasts `redis_config`'s 1 s lease, and then the daemons take the lease from each other
    // mid-batch, each applying the batch again from the durable cursor (removing user:1 from
    // Redis again) and none able to write the cursor past it, so the standby's read times out.
    let config = |port| with_lease(&slow_users_config(port, &redis), LONG_LEASE);
    let mut a = start_active(&catalog, &config(port_a), port_a);
    let config_b = write_named(&catalog, "b.toml", &config(port_b));
    let mut b = Daemon::start_existing(&config_b, port_b);
    assert_eq!(role(&mut b), "standby");
    read_all_keys(&mut a);

    // The standby's lag: after a commit, `?fresh=1` on the active daemon, then on the standby:
    // how long the standby takes to answer the committed value once the active one has applied
    // it. Writes now and then first (the active daemon writes its cursor at once, and the
    // standby hears of it through the same file notifications as the change), then in the
    // middle of a stream of changes (the cursor is written at most every 100 ms).
    let lag = |a: &mut Daemon, b: &mut Daemon, n: u64| -> Duration {
        catalog.sqlite_cli(&format!("UPDATE users SET name = 'name {n}' WHERE id = 2"));
        let name = format!("\"name {n}\"");
        let reply = a.get_path("/v1/keys/user:2?fresh=1");
        assert!(reply.text().contains(&name), "{}", reply.text());
        let asked = Instant::now();
        let reply = b.get_path("/v1/keys/user:2?fresh=1");
        let took = asked.elapsed();
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(
            reply.text().contains(&name),
            "a fresh read on the standby answered {}",
            reply.text()
        );
        took
    };
    let mut quiet: Vec<Duration> = (1..=10).map(|n| lag(&mut a, &mut b, n)).collect();
    let stop = catalog.path().join("stop-stream");
    let mut writer = Reaped(endless_writer(&catalog, &stop));
    let mut streaming: Vec<Duration> = (11..=20).map(|n| lag(&mut a, &mut b, n)).collect();
    std::fs::write(&stop, "").expect("stop the stream");
    assert!(writer.0.wait().expect("writer").success());
    quiet.sort();
    streaming.sort();
    eprintln!(
        "standby ?fresh=1 lag behind the active daemon: quiet {quiet:?}; during a stream {streaming:?}"
    );
    let median = streaming[streaming.len() / 2];
    let max = quiet
        .iter()
        .chain(&streaming)
        .max()
        .copied()
        .unwrap_or_default();
    assert!(
        median < Duration::from_millis(400) && max < Duration::from_secs(2),
        "the standby's durable cursor lags the active daemon's by far more than about 300 ms: quiet {quiet:?}, streaming {streaming:?}"
    );

    // Only waiting gives the fresh value. The active daemon's tail is kept busy (user:1's
    // recompute made slow, after its batch removed the old value from Redis); user 2 changes
    // meanwhile: Redis keeps user:2's old value until the tail gets to it, and the durable
    // cursor moves after that.
    let before = b.get("user:2").text();
    assert_eq!(redis.value("user:2").as_ref(), Some(&before));
    assert!(
        redis.value("user:1").is_some(),
        "user:1 is in Redis before it changes (else its absence below would prove nothing)"
    );
    set_spin(&catalog, 1, SPIN / 2);
    catalog.sqlite_cli("UPDATE users SET name = 'renamed' WHERE id = 1");
    eventually(
        "the active daemon's tail is inside user:1's recompute",
        || redis.value("user:1").is_none().then_some(()),
    );
    catalog.sqlite_cli("UPDATE users SET name = 'renamed 2' WHERE id = 2");
    // The read below starts while Redis still holds user:2's value from before the write: a
    // standby that did not wait would answer it.
    assert!(
        redis.value("user:1").is_none() && redis.value("user:2").as_ref() == Some(&before),
        "the active daemon's tail got past user:1's slow recompute before the standby was asked"
    );
    let reply = b.get_path("/v1/keys/user:2?fresh=1");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        reply.text().contains("renamed 2"),
        "a fresh read on the standby answered {} (before the write: {before})",
        reply.text()
    );
    assert!(
        redis.value("user:1").is_some_and(|v| v.contains("renamed")),
        "the slow recompute was done before the standby answered"
    );
    assert_eq!(
        (role(&mut a), role(&mut b)),
        ("active".into(), "standby".into())
    );
    set_spin(&catalog, 1, 0);
}
