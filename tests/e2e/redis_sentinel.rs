//! Redis Sentinel: a real primary, a replica and three `redis-sentinel` processes the tests
//! start, the daemon given only the Sentinels (`[cache] sentinels`, `sentinel_master`; its
//! `url`'s host points nowhere). A kill -9 of the primary while a writer process streams changes
//! (write-through and delete rules) and readers read over HTTP: the daemon follows the new primary
//! within a second of the Sentinels naming it, no read is ever stale, and the cache ends equal
//! to the database. And a promoted replica that lacks the last batch the old primary applied
//! (detached just before it with `REPLICAOF` to a port nobody listens on): no read returns the
//! value that batch invalidated, and the daemon rebuilds the namespace as after a Redis restart.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

const PREFIX: &str = "st:";
const MASTER: &str = "m";
/// The rows the writer updates (each `n` set to the write's sequence number, so a row's value
/// only grows).
const ROWS: i64 = 8;
const READERS: usize = 3;

/// A child process killed when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redis-cli` against a port: its raw output, or why it failed.
fn cli(port: u16, args: &[&str]) -> Result<String, String> {
    let output = Command::new("redis-cli")
        .args(["-e", "-p", &port.to_string(), "--raw"])
        .args(args)
        .output()
        .expect("redis-cli runs (apt-get install redis-tools)");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "redis-cli -p {port} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        ))
    }
}

/// The position Redis at `port` has applied (`{prefix}#state applied`).
fn applied(port: u16) -> Option<u64> {
    cli(port, &["HGET", &format!("{PREFIX}#state"), "applied"])
        .ok()?
        .parse()
        .ok()
}

/// A primary, its replica and three Sentinels monitoring it as `m` (quorum 2, down after 1 s).
struct Ha {
    _dir: tempfile::TempDir,
    primary: Option<Reaped>,
    primary_port: u16,
    _replica: Reaped,
    replica_port: u16,
    _sentinels: Vec<Reaped>,
    sentinel_ports: Vec<u16>,
}

impl Ha {
    fn start() -> Ha {
        let dir = tempfile::tempdir().expect("temp dir");
        let (primary_port, replica_port) = (free_port(), free_port());
        let primary = Reaped(redis_server(dir.path(), primary_port, None));
        let replica = Reaped(redis_server(dir.path(), replica_port, Some(primary_port)));
        eventually("the replica is in sync", || {
            let info = cli(replica_port, &["INFO", "replication"]).ok()?;
            info.contains("master_link_status:up").then_some(())
        });
        let sentinel_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let sentinels = sentinel_ports
            .iter()
            .map(|&port| Reaped(sentinel(dir.path(), port, primary_port)))
            .collect();
        for &port in &sentinel_ports {
            eventually(
                "each sentinel knows the replica and the two other sentinels",
                || {
                    let replicas = cli(port, &["SENTINEL", "replicas", MASTER]).ok()?;
                    let others = cli(port, &["SENTINEL", "sentinels", MASTER]).ok()?;
                    let known = others.lines().filter(|l| *l == "runid").count();
                    (replicas.contains(&replica_port.to_string()) && known == 2).then_some(())
                },
            );
        }
        Ha {
            _dir: dir,
            primary: Some(primary),
            primary_port,
            _replica: replica,
            replica_port,
            _sentinels: sentinels,
            sentinel_ports,
        }
    }

    /// The port of the primary the Sentinels name (the first that answers).
    fn named(&self) -> Option<u16> {
        self.sentinel_ports.iter().find_map(|&port| {
            let text = cli(port, &["SENTINEL", "get-master-addr-by-name", MASTER]).ok()?;
            text.lines().nth(1)?.parse().ok()
        })
    }

    fn kill_primary(&mut self) {
        drop(self.primary.take());
    }

    /// The daemon's config: the Sentinels only (the URL's host and port are not used).
    fn config(&self, port: u16) -> String {
        let sentinels: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        format!(
            r#"database = "catalog.db"
listen = "127.0.0.1:{port}"

[cache]
ttl = "1h"
backend = "redis"
url = "redis://nowhere.invalid:1/0"
prefix = "{PREFIX}"
sentinels = [{}]
sentinel_master = "{MASTER}"

[tail]
poll_interval = "50ms"

[keys."wt:{{id}}"]
query = "SELECT n FROM items WHERE id = :id"

[keys."del:{{id}}"]
query = "SELECT n FROM items WHERE id = :id"

[[rules]]
table = "items"
keys = ["wt:{{id}}"]
strategy = "write-through"

[[rules]]
table = "items"
keys = ["del:{{id}}"]
strategy = "delete"
"#,
            sentinels.join(", ")
        )
    }
}

fn redis_server(dir: &Path, port: u16, replica_of: Option<u16>) -> Child {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--repl-diskless-sync-delay", "0"])
        .args(["--dbfilename", &format!("dump-{port}.rdb")])
        .arg("--dir")
        .arg(dir);
    if let Some(primary) = replica_of {
        command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
    }
    let child = command
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server runs (apt-get install redis-server)");
    eventually("redis-server answers PING", || {
        (cli(port, &["PING"]).ok()? == "PONG").then_some(())
    });
    child
}

/// `redis-sentinel` (or `redis-server --sentinel` where there is no such command) on `port`.
fn sentinel(dir: &Path, port: u16, primary: u16) -> Child {
    let config = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &config,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {MASTER} 1000\n\
             sentinel failover-timeout {MASTER} 3000\n\
             sentinel parallel-syncs {MASTER} 1\n",
            dir.display()
        ),
    )
    .expect("write the sentinel's config");
    let has_sentinel = Command::new("sh")
        .args(["-c", "command -v redis-sentinel"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut command = if has_sentinel {
        let mut c = Command::new("redis-sentinel");
        c.arg(&config);
        c
    } else {
        let mut c = Command::new("redis-server");
        c.arg(&config).arg("--sentinel");
        c
    };
    let child = command
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-sentinel runs (apt-get install redis-sentinel)");
    eventually("the sentinel answers PING", || {
        (cli(port, &["PING"]).ok()? == "PONG").then_some(())
    });
    child
}

/// The rows, and the writes' log (not captured by any rule): each write's sequence number, row,
/// value and the outbox position its trigger wrote.
fn setup(catalog: &Catalog) {
    let mut setup = String::from(
        "con.execute('CREATE TABLE items (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)')\n\
         con.execute('CREATE TABLE wlog (seq INTEGER PRIMARY KEY, id INTEGER NOT NULL, n INTEGER NOT NULL, pos INTEGER NOT NULL)')\n",
    );
    for id in 1..=ROWS {
        setup += &format!(
            "con.execute('INSERT INTO items VALUES ({id}, {id})')\ncon.execute('INSERT INTO wlog VALUES ({id}, {id}, {id}, 0)')\n"
        );
    }
    catalog.python(&setup);
}

/// A writer process: one update per transaction, each row's `n` set to the write's sequence
/// number, logged with its outbox position in the same transaction; until `stop` exists.
fn spawn_writer(db: &Path, stop: &Path) -> Reaped {
    let script = format!(
        r#"
import os, random, sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
rnd = random.Random(5)
while not os.path.exists(sys.argv[2]):
    con.execute('BEGIN IMMEDIATE')
    seq = con.execute('SELECT max(seq) + 1 FROM wlog').fetchone()[0]
    row = rnd.randint(1, {ROWS})
    con.execute('UPDATE items SET n = ? WHERE id = ?', (seq, row))
    pos = con.execute('SELECT max(id) FROM cachetail_outbox').fetchone()[0]
    con.execute('INSERT INTO wlog VALUES (?, ?, ?, ?)', (seq, row, seq, pos))
    con.execute('COMMIT')
    time.sleep(rnd.uniform(0.003, 0.012))
"#
    );
    Reaped(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(db)
            .arg(stop)
            .spawn()
            .expect("a writer"),
    )
}

/// One read, as the readers saw it.
struct Read {
    key: String,
    row: i64,
    fresh: bool,
    /// Microseconds since the run started.
    sent: u64,
    ended: u64,
    /// The highest cursor `/v1/status` had reported when the read was sent.
    applied: u64,
    /// For `?fresh=1`: the row's value in the database just before the request was sent.
    committed: i64,
    status: u16,
    n: Option<i64>,
    cache: String,
}

struct Run {
    start: Instant,
    address: std::net::SocketAddr,
    reading: AtomicBool,
    applied: AtomicU64,
}

impl Run {
    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
}

fn poll_status(run: &Run) {
    let mut client = Client::new(run.address);
    while run.reading.load(Ordering::Acquire) {
        if let Some(cursor) = client
            .get("/v1/status")
            .ok()
            .and_then(|r| r.json().ok())
            .and_then(|s: Value| s["cursor"].as_u64())
        {
            run.applied.fetch_max(cursor, Ordering::AcqRel);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Plain GETs and (one in four) `?fresh=1` GETs of random rows, both families.
fn read_loop(run: &Run, db: &Path, reader: u64) -> Vec<Read> {
    let direct = rusqlite::Connection::open(db).expect("direct read connection");
    direct
        .busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    let mut client = Client::new(run.address);
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ (reader + 1);
    let mut reads = Vec::new();
    while run.reading.load(Ordering::Acquire) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let row = (seed % ROWS as u64) as i64 + 1;
        let family = if (seed / 16).is_multiple_of(2) {
            "wt"
        } else {
            "del"
        };
        let fresh = (seed / 64).is_multiple_of(4);
        let key = format!("{family}:{row}");
        let applied = run.applied.load(Ordering::Acquire);
        let committed = if fresh {
            direct
                .query_row("SELECT n FROM items WHERE id = ?", [row], |r| r.get(0))
                .expect("the row's value")
        } else {
            0
        };
        let sent = run.now();
        let path = format!("/v1/keys/{key}{}", if fresh { "?fresh=1" } else { "" });
        let Ok(reply) = client.get(&path) else {
            client = Client::new(run.address);
            continue;
        };
        let n = serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .and_then(|v| v["n"].as_i64());
        reads.push(Read {
            key,
            row,
            fresh,
            sent,
            ended: run.now(),
            applied,
            committed,
            status: reply.status,
            n,
            cache: x_cache(&reply).to_owned(),
        });
    }
    reads
}

/// Every violation among the reads: an error status, a `?fresh=1` read older than the database
/// before it was sent, a read older than the value at the position the daemon had applied when
/// it was sent, or a read older than one of the same key that ended before it started.
fn violations(reads: &mut [Read], db: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).expect("open");
    // Per row, (position, value) in position order: the value at position p is the last one
    // written at or before p.
    let mut history: HashMap<i64, Vec<(u64, i64)>> = HashMap::new();
    let mut statement = conn
        .prepare("SELECT id, n, pos FROM wlog ORDER BY seq")
        .expect("the log");
    for row in statement
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?)))
        .expect("the log")
    {
        let (id, n, pos): (i64, i64, i64) = row.expect("a log row");
        history.entry(id).or_default().push((pos as u64, n));
    }
    let at = |row: i64, position: u64| {
        history[&row]
            .iter()
            .take_while(|(pos, _)| *pos <= position)
            .last()
            .map_or(0, |(_, n)| *n)
    };
    let mut found = Vec::new();
    reads.sort_by_key(|r| r.sent);
    let mut order: Vec<(u64, String, i64)> = reads
        .iter()
        .filter_map(|r| Some((r.ended, r.key.clone(), r.n?)))
        .collect();
    order.sort();
    let mut newest: HashMap<String, i64> = HashMap::new();
    let mut next = 0;
    for read in reads.iter() {
        while next < order.len() && order[next].0 < read.sent {
            let (_, key, n) = &order[next];
            let seen = newest.entry(key.clone()).or_insert(*n);
            *seen = (*seen).max(*n);
            next += 1;
        }
        let what = format!(
            "{}{} at {} ms ({}, {})",
            read.key,
            if read.fresh { "?fresh=1" } else { "" },
            read.sent / 1000,
            read.status,
            read.cache
        );
        let Some(n) = read.n.filter(|_| read.status == 200) else {
            // While Redis fails over, a `?fresh=1` read may wait out `fresh_timeout` (503, as
            // documented); nothing else may fail.
            if !(read.fresh && read.status == 503) {
                found.push(format!("{what}: no value"));
            }
            continue;
        };
        if read.fresh && n < read.committed {
            found.push(format!("{what}: {n}, the database held {}", read.committed));
        }
        let floor = at(read.row, read.applied);
        if n < floor {
            found.push(format!(
                "{what}: {n}, behind the applied position {} ({floor})",
                read.applied
            ));
        }
        if let Some(&before) = newest.get(&read.key)
            && n < before
        {
            found.push(format!("{what}: {n}, went back from {before}"));
        }
    }
    found
}

/// kill -9 of the primary in the middle of a change stream: the daemon reads and writes on the
/// new primary within a second of the Sentinels naming it, and no read is stale before, during
/// or after.
#[test]
fn a_kill_9_of_the_primary_mid_stream_is_followed_within_a_second_and_nothing_is_stale() {
    let started = Instant::now();
    let mut ha = Ha::start();
    let catalog = Catalog::new();
    setup(&catalog);
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &ha.config(port), port);
    eventually("the daemon holds the lease", || {
        (daemon.status()["role"] == "active").then_some(())
    });
    let run = Arc::new(Run {
        start: Instant::now(),
        address: daemon.address,
        reading: AtomicBool::new(true),
        applied: AtomicU64::new(0),
    });
    let stop = catalog.path().join("stop-writing");
    let writer = spawn_writer(&catalog.db(), &stop);
    let poller = {
        let run = Arc::clone(&run);
        std::thread::spawn(move || poll_status(&run))
    };
    let readers: Vec<_> = (0..READERS as u64)
        .map(|r| {
            let (run, db) = (Arc::clone(&run), catalog.db());
            std::thread::spawn(move || read_loop(&run, &db, r))
        })
        .collect();

    // Before: values come from the primary.
    eventually("values are stored in the primary", || {
        (cli(ha.primary_port, &["DBSIZE"])
            .ok()?
            .parse::<u64>()
            .ok()?
            > 4)
        .then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    let killed = run.now();
    ha.kill_primary();
    let new = ha.replica_port;
    // The moment the Sentinels name the replica, and its applied position then.
    let switched = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ha.named() == Some(new) {
                break run.now();
            }
            assert!(Instant::now() < deadline, "the sentinels never failed over");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let at_switch = applied(new).unwrap_or(0);
    // The daemon writes to the new primary (the tail applies a batch there).
    let wrote = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if applied(new).is_some_and(|a| a > at_switch) {
                break run.now();
            }
            assert!(
                Instant::now() < deadline,
                "the daemon never applied a batch on the new primary"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&stop, "").expect("stop the writer");
    drop(writer);
    daemon.wait_caught_up();
    std::thread::sleep(Duration::from_millis(300));
    run.reading.store(false, Ordering::Release);
    let mut reads: Vec<Read> = readers
        .into_iter()
        .flat_map(|r| r.join().expect("a reader"))
        .collect();
    poller.join().expect("the poller");

    // The first read the new primary served (a hit sent after the switch).
    let served = reads
        .iter()
        .filter(|r| r.sent >= switched && r.cache == "hit")
        .map(|r| r.ended)
        .min()
        .expect("no read was served by the new primary");
    let ms = |t: u64| t as f64 / 1000.0;
    eprintln!(
        "sentinel failover: killed at {:.0} ms, the sentinels named the replica at {:.0} ms ({:.0} ms later); the daemon's first batch there {:.0} ms after, first read served from it {:.0} ms after; {} reads ({} hits, {} ?fresh=1)",
        ms(killed),
        ms(switched),
        ms(switched - killed),
        ms(wrote.saturating_sub(switched)),
        ms(served.saturating_sub(switched)),
        reads.len(),
        reads.iter().filter(|r| r.cache == "hit").count(),
        reads.iter().filter(|r| r.fresh).count(),
    );
    let found = violations(&mut reads, &catalog.db());
    assert!(
        found.is_empty(),
        "{} stale or failed reads, e.g. {:#?}",
        found.len(),
        &found[..found.len().min(8)]
    );
    assert!(
        wrote.saturating_sub(switched) <= 1_000_000 && served.saturating_sub(switched) <= 1_000_000,
        "the daemon followed the new primary {:.0} ms (batch) and {:.0} ms (read) after the sentinels named it: more than a second",
        ms(wrote.saturating_sub(switched)),
        ms(served.saturating_sub(switched))
    );
    assert!(
        reads.iter().filter(|r| r.cache == "hit").count() > 200,
        "too few hits to have checked anything"
    );

    // After: every cached value equals the database, through the endpoint and in Redis.
    let report = daemon.verify();
    assert_eq!(report["stale"], 0, "{report}");
    for row in 1..=ROWS {
        let fresh = daemon.get_uncached(&format!("wt:{row}")).text();
        for family in ["wt", "del"] {
            let key = format!("{family}:{row}");
            assert_eq!(daemon.get(&key).text(), fresh, "{key}");
            if let Ok(stored) = cli(new, &["GET", &format!("{PREFIX}{key}")])
                && !stored.is_empty()
            {
                assert_eq!(stored, fresh, "{key} in the new primary");
            }
        }
    }
    let status = daemon.status();
    assert_eq!(status["redis"]["ok"], true, "{status}");
    assert!(
        status["redis"]["address"]
            .as_str()
            .is_some_and(|a| a.contains(&format!(":{new}/"))),
        "{status}"
    );
    assert_eq!(daemon.stop().code(), Some(0));
    eprintln!("run time {:?}", started.elapsed());
}

/// A promoted replica that lacks the last batch the old primary applied (detached from it just
/// before): no read returns the value that batch replaced, and the daemon rebuilds the
/// namespace.
#[test]
fn a_promoted_replica_missing_the_last_batch_is_rebuilt_and_never_serves_its_older_value() {
    let mut ha = Ha::start();
    let catalog = Catalog::new();
    setup(&catalog);
    let port = free_port();
    let config = catalog.write_config(&ha.config(port));
    let mut command = Command::new(env!("CARGO_BIN_EXE_cachetail"));
    command
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn,cachetail=info");
    let (mut daemon, log) = Daemon::start_logged(command, &config, port);
    eventually("the daemon holds the lease", || {
        (daemon.status()["role"] == "active").then_some(())
    });
    // Row 1 cached in both families, on the primary and the replica.
    for key in ["wt:1", "del:1"] {
        eventually("the value is cached", || {
            (x_cache(&daemon.get(key)) == "hit").then_some(())
        });
    }
    eventually("the replica holds them", || {
        let stored = cli(ha.replica_port, &["MGET", "st:wt:1", "st:del:1"]).ok()?;
        (stored.lines().count() == 2 && !stored.lines().any(str::is_empty)).then_some(())
    });
    let old = cli(ha.replica_port, &["GET", "st:wt:1"]).expect("the replica's value");
    // The replica follows a server that does not exist from now on: it keeps its data but
    // receives nothing more (the Sentinels leave its configuration alone for their
    // `failover-timeout`, 3 s, and the primary is gone well before).
    let nowhere = free_port().to_string();
    cli(ha.replica_port, &["REPLICAOF", "127.0.0.1", &nowhere]).expect("detach the replica");

    // The change: applied on the primary only.
    catalog.python("con.execute('UPDATE items SET n = 1000 WHERE id = 1')");
    let head: u64 = catalog
        .sqlite_cli("SELECT max(id) FROM cachetail_outbox")
        .parse()
        .expect("the outbox head");
    eventually("the primary applied the change", || {
        (applied(ha.primary_port)? >= head).then_some(())
    });
    assert!(daemon.get("wt:1").text().contains("1000"));
    assert!(
        applied(ha.replica_port).is_some_and(|a| a < head),
        "the replica applied the change after it was detached"
    );
    assert_eq!(
        cli(ha.replica_port, &["GET", "st:wt:1"]).expect("the replica's value"),
        old,
        "the replica holds the older value"
    );

    // Readers of row 1 from now on: never the older value.
    let reading = Arc::new(AtomicBool::new(true));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (reading, seen, address) =
                (Arc::clone(&reading), Arc::clone(&seen), daemon.address);
            std::thread::spawn(move || {
                let mut client = Client::new(address);
                let key = if r == 0 { "wt:1" } else { "del:1" };
                while reading.load(Ordering::Acquire) {
                    let Ok(reply) = client.get(&format!("/v1/keys/{key}")) else {
                        client = Client::new(address);
                        continue;
                    };
                    let line = format!(
                        "{key} {} {} {}",
                        reply.status,
                        x_cache(&reply),
                        reply.text()
                    );
                    seen.lock().expect("lock").push(line);
                }
            })
        })
        .collect();

    ha.kill_primary();
    eventually("the sentinels name the replica", || {
        (ha.named() == Some(ha.replica_port)).then_some(())
    });
    eventually(
        "the daemon rebuilt the namespace on the new primary",
        || {
            let said: Vec<String> = log.try_iter().collect();
            said.iter()
                .any(|l| l.contains("redis did not hold every applied invalidation"))
                .then_some(())
                .or_else(|| {
                    // Not yet: keep waiting (lines already read are gone from the channel, so the
                    // rebuild is also recognised by its floor).
                    let floor: u64 = cli(ha.replica_port, &["HGET", "st:#state", "floor"])
                        .ok()?
                        .parse()
                        .ok()?;
                    (floor >= head).then_some(())
                })
        },
    );
    for key in ["wt:1", "del:1"] {
        eventually("the new primary serves the new value", || {
            let reply = daemon.get(key);
            (x_cache(&reply) == "hit" && reply.text().contains("1000")).then_some(())
        });
    }
    reading.store(false, Ordering::Release);
    for reader in readers {
        reader.join().expect("a reader");
    }
    let seen = seen.lock().expect("lock");
    let hits = seen.iter().filter(|l| l.contains(" hit ")).count();
    eprintln!(
        "{} reads of row 1 during and after the failover, {hits} hits",
        seen.len()
    );
    let wrong: Vec<&String> = seen
        .iter()
        .filter(|l| !(l.contains(" 200 ") && l.contains("1000")))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} reads after the change did not answer its value, e.g. {:?}",
        wrong.len(),
        seen.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert!(
        seen.iter().any(|l| l.contains(" hit ")),
        "no read was served from the new primary"
    );
    assert_eq!(daemon.verify()["stale"], 0);
    assert_eq!(daemon.stop().code(), Some(0));
}
