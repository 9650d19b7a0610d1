//! The invalidation stream `{prefix}#invalidations`: an app server's local cache
//! (`examples/redis_subscriber.py`, a separate python3 process keeping its cache and its last
//! entry id in a file) killed with SIGKILL while thousands of changes are applied resumes from
//! its last entry, never dropping its cache whole, unless the stream was trimmed past that entry
//! while it was away: then it drops it whole, once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::redis::{RedisServer, redis_config};

/// The prefix `redis_config` sets.
const PREFIX: &str = "ct:";
/// Books whose `book:{id}` the subscriber keeps in its local cache.
const BOOKS: u64 = 50;
/// How long the subscriber stays dead while the changes are applied.
const DOWN: Duration = Duration::from_secs(5);

/// The subscriber example, appending what it prints to `out`, its state in `state`.
fn start_subscriber(redis: &RedisServer, state: &Path, out: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .expect("subscriber output file");
    let mut command = Command::new("python3");
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/redis_subscriber.py"
        ))
        .args([
            "--url",
            &redis.url(),
            "--prefix",
            PREFIX,
            "--block-ms",
            "200",
        ])
        .arg("--state")
        .arg(state);
    for id in 1..=BOOKS {
        command.args(["--keep", &format!("book:{id}")]);
    }
    command
        .stdout(Stdio::from(log))
        .spawn()
        .expect("the subscriber example runs")
}

/// What the subscriber printed so far, one JSON value a line.
fn said(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The subscriber's saved state: its last entry id and its local cache (key → value).
fn saved(state: &Path) -> Option<(String, Vec<(String, String)>)> {
    let state: Value = serde_json::from_str(&std::fs::read_to_string(state).ok()?).ok()?;
    let entries = state["entries"]
        .as_object()?
        .iter()
        .map(|(key, entry)| (key.clone(), entry[0].as_str().unwrap_or("").to_owned()))
        .collect();
    Some((state["last_id"].as_str()?.to_owned(), entries))
}

/// A stream entry id, in stream order.
fn entry_id(text: &str) -> (u64, u64) {
    let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
    (
        ms.parse().expect("an entry id"),
        seq.parse().expect("an entry id"),
    )
}

/// The id of the stream's first entry.
fn first_entry(redis: &RedisServer) -> String {
    let first = redis.cli(&[
        "XRANGE",
        &format!("{PREFIX}#invalidations"),
        "-",
        "+",
        "COUNT",
        "1",
    ]);
    first.lines().next().expect("an entry").to_owned()
}

/// A writer process adding 10,000 reviews (each a change) to the books, in 100 transactions.
fn write_ten_thousand_changes(catalog: &Catalog) {
    let status = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys, random, time\n\
             con = sqlite3.connect(sys.argv[1], timeout=5)\n\
             rnd = random.Random(11)\n\
             for t in range(100):\n\
             \x20   con.executemany('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, ?)', [(rnd.randint(1, int(sys.argv[2])), rnd.randint(1, 5)) for _ in range(100)])\n\
             \x20   con.commit()\n\
             \x20   time.sleep(0.02)\n",
        )
        .arg(catalog.db())
        .arg(BOOKS.to_string())
        .status()
        .expect("python3 writer");
    assert!(status.success(), "the writer failed: {status}");
}

struct Scenario {
    redis: RedisServer,
    catalog: Catalog,
    daemon: Daemon,
    state: PathBuf,
    out: PathBuf,
}

/// Redis, the daemon (with `extra` in `[cache]`), `BOOKS` books read once (so Redis holds
/// them), and the subscriber, up and holding every book in its local cache.
fn scenario(extra: &str) -> (Scenario, Child) {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    catalog.python(&format!(
        "con.executemany('INSERT INTO books (id, title, author) VALUES (?, ?, ?)', \
             [(i, f'Book {{i}}', 'A') for i in range(6, {})])",
        BOOKS + 1
    ));
    let port = free_port();
    let config = redis_config(port, &redis, "delete");
    let config = config.replace(
        &format!("prefix = \"{PREFIX}\""),
        &format!("prefix = \"{PREFIX}\"\n{extra}"),
    );
    assert!(config.contains(extra), "{config}");
    let mut daemon = Daemon::start(&catalog, &config, port);
    eventually("the daemon holds the lease", || {
        (daemon.status()["role"] == "active").then_some(())
    });
    // A first change, so the stream exists before the subscriber first looks.
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 1, 4)')");
    daemon.wait_caught_up();
    fill_redis(&mut daemon);
    let state = catalog.path().join("subscriber-state.json");
    let out = catalog.path().join("subscriber-out.jsonl");
    let subscriber = start_subscriber(&redis, &state, &out);
    eventually("the subscriber holds every book", || {
        let (_, entries) = saved(&state)?;
        (entries.len() as u64 == BOOKS).then_some(())
    });
    let scenario = Scenario {
        redis,
        catalog,
        daemon,
        state,
        out,
    };
    (scenario, subscriber)
}

/// Every book read through the daemon: Redis holds it (the delete strategy removed it on change).
fn fill_redis(daemon: &mut Daemon) {
    for id in 1..=BOOKS {
        let reply = daemon.get(&format!("book:{id}"));
        assert_eq!(reply.status, 200, "book:{id}: {}", reply.text());
    }
}

impl Scenario {
    /// SIGKILLs the subscriber, applies 10,000 changes while it is dead for `DOWN`, restarts it.
    /// Returns the entry id it had saved when killed, and the restarted subscriber.
    fn kill_change_restart(&mut self, mut subscriber: Child) -> (String, Child) {
        subscriber.kill().expect("SIGKILL the subscriber");
        subscriber.wait().expect("reaped");
        let killed_at = Instant::now();
        let (last_id, _) = saved(&self.state).expect("the subscriber saved its state");
        write_ten_thousand_changes(&self.catalog);
        self.daemon.wait_caught_up();
        std::thread::sleep(DOWN.saturating_sub(killed_at.elapsed()));
        (
            last_id,
            start_subscriber(&self.redis, &self.state, &self.out),
        )
    }

    /// The subscriber ends with a local cache equal to the database: every book, each with the
    /// value the database gives now.
    fn assert_subscriber_matches_database(&mut self) {
        let database: Vec<(String, String)> = (1..=BOOKS)
            .map(|id| {
                let key = format!("book:{id}");
                let reply = self.daemon.get_uncached(&key);
                assert_eq!(reply.status, 200, "{key}");
                (key, reply.text())
            })
            .collect();
        fill_redis(&mut self.daemon);
        let mut expected = database;
        expected.sort();
        let started = Instant::now();
        let mut last = Vec::new();
        while started.elapsed() < DEADLINE {
            if let Some((_, mut entries)) = saved(&self.state) {
                entries.sort();
                if entries == expected {
                    return;
                }
                last = entries;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let differences: Vec<_> = expected
            .iter()
            .filter(|entry| !last.contains(entry))
            .take(3)
            .collect();
        panic!(
            "the subscriber's local cache differs from the database ({} of {} entries equal); the database has, e.g.: {differences:?}",
            last.iter().filter(|entry| expected.contains(entry)).count(),
            expected.len()
        );
    }

    fn whole_drops(&self) -> Vec<Value> {
        said(&self.out)
            .into_iter()
            .filter(|line| line.get("dropped_whole").is_some())
            .collect()
    }

    fn connects(&self) -> Vec<Value> {
        said(&self.out)
            .into_iter()
            .filter(|line| line["subscribed"] == true)
            .collect()
    }
}

#[test]
fn a_subscriber_killed_while_ten_thousand_changes_are_applied_resumes_without_dropping_its_cache() {
    let (mut scenario, subscriber) = scenario("");
    let (last_id, subscriber) = scenario.kill_change_restart(subscriber);
    let _subscriber = Reaped(subscriber);
    scenario.assert_subscriber_matches_database();
    let connects = scenario.connects();
    assert_eq!(connects.len(), 2, "{connects:?}");
    assert_eq!(
        connects[1]["resumed_from"].as_str(),
        Some(last_id.as_str()),
        "it resumes from the entry it had processed: {connects:?}"
    );
    assert_eq!(
        scenario.whole_drops(),
        Vec::<Value>::new(),
        "it never drops its local cache whole"
    );
}

#[test]
fn a_subscriber_whose_last_entry_was_trimmed_away_drops_its_cache_once() {
    let (mut scenario, subscriber) = scenario("stream_max_len = 5");
    let (last_id, subscriber) = scenario.kill_change_restart(subscriber);
    let _subscriber = Reaped(subscriber);
    // The stream now holds 5 entries, and its first is after the subscriber's last.
    assert_eq!(
        scenario
            .redis
            .cli(&["XLEN", &format!("{PREFIX}#invalidations")]),
        "5"
    );
    let first = first_entry(&scenario.redis);
    assert!(
        entry_id(&first) > entry_id(&last_id),
        "the stream was trimmed past {last_id} (it starts at {first})"
    );
    scenario.assert_subscriber_matches_database();
    let drops = scenario.whole_drops();
    assert_eq!(
        drops.len(),
        1,
        "it drops its local cache whole, once: {drops:?}"
    );
    assert_eq!(drops[0]["dropped_whole"], BOOKS, "{drops:?}");
}

/// A subscriber connected but behind when Redis loses cachetail's data (here a FLUSHALL): the
/// daemon rebuilds the namespace, the stream with it, so the entries the subscriber had not read
/// yet are gone, and the new stream's ids are all above its last one: nothing tells it of what
/// it missed but the rebuild's own `all` entry, first in the new stream. Without it, the book
/// changed before the flush stayed stale in its local cache.
#[test]
fn a_subscriber_behind_when_redis_is_rebuilt_drops_what_the_lost_entries_covered() {
    let (mut scenario, subscriber) = scenario("");
    let subscriber = Reaped(subscriber);
    let signal = |which: &str| {
        let status = Command::new("kill")
            .args([which, &subscriber.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {which}");
    };
    // Stopped, and past its XREAD's 200 ms wait: it has read nothing of what follows.
    signal("-STOP");
    std::thread::sleep(Duration::from_millis(400));
    let review = |book: u64| {
        scenario.catalog.python(&format!(
            "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES ({book}, 2, 1)')"
        ));
    };
    review(2);
    scenario.daemon.wait_caught_up();
    assert_eq!(scenario.redis.cli(&["FLUSHALL"]), "OK");
    // The next batch finds Redis's state gone: the daemon rebuilds, then applies it.
    review(3);
    scenario.daemon.wait_caught_up();
    let entries = scenario
        .redis
        .cli(&["XRANGE", &format!("{PREFIX}#invalidations"), "-", "+"]);
    assert!(
        entries.contains("\"all\":true"),
        "the new stream: {entries}"
    );
    signal("-CONT");
    scenario.assert_subscriber_matches_database();
}

/// A child process killed when dropped (a failing test leaves no subscriber behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
