//! The randomized checker: concurrent writer processes and HTTP readers over a long-TTL cache,
//! every strategy at once. The families' query spins for a moment after its snapshot is taken,
//! to widen the window in which a fill races an invalidation. No read may go backwards in time, a fresh read must reflect what was
//! committed before it, and at the end every cached value equals the database.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use cachetail::client::Client;

use crate::common::*;

const COUNTERS: u64 = 6;
const FAMILIES: [&str; 3] = ["wt", "del", "wb"];
const WRITERS: usize = 3;
const WRITES_PER_WRITER: usize = 1_500;
const READERS: usize = 6;
const MIN_READS: u64 = 96_000;

fn config(port: u16, cache: &str) -> String {
    let mut text = format!(
        "database = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n[cache]\nttl = \"1h\"\n{cache}\n[write_behind]\ndelay = \"5ms\"\n[tail]\npoll_interval = \"50ms\"\n"
    );
    for (family, strategy) in FAMILIES
        .iter()
        .zip(["write-through", "delete", "write-behind"])
    {
        text += &format!(
            "[keys.\"{family}:{{id}}\"]\nquery = \"SELECT n FROM counters WHERE id = :id AND (WITH RECURSIVE spin(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM spin WHERE i < 5000) SELECT count(*) FROM spin) > 0\"\n[[rules]]\ntable = \"counters\"\nkeys = [\"{family}:{{id}}\"]\nstrategy = \"{strategy}\"\n"
        );
    }
    text
}

#[test]
fn randomized_readers_and_writers_never_see_stale_or_backwards_values() {
    check("", None);
}

/// The same on Redis, with readers spread over two daemons on one database (the active one and
/// a standby), so fills from another process race the applier's invalidations.
#[test]
fn randomized_check_on_redis_across_an_active_and_a_standby_daemon() {
    let redis = crate::redis::RedisServer::start();
    check(
        &format!(
            "backend = \"redis\"\nurl = \"{}\"\nprefix = \"race:\"",
            redis.url()
        ),
        Some(&redis),
    );
}

fn check(cache: &str, redis: Option<&crate::redis::RedisServer>) {
    let catalog = Catalog::new();
    catalog.python(&format!(
        "con.execute('CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)')\n\
         con.executemany('INSERT INTO counters VALUES (?, 0)', [(i,) for i in range(1, {COUNTERS} + 1)])"
    ));
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &config(port, cache), port);
    eventually("the daemon holds the lease", || {
        (daemon.status()["role"] == "active").then_some(())
    });
    let mut addresses = vec![daemon.address];
    let standby = redis.map(|_| {
        let port = free_port();
        let path = catalog.path().join("standby.toml");
        std::fs::write(&path, config(port, cache)).expect("write config");
        let standby = Daemon::start_existing(&path, port);
        addresses.push(standby.address);
        standby
    });

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            std::process::Command::new("python3")
                .arg("-c")
                .arg(format!(
                    "import sqlite3, sys, random, time\n\
                     con = sqlite3.connect(sys.argv[1], timeout=5)\n\
                     rnd = random.Random({w})\n\
                     done = 0\n\
                     while done < {WRITES_PER_WRITER}:\n\
                     \x20   for _ in range(min(rnd.randint(1, 3), {WRITES_PER_WRITER} - done)):\n\
                     \x20       con.execute('UPDATE counters SET n = n + 1 WHERE id = ?', (rnd.randint(1, {COUNTERS}),))\n\
                     \x20       done += 1\n\
                     \x20   con.commit()\n\
                     \x20   time.sleep(0.02)\n"
                ))
                .arg(catalog.db())
                .spawn()
                .expect("writer")
        })
        .collect();

    let writing = Arc::new(AtomicBool::new(true));
    let reads = Arc::new(AtomicU64::new(0));
    let violations = Arc::new(AtomicU64::new(0));
    // For each key, the highest value a read that has already completed returned: a read that
    // starts later must not return less (no read goes backwards in time, across all readers).
    let highest: Arc<Vec<AtomicI64>> =
        Arc::new((0..COUNTERS * 3).map(|_| AtomicI64::new(0)).collect());
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (writing, reads, violations, db) = (
                Arc::clone(&writing),
                Arc::clone(&reads),
                Arc::clone(&violations),
                catalog.db(),
            );
            let highest = Arc::clone(&highest);
            let address = addresses[r % addresses.len()];
            std::thread::spawn(move || {
                let mut client = Client::new(address);
                let direct = rusqlite::Connection::open(&db).expect("direct read connection");
                direct
                    .busy_timeout(Duration::from_secs(5))
                    .expect("busy timeout");
                let mut last_seen: HashMap<String, i64> = HashMap::new();
                let mut seed = 0x2545_F491_4F6C_DD1D_u64 ^ (r as u64 + 1);
                let mut mine = 0u64;
                while writing.load(Ordering::Acquire) || reads.load(Ordering::Relaxed) < MIN_READS {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let id = seed % COUNTERS + 1;
                    let family = (seed / COUNTERS % 3) as usize;
                    let key = format!("{}:{id}", FAMILIES[family]);
                    let slot = &highest[family * COUNTERS as usize + (id - 1) as usize];
                    let floor = slot.load(Ordering::Acquire);
                    let fresh = mine.is_multiple_of(3);
                    let committed: i64 = if fresh {
                        direct
                            .query_row("SELECT n FROM counters WHERE id = ?1", [id as i64], |row| {
                                row.get(0)
                            })
                            .expect("direct read")
                    } else {
                        0
                    };
                    let path = format!("/v1/keys/{key}{}", if fresh { "?fresh=1" } else { "" });
                    let reply = client.get(&path).expect("GET");
                    assert_eq!(reply.status, 200, "{path}: {}", reply.text());
                    let n = reply.json().expect("json")["n"].as_i64().expect("n");
                    let previous = last_seen.insert(key.clone(), n).unwrap_or(0);
                    if n < previous.max(floor) {
                        eprintln!("backwards: {key} read {n} after {}", previous.max(floor));
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                    slot.fetch_max(n, Ordering::AcqRel);
                    if n < committed {
                        eprintln!(
                            "stale fresh read: {key} read {n}, {committed} was committed before"
                        );
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                    mine += 1;
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    for mut writer in writers {
        assert!(writer.wait().expect("writer").success());
    }
    writing.store(false, Ordering::Release);
    for reader in readers {
        reader.join().expect("reader");
    }
    let reads = reads.load(Ordering::Relaxed);

    // Caught up, the write-behind queue drained: every cached value equals the database.
    daemon.wait_caught_up();
    eventually("the write-behind queue drains", || {
        (daemon.status()["write_behind_queue"] == 0).then_some(())
    });
    let mut stale_at_end = 0;
    let mut cached = 0;
    for family in FAMILIES {
        for id in 1..=COUNTERS {
            let key = format!("{family}:{id}");
            let reply = daemon.peek(&key);
            if reply.status == 200 {
                cached += 1;
                let expected =
                    catalog.sqlite_cli(&format!("SELECT n FROM counters WHERE id = {id}"));
                if json(&reply)["n"].as_i64() != expected.parse::<i64>().ok() {
                    stale_at_end += 1;
                }
            }
        }
    }
    let verify = daemon.verify();
    drop(standby);
    let writes = (WRITERS * WRITES_PER_WRITER) as u64;
    eprintln!(
        "randomized checker{}: {} operations ({writes} writes, {reads} reads), {} stale or backwards reads, {stale_at_end} stale cached values of {cached}",
        if redis.is_some() {
            " (redis, two daemons)"
        } else {
            ""
        },
        writes + reads,
        violations.load(Ordering::Relaxed)
    );
    assert!(writes + reads >= 100_000);
    assert_eq!(
        violations.load(Ordering::Relaxed),
        0,
        "stale or backwards reads"
    );
    assert_eq!(stale_at_end, 0, "stale cached values at the end");
    assert_eq!(verify["stale"], 0, "{verify}");
    let total: i64 = catalog
        .sqlite_cli("SELECT sum(n) FROM counters")
        .parse()
        .expect("sum");
    assert_eq!(total as u64, writes, "every write landed");
}
