//! Starting while what the daemon depends on is not there yet.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::redis::{RedisServer, redis_config};

/// The lease's epoch: it rises at each takeover (each try to start applying).
fn lease_epoch(catalog: &Catalog) -> u64 {
    let text = catalog.sqlite_cli("SELECT coalesce(max(epoch), 0) FROM cachetail_lease");
    text.trim().parse().expect("the lease's epoch")
}

#[test]
fn with_redis_down_at_start_the_daemon_backs_off_instead_of_spinning_and_starts_once_it_is_back() {
    let mut redis = RedisServer::start();
    redis.kill();
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &redis_config(port, &redis, "delete"), port);
    // Each try takes the lease, finds Redis down and lets the lease go; the try writes to the
    // database, and that write must not cut the wait before the next try short.
    let first = lease_epoch(&catalog);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(3)); // the span over which tries are counted
    let tries = lease_epoch(&catalog) - first;
    assert!(
        tries <= 15,
        "{tries} tries to start applying in {:?} with Redis down: it spins instead of backing off",
        started.elapsed()
    );
    assert_eq!(
        daemon.status()["role"],
        "standby",
        "not applying without Redis"
    );

    redis.restart();
    let back = Instant::now();
    eventually("the daemon applies once Redis is back", || {
        (daemon.status()["role"] == "active").then_some(())
    });
    eprintln!(
        "{tries} tries in 3 s with Redis down; active {:?} after Redis came back",
        back.elapsed()
    );
}
