//! README promises about the Redis backend that no other test asserted, each checked end to end
//! against a real `redis-server` (read with `redis-cli`) and the real binary: the invalidation
//! marks beside each key, an outage (backoff, cursor, log lines, `/v1/status`), eviction of
//! `#state` and a full Redis under `noeviction`, keys that could land among the bookkeeping,
//! `publish = false`, an ACL user in the URL, the example subscriber dropping its local cache
//! when it reconnects, and the lease epoch across takeovers.

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::Client;
use serde_json::Value;

use crate::common::*;
use crate::redis::{RedisServer, redis_config};

/// The prefix `redis_config` sets.
const PREFIX: &str = "ct:";

/// Starts a daemon and waits until it holds the lease (and has made Redis trustworthy); if it
/// does not, says what Redis answered it.
fn start_active(catalog: &Catalog, config: &str, port: u16) -> Daemon {
    let mut daemon = Daemon::start(catalog, config, port);
    let start = Instant::now();
    loop {
        let status = daemon.status();
        if status["role"] == "active" {
            return daemon;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the daemon does not hold the lease after {DEADLINE:?}; redis: {}",
            status["redis"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn review_count(text: &str) -> i64 {
    serde_json::from_str::<Value>(text).expect("JSON")["review_count"]
        .as_i64()
        .expect("review_count")
}

/// Adds one review to `book` from a separate writer process; returns its outbox position (one
/// change: the newest outbox row right after the commit).
fn post_review(catalog: &Catalog, book: u32) -> u64 {
    catalog.python(&format!(
        "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES ({book}, 3, 5)')"
    ));
    outbox_head(catalog)
}

fn outbox_head(catalog: &Catalog) -> u64 {
    catalog
        .sqlite_cli("SELECT max(id) FROM cachetail_outbox")
        .parse()
        .expect("the outbox head")
}

/// The cursor the daemon wrote into the database (what a restart would resume from).
fn durable_cursor(catalog: &Catalog) -> u64 {
    catalog
        .sqlite_cli("SELECT position FROM cachetail_cursor")
        .parse()
        .expect("the durable cursor")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

#[test]
fn each_invalidation_records_its_outbox_position_beside_the_key_for_ten_minutes() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = start_active(&catalog, &redis_config(port, &redis, "delete"), port);
    daemon.get("book:1");
    daemon.get("book:2");
    assert!(redis.value("book:1").is_some());

    let mut last = 0;
    for round in 0..2 {
        let position = post_review(&catalog, 1);
        assert!(position > last);
        last = position;
        eventually("the change reaches redis", || {
            redis.value("book:1").is_none().then_some(())
        });
        // The rule on reviews names `book:{book_id}` and `top-books`: both get the change's
        // position beside them, kept 10 minutes.
        for key in ["book:1", "top-books"] {
            let mark = format!("{PREFIX}#m:{key}");
            assert_eq!(
                redis.cli(&["HGET", &mark, "i"]),
                position.to_string(),
                "round {round}: the mark of {key} holds the invalidation's outbox position"
            );
            let ttl: i64 = redis.cli(&["PTTL", &mark]).parse().expect("PTTL");
            assert!(
                ttl > 590_000 && ttl <= 600_000,
                "round {round}: the mark of {key} is kept 10 minutes, PTTL {ttl} ms"
            );
        }
        // A key no rule named has no invalidation mark.
        assert_eq!(redis.cli(&["HGET", &format!("{PREFIX}#m:book:2"), "i"]), "");
        daemon.get("book:1");
    }
}

/// A `cachetail run` process whose log (`--log-format json`, on stderr) the test reads.
struct LoggedDaemon {
    child: Child,
    client: Client,
    /// Each log line as it came, with when it was read.
    log: Arc<Mutex<Vec<(Instant, Value)>>>,
}

impl LoggedDaemon {
    fn start(config: &Path, port: u16) -> LoggedDaemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cachetail"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn,cachetail=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cachetail");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("daemon: {line}");
                let entry: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("a JSON log line ({e}): {line}"));
                sink.lock().expect("log").push((Instant::now(), entry));
            }
        });
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let mut daemon = LoggedDaemon {
            child,
            client: Client::new(address),
            log,
        };
        eventually("the daemon is active", || {
            (daemon.status()["role"] == "active").then_some(())
        });
        daemon
    }

    fn status(&mut self) -> Value {
        self.client
            .get("/v1/status")
            .ok()
            .and_then(|r| r.json().ok())
            .unwrap_or(Value::Null)
    }

    /// The log lines whose message starts with `message`: when each was read, and its fields.
    fn logged(&self, message: &str) -> Vec<(Instant, Value)> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|(_, line)| {
                line["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .cloned()
            .collect()
    }
}

impl Drop for LoggedDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `20ms`, `1.28s`, `2s` (a `Duration` as its Debug form prints it) as a Duration.
fn debug_duration(text: &str) -> Duration {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 0.001)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        panic!("a duration, got {text:?}")
    };
    // Whole milliseconds, so that 640ms doubled compares equal to 1.28s.
    Duration::from_millis(
        (number.parse::<f64>().expect("a number") * scale * 1000.0).round() as u64,
    )
}

const APPLY_FAILED: &str = "applying the outbox failed";
const REDIS_WENT: &str = "redis is unavailable";
const REDIS_BACK: &str = "redis is back";

#[test]
fn redis_down_the_daemon_backs_off_up_to_2s_keeps_its_cursor_and_logs_going_and_coming_back() {
    let mut redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog.write_config(&redis_config(port, &redis, "delete"));
    let mut daemon = LoggedDaemon::start(&config, port);
    let status = daemon.status();
    assert_eq!(
        (
            &status["redis"]["ok"],
            &status["redis"]["down_since"],
            &status["redis"]["outages"]
        ),
        (&Value::Bool(true), &Value::Null, &Value::from(0)),
        "{status}"
    );
    // The durable cursor lags the in-memory one a moment (it is persisted after the batch):
    // compare durable with durable.
    let cursor_before = durable_cursor(&catalog);

    let went_at = unix_now();
    redis.kill();
    let position = post_review(&catalog, 1);
    let status = eventually("the outage shows in /v1/status", || {
        let status = daemon.status();
        (status["redis"]["ok"] == false).then_some(status)
    });
    let down_since = status["redis"]["down_since"]
        .as_f64()
        .unwrap_or_else(|| panic!("down_since is a time: {status}"));
    assert!(
        down_since >= went_at.floor() - 1.0 && down_since <= unix_now() + 1.0,
        "down_since {down_since} is when Redis went ({went_at})"
    );
    assert_eq!(status["redis"]["outages"], 1, "{status}");
    assert!(
        status["redis"]["last_error"].is_string(),
        "the last error is reported: {status}"
    );
    // Meanwhile reads answer from the database (the change, not yet applied, is already there).
    let reply = daemon.client.get("/v1/keys/book:1").expect("GET book:1");
    assert_eq!(
        (reply.header("x-cache"), review_count(&reply.text())),
        (Some("bypass"), 3)
    );

    // The daemon retries, each time waiting twice as long, up to 2 s: wait until it has waited
    // 2 s twice, and check the cursor never passed the change Redis has not applied.
    eventually("the retries reach the 2 s cap, twice", || {
        let status = daemon.status();
        assert!(
            status["cursor"].as_u64() < Some(position),
            "the cursor moved past a change Redis has not applied: {status}"
        );
        let waits = daemon.logged(APPLY_FAILED);
        let longest = waits
            .iter()
            .map(|(_, l)| debug_duration(l["fields"]["retry_in"].as_str().expect("retry_in")))
            .max();
        assert!(
            longest <= Some(Duration::from_secs(2)),
            "a retry waits {longest:?}: more than 2 s"
        );
        let capped = waits
            .iter()
            .filter(|(_, l)| l["fields"]["retry_in"] == "2s")
            .count();
        (capped >= 2).then_some(())
    });
    let durable = durable_cursor(&catalog);
    assert!(
        durable >= cursor_before && durable < position,
        "the durable cursor {durable} stays before the change at {position}"
    );
    let waits: Vec<Duration> = daemon
        .logged(APPLY_FAILED)
        .iter()
        .map(|(_, l)| debug_duration(l["fields"]["retry_in"].as_str().expect("retry_in")))
        .collect();
    assert!(
        waits[0] <= Duration::from_millis(40),
        "the first retry comes soon: {waits:?}"
    );
    for pair in waits.windows(2) {
        assert!(
            pair[1] == (pair[0] * 2).min(Duration::from_secs(2)),
            "each wait doubles, up to 2 s: {waits:?}"
        );
    }
    let went = daemon.logged(REDIS_WENT);
    assert_eq!(
        went.len(),
        1,
        "the outage is logged once, not at each retry"
    );
    assert_eq!(went[0].1["level"], "WARN");
    assert_eq!(
        went[0].1["fields"]["address"],
        format!("127.0.0.1:{}/0", redis.port)
    );
    assert!(daemon.logged(REDIS_BACK).is_empty());

    // Redis comes back (empty): the next retry, at most 2 s later, finds it.
    let restarted = Instant::now();
    redis.restart();
    let back = eventually("the log says redis is back", || {
        daemon.logged(REDIS_BACK).first().cloned()
    });
    let took = back.0.saturating_duration_since(restarted);
    eprintln!("redis back {took:?} after its restart began (retry waits: {waits:?})");
    assert!(
        took < Duration::from_secs(6),
        "redis back after {took:?}: the retries are at most 2 s apart"
    );
    assert!(back.0 > went[0].0, "went, then came back");
    assert_eq!(back.1["level"], "INFO");
    assert!(back.1["fields"]["down"].is_string(), "{}", back.1);
    let status = eventually("the change is applied", || {
        let status = daemon.status();
        (status["cursor"].as_u64()? >= position).then_some(status)
    });
    assert_eq!(
        (
            &status["redis"]["ok"],
            &status["redis"]["down_since"],
            &status["redis"]["outages"]
        ),
        (&Value::Bool(true), &Value::Null, &Value::from(1)),
        "{status}"
    );
    assert!(status["apply_errors"].as_u64() >= Some(waits.len() as u64));
    eventually("the durable cursor follows", || {
        (durable_cursor(&catalog) >= position).then_some(())
    });
    eventually("book:1 is cached fresh again", || {
        let reply = daemon.client.get("/v1/keys/book:1").expect("GET book:1");
        assert_eq!(review_count(&reply.text()), 3);
        redis
            .value("book:1")
            .filter(|v| review_count(v) == 3)
            .map(|_| ())
    });
}

/// The keys of every cache key family `redis_config` has, read through the endpoint (cached).
fn read_some_keys(daemon: &mut Daemon) {
    for key in ["book:1", "book:2", "top-books", "user:1"] {
        let reply = daemon.get(key);
        assert_eq!(reply.status, 200, "{key}: {}", reply.text());
    }
}

#[test]
fn evicting_the_state_only_makes_the_daemon_empty_redis_and_start_again() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = start_active(&catalog, &redis_config(port, &redis, "delete"), port);
    read_some_keys(&mut daemon);
    post_review(&catalog, 2); // a mark for book:2
    daemon.wait_caught_up();
    read_some_keys(&mut daemon);
    // Something else under the prefix, and a key outside it.
    redis.cli(&["SET", &format!("{PREFIX}planted"), "x"]);
    redis.cli(&["SET", "elsewhere", "x"]);
    assert!(redis.value("user:1").is_some());

    // Redis evicts cachetail's state (as `allkeys-*` might).
    assert_eq!(redis.cli(&["DEL", &format!("{PREFIX}#state")]), "1");
    // Nothing is served from a Redis that lost its state: the database answers.
    let reply = daemon.get("user:1");
    assert_eq!(
        (reply.status, x_cache(&reply)),
        (200, "bypass"),
        "{}",
        reply.text()
    );
    // The daemon removes every key under the prefix (values, marks, groups, anything) and
    // starts again at its cursor, with one stream entry telling app-local caches to drop all.
    let cursor = daemon.status()["cursor"].as_u64().expect("cursor");
    eventually("the daemon rebuilds redis", || {
        let keys = redis.cli(&["--scan", "--pattern", &format!("{PREFIX}*")]);
        let mut keys: Vec<&str> = keys.lines().map(str::trim).collect();
        keys.sort_unstable();
        (keys == [format!("{PREFIX}#invalidations"), format!("{PREFIX}#state")]).then_some(())
    });
    let stream = redis.cli(&["XRANGE", &format!("{PREFIX}#invalidations"), "-", "+"]);
    assert!(stream.contains("\"all\":true"), "{stream}");
    assert_eq!(
        redis.cli(&["XLEN", &format!("{PREFIX}#invalidations")]),
        "1"
    );
    assert_eq!(
        redis.cli(&["HGET", &format!("{PREFIX}#state"), "applied"]),
        cursor.to_string()
    );
    assert_eq!(
        redis.cli(&["HGET", &format!("{PREFIX}#state"), "floor"]),
        cursor.to_string()
    );
    assert_eq!(redis.cli(&["GET", "elsewhere"]), "x", "outside the prefix");
    // It goes on as before: values are cached again, and changes applied.
    let first = daemon.get("user:1");
    assert_eq!(x_cache(&first), "miss");
    assert_eq!(x_cache(&daemon.get("user:1")), "hit");
    assert_eq!(redis.value("user:1"), Some(first.text()));
    let position = post_review(&catalog, 1);
    let reply = daemon.get("book:1");
    eventually("the change is applied", || {
        (daemon.status()["cursor"].as_u64()? >= position).then_some(())
    });
    let after = daemon.get("book:1");
    assert_eq!(review_count(&after.text()), 3, "before: {}", reply.text());
    assert_eq!(
        redis.cli(&["HGET", &format!("{PREFIX}#m:book:1"), "i"]),
        position.to_string()
    );
}

/// The `redis.last_error` of a status, or "".
fn last_error(status: &Value) -> String {
    status["redis"]["last_error"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn a_full_redis_under_noeviction_stores_nothing_new_and_the_daemon_waits_for_room_where_a_batch_needs_it()
 {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = start_active(&catalog, &redis_config(port, &redis, "delete"), port);
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let user = daemon.get("user:1");
    assert_eq!(redis.value("user:1"), Some(user.text()));

    // Full: far more in use than Redis may hold.
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    assert!(
        redis.try_cli(&["SET", "probe", "x"]).is_err(),
        "redis refuses writes"
    );

    // A change that removes a key still applies: Redis lets a script that has removed a key
    // go on, so invalidations are never held back by a full Redis.
    catalog.python("con.execute(\"UPDATE users SET name = 'ada' WHERE id = 1\")");
    let position = outbox_head(&catalog);
    eventually("the invalidation is applied", || {
        (daemon.status()["cursor"].as_u64()? >= position).then_some(())
    });
    assert_eq!(redis.value("user:1"), None, "the old value is gone");
    assert_eq!(
        redis.cli(&["HGET", &format!("{PREFIX}#m:user:1"), "i"]),
        position.to_string()
    );
    // Nothing new is stored: reads are answered from the database, fresh.
    for _ in 0..2 {
        let reply = daemon.get("user:1");
        assert_eq!((reply.status, x_cache(&reply)), (200, "miss"));
        assert_eq!(
            serde_json::from_str::<Value>(&reply.text()).expect("JSON")["name"],
            "ada"
        );
    }
    assert_eq!(redis.value("user:1"), None, "nothing stored while full");
    let status = daemon.status();
    assert!(
        last_error(&status).starts_with("redis replied with an error: OOM"),
        "the status says why: {status}"
    );

    // A change whose batch only records marks (a tag no stored value carries yet): Redis
    // refuses the whole script, and the daemon waits, the cursor staying, until there is room.
    catalog.sqlite_cli("UPDATE books SET title = 'Renamed' WHERE id = 2");
    let position = outbox_head(&catalog);
    let errors = status["apply_errors"].as_u64().expect("apply_errors");
    eventually("the refused batch shows in /v1/status", || {
        let status = daemon.status();
        (status["apply_errors"].as_u64()? >= errors + 2).then_some(())
    });
    let status = daemon.status();
    assert!(
        status["cursor"].as_u64() < Some(position),
        "the cursor waits: {status}"
    );
    assert!(durable_cursor(&catalog) < position);
    assert_eq!(status["redis"]["ok"], false, "{status}");
    assert!(last_error(&status).contains("OOM"), "{status}");
    assert_eq!(
        redis.cli(&["GET", &format!("{PREFIX}#gm:t:books")]),
        "",
        "nothing of the batch was applied"
    );

    // Room again: the daemon catches up (within its 2 s backoff) and stores values again.
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    let status = eventually("the daemon catches up", || {
        let status = daemon.status();
        (status["cursor"].as_u64()? >= position).then_some(status)
    });
    assert_eq!(status["redis"]["ok"], true, "{status}");
    assert_eq!(
        redis.cli(&["GET", &format!("{PREFIX}#gm:t:books")]),
        position.to_string()
    );
    let renamed = daemon.get("book:2");
    assert_eq!(x_cache(&renamed), "miss");
    assert_eq!(
        serde_json::from_str::<Value>(&renamed.text()).expect("JSON")["title"],
        "Renamed"
    );
    assert_eq!(x_cache(&daemon.get("book:2")), "hit");
    assert_eq!(redis.value("book:2"), Some(renamed.text()));
    let user = daemon.get("user:1");
    assert_eq!(redis.value("user:1"), Some(user.text()));
}

/// Runs `cachetail check`; its exit code and everything it printed.
fn check(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("the cachetail binary runs");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_refuses_key_families_that_could_name_redis_bookkeeping() {
    let catalog = Catalog::new();
    let families = "\n[keys.\"#x:{id}\"]\nquery = \"SELECT id FROM books WHERE id = :id\"\n\
                    \n[keys.\"{slug}\"]\nquery = \"SELECT id, title FROM books WHERE title = :slug\"\n\
                    \n[[rules]]\ntable = \"books\"\nkeys = [\"#x:{id}\", \"{title}\"]\n";
    let on_redis = format!(
        "database = \"catalog.db\"\n\n[cache]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:1/0\"\n{families}"
    );
    let (code, printed) = check(&catalog.write_config(&on_redis));
    assert_eq!(code, Some(2), "{printed}");
    // Each at its pattern, `file:line:column`: one begins with `#`, the other with a
    // placeholder, which a key beginning with `#` (`#state`, `#m:book:1`) would fill.
    assert!(
        printed.contains(
            "config.toml:7:7: key family `#x:{id}`: with the redis backend, a pattern must begin with literal text other than `#`"
        ),
        "{printed}"
    );
    assert!(
        printed.contains(
            "config.toml:10:7: key family `{slug}`: with the redis backend, a pattern must begin with literal text other than `#`"
        ),
        "{printed}"
    );
    // In memory there is no bookkeeping to collide with.
    let in_memory = format!("database = \"catalog.db\"\n{families}");
    let (code, printed) = check(&catalog.write_config(&in_memory));
    assert_eq!(code, Some(0), "{printed}");
}

fn state_field(redis: &RedisServer, field: &str) -> String {
    redis.cli(&["HGET", &format!("{PREFIX}#state"), field])
}

#[test]
fn keys_a_rule_renders_or_an_admin_deletes_never_touch_redis_bookkeeping() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    // A rule whose key comes from the data: a book titled `#state` names cachetail's state.
    let config = redis_config(port, &redis, "delete")
        .replace(
            "[tail]",
            "admin_token = \"a-long-enough-admin-token\"\n\n[tail]",
        )
        .replace(
            "[[rules]]\ntable = \"books\"\ntags = [\"books\"]",
            "[[rules]]\ntable = \"books\"\ntags = [\"books\"]\nkeys = [\"{title}\"]",
        );
    assert!(config.contains("keys = [\"{title}\"]"));
    let mut daemon = start_active(&catalog, &config, port);
    catalog.python("con.execute(\"UPDATE books SET title = 'Warm-up' WHERE id = 3\")");
    daemon.wait_caught_up();
    let user = daemon.get("user:1");
    assert_eq!(redis.value("user:1"), Some(user.text()));
    let epoch = catalog.sqlite_cli("SELECT epoch FROM cachetail_lease");
    let floor = state_field(&redis, "floor");
    assert_eq!(state_field(&redis, "epoch"), epoch);

    // Its state, a key's mark, a tag's set of keys.
    for title in ["#state", "#m:user:1", "#g:t:books"] {
        assert_eq!(daemon.get("book:2").status, 200);
        assert!(redis.value("book:2").is_some());
        catalog.python(&format!(
            "con.execute(\"UPDATE books SET title = '{title}' WHERE id = 2\")"
        ));
        let position = outbox_head(&catalog);
        eventually("the change is applied", || {
            (daemon.status()["cursor"].as_u64()? >= position).then_some(())
        });
        assert_eq!(
            state_field(&redis, "epoch"),
            epoch,
            "the fencing epoch survives a key named {title:?}"
        );
        assert_eq!(state_field(&redis, "floor"), floor, "{title}");
        assert_eq!(state_field(&redis, "applied"), position.to_string());
        assert_eq!(
            redis.cli(&["TYPE", &format!("{PREFIX}#m:user:1")]),
            "hash",
            "{title}"
        );
        assert_eq!(
            x_cache(&daemon.get("user:1")),
            "hit",
            "{title}: nothing was rebuilt"
        );
        // The change's own tag dropped the book's old value (its set of keys is intact).
        assert_eq!(redis.value("book:2"), None, "{title}: a stale book:2");
        let renamed = daemon.get("book:2");
        assert_eq!(
            serde_json::from_str::<Value>(&renamed.text()).expect("JSON")["title"],
            title
        );
    }

    // An operator deleting the key `#state` removes no bookkeeping either.
    let reply = daemon
        .request_with(
            "DELETE",
            "/v1/keys/%23state",
            &[("Authorization", "Bearer a-long-enough-admin-token")],
        )
        .expect("DELETE");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(state_field(&redis, "epoch"), epoch);
    assert_eq!(x_cache(&daemon.get("user:1")), "hit");
    assert_eq!(redis.value("user:1"), Some(user.text()));
}

/// `redis-cli PSUBSCRIBE *` (every channel): its output lines, once subscribed.
fn listen_to_every_channel(redis: &RedisServer) -> (Reaped, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--raw", "PSUBSCRIBE", "*"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli runs");
    let lines = lines_of(child.stdout.take().expect("stdout"));
    let child = Reaped(child);
    let head: Vec<String> = (0..3)
        .map(|_| lines.recv_timeout(DEADLINE).expect("the subscription"))
        .collect();
    assert_eq!(head, ["psubscribe", "*", "1"]);
    (child, lines)
}

/// A child process killed when dropped (a failing test leaves nothing behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn with_publish_false_nothing_is_published_while_changes_apply() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let config = redis_config(port, &redis, "delete").replace(
        &format!("prefix = \"{PREFIX}\""),
        &format!("prefix = \"{PREFIX}\"\npublish = false"),
    );
    assert!(config.contains("publish = false"));
    let mut daemon = start_active(&catalog, &config, port);
    let (_listener, heard) = listen_to_every_channel(&redis);

    read_some_keys(&mut daemon);
    catalog.python(
        "for i in range(20):\n\
         \x20   con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, 3)', (1 + i % 3,))\n\
         \x20   con.commit()\n\
         con.execute(\"UPDATE books SET title = 'T' WHERE id = 2\")\n\
         con.execute(\"UPDATE users SET name = 'U' WHERE id = 1\")",
    );
    let position = outbox_head(&catalog);
    eventually("the changes are applied", || {
        (daemon.status()["cursor"].as_u64()? >= position).then_some(())
    });
    // Applied in Redis: the batches ran there.
    assert_eq!(
        redis.cli(&["HGET", &format!("{PREFIX}#m:user:1"), "i"]),
        position.to_string()
    );
    assert_eq!(redis.value("book:2"), None);
    // A message of our own, after everything the daemon did: whatever the daemon published
    // would have come before it.
    redis.cli(&["PUBLISH", &format!("{PREFIX}invalidations"), "end-of-test"]);
    let mut before = Vec::new();
    loop {
        let line = heard
            .recv_timeout(DEADLINE)
            .expect("the test's own message arrives");
        if line == "end-of-test" {
            break;
        }
        before.push(line);
    }
    // pmessage, the pattern, the channel, then the payload.
    assert_eq!(
        before,
        ["pmessage", "*", &format!("{PREFIX}invalidations")],
        "the daemon published with publish = false"
    );
}

#[test]
fn a_user_name_in_the_redis_url_connects_as_that_acl_user() {
    let redis = RedisServer::start();
    // A user that may touch only keys and channels under the prefix.
    redis.cli(&[
        "ACL",
        "SETUSER",
        "cachetail",
        "on",
        ">cachetail-secret",
        &format!("~{PREFIX}*"),
        &format!("&{PREFIX}*"),
        "+@all",
    ]);
    // The default user may not subscribe: a subscriber that ignored the URL's user would fail.
    redis.cli(&["ACL", "SETUSER", "default", "resetchannels"]);
    let catalog = Catalog::new();
    let port = free_port();
    let url = format!(
        "redis://cachetail:cachetail-secret@127.0.0.1:{}/3",
        redis.port
    );
    let config = redis_config(port, &redis, "write-through").replace(&redis.url(), &url);
    assert!(config.contains(&url));
    let mut daemon = start_active(&catalog, &config, port);
    let mut subscriber = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/redis_subscriber.py"
        ))
        .args(["--url", &url, "--prefix", PREFIX])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the subscriber example runs");
    let messages = lines_of(subscriber.stdout.take().expect("stdout"));
    let _subscriber = Reaped(subscriber);
    let first = messages
        .recv_timeout(DEADLINE)
        .expect("the subscriber subscribes as the URL's user");
    assert!(first.contains("\"subscribed\": true"), "{first}");

    let first = daemon.get("book:1");
    assert_eq!(x_cache(&first), "miss");
    assert_eq!(x_cache(&daemon.get("book:1")), "hit");
    let in_db_3 = |key: &str| redis.cli(&["-n", "3", "GET", &format!("{PREFIX}{key}")]);
    assert_eq!(in_db_3("book:1"), first.text(), "stored in database 3");
    assert_eq!(redis.cli(&["EXISTS", &format!("{PREFIX}book:1")]), "0");
    let position = post_review(&catalog, 1);
    eventually("the change is applied in redis", || {
        (review_count(&in_db_3("book:1")) == 3).then_some(())
    });
    let message: Value = serde_json::from_str(
        &messages
            .recv_timeout(DEADLINE)
            .expect("the change's message"),
    )
    .expect("JSON");
    assert_eq!(message["position"], position);
    // Every connection the daemon holds is the ACL user's, on database 3.
    let clients = redis.cli(&["CLIENT", "LIST"]);
    let daemons: Vec<&str> = clients
        .lines()
        .filter(|c| !c.contains("cmd=client|list") && !c.contains("cmd=subscribe"))
        .collect();
    assert!(!daemons.is_empty(), "{clients}");
    for client in daemons {
        assert!(
            client.contains(" user=cachetail ") && client.contains(" db=3 "),
            "{client}"
        );
    }
}

#[test]
fn the_example_subscriber_resumes_from_the_stream_when_it_reconnects() {
    let redis = RedisServer::start();
    redis.cli(&[
        "ACL",
        "SETUSER",
        "app",
        "on",
        ">app-secret",
        "~*",
        "&*",
        "+@all",
    ]);
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = start_active(&catalog, &redis_config(port, &redis, "write-through"), port);
    let before = daemon.get("book:1").text();
    daemon.get("user:1");
    assert_eq!(review_count(&before), 2);
    let mut subscriber = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/redis_subscriber.py"
        ))
        .args([
            "--url",
            &format!("redis://app:app-secret@127.0.0.1:{}/0", redis.port),
            "--prefix",
            PREFIX,
            "--keep",
            "book:1",
            "--keep",
            "user:1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the subscriber example runs");
    let said = lines_of(subscriber.stdout.take().expect("stdout"));
    let _subscriber = Reaped(subscriber);
    let next = || -> Value {
        serde_json::from_str(&said.recv_timeout(DEADLINE).expect("the subscriber says"))
            .expect("JSON")
    };
    let connected = next();
    assert_eq!(connected["subscribed"], true, "{connected}");
    assert_eq!(connected["dropped"], 0, "{connected}");
    assert_eq!(
        connected["cached"]["book:1"],
        before.as_str(),
        "{connected}"
    );

    // Cut off, and kept off (its user disabled) while a change is applied and published.
    redis.cli(&["ACL", "SETUSER", "app", "off"]);
    let killed: u32 = redis
        .cli(&["CLIENT", "KILL", "USER", "app"])
        .parse()
        .expect("a count");
    assert_eq!(killed, 1);
    let position = post_review(&catalog, 1);
    eventually("the change is applied and published", || {
        (daemon.status()["cursor"].as_u64()? >= position).then_some(())
    });
    let after = redis.value("book:1").expect("recomputed in redis");
    assert_eq!(review_count(&after), 3);
    // It missed that message on the channel; back, it reads it from the stream, where it
    // stopped: it drops book:1 (and reads it again), and keeps user:1, which did not change.
    redis.cli(&["ACL", "SETUSER", "app", "on"]);
    let mut reconnected = next();
    while reconnected.get("subscribed").is_none() {
        // The entries it catches up on come first.
        assert!(reconnected["position"].is_u64(), "{reconnected}");
        reconnected = next();
    }
    assert_eq!(
        reconnected["dropped"], 0,
        "it resumes, keeping its local cache: {reconnected}"
    );
    assert!(reconnected["resumed_from"].is_string(), "{reconnected}");
    assert_eq!(
        reconnected["cached"]["user:1"], connected["cached"]["user:1"],
        "{reconnected}"
    );
    assert_eq!(
        reconnected["cached"]["book:1"],
        after.as_str(),
        "a value kept from before it was cut off is stale: {reconnected}"
    );
}

/// The lease's epoch, as the database holds it.
fn lease_epoch(catalog: &Catalog) -> u64 {
    catalog
        .sqlite_cli("SELECT epoch FROM cachetail_lease WHERE name = 'main'")
        .parse()
        .expect("an epoch")
}

#[test]
fn each_takeover_raises_the_lease_epoch_and_redis_follows_it() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let ports = [free_port(), free_port()];
    // A lease far longer than the test: each takeover is the kill -9 being noticed.
    let config =
        |port| redis_config(port, &redis, "delete").replace("lease = \"1s\"", "lease = \"30s\"");
    let configs: Vec<PathBuf> = ports
        .iter()
        .enumerate()
        .map(|(i, &port)| {
            let path = catalog.path().join(format!("daemon-{i}.toml"));
            std::fs::write(&path, config(port)).expect("write config");
            path
        })
        .collect();
    let role = |daemon: &mut Daemon| daemon.status()["role"].as_str().unwrap_or("").to_owned();
    let mut daemons = [Some(Daemon::start_existing(&configs[0], ports[0])), None];
    eventually("the first daemon holds the lease", || {
        (role(daemons[0].as_mut()?) == "active").then_some(())
    });
    daemons[1] = Some(Daemon::start_existing(&configs[1], ports[1]));
    let mut epochs = Vec::new();
    for round in 0..3 {
        let active = round % 2;
        if round > 0 {
            // kill -9 of the active daemon; the other takes over; the killed one comes back
            // as the standby.
            daemons[1 - active].take().expect("running").kill();
            eventually("the standby takes over", || {
                (role(daemons[active].as_mut()?) == "active").then_some(())
            });
            daemons[1 - active] = Some(Daemon::start_existing(
                &configs[1 - active],
                ports[1 - active],
            ));
        }
        let epoch = lease_epoch(&catalog);
        let position = post_review(&catalog, 1);
        eventually("the change reaches redis", || {
            (redis.cli(&["HGET", &format!("{PREFIX}#state"), "applied"]) == position.to_string())
                .then_some(())
        });
        assert_eq!(
            state_field(&redis, "epoch"),
            epoch.to_string(),
            "round {round}: redis follows the lease's epoch"
        );
        epochs.push(epoch);
    }
    assert!(
        epochs.windows(2).all(|pair| pair[1] > pair[0]),
        "each takeover raises the epoch: {epochs:?}"
    );
}
