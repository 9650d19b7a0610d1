//! The app is never hurt: a writer with a normal 5 s busy timeout never gets SQLITE_BUSY because
//! of the daemon, and the outbox and the `-wal` file stay bounded under a sustained write load.
//! Also prints the writer's commit latency with and without the daemon (a figure, not a target).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::*;
use crate::strategies::catalog_config;

const COMMITS: usize = 10_000;

/// Runs a python writer: COMMITS single-review transactions; returns (busy errors, p50 µs, p99 µs).
fn write_load(catalog: &Catalog) -> (u64, f64, f64) {
    let out = catalog.python(&format!(
        "import time\n\
         busy = 0\n\
         lat = []\n\
         for i in range({COMMITS}):\n\
         \x20   t = time.perf_counter()\n\
         \x20   try:\n\
         \x20       con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, 3)', (i % 5 + 1,))\n\
         \x20       con.commit()\n\
         \x20   except sqlite3.OperationalError as e:\n\
         \x20       busy += 1\n\
         \x20       con.rollback()\n\
         \x20   lat.append(time.perf_counter() - t)\n\
         lat.sort()\n\
         print(busy, lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6)"
    ));
    let fields: Vec<f64> = out
        .split_whitespace()
        .map(|f| f.parse().expect("a number"))
        .collect();
    (fields[0] as u64, fields[1], fields[2])
}

#[test]
fn a_sustained_writer_never_gets_busy_and_the_outbox_and_wal_stay_bounded() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog.write_config(&catalog_config(port, "delete", "50ms"));
    // Capture installed in both runs: the difference measured is the running daemon's.
    let installed = std::process::Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["install", "--config"])
        .arg(&config)
        .output()
        .expect("install");
    assert!(installed.status.success());
    let (busy_without, p50_without, p99_without) = write_load(&catalog);

    let mut daemon = Daemon::start_existing(&config, port);
    daemon.wait_caught_up();
    wait_persisted(&catalog.db());
    let sampling = Arc::new(AtomicBool::new(true));
    let max_outbox = Arc::new(AtomicU64::new(0));
    let max_wal = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (sampling, max_outbox, max_wal, db) = (
            Arc::clone(&sampling),
            Arc::clone(&max_outbox),
            Arc::clone(&max_wal),
            catalog.db(),
        );
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .expect("reader");
            let wal = db.with_extension("db-wal");
            while sampling.load(Ordering::Acquire) {
                let rows: i64 = conn
                    .query_row("SELECT count(*) FROM cachetail_outbox", [], |r| r.get(0))
                    .unwrap_or(0);
                let rows = rows as u64;
                max_outbox.fetch_max(rows, Ordering::Relaxed);
                max_wal.fetch_max(
                    std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0),
                    Ordering::Relaxed,
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // First the daemon alone (applying the writer's changes), then with readers too.
    let (busy_alone, p50_alone, p99_alone) = write_load(&catalog);
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let (reading, address) = (Arc::clone(&reading), daemon.address);
        std::thread::spawn(move || {
            let mut client = cachetail::client::Client::new(address);
            let mut n = 0u64;
            while reading.load(Ordering::Acquire) {
                n += 1;
                let _ = client.get(&format!("/v1/keys/book:{}", n % 5 + 1));
                // A steady read load (about 1,000/s), not a CPU hog on a 2-core machine.
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let (busy_with, p50_with, p99_with) = write_load(&catalog);
    reading.store(false, Ordering::Release);
    reader.join().expect("reader");
    daemon.wait_caught_up();
    sampling.store(false, Ordering::Release);
    sampler.join().expect("sampler");

    let (outbox, wal) = (
        max_outbox.load(Ordering::Relaxed),
        max_wal.load(Ordering::Relaxed),
    );
    eprintln!(
        "app writer, {COMMITS} commits each: p50/p99 {p50_without:.0}/{p99_without:.0}µs without the daemon, \
         {p50_alone:.0}/{p99_alone:.0}µs with it applying (p99 ratio {:.2}), \
         {p50_with:.0}/{p99_with:.0}µs with it applying and serving ~1,000 reads/s (p99 ratio {:.2}); \
         outbox peaked at {outbox} rows, -wal at {} KiB",
        p99_alone / p99_without,
        p99_with / p99_without,
        wal / 1024
    );
    assert_eq!(busy_alone, 0, "SQLITE_BUSY reached the app's writer");
    assert_eq!(busy_without, 0);
    assert_eq!(busy_with, 0, "SQLITE_BUSY reached the app's writer");
    assert!(
        outbox < 5_000,
        "the outbox grew to {outbox} rows while the daemon kept up"
    );
    assert!(wal < 64 * 1024 * 1024, "the -wal file grew to {wal} bytes");
    wait_persisted(&catalog.db());
}
