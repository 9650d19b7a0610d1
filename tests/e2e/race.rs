//! The randomized checker: writer processes insert, update and delete rows while HTTP readers
//! read every kind of key (one row, a group of rows, the whole table; single GETs, `?fresh=1`,
//! multi-gets) and a controller acts on the daemons meanwhile: admin actions with the token,
//! config reloads (a family's query changed, a rule's strategy changed), `cachetail pause` /
//! `resume`, restarts (SIGTERM, kill -9) and, on Redis, standby takeovers. The families cover
//! every strategy, tags (per row, per group, per family), a short TTL, and one-row and many-row
//! values; their queries spin for a moment after the snapshot is taken, to widen the window in
//! which a fill races an invalidation.
//!
//! The check is exact because every write is logged in its own transaction: writers set each
//! row's `n` to the write's sequence number (commit order) and record `(seq, row, n, outbox id)`
//! in a table no rule captures. After the run, each answer is mapped to the commit sequence
//! numbers at which the database held that value (a 404 to those where the row was absent, a
//! list to those where every row matched), at most the last one committed when the answer came
//! in, and must be consistent with a point at or after:
//!
//! - for `?fresh=1`, every write committed before the request was sent;
//! - for every read, every write the daemon had applied when the read started (`cursor ≥ p` in
//!   `/v1/status`, polled throughout): the writes whose outbox id is at most `p` (a write made
//!   while capture was paused counts from the first outbox id after `resume`);
//! - the earliest point any read of the same key that ended before this one started could have
//!   seen (no read goes backwards, across readers and daemons; except for reads sent while the
//!   daemons were still noticing a pause, see `PauseWindow`).
//!
//! Besides: reads made while the daemons reported `paused` bypass the cache; values of the
//! short-TTL family are never older than their TTL and refill; admin actions remove what they
//! name (seen with `Cache-Control: only-if-cached`); the cache was used (a hit-ratio floor from
//! the daemons' own counters); at the end every cached value equals the database, `verify`
//! finds nothing stale, and every logged write is in the database. Each kind of checked
//! operation must reach a floor, so a run that checked little fails.
//!
//! One interleaving it found on Redis is replayed deterministically against the store script by
//! a unit test in `daemon/redis_cache.rs` (`a_value_read_before_a_404_that_was_answered_is_refused`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::redis::RedisServer;

/// Rows the writers insert, update and delete.
const HOT: i64 = 8;
/// Rows nobody writes: their refills come from TTL expiry and flushes only.
const COLD: [i64; 4] = [11, 12, 13, 14];
/// A row only the controller reads, to see admin actions remove values.
const ADMIN_ROW: i64 = 99;
/// Rows are grouped by `id % GROUPS` (the `g` column).
const GROUPS: i64 = 3;
const WRITERS: usize = 3;
const READERS: usize = 6;
const TOKEN: &str = "race-admin-token-0123456789";
/// The one-row families, in `Key::Row::family` order.
const FAMILIES: [&str; 5] = ["wt", "del", "wb", "tg", "ttl"];
const TTL_FAMILY: u8 = 4;
const TTL_SECONDS: u64 = 1;
/// Steady running time between two of the controller's actions, at least; and the checked
/// reads it must include (on a loaded machine the controller waits for them, so a slow run
/// checks as much as a fast one).
const GAP: Duration = Duration::from_millis(1200);
const READS_PER_GAP: u64 = 1_000;
/// How often each daemon's `/v1/status` is polled.
const POLL: Duration = Duration::from_millis(20);

/// What a reload may change: the `wt` family's query (a harmless variant that retires the
/// family) and the `del` rule's strategy.
#[derive(Clone, Copy)]
struct Knobs {
    wt_variant: u32,
    del_strategy: &'static str,
}

fn spin(rounds: u32) -> String {
    format!(
        "(WITH RECURSIVE spin(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM spin WHERE i < {rounds}) SELECT count(*) FROM spin) > 0"
    )
}

fn config(port: u16, backend: &str, knobs: Knobs) -> String {
    let (slow, slowest, quick) = (spin(5000), spin(20000), spin(1500));
    let Knobs {
        wt_variant: v,
        del_strategy,
    } = knobs;
    format!(
        r#"database = "catalog.db"
listen = "127.0.0.1:{port}"
admin_token = "{TOKEN}"

[cache]
ttl = "1h"
{backend}

[write_behind]
delay = "5ms"

[tail]
poll_interval = "50ms"

[keys."wt:{{id}}"]
query = "SELECT n FROM items WHERE id = :id AND {slow} AND {v} = {v}"

[keys."del:{{id}}"]
query = "SELECT n FROM items WHERE id = :id AND {slowest}"

[keys."wb:{{id}}"]
query = "SELECT n FROM items WHERE id = :id AND {slow}"

[keys."tg:{{id}}"]
query = "SELECT n FROM items WHERE id = :id AND {quick}"
tags = ["tg", "row:{{id}}"]

[keys."ttl:{{id}}"]
query = "SELECT n FROM items WHERE id = :id AND {slowest}"
ttl = "{TTL_SECONDS}s"

[keys."grp:{{g}}"]
query = "SELECT id, n FROM items WHERE g = :g AND {quick} ORDER BY id"
many = true
tags = ["grp:{{g}}"]

[keys."all"]
query = "SELECT id, n FROM items WHERE {slow} ORDER BY id"
many = true
tags = ["items"]

[[rules]]
table = "items"
keys = ["wt:{{id}}", "all"]
strategy = "write-through"

[[rules]]
table = "items"
keys = ["del:{{id}}"]
strategy = "{del_strategy}"

[[rules]]
table = "items"
keys = ["wb:{{id}}"]
strategy = "write-behind"

[[rules]]
table = "items"
keys = ["ttl:{{id}}"]
tags = ["row:{{id}}", "grp:{{g}}"]
"#
    )
}

#[test]
fn randomized_readers_and_writers_never_see_stale_or_backwards_values() {
    check(None);
}

/// The same on Redis, with readers spread over two daemons on one database (the active one and
/// a standby), so fills from another process race the applier's invalidations, and the active
/// one is killed or stopped so that the standby takes over.
#[test]
fn randomized_check_on_redis_across_an_active_and_a_standby_daemon() {
    let redis = RedisServer::start();
    check(Some(&redis));
}

/// A key the readers read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// `{family}:{id}`: one row's `n`, 404 when the row is absent.
    Row { family: u8, id: i64 },
    /// `grp:{g}`: the rows of one group.
    Group(i64),
    /// `all`: the whole table.
    All,
}

impl Key {
    fn name(self) -> String {
        match self {
            Key::Row { family, id } => format!("{}:{id}", FAMILIES[family as usize]),
            Key::Group(g) => format!("grp:{g}"),
            Key::All => "all".to_owned(),
        }
    }

    /// Every key the readers read (the admin row is left to the controller).
    fn universe() -> Vec<Key> {
        let mut keys = Vec::new();
        for family in 0..FAMILIES.len() as u8 {
            for id in (1..=HOT).chain(COLD) {
                keys.push(Key::Row { family, id });
            }
        }
        keys.extend((0..GROUPS).map(Key::Group));
        keys.push(Key::All);
        keys
    }
}

/// What a read answered.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    /// A one-row key: `Some(n)` (200) or `None` (404).
    Row(Option<i64>),
    /// A many-row key: `(id, n)` in id order.
    Rows(Vec<(i64, i64)>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Get,
    FreshGet,
    Multi,
    FreshMulti,
}

impl Kind {
    fn fresh(self) -> bool {
        matches!(self, Kind::FreshGet | Kind::FreshMulti)
    }
}

/// One checked read, as recorded while the run goes (checked after it).
#[derive(Clone, Debug)]
struct Read {
    key: Key,
    kind: Kind,
    /// Which daemon answered, its generation (restarts) and role when the read started.
    slot: usize,
    generation: u64,
    standby: bool,
    /// Nanoseconds since the run started: when the request was sent, when the answer was in.
    start: u64,
    end: u64,
    /// The highest cursor a daemon had reported in `/v1/status` before the request was sent.
    applied: u64,
    /// For `?fresh=1`: the last write sequence committed before the request was sent.
    committed: u64,
    /// The last write sequence committed when the answer was in: it cannot reflect a later one.
    upto: u64,
    answer: Answer,
    cache: String,
    age: Option<u64>,
    /// Sent spelled otherwise than rules render it (`spelled`): answered from the database, so
    /// possibly ahead of the applied position; checked apart from the key's other reads.
    spelled: bool,
}

/// What the readers, the status pollers and the controller share.
struct Run {
    start: Instant,
    addresses: Vec<SocketAddr>,
    /// Per daemon slot: how many times it was (re)started; 0 = down, 1 = active, 2 = standby
    /// as its last status said; whether its last status said paused.
    generation: Vec<AtomicU64>,
    role: Vec<AtomicU8>,
    paused: Vec<AtomicBool>,
    /// The highest `cursor` any daemon reported.
    applied: AtomicU64,
    /// Hits and misses the daemons counted (summed over restarts), from `/v1/status`.
    hits: AtomicU64,
    misses: AtomicU64,
    reading: AtomicBool,
    polling: AtomicBool,
    /// Answers recorded for checking so far.
    checked: AtomicU64,
    /// Requests that failed on the connection (a daemon restarting), retried, never counted.
    retries: AtomicU64,
    /// Answers that are wrong on their face (a status other than 200/404, a malformed body).
    malformed: AtomicU64,
}

impl Run {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// A pause: `cachetail pause` ran at `began`; from `from` to `until` the daemons in `slots`
/// reported it, so reads sent to them then must bypass the cache.
///
/// Between `began` and `from` the daemons had not all noticed it: a daemon that has not yet may
/// answer from its cache a value older than a write made since (no outbox row tells it), while
/// one that has answers from the database. Reads sent then are not held to what reads that
/// ended after `began` saw (every other check applies).
struct PauseWindow {
    began: u64,
    from: u64,
    until: u64,
    slots: Vec<usize>,
    /// Writes up to this sequence were made before the resume's flush markers: those with no
    /// outbox row (made while paused) count as applied from `position` on.
    last_seq: u64,
    position: u64,
}

/// A daemon slot: its port and config file, and the daemon running there (if any).
struct Slot {
    port: u16,
    config: PathBuf,
    daemon: Option<Daemon>,
}

/// The controller's side: the daemons, the config knobs, and what it did.
struct Cluster<'a> {
    catalog: &'a Catalog,
    backend: String,
    knobs: Knobs,
    slots: Vec<Slot>,
    run: Arc<Run>,
    pauses: Vec<PauseWindow>,
    done: HashMap<&'static str, u64>,
}

fn check(redis: Option<&RedisServer>) {
    let started = Instant::now();
    let catalog = Catalog::new();
    let mut setup = String::from(
        "con.execute('CREATE TABLE items (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, g INTEGER NOT NULL)')\n\
         con.execute('CREATE TABLE wlog (seq INTEGER PRIMARY KEY, id INTEGER NOT NULL, n INTEGER, pos INTEGER)')\n",
    );
    // Rows 1..6 present, 7 and 8 absent (inserted later); the cold rows and the admin row too.
    // Their writes are applied from position 0: they precede capture.
    let initial: Vec<i64> = (1..=6).chain(COLD).chain([ADMIN_ROW]).collect();
    for (seq, id) in initial.iter().enumerate() {
        let seq = seq + 1;
        setup += &format!(
            "con.execute('INSERT INTO items VALUES ({id}, {seq}, {g})')\ncon.execute('INSERT INTO wlog VALUES ({seq}, {id}, {seq}, 0)')\n",
            g = id % GROUPS
        );
    }
    catalog.python(&setup);

    let backend = match redis {
        None => String::new(),
        Some(redis) => format!(
            "backend = \"redis\"\nurl = \"{}\"\nprefix = \"race:\"",
            redis.url()
        ),
    };
    let knobs = Knobs {
        wt_variant: 1,
        del_strategy: "delete",
    };
    let slot_count = if redis.is_some() { 2 } else { 1 };
    let slots: Vec<Slot> = (0..slot_count)
        .map(|i| Slot {
            port: free_port(),
            config: catalog.path().join(format!("daemon{i}.toml")),
            daemon: None,
        })
        .collect();
    let run = Arc::new(Run {
        start: Instant::now(),
        addresses: slots
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port).parse().expect("address"))
            .collect(),
        generation: (0..slot_count).map(|_| AtomicU64::new(0)).collect(),
        role: (0..slot_count).map(|_| AtomicU8::new(0)).collect(),
        paused: (0..slot_count).map(|_| AtomicBool::new(false)).collect(),
        applied: AtomicU64::new(0),
        hits: AtomicU64::new(0),
        misses: AtomicU64::new(0),
        reading: AtomicBool::new(true),
        polling: AtomicBool::new(true),
        checked: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        malformed: AtomicU64::new(0),
    });
    let mut cluster = Cluster {
        catalog: &catalog,
        backend,
        knobs,
        slots,
        run: Arc::clone(&run),
        pauses: Vec::new(),
        done: HashMap::new(),
    };
    cluster.write_configs();
    cluster.start(0);
    cluster.wait_role(0, "active");
    if slot_count > 1 {
        cluster.start(1);
        cluster.wait_role(1, "standby");
    }

    let pollers: Vec<_> = (0..slot_count)
        .map(|slot| {
            let run = Arc::clone(&run);
            std::thread::spawn(move || poll_status(&run, slot))
        })
        .collect();
    let stop_file = catalog.path().join("stop-writing");
    let writers: Vec<Child> = (0..WRITERS)
        .map(|w| spawn_writer(&catalog.db(), &stop_file, w))
        .collect();
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (run, db) = (Arc::clone(&run), catalog.db());
            std::thread::spawn(move || read_loop(&run, &db, r))
        })
        .collect();

    // The controller: one action after another, the load running throughout.
    let schedule: &[&str] = if redis.is_some() {
        &[
            "admin-key",
            "reload-query",
            "pause",
            "takeover-kill",
            "admin-tag",
            "reload-strategy",
            "admin-family",
            "takeover-stop",
            "pause",
            "reload-query",
            "admin-all",
            "takeover-kill",
            "reload-strategy",
            "pause",
        ]
    } else {
        &[
            "admin-key",
            "reload-query",
            "pause",
            "restart-kill",
            "admin-tag",
            "reload-strategy",
            "admin-family",
            "restart-stop",
            "pause",
            "reload-query",
            "admin-all",
            "restart-kill",
            "reload-strategy",
            "pause",
        ]
    };
    for action in schedule {
        cluster.steady(READS_PER_GAP);
        cluster.act(action);
    }
    cluster.steady(READS_PER_GAP);

    std::fs::write(&stop_file, "").expect("stop the writers");
    let mut written = [0u64; 5];
    for writer in writers {
        let output = writer.wait_with_output().expect("writer");
        assert!(output.status.success(), "a writer failed");
        let counts: Vec<u64> = String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .map(|c| c.parse().expect("a count"))
            .collect();
        for (total, count) in written.iter_mut().zip(counts) {
            *total += count;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    run.reading.store(false, Ordering::Release);
    let mut reads: Vec<Read> = Vec::new();
    for reader in readers {
        reads.extend(reader.join().expect("reader"));
    }

    // Caught up, the write-behind queue drained: every cached value equals the database.
    let active = cluster.active_slot();
    let daemon = cluster.slots[active].daemon.as_mut().expect("running");
    daemon.wait_caught_up();
    eventually("the write-behind queue drains", || {
        (daemon.status()["write_behind_queue"] == 0).then_some(())
    });
    let direct = rusqlite::Connection::open(catalog.db()).expect("open");
    let (mut cached, mut stale_at_end) = (0, Vec::new());
    for slot in 0..cluster.slots.len() {
        let daemon = cluster.slots[slot].daemon.as_mut().expect("running");
        for key in Key::universe() {
            let reply = daemon.peek(&key.name());
            if reply.status == 504 {
                continue;
            }
            cached += 1;
            let answer = decode(key, reply.status, &reply.body);
            let truth = database_answer(&direct, key);
            if answer.as_ref() != Some(&truth) {
                stale_at_end.push(format!(
                    "{}: cached {answer:?}, database {truth:?}",
                    key.name()
                ));
            }
        }
    }
    let bearer = format!("Bearer {TOKEN}");
    let verify = cluster
        .daemon(active)
        .request_with(
            "POST",
            "/v1/verify?sample=100000",
            &[("Authorization", &bearer)],
        )
        .expect("verify");
    assert_eq!(verify.status, 200, "{}", verify.text());
    let verify = json(&verify);
    run.polling.store(false, Ordering::Release);
    for poller in pollers {
        poller.join().expect("poller");
    }

    // Every logged write is in the database: replaying the log gives the table.
    let log = load_log(&direct);
    let mut replayed: HashMap<i64, Option<i64>> = HashMap::new();
    for write in &log {
        replayed.insert(write.id, write.n);
    }
    let mut table: HashMap<i64, Option<i64>> = replayed.keys().map(|&id| (id, None)).collect();
    let mut stmt = direct.prepare("SELECT id, n FROM items").expect("items");
    for row in stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .expect("items")
    {
        let (id, n) = row.expect("row");
        table.insert(id, Some(n));
    }
    assert_eq!(replayed, table, "the table is the replay of the write log");
    let logged_writes = log.iter().filter(|w| w.pos != Some(0)).count() as u64;
    assert_eq!(
        logged_writes,
        written[..3].iter().sum::<u64>(),
        "every write the writers made is logged"
    );

    assert!(
        written[4] > 0,
        "the writers made poisoned writes: {written:?}"
    );
    let report = analyse(&log, &cluster.pauses, &reads);
    let hits = run.hits.load(Ordering::Relaxed);
    let misses = run.misses.load(Ordering::Relaxed);
    let hit_ratio = hits as f64 / (hits + misses).max(1) as f64;
    let done = |what: &str| cluster.done.get(what).copied().unwrap_or(0);
    eprintln!(
        "randomized checker{}: {:.1} s\n  writes: {} inserts, {} updates ({} through a poisoned value), {} deletes ({} while capture was paused)\n  {report}\n  daemon counters: {hits} hits, {misses} misses, hit ratio {:.1}%; {} requests retried across restarts\n  controller: {:?}\n  {cached} cached values at the end, {} stale; verify: {verify}",
        if redis.is_some() {
            " (redis, two daemons)"
        } else {
            " (memory)"
        },
        started.elapsed().as_secs_f64(),
        written[0],
        written[1],
        written[4],
        written[2],
        written[3],
        hit_ratio * 100.0,
        run.retries.load(Ordering::Relaxed),
        cluster.done,
        stale_at_end.len(),
    );
    for p in &cluster.pauses {
        eprintln!(
            "  paused from {:.3} s to {:.3} s; resumed at position {} (seq {})",
            p.from as f64 / 1e9,
            p.until as f64 / 1e9,
            p.position,
            p.last_seq
        );
    }
    for example in &report.examples {
        eprintln!("  {example}");
    }

    assert_eq!(report.violations(), 0, "stale, behind or backwards reads");
    assert_eq!(
        run.malformed.load(Ordering::Relaxed),
        0,
        "answers with an unexpected status or body"
    );
    assert!(
        stale_at_end.is_empty(),
        "stale cached values at the end: {stale_at_end:?}"
    );
    assert_eq!(verify["stale"], 0, "{verify}");
    // The cache was used: a checker whose reads all bypass or miss proves little. (On Redis,
    // two daemons, takeovers and rebuilds, the ratio is lower: 37% on a quiet machine, 29% once
    // in a CI run of 207 s where writes far outpaced reads.)
    let floor = if redis.is_some() { 0.2 } else { 0.3 };
    assert!(
        hit_ratio >= floor,
        "hit ratio {hit_ratio:.3} below the {floor} floor"
    );
    // Values of the short-TTL family expire and refill: its never-written rows miss more often
    // than the same rows of a family with a long TTL, which only flushes empty. (Restarts, pauses
    // and admin flushes empty both alike, so the margin varies with load; `a_value_expires_after_
    // its_ttl` tests expiry exactly, and the Age check above catches a hit older than its TTL.)
    assert!(
        report.ttl_cold_misses > report.del_cold_misses,
        "the {TTL_SECONDS} s TTL family refilled {} times on cold rows, the 1 h one {} times",
        report.ttl_cold_misses,
        report.del_cold_misses
    );
    // What was checked, each kind above a floor.
    let floors = [
        ("plain GETs", report.gets, 2_000),
        ("?fresh=1 GETs", report.fresh_gets, 600),
        ("multi-get answers", report.multi, 2_000),
        ("answers of 404", report.absent, 400),
        ("group and table answers", report.many_rows, 500),
        ("TTL family hits, age checked", report.ttl_hits, 100),
        (
            "reads while paused, bypass checked",
            report.paused_reads,
            600,
        ),
        ("reads by a restarted daemon", report.restarted_reads, 2_000),
        ("inserts", written[0], 100),
        ("updates", written[1], 400),
        ("deletes", written[2], 100),
        ("writes while capture was paused", written[3], 10),
    ];
    for (what, count, floor) in floors {
        assert!(
            count >= floor,
            "only {count} {what} checked (floor {floor})"
        );
    }
    if redis.is_some() {
        assert!(
            report.standby_reads >= 500,
            "only {} reads by a standby",
            report.standby_reads
        );
        assert!(done("takeover") >= 3, "{:?}", cluster.done);
    } else {
        assert!(done("restart") >= 3, "{:?}", cluster.done);
    }
    for what in ["admin", "reload", "pause"] {
        assert!(done(what) >= 2, "{what}: {:?}", cluster.done);
    }
}

/// A writer process: transactions of one to three writes to distinct hot rows, until the stop
/// file appears. Each write sets the row's `n` to its sequence number and logs itself, with the
/// outbox id its trigger wrote (none while capture is paused), in the same transaction. Prints
/// how many inserts, updates, deletes it made, and how many of them capture did not see.
fn spawn_writer(db: &Path, stop: &Path, seed: usize) -> Child {
    let script = format!(
        r#"
import os, random, sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
rnd = random.Random({seed})
made = [0, 0, 0, 0, 0]
{poison}
def head():
    return con.execute('SELECT coalesce(max(id), 0) FROM cachetail_outbox').fetchone()[0]
while not os.path.exists(sys.argv[2]):
    con.execute('BEGIN IMMEDIATE')
    for row in rnd.sample(range(1, {HOT} + 1), rnd.randint(1, 3)):
        seq = con.execute('SELECT coalesce(max(seq), 0) + 1 FROM wlog').fetchone()[0]
        before = head()
        if con.execute('SELECT 1 FROM items WHERE id = ?', (row,)).fetchone() is None:
            con.execute('INSERT INTO items (id, n, g) VALUES (?, ?, ?)', (row, seq, row % {GROUPS}))
            n, kind = seq, 0
        elif rnd.random() < 0.2:
            con.execute('DELETE FROM items WHERE id = ?', (row,))
            n, kind = None, 2
        else:
            if rnd.random() < {POISONED_SHARE}:
                poison(row)
                made[4] += 1
            con.execute('UPDATE items SET n = ?, g = id % {GROUPS} WHERE id = ?', (seq, row))
            n, kind = seq, 1
        after = head()
        pos = after if after > before else None
        con.execute('INSERT INTO wlog (seq, id, n, pos) VALUES (?, ?, ?, ?)', (seq, row, n, pos))
        made[kind] += 1
        if pos is None:
            made[3] += 1
    con.execute('COMMIT')
    time.sleep(rnd.uniform(0.01, 0.04))
print(*made)
"#,
        poison = poisoned_writes(),
    );
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(db)
        .arg(stop)
        .stdout(Stdio::piped())
        .spawn()
        .expect("a writer")
}

/// The share of the writers' updates made through a poisoned value first.
const POISONED_SHARE: f64 = 0.005;

/// A writer's `poison(row)`: within the update's transaction, sets the row's captured `g` to a
/// value no key can be rendered from (text that is not UTF-8, or text holding a NUL, which
/// SQLite's `quote()` would cut short), which the update then puts back. Both outbox rows are
/// undecodable: the daemons must drop what reads `items`, count and skip them, never stall.
fn poisoned_writes() -> &'static str {
    r#"
def poison(row):
    bad = "CAST(X'FF' AS TEXT)" if rnd.random() < 0.5 else "'1' || char(0) || '2'"
    con.execute('UPDATE items SET g = ' + bad + ' WHERE id = ?', (row,))
"#
}

/// Polls one daemon's `/v1/status`: the highest cursor reported, its role and pause, and its
/// hit and miss counters (summed across its restarts).
fn poll_status(run: &Run, slot: usize) {
    let mut client = Client::new(run.addresses[slot]);
    let (mut last_hits, mut last_misses) = (0u64, 0u64);
    while run.polling.load(Ordering::Acquire) {
        let status = client
            .get("/v1/status")
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| r.json().ok());
        let Some(status) = status else {
            run.role[slot].store(0, Ordering::Release);
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        if let Some(cursor) = status["cursor"].as_u64() {
            run.applied.fetch_max(cursor, Ordering::AcqRel);
        }
        let role = if status["role"] == "active" { 1 } else { 2 };
        run.role[slot].store(role, Ordering::Release);
        run.paused[slot].store(status["paused"] == true, Ordering::Release);
        for (counter, last, total) in [
            ("hits", &mut last_hits, &run.hits),
            ("misses", &mut last_misses, &run.misses),
        ] {
            let now = status[counter].as_u64().unwrap_or(0);
            // Lower than before: a restarted daemon, counting from zero.
            total.fetch_add(now.checked_sub(*last).unwrap_or(now), Ordering::Relaxed);
            *last = now;
        }
        std::thread::sleep(POLL);
    }
}

/// xorshift64: the readers' deterministic randomness.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn pick_key(seed: &mut u64) -> Key {
    let r = next(seed);
    match r % 100 {
        0..4 => Key::All,
        4..10 => Key::Group((r / 100 % GROUPS as u64) as i64),
        _ => {
            // Mostly the written rows, where fills race invalidations.
            let family = (r / 100 % FAMILIES.len() as u64) as u8;
            let id = if (r / 1000).is_multiple_of(8) {
                COLD[(r / 10_000 % COLD.len() as u64) as usize]
            } else {
                (r / 100_000 % HOT as u64) as i64 + 1
            };
            Key::Row { family, id }
        }
    }
}

/// One reader: single GETs (a quarter with `?fresh=1`) and multi-gets, on its daemon or, when
/// that one is down, the other. A request that fails on the connection is retried, never
/// counted.
fn read_loop(run: &Run, db: &Path, reader: usize) -> Vec<Read> {
    let direct = rusqlite::Connection::open(db).expect("direct read connection");
    direct
        .busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    let mut clients: Vec<Client> = run.addresses.iter().map(|&a| Client::new(a)).collect();
    let mut seed = 0x2545_F491_4F6C_DD1D_u64 ^ (reader as u64 + 1).wrapping_mul(0x9E37_79B9);
    let mut reads = Vec::new();
    let mut slot = reader % run.addresses.len();
    while run.reading.load(Ordering::Acquire) {
        let r = next(&mut seed);
        let standby = run.role[slot].load(Ordering::Acquire) == 2;
        let mut kind = match r % 12 {
            0..7 => Kind::Get,
            7..10 => Kind::FreshGet,
            10 => Kind::Multi,
            _ => Kind::FreshMulti,
        };
        // On a standby `?fresh=1` waits for the durable cursor (a few hundred ms): fewer there.
        if standby && kind.fresh() && !(r / 12).is_multiple_of(4) {
            kind = match kind {
                Kind::FreshGet => Kind::Get,
                _ => Kind::Multi,
            };
        }
        let keys: Vec<Key> = match kind {
            Kind::Get | Kind::FreshGet => vec![pick_key(&mut seed)],
            Kind::Multi | Kind::FreshMulti => {
                let mut keys = Vec::new();
                for _ in 0..2 + r / 16 % 5 {
                    let key = pick_key(&mut seed);
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
                keys
            }
        };
        let fresh = if kind.fresh() { "?fresh=1" } else { "" };
        let generation = run.generation[slot].load(Ordering::Acquire);
        let applied = run.applied.load(Ordering::Acquire);
        let last_committed = || {
            direct
                .query_row("SELECT coalesce(max(seq), 0) FROM wlog", [], |row| {
                    row.get::<_, i64>(0)
                })
                .expect("the committed sequence") as u64
        };
        let committed = if kind.fresh() { last_committed() } else { 0 };
        let names: Vec<String> = keys.iter().map(|&k| spelled(k, &mut seed)).collect();
        let start = run.now();
        let reply = match kind {
            Kind::Get | Kind::FreshGet => {
                clients[slot].get(&format!("/v1/keys/{}{fresh}", encode_key(&names[0])))
            }
            Kind::Multi | Kind::FreshMulti => {
                let body = serde_json::to_vec(&names).expect("json");
                clients[slot].request(
                    "POST",
                    &format!("/v1/keys{fresh}"),
                    &[("Content-Type", "application/json")],
                    &body,
                )
            }
        };
        let end = run.now();
        let upto = last_committed();
        let Ok(reply) = reply else {
            // The daemon is restarting: try the other one (if any), a moment later.
            run.retries.fetch_add(1, Ordering::Relaxed);
            slot = (slot + 1) % run.addresses.len();
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let record = |key: Key, sent: &str, status: u16, body: &[u8], cache: &str, age| {
            let spelled = sent != key.name();
            // (A multi-get's 404 entry says nothing of the cache.)
            if spelled && !matches!(cache, "bypass" | "") {
                eprintln!("{sent:?} answered {cache}: a spelling no rule renders was cached");
                run.malformed.fetch_add(1, Ordering::Relaxed);
            }
            let answer = decode(key, status, body);
            if answer.is_none() {
                eprintln!(
                    "unexpected answer for {}: {status} {}",
                    key.name(),
                    String::from_utf8_lossy(body)
                );
                run.malformed.fetch_add(1, Ordering::Relaxed);
            }
            run.checked
                .fetch_add(u64::from(answer.is_some()), Ordering::Relaxed);
            answer.map(|answer| Read {
                key,
                kind,
                slot,
                generation,
                standby,
                start,
                end,
                applied,
                committed,
                upto,
                answer,
                cache: cache.to_owned(),
                age,
                spelled,
            })
        };
        match kind {
            Kind::Get | Kind::FreshGet => {
                let age = reply.header("age").and_then(|a| a.parse().ok());
                reads.extend(record(
                    keys[0],
                    &names[0],
                    reply.status,
                    &reply.body,
                    x_cache(&reply),
                    age,
                ));
            }
            Kind::Multi | Kind::FreshMulti => {
                let results = multi_results(&reply, keys.len());
                let Some(results) = results else {
                    eprintln!(
                        "unexpected multi-get answer: {} {}",
                        reply.status,
                        reply.text()
                    );
                    run.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                for ((key, sent), result) in keys.into_iter().zip(&names).zip(results) {
                    let status = result["status"].as_u64().unwrap_or(0) as u16;
                    let body = result
                        .get("value")
                        .map(|v| v.to_string().into_bytes())
                        .unwrap_or_default();
                    let cache = result["cache"].as_str().unwrap_or("");
                    reads.extend(record(key, sent, status, &body, cache, None));
                }
            }
        }
    }
    reads
}

fn multi_results(reply: &Reply, count: usize) -> Option<Vec<Value>> {
    if reply.status != 200 {
        return None;
    }
    let results = reply.json().ok()?["results"].as_array()?.clone();
    (results.len() == count).then_some(results)
}

/// A key's answer as the checker models it; None when it is not a well-formed 200 or 404.
fn decode(key: Key, status: u16, body: &[u8]) -> Option<Answer> {
    match (key, status) {
        (Key::Row { .. }, 404) => Some(Answer::Row(None)),
        (Key::Row { .. }, 200) => {
            let value: Value = serde_json::from_slice(body).ok()?;
            Some(Answer::Row(Some(value["n"].as_i64()?)))
        }
        (Key::Group(_) | Key::All, 200) => {
            let value: Value = serde_json::from_slice(body).ok()?;
            let rows = value
                .as_array()?
                .iter()
                .map(|row| Some((row["id"].as_i64()?, row["n"].as_i64()?)))
                .collect::<Option<Vec<_>>>()?;
            Some(Answer::Rows(rows))
        }
        _ => None,
    }
}

/// What the database holds for a key now.
fn database_answer(conn: &rusqlite::Connection, key: Key) -> Answer {
    let rows = |sql: &str| -> Vec<(i64, i64)> {
        let mut stmt = conn.prepare(sql).expect("prepare");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .map(|r| r.expect("row"))
            .collect()
    };
    match key {
        Key::Row { id, .. } => Answer::Row(
            rows(&format!("SELECT id, n FROM items WHERE id = {id}"))
                .first()
                .map(|&(_, n)| n),
        ),
        Key::Group(g) => Answer::Rows(rows(&format!(
            "SELECT id, n FROM items WHERE g = {g} ORDER BY id"
        ))),
        Key::All => Answer::Rows(rows("SELECT id, n FROM items ORDER BY id")),
    }
}

impl Cluster<'_> {
    fn write_configs(&self) {
        for slot in &self.slots {
            // Write then rename, as editors do, so a daemon never reads a half-written file.
            let tmp = slot.config.with_extension("tmp");
            std::fs::write(&tmp, config(slot.port, &self.backend, self.knobs)).expect("config");
            std::fs::rename(&tmp, &slot.config).expect("config");
        }
    }

    fn start(&mut self, slot: usize) {
        let daemon = Daemon::start_existing(&self.slots[slot].config, self.slots[slot].port);
        self.slots[slot].daemon = Some(daemon);
        self.run.generation[slot].fetch_add(1, Ordering::AcqRel);
    }

    fn daemon(&mut self, slot: usize) -> &mut Daemon {
        self.slots[slot].daemon.as_mut().expect("running")
    }

    fn wait_role(&mut self, slot: usize, role: &str) {
        let daemon = self.daemon(slot);
        eventually(&format!("daemon {slot} is {role}"), || {
            (daemon.status()["role"] == role).then_some(())
        });
    }

    fn active_slot(&mut self) -> usize {
        (0..self.slots.len())
            .find(|&slot| {
                self.slots[slot]
                    .daemon
                    .as_mut()
                    .is_some_and(|d| d.status()["role"] == "active")
            })
            .expect("an active daemon")
    }

    /// Lets the load run for `GAP` and at least `reads` more checked answers (up to a minute:
    /// past it, the floors on what was checked decide).
    fn steady(&self, reads: u64) {
        self.steady_for(GAP, reads);
    }

    fn steady_for(&self, time: Duration, reads: u64) {
        let from = self.run.checked.load(Ordering::Acquire);
        std::thread::sleep(time);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.run.checked.load(Ordering::Acquire) < from + reads && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.done.entry(what).or_insert(0) += 1;
    }

    fn act(&mut self, action: &str) {
        match action {
            "admin-key" => self.admin_removes("del", "DELETE", "/v1/keys/del:99"),
            "admin-tag" => {
                self.admin_removes("tg", "POST", "/v1/admin/invalidate?tag=row:99");
                self.admin(0, "POST", "/v1/admin/invalidate?tag=tg");
                self.admin(0, "POST", "/v1/admin/invalidate?tag=grp:1");
            }
            "admin-family" => {
                self.admin_removes("wb", "POST", "/v1/admin/flush?family=wb:%7Bid%7D");
                self.admin(0, "POST", "/v1/admin/flush?family=del:%7Bid%7D");
            }
            "admin-all" => self.admin_removes("wt", "POST", "/v1/admin/flush"),
            "reload-query" => {
                self.knobs.wt_variant += 1;
                self.reload();
            }
            "reload-strategy" => {
                self.knobs.del_strategy = match self.knobs.del_strategy {
                    "delete" => "write-through",
                    _ => "delete",
                };
                self.reload();
            }
            "pause" => self.pause(),
            "restart-stop" | "restart-kill" => {
                self.stop(0, action == "restart-kill");
                self.start(0);
                self.wait_role(0, "active");
                self.count("restart");
            }
            "takeover-stop" | "takeover-kill" => {
                let active = self.active_slot();
                let standby = 1 - active;
                self.stop(active, action == "takeover-kill");
                self.wait_role(standby, "active");
                self.start(active);
                self.wait_role(active, "standby");
                self.count("takeover");
            }
            other => panic!("unknown action {other}"),
        }
    }

    fn stop(&mut self, slot: usize, kill: bool) {
        let mut daemon = self.slots[slot].daemon.take().expect("running");
        if kill {
            daemon.kill();
        } else {
            assert!(daemon.stop().success(), "a clean stop");
        }
    }

    /// An admin action on daemon `slot`, with the token (and refused without it).
    fn admin(&mut self, slot: usize, method: &str, path: &str) {
        let daemon = self.daemon(slot);
        let refused = daemon.request_with(method, path, &[]).expect("admin");
        assert_eq!(refused.status, 401, "{path} without the token");
        let bearer = format!("Bearer {TOKEN}");
        let reply = daemon
            .request_with(method, path, &[("Authorization", &bearer)])
            .expect("admin");
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        self.count("admin");
    }

    /// An admin action that must remove the admin row's value of `family`, which only the
    /// controller reads: cached before (filled through one daemon), gone after (seen through
    /// every daemon).
    fn admin_removes(&mut self, family: &str, method: &str, path: &str) {
        let key = format!("{family}:{ADMIN_ROW}");
        let slots = self.slots.len();
        let daemon = self.daemon(0);
        assert_eq!(daemon.get(&key).status, 200);
        eventually(&format!("{key} is cached"), || {
            (daemon.peek(&key).status == 200).then_some(())
        });
        self.admin(slots - 1, method, path);
        for slot in 0..slots {
            let reply = self.daemon(slot).peek(&key);
            assert_eq!(reply.status, 504, "{method} {path} left {key} cached");
        }
    }

    /// Rewrites the config files with the current knobs; waits until every daemon reloaded.
    fn reload(&mut self) {
        let before: Vec<u64> = (0..self.slots.len())
            .map(|slot| {
                self.daemon(slot).status()["config"]["reloads"]
                    .as_u64()
                    .expect("reloads")
            })
            .collect();
        self.write_configs();
        let strategy = self.knobs.del_strategy;
        for (slot, before) in before.into_iter().enumerate() {
            let daemon = self.daemon(slot);
            eventually(&format!("daemon {slot} reloads its config"), || {
                let status = daemon.status();
                let config = &status["config"];
                assert_eq!(config["last_reload_error"], Value::Null, "{status}");
                let del_rule = config["rules"]
                    .as_array()?
                    .iter()
                    .find(|r| r["keys"][0] == "del:{id}")?
                    .clone();
                (config["reloads"].as_u64()? > before && del_rule["strategy"] == strategy)
                    .then_some(())
            });
        }
        self.count("reload");
    }

    /// `cachetail pause` while the writers write (their writes go uncaptured), a moment with
    /// the daemons serving reads from the database, then `cachetail resume`.
    fn pause(&mut self) {
        let config = self.slots[0].config.clone();
        let began = self.run.now();
        cli_ok("pause", &config);
        // Admin actions while paused write position markers, so the outbox head moves while
        // writes go uncaptured: one before the daemons noticed the pause, one after.
        let last = self.slots.len() - 1;
        self.admin(last, "POST", "/v1/admin/invalidate?tag=items");
        let run = Arc::clone(&self.run);
        eventually("every daemon reports the pause", || {
            run.paused
                .iter()
                .all(|paused| paused.load(Ordering::Acquire))
                .then_some(())
        });
        let from = self.run.now();
        let slots: Vec<usize> = (0..self.slots.len()).collect();
        self.steady_for(GAP / 3, READS_PER_GAP / 4);
        self.admin(last, "POST", "/v1/admin/invalidate?tag=items");
        self.steady_for(GAP / 3, READS_PER_GAP / 4);
        let until = self.run.now();
        cli_ok("resume", &config);
        let direct = rusqlite::Connection::open(self.catalog.db()).expect("open");
        let (position, last_seq): (i64, i64) = direct
            .query_row(
                "SELECT (SELECT max(id) FROM cachetail_outbox), (SELECT max(seq) FROM wlog)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("head");
        eventually("the daemons report the resume", || {
            (0..run.paused.len())
                .all(|slot| !run.paused[slot].load(Ordering::Acquire))
                .then_some(())
        });
        self.pauses.push(PauseWindow {
            began,
            from,
            until,
            slots,
            last_seq: last_seq as u64,
            position: position as u64,
        });
        self.count("pause");
    }
}

/// A logged write: its sequence (commit order), row, new `n` (None: deleted), and outbox id
/// (None: made while capture was paused; Some(0): before capture).
struct Write {
    seq: u64,
    id: i64,
    n: Option<i64>,
    pos: Option<u64>,
}

fn load_log(conn: &rusqlite::Connection) -> Vec<Write> {
    let mut stmt = conn
        .prepare("SELECT seq, id, n, pos FROM wlog ORDER BY seq")
        .expect("wlog");
    stmt.query_map([], |r| {
        Ok(Write {
            seq: r.get::<_, i64>(0)? as u64,
            id: r.get(1)?,
            n: r.get(2)?,
            pos: r.get::<_, Option<i64>>(3)?.map(|p| p as u64),
        })
    })
    .expect("wlog")
    .map(|w| w.expect("a write"))
    .collect()
}

/// A row's history: `(seq, n)` from seq 0 (absent), one entry per write.
type History = Vec<(u64, Option<i64>)>;

/// The entry in force at `seq`.
fn at(history: &History, seq: u64) -> usize {
    history.partition_point(|&(s, _)| s <= seq) - 1
}

/// The commit points at which `history` held `n`: from the write that set it (whose sequence
/// number it is) to the next write of the row.
fn holding(history: &History, n: i64) -> Option<(u64, u64)> {
    let i = history
        .binary_search_by_key(&u64::try_from(n).ok()?, |&(seq, _)| seq)
        .ok()?;
    (history[i].1 == Some(n)).then(|| (history[i].0, history.get(i + 1).map_or(u64::MAX, |h| h.0)))
}

/// For each point `p`, the last write (in commit order) among those applied at `p`.
struct Coverage(Vec<(u64, u64)>);

impl Coverage {
    fn new(mut points: Vec<(u64, u64)>) -> Coverage {
        points.sort_unstable();
        let mut highest = 0;
        for point in &mut points {
            highest = highest.max(point.1);
            point.1 = highest;
        }
        Coverage(points)
    }

    fn required(&self, applied: u64) -> u64 {
        match self.0.partition_point(|&(position, _)| position <= applied) {
            0 => 0,
            i => self.0[i - 1].1,
        }
    }
}

struct Model {
    histories: HashMap<i64, History>,
    rows: Vec<i64>,
    by_row: HashMap<i64, Coverage>,
    by_group: HashMap<i64, Coverage>,
    all: Coverage,
}

impl Model {
    fn new(log: &[Write], pauses: &[PauseWindow]) -> Model {
        let mut histories: HashMap<i64, History> = HashMap::new();
        let mut points: HashMap<i64, Vec<(u64, u64)>> = HashMap::new();
        for write in log {
            histories
                .entry(write.id)
                .or_insert_with(|| vec![(0, None)])
                .push((write.seq, write.n));
            // A write capture did not see is applied once the resume's flush markers are.
            let applied_at = write.pos.unwrap_or_else(|| {
                pauses
                    .iter()
                    .find(|p| p.last_seq >= write.seq)
                    .expect("an uncaptured write made outside any pause")
                    .position
            });
            points
                .entry(write.id)
                .or_default()
                .push((applied_at, write.seq));
        }
        let rows: Vec<i64> = {
            let mut rows: Vec<i64> = histories.keys().copied().collect();
            rows.sort_unstable();
            rows
        };
        let by_group = (0..GROUPS)
            .map(|g| {
                let points = rows
                    .iter()
                    .filter(|id| *id % GROUPS == g)
                    .flat_map(|id| points[id].iter().copied())
                    .collect();
                (g, Coverage::new(points))
            })
            .collect();
        let all = Coverage::new(points.values().flatten().copied().collect());
        let by_row = points
            .into_iter()
            .map(|(id, p)| (id, Coverage::new(p)))
            .collect();
        Model {
            histories,
            rows,
            by_row,
            by_group,
            all,
        }
    }

    /// The last write a read of `key` must reflect once the daemon applied up to `applied`.
    fn required(&self, key: Key, applied: u64) -> u64 {
        match key {
            Key::Row { id, .. } => self.by_row[&id].required(applied),
            Key::Group(g) => self.by_group[&g].required(applied),
            Key::All => self.all.required(applied),
        }
    }

    /// The first commit point from `from` to `upto` at which the database held `answer` for
    /// `key`; None if there is none.
    fn first_consistent(&self, key: Key, answer: &Answer, from: u64, upto: u64) -> Option<u64> {
        let point = match (key, answer) {
            (Key::Row { id, .. }, Answer::Row(value)) => {
                let history = &self.histories[&id];
                match value {
                    Some(n) => {
                        let (since, until) = holding(history, *n)?;
                        (until > from).then(|| since.max(from))
                    }
                    None => history[at(history, from)..]
                        .iter()
                        .find(|(_, m)| m.is_none())
                        .map(|&(seq, _)| seq.max(from)),
                }
            }
            (Key::Group(_) | Key::All, Answer::Rows(listed)) => {
                let in_scope = |id: i64| match key {
                    Key::Group(g) => id % GROUPS == g,
                    _ => true,
                };
                // The listed rows pin an interval; the others must be absent within it.
                let (mut low, mut high) = (from, u64::MAX);
                for &(id, n) in listed {
                    let history = self.histories.get(&id).filter(|_| in_scope(id))?;
                    let (since, until) = holding(history, n)?;
                    low = low.max(since);
                    high = high.min(until);
                }
                let absent: Vec<&History> = self
                    .rows
                    .iter()
                    .filter(|&&id| in_scope(id) && !listed.iter().any(|&(l, _)| l == id))
                    .map(|id| &self.histories[id])
                    .collect();
                let high = high.min(upto.saturating_add(1));
                let mut point = low;
                'search: while point < high {
                    for history in &absent {
                        let i = at(history, point);
                        if history[i].1.is_some() {
                            // Present here: move to where it is next absent.
                            point = history[i..].iter().find(|(_, m)| m.is_none())?.0;
                            continue 'search;
                        }
                    }
                    return Some(point);
                }
                None
            }
            _ => None,
        };
        point.filter(|&point| point <= upto)
    }
}

/// What the analysis found and counted.
#[derive(Default)]
struct Report {
    never_existed: u64,
    stale_fresh: u64,
    behind_applied: u64,
    backwards: u64,
    not_bypassed: u64,
    too_old: u64,
    examples: Vec<String>,
    examples_of: HashMap<&'static str, usize>,
    gets: u64,
    fresh_gets: u64,
    multi: u64,
    absent: u64,
    many_rows: u64,
    hits: u64,
    misses: u64,
    ttl_hits: u64,
    ttl_cold_misses: u64,
    del_cold_misses: u64,
    paused_reads: u64,
    restarted_reads: u64,
    standby_reads: u64,
}

impl Report {
    /// Keeps a few examples of each kind of violation.
    fn example(&mut self, kind: &'static str, text: String) {
        let kept = self.examples_of.entry(kind).or_insert(0);
        if *kept < 4 {
            *kept += 1;
            self.examples.push(text);
        }
    }

    fn violations(&self) -> u64 {
        self.never_existed
            + self.stale_fresh
            + self.behind_applied
            + self.backwards
            + self.not_bypassed
            + self.too_old
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checked: {} GETs, {} ?fresh=1 GETs, {} multi-get answers ({} answers of 404, {} of group/table keys); {} reads while paused, {} by restarted daemons, {} by a standby; hits {} misses {} as readers saw them; TTL family: {} hits age-checked, {} refills of cold rows (long-TTL family: {})\n  violations: {} answers that never existed, {} stale ?fresh=1, {} behind the applied position, {} backwards, {} not bypassed while paused, {} older than their TTL",
            self.gets,
            self.fresh_gets,
            self.multi,
            self.absent,
            self.many_rows,
            self.paused_reads,
            self.restarted_reads,
            self.standby_reads,
            self.hits,
            self.misses,
            self.ttl_hits,
            self.ttl_cold_misses,
            self.del_cold_misses,
            self.never_existed,
            self.stale_fresh,
            self.behind_applied,
            self.backwards,
            self.not_bypassed,
            self.too_old,
        )
    }
}

fn analyse(log: &[Write], pauses: &[PauseWindow], reads: &[Read]) -> Report {
    let model = Model::new(log, pauses);
    let mut report = Report::default();
    // A key sent spelled otherwise (`spelled`) reads the database now, maybe ahead of what was
    // applied: it does not bind the key's later reads, so its reads are checked as their own.
    let mut by_key: HashMap<(Key, bool), Vec<&Read>> = HashMap::new();
    for read in reads {
        by_key
            .entry((read.key, read.spelled))
            .or_default()
            .push(read);
    }
    for ((key, _), mut reads) in by_key {
        reads.sort_by_key(|r| r.start);
        // Reads of this key that have ended, by end time, with the earliest point each could
        // have seen: a read that starts later must not see an earlier one.
        let mut ended: BinaryHeap<Reverse<Ended>> = BinaryHeap::new();
        let mut seen = Seen::default();
        let mut seen_when_paused: Vec<Option<Seen>> = vec![None; pauses.len()];
        for (index, read) in reads.iter().enumerate() {
            for (pause, noted) in pauses.iter().zip(&mut seen_when_paused) {
                if noted.is_none() && pause.began <= read.start {
                    take_ended(&mut ended, pause.began, &mut seen);
                    *noted = Some(seen);
                }
            }
            take_ended(&mut ended, read.start, &mut seen);
            // Sent while the daemons were noticing a pause: held to what was seen before it.
            let seen = pauses
                .iter()
                .zip(&seen_when_paused)
                .find(|(p, _)| p.began <= read.start && read.start <= p.from)
                .and_then(|(_, noted)| *noted)
                .unwrap_or(seen);
            count(&mut report, read, pauses);
            let required = model.required(key, read.applied);
            let floor = read.committed.max(required).max(seen.point);
            let consistent = |from: u64| model.first_consistent(key, &read.answer, from, read.upto);
            let point = match consistent(floor) {
                Some(point) => point,
                None => {
                    let reason = if consistent(0).is_none() {
                        report.never_existed += 1;
                        "never existed"
                    } else if consistent(read.committed).is_none() {
                        report.stale_fresh += 1;
                        "stale ?fresh=1"
                    } else if consistent(read.committed.max(required)).is_none() {
                        report.behind_applied += 1;
                        "behind the applied position"
                    } else {
                        report.backwards += 1;
                        "backwards"
                    };
                    let earlier = seen
                        .by
                        .map_or_else(String::new, |i| format!(" (by {})", describe(reads[i])));
                    report.example(
                        reason,
                        format!(
                            "{reason}: {}; committed before it: seq {}, applied: position {} (seq {required}), seen earlier: seq {}{earlier}, committed when it was in: seq {}",
                            describe(read),
                            read.committed,
                            read.applied,
                            seen.point,
                            read.upto,
                        ),
                    );
                    // Carry on from what it could have seen at the earliest.
                    consistent(0).unwrap_or(0).max(seen.point)
                }
            };
            ended.push(Reverse(Ended {
                end: read.end,
                point,
                index,
            }));
        }
    }
    report
}

/// A read that has ended: when, the earliest point it could have seen, which one it was.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Ended {
    end: u64,
    point: u64,
    index: usize,
}

/// The highest of those points so far, and the read that saw it.
#[derive(Clone, Copy, Default)]
struct Seen {
    point: u64,
    by: Option<usize>,
}

/// Reads that ended before `before`: folded into `seen`.
fn take_ended(ended: &mut BinaryHeap<Reverse<Ended>>, before: u64, seen: &mut Seen) {
    while let Some(&Reverse(read)) = ended.peek() {
        if read.end >= before {
            break;
        }
        if read.point > seen.point {
            *seen = Seen {
                point: read.point,
                by: Some(read.index),
            };
        }
        ended.pop();
    }
}

fn describe(read: &Read) -> String {
    format!(
        "{} {:?} by daemon {} (gen {}, {}) sent at {:.4} s, in at {:.4} s: {} {:?}",
        read.key.name(),
        read.kind,
        read.slot,
        read.generation,
        if read.standby { "standby" } else { "active" },
        read.start as f64 / 1e9,
        read.end as f64 / 1e9,
        read.cache,
        read.answer,
    )
}

/// Counts a read by kind, and checks what does not depend on the write log: bypass while
/// paused, and the TTL family's age.
fn count(report: &mut Report, read: &Read, pauses: &[PauseWindow]) {
    match read.kind {
        Kind::Get => report.gets += 1,
        Kind::FreshGet => report.fresh_gets += 1,
        Kind::Multi | Kind::FreshMulti => report.multi += 1,
    }
    match &read.answer {
        Answer::Row(None) => report.absent += 1,
        Answer::Rows(_) => report.many_rows += 1,
        Answer::Row(Some(_)) => {}
    }
    match read.cache.as_str() {
        "hit" => report.hits += 1,
        "miss" => report.misses += 1,
        _ => {}
    }
    if read.generation > 1 {
        report.restarted_reads += 1;
    }
    if read.standby {
        report.standby_reads += 1;
    }
    // (A multi-get's 404 answers say nothing of the cache: README documents them without it.)
    let paused = !read.cache.is_empty()
        && pauses
            .iter()
            .any(|p| p.slots.contains(&read.slot) && read.start >= p.from && read.end <= p.until);
    if paused {
        report.paused_reads += 1;
        if read.cache != "bypass" {
            report.not_bypassed += 1;
            report.example(
                "not bypassed",
                format!("not bypassed while paused: {}", describe(read)),
            );
        }
    }
    if let Key::Row { family, id } = read.key {
        let cold = COLD.contains(&id);
        if family == TTL_FAMILY
            && read.cache == "hit"
            && let Some(age) = read.age
        {
            report.ttl_hits += 1;
            if age > TTL_SECONDS {
                report.too_old += 1;
                report.example(
                    "too old",
                    format!("older than its TTL, Age {age}: {}", describe(read)),
                );
            }
        }
        if cold && read.cache == "miss" {
            match family {
                TTL_FAMILY => report.ttl_cold_misses += 1,
                1 => report.del_cold_misses += 1,
                _ => {}
            }
        }
    }
}

// --- Hostile spellings (issue 14): a row's id written otherwise than rules render it.

/// How a reader spells `key` in its request: mostly as rules render it; one row key in six
/// written another way SQLite reads as the same id (`wt:007`, `wt:+7`, `wt:7.0`, `wt: 7`,
/// `wt:7e0`). It reads the same row, so its answer is checked as the key's; no rule renders it,
/// so a value cached under it would never be refreshed (a 404 of rows 7 and 8 included, which
/// the writers insert later).
fn spelled(key: Key, seed: &mut u64) -> String {
    let Key::Row { family, id } = key else {
        return key.name();
    };
    let r = next(seed);
    if !r.is_multiple_of(6) {
        return key.name();
    }
    let family = FAMILIES[family as usize];
    match r / 6 % 5 {
        0 => format!("{family}:{id:03}"),
        1 => format!("{family}:+{id}"),
        2 => format!("{family}:{id}.0"),
        3 => format!("{family}: {id}"),
        _ => format!("{family}:{id}e0"),
    }
}
