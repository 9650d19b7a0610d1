//! Batches longer than the lease: an active daemon and a standby on one database (Redis backend,
//! a 1 s lease); the active daemon's write-through work takes several leases. It must keep its
//! lease while it works (no takeover, no batch applied twice), move the durable cursor to the
//! head, and the standby's `?fresh=1` read must answer the new value.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::redis::{RedisServer, redis_config};

/// The lease of both daemons (`redis_config`'s).
const LEASE: Duration = Duration::from_secs(1);

/// How long the slow `user:{id}` query is made to take: several leases.
const SLOW: Duration = Duration::from_secs(4);

/// How far the slow query must count to take about `SLOW` now: timed on this machine, under
/// its load of the moment, with the same SQLite as the daemon's (the bundled one, same build).
fn spin_for(slow: Duration) -> u64 {
    let conn = rusqlite::Connection::open_in_memory().expect("sqlite");
    let rounds = 1_000_000u64;
    let started = Instant::now();
    let counted: i64 = conn
        .query_row(
            "WITH RECURSIVE spin(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM spin WHERE n < ?1) \
             SELECT count(*) FROM spin",
            [rounds as i64],
            |row| row.get(0),
        )
        .expect("spin");
    assert_eq!(counted as u64, rounds);
    let per_round = started.elapsed().as_secs_f64() / rounds as f64;
    ((slow.as_secs_f64() / per_round) as u64).clamp(rounds, 200_000_000)
}

/// `redis_config` with `user:{id}` written through and slow on demand (a recursive CTE counting
/// to the user's `knobs.spin`, if the user has a row there; `knobs` is a table no rule watches),
/// and a `?fresh=1` timeout long enough to outwait the slow recompute.
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
        )
        .replacen("\n[tail]", "fresh_timeout = \"25s\"\n\n[tail]", 1);
    assert_eq!(slow.matches("knobs").count(), 1, "the slow query is in");
    assert!(slow.contains("keys = [\"user:{id}\"]\nstrategy"));
    assert!(
        slow.contains(
            "fresh_timeout = \"25s\"\n\n[tail]\npoll_interval = \"100ms\"\nlease = \"1s\""
        )
    );
    slow
}

/// Starts `cachetail run` on `config`, its log read line by line.
fn start(config: &Path, port: u16) -> (Daemon, Receiver<String>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cachetail"));
    command
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,cachetail=info");
    Daemon::start_logged(command, config, port)
}

fn role(daemon: &mut Daemon) -> String {
    daemon.status()["role"].as_str().unwrap_or("").to_owned()
}

/// Every line logged so far (kept in `seen`), and how many contain `what`.
fn count_logged(log: &Receiver<String>, seen: &mut Vec<String>, what: &str) -> usize {
    seen.extend(log.try_iter());
    seen.iter().filter(|line| line.contains(what)).count()
}

/// The lease row: holder and epoch.
fn lease_row(conn: &rusqlite::Connection) -> (String, i64) {
    conn.query_row(
        "SELECT holder, epoch FROM cachetail_lease WHERE name = 'main'",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .expect("the lease row")
}

fn durable_cursor(conn: &rusqlite::Connection) -> u64 {
    conn.query_row(
        "SELECT position FROM cachetail_cursor WHERE consumer = 'main'",
        [],
        |row| row.get::<_, i64>(0),
    )
    .expect("the cursor row") as u64
}

fn write_named(catalog: &Catalog, name: &str, text: &str) -> PathBuf {
    let path = catalog.path().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// An active daemon A and a standby B on one catalog (with the `knobs` table), Redis behind
/// them, both logging; the lease row as A took it.
struct Pair {
    redis: RedisServer,
    catalog: Catalog,
    a: Daemon,
    b: Daemon,
    logs: [(Receiver<String>, Vec<String>); 2],
    db: rusqlite::Connection,
    lease: (String, i64),
}

impl Pair {
    fn start() -> Pair {
        let redis = RedisServer::start();
        let catalog = Catalog::new();
        catalog.sqlite_cli("CREATE TABLE knobs (id INTEGER PRIMARY KEY, spin INTEGER NOT NULL)");
        let (port_a, port_b) = (free_port(), free_port());
        let config_a = catalog.write_config(&slow_users_config(port_a, &redis));
        let config_b = write_named(&catalog, "b.toml", &slow_users_config(port_b, &redis));
        let (mut a, log_a) = start(&config_a, port_a);
        eventually("A holds the lease", || {
            (role(&mut a) == "active").then_some(())
        });
        let (mut b, log_b) = start(&config_b, port_b);
        assert_eq!(role(&mut b), "standby");
        let db = rusqlite::Connection::open(catalog.db()).expect("open");
        assert!(a.get("user:1").text().contains("user1"));
        assert!(redis.value("user:1").is_some(), "user:1 is in Redis");
        let lease = lease_row(&db);
        Pair {
            redis,
            catalog,
            a,
            b,
            logs: [(log_a, Vec::new()), (log_b, Vec::new())],
            db,
            lease,
        }
    }

    /// Right after a commit that A's tail takes several leases to apply (ending at outbox
    /// position `head`): the standby's `?fresh=1` read of `key` answers 200 with `expected`
    /// once the durable cursor passes the commit. Returns how long it waited.
    fn fresh_on_standby(&mut self, key: &str, expected: &str) -> Duration {
        let asked = Instant::now();
        let reply = self.b.get_path(&format!("/v1/keys/{key}?fresh=1"));
        let took = asked.elapsed();
        if reply.status != 200 {
            let [(log_a, said_a), (log_b, said_b)] = &mut self.logs;
            let lease = |said: &[String]| -> Vec<String> {
                said.iter()
                    .filter(|line| line.contains("lease"))
                    .cloned()
                    .collect()
            };
            count_logged(log_a, said_a, "");
            count_logged(log_b, said_b, "");
            panic!(
                "the standby's ?fresh=1 read answered {} after {took:?}: {}\nthe lease row: {:?} (A took {:?})\nA said: {:#?}\nB said: {:#?}",
                reply.status,
                reply.text(),
                lease_row(&self.db),
                self.lease,
                lease(said_a),
                lease(said_b)
            );
        }
        assert!(
            reply.text().contains(expected),
            "the standby's ?fresh=1 read answered {}",
            reply.text()
        );
        took
    }

    /// A applied everything up to `head` under the lease it took at the start: the durable cursor
    /// is there, the lease row unchanged, the roles too, and neither daemon logged a takeover
    /// after A's first.
    fn assert_applied_without_a_takeover(&mut self, head: u64) {
        let durable = durable_cursor(&self.db);
        assert!(
            durable >= head,
            "the durable cursor is at {durable}, short of the head {head}"
        );
        assert_eq!(
            (role(&mut self.a), role(&mut self.b)),
            ("active".to_owned(), "standby".to_owned())
        );
        assert_eq!(lease_row(&self.db), self.lease, "the lease changed hands");
        let [(log_a, said_a), (log_b, said_b)] = &mut self.logs;
        assert_eq!(
            (
                count_logged(log_a, said_a, "holding the lease"),
                count_logged(log_b, said_b, "holding the lease"),
                count_logged(log_a, said_a, "lost the lease"),
            ),
            (1, 0, 0),
            "takeovers happened:\nA: {said_a:#?}\nB: {said_b:#?}"
        );
    }
}

#[test]
fn a_write_through_recompute_longer_than_the_lease_is_applied_without_a_takeover() {
    let mut pair = Pair::start();

    // user:{id} turns slow (several leases of CPU), and user 1 changes: A's tail recomputes it
    // inside one batch, in one query. The standby's fresh read waits for the durable cursor.
    let spin = spin_for(SLOW);
    pair.catalog.sqlite_cli(&format!(
        "INSERT OR REPLACE INTO knobs (id, spin) VALUES (1, {spin})"
    ));
    let head: u64 = pair
        .catalog
        .python(
            "con.execute(\"UPDATE users SET name = 'renamed' WHERE id = 1\")\n\
             print(con.execute('SELECT max(id) FROM cachetail_outbox').fetchone()[0])",
        )
        .trim()
        .parse()
        .expect("position");
    let took = pair.fresh_on_standby("user:1", "renamed");
    eprintln!(
        "a write-through recompute of several leases (lease {LEASE:?}, spin {spin}): the standby's ?fresh=1 answered after {took:?}"
    );
    assert!(
        took >= 2 * LEASE,
        "the recompute took {took:?}, not several leases of {LEASE:?}: the test proves nothing"
    );
    pair.assert_applied_without_a_takeover(head);
    assert!(
        pair.redis
            .value("user:1")
            .is_some_and(|v| v.contains("renamed")),
        "the new value is in Redis"
    );

    // Fast again: the next change is applied as usual, by A.
    pair.catalog.sqlite_cli("DELETE FROM knobs");
    pair.catalog
        .sqlite_cli("UPDATE users SET name = 'renamed again' WHERE id = 1");
    pair.fresh_on_standby("user:1", "renamed again");
    let head = pair.a.wait_caught_up()["head"].as_u64().expect("head");
    pair.assert_applied_without_a_takeover(head);
}

/// New users in one transaction: one batch of `batch_size` (10,000) write-through keys.
const USERS: u64 = 10_000;

#[test]
fn a_batch_of_many_write_through_keys_longer_than_the_lease_is_applied_without_a_takeover() {
    let mut pair = Pair::start();

    // 10,000 new users in one commit: one batch of 10,000 write-through keys, each recompute
    // short (no knobs row) and stored in Redis, the whole batch several leases long.
    let last = 100 + USERS - 1;
    let head: u64 = pair
        .catalog
        .python(&format!(
            "con.executemany('INSERT INTO users (id, name) VALUES (?, ?)', [(i, f'new {{i}}') for i in range(100, {last} + 1)])\n\
             print(con.execute('SELECT max(id) FROM cachetail_outbox').fetchone()[0])"
        ))
        .trim()
        .parse()
        .expect("position");
    let took = pair.fresh_on_standby(&format!("user:{last}"), &format!("new {last}"));
    eprintln!(
        "a batch of {USERS} write-through keys (lease {LEASE:?}): the standby's ?fresh=1 answered after {took:?}"
    );
    assert!(
        took >= 2 * LEASE,
        "the batch took {took:?}, not several leases of {LEASE:?}: the test proves nothing"
    );
    pair.assert_applied_without_a_takeover(head);
    for id in [100, 100 + USERS / 2, last] {
        assert_eq!(
            pair.redis.value(&format!("user:{id}")),
            Some(format!("{{\"id\":{id},\"name\":\"new {id}\"}}")),
            "user:{id} was written through"
        );
    }
}
