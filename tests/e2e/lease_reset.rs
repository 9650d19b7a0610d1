//! A lease row deleted or reset (by hand, or by `cachetail uninstall` + `install` while daemons
//! run) on the Redis backend: the next holder starts again at epoch 1 while Redis remembers a
//! higher epoch. The daemon must keep applying (it takes an epoch above every one Redis has
//! seen), nothing is served stale, and the epoch Redis holds never goes backwards.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::redis::{RedisServer, redis_config};

const PREFIX: &str = "ct:";

/// How long a change may take to become visible through `?fresh=1` after the lease row was
/// reset. The lease is 1 s; a daemon stuck behind Redis's epoch climbs it one lease expiry at a
/// time, so with Redis at epoch 41 it would take 40 s.
const RECOVERY: Duration = Duration::from_secs(6);

/// The epoch `#state` holds in Redis (0: none).
fn redis_epoch(redis: &RedisServer) -> i64 {
    redis
        .cli(&["HGET", &format!("{PREFIX}#state"), "epoch"])
        .parse()
        .unwrap_or(0)
}

/// Samples the epoch Redis holds every few milliseconds until dropped, and remembers the first
/// time it went down.
struct EpochWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<String>>>,
}

impl EpochWatch {
    fn start(port: u16) -> EpochWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            let mut highest = 0i64;
            while !stopping.load(Ordering::Relaxed) {
                let epoch = hget_epoch(&mut conn)?;
                if epoch < highest {
                    return Some(format!("redis's epoch went from {highest} down to {epoch}"));
                }
                highest = epoch;
                std::thread::sleep(Duration::from_millis(2));
            }
            None
        });
        EpochWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; fails the test if the epoch ever went down.
    fn assert_never_went_down(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let found = self.thread.take().and_then(|t| t.join().expect("sampler"));
        assert!(found.is_none(), "{}", found.unwrap_or_default());
    }
}

/// `HGET ct:#state epoch` over a plain RESP connection (redis-cli would be too slow to sample).
fn hget_epoch(conn: &mut std::net::TcpStream) -> Option<i64> {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let key = format!("{PREFIX}#state");
    let command = format!(
        "*3\r\n$4\r\nHGET\r\n${}\r\n{key}\r\n$5\r\nepoch\r\n",
        key.len()
    );
    conn.write_all(command.as_bytes()).ok()?;
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut header = String::new();
    reader.read_line(&mut header).ok()?;
    let length: i64 = header.trim().strip_prefix('$')?.parse().ok()?;
    if length < 0 {
        return Some(0);
    }
    let mut body = vec![0; usize::try_from(length).ok()? + 2];
    reader.read_exact(&mut body).ok()?;
    String::from_utf8_lossy(&body[..body.len() - 2])
        .parse()
        .ok()
}

fn review_count(text: &str) -> i64 {
    serde_json::from_str::<Value>(text).expect("JSON")["review_count"]
        .as_i64()
        .expect("review_count")
}

/// Adds a review of book 1 and waits (at most `limit`) until `daemon` answers it through
/// `?fresh=1`. Returns how long that took.
fn new_review_is_fresh_within(
    catalog: &Catalog,
    daemon: &mut Daemon,
    limit: Duration,
    what: &str,
) -> Duration {
    let before = review_count(&daemon.get_uncached("book:1").text());
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    let start = Instant::now();
    loop {
        let reply = daemon.get_path("/v1/keys/book:1?fresh=1");
        if reply.status == 200 && review_count(&reply.text()) == before + 1 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what}: the new review was not visible through ?fresh=1 within {limit:?} (last answer: {} {})",
            reply.status,
            reply.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every key, through the daemon (cached or filled), equals the database's value.
fn assert_nothing_stale(daemon: &mut Daemon) -> usize {
    let keys = [
        "book:1",
        "book:2",
        "book:3",
        "top-books",
        "user:1",
        "user:2",
    ];
    for _ in 0..2 {
        for key in keys {
            let cached = daemon.get(key);
            let fresh = daemon.get_uncached(key);
            assert_eq!(
                (cached.status, cached.text()),
                (fresh.status, fresh.text()),
                "{key} was served stale ({})",
                x_cache(&cached)
            );
        }
    }
    keys.len() * 2
}

/// Waits until a daemon took the lease again (the row is back), so the change that follows is
/// applied by the new holder, not by the old one before its renewal noticed.
fn wait_lease_taken_again(catalog: &Catalog) {
    eventually("a daemon takes the lease again", || {
        (catalog.sqlite_cli("SELECT count(*) FROM cachetail_lease") == "1").then_some(())
    });
}

fn role(daemon: &mut Daemon) -> String {
    daemon.status()["role"].as_str().unwrap_or("").to_owned()
}

/// A daemon on Redis whose lease row says epoch `epoch`: the row is set while it is stopped (a
/// history of that many takeovers), then it starts, takes `epoch + 1`, and applies a change, so
/// Redis holds `epoch + 1`.
fn active_at_a_high_epoch(catalog: &Catalog, redis: &RedisServer, port: u16) -> (Daemon, PathBuf) {
    let config = catalog.write_config(&redis_config(port, redis, "delete"));
    let mut daemon = Daemon::start_existing(&config, port);
    eventually("the daemon holds the lease", || {
        (role(&mut daemon) == "active").then_some(())
    });
    daemon.stop();
    catalog.sqlite_cli("UPDATE cachetail_lease SET epoch = 40");
    let mut daemon = Daemon::start_existing(&config, port);
    eventually("the daemon holds the lease", || {
        (role(&mut daemon) == "active").then_some(())
    });
    assert_eq!(daemon.get("book:1").status, 200);
    new_review_is_fresh_within(catalog, &mut daemon, RECOVERY, "before the reset");
    assert_eq!(redis_epoch(redis), 41, "redis records the holder's epoch");
    (daemon, config)
}

#[test]
fn a_lease_row_deleted_by_hand_does_not_stop_the_daemon_on_redis() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let (mut daemon, config) = active_at_a_high_epoch(&catalog, &redis, port);
    let watch = EpochWatch::start(redis.port);

    // While it runs: its next renewal finds no row, so it takes the lease again, at epoch 1.
    catalog.sqlite_cli("DELETE FROM cachetail_lease");
    wait_lease_taken_again(&catalog);
    let took = new_review_is_fresh_within(
        &catalog,
        &mut daemon,
        RECOVERY,
        "the lease row deleted while the daemon runs",
    );
    eprintln!("after DELETE FROM cachetail_lease (running): fresh in {took:?}");
    assert!(assert_nothing_stale(&mut daemon) > 0);

    // Stopped, the row deleted, started again: it takes the lease at epoch 1.
    daemon.stop();
    catalog.sqlite_cli("DELETE FROM cachetail_lease");
    let mut daemon = Daemon::start_existing(&config, port);
    let took = new_review_is_fresh_within(
        &catalog,
        &mut daemon,
        RECOVERY,
        "the lease row deleted, the daemon restarted",
    );
    eprintln!("after DELETE FROM cachetail_lease (restart): fresh in {took:?}");
    assert!(assert_nothing_stale(&mut daemon) > 0);
    let epoch = redis_epoch(&redis);
    let row: i64 = catalog
        .sqlite_cli("SELECT epoch FROM cachetail_lease")
        .parse()
        .expect("the lease row's epoch");
    assert!(
        row > 41 && row == epoch,
        "the holder's epoch ({row}) is above every one redis saw before, and redis holds it ({epoch})"
    );
    watch.assert_never_went_down();
}

#[test]
fn uninstall_and_install_while_daemons_run_on_redis_do_not_stop_them() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let (port_a, port_b) = (free_port(), free_port());
    let (mut a, config) = active_at_a_high_epoch(&catalog, &redis, port_a);
    let config_b = catalog.path().join("b.toml");
    std::fs::write(&config_b, redis_config(port_b, &redis, "delete")).expect("write b.toml");
    let mut b = Daemon::start_existing(&config_b, port_b);
    assert_eq!(role(&mut b), "standby");
    let watch = EpochWatch::start(redis.port);

    // Through the binary, while both run: the tables (the lease row among them) are dropped and
    // created again.
    cli_ok("uninstall", &config);
    cli_ok("install", &config);
    wait_lease_taken_again(&catalog);
    let took = new_review_is_fresh_within(&catalog, &mut a, RECOVERY, "uninstall + install (A)");
    eprintln!("after uninstall + install: fresh through A in {took:?}");
    new_review_is_fresh_within(&catalog, &mut b, RECOVERY, "uninstall + install (B)");
    let roles = [role(&mut a), role(&mut b)];
    assert!(
        roles.contains(&"active".to_owned()) && roles.contains(&"standby".to_owned()),
        "exactly one applies: {roles:?}"
    );
    assert!(assert_nothing_stale(&mut a) > 0);
    assert!(assert_nothing_stale(&mut b) > 0);
    watch.assert_never_went_down();
}
