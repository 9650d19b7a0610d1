//! Drain: a backlog of outbox rows written while no daemon ran, then the daemon started on it
//! and timed until `/v1/status` reports it applied everything; beside a bare sequential read of
//! the same rows, taken just before and just after the drain (the machine is shared: the faster
//! of the two is the limit the drain is held to).

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::daemons::Running;
use super::{BOOKS, BenchOptions, DELETE_RULE, Row, config_for, fresh_catalog, human, rate};

pub(super) fn drain(options: &BenchOptions) -> anyhow::Result<Row> {
    let events: u32 = if options.quick { 100_000 } else { 1_000_000 };
    let db = options.dir.join("drain.db");
    fresh_catalog(&db, 0)?;
    let config = config_for(&options.dir, "drain.db", DELETE_RULE)?;
    // Capture installed, nothing applying: the app's writes pile up in the outbox.
    cachetail::prepare(&config)?;
    let head = write_backlog(&db, events)?;
    let read_before = bare_read(&db)?;

    // The daemon started on the backlog, polled (about every millisecond) until its cursor is
    // the head. From the start: opening, checking and the lease are part of the drain.
    let start = Instant::now();
    let mut running = Running::start(config)?;
    let serving = start.elapsed();
    loop {
        let status = running.status()?;
        if status["cursor"]
            .as_u64()
            .is_some_and(|cursor| cursor >= head)
        {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "the daemon did not drain {head} events within 10 minutes: {status}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let drained = start.elapsed();
    let drain_rate = rate(head, drained);
    // Then the housekeeping the daemon does once idle: deleting the applied rows (all but the
    // one at the cursor).
    let pruned = wait_pruned(&db, head)?;
    drop(running);
    // The rows are gone now (pruned): the same backlog written again, read bare again.
    fresh_catalog(&db, 0)?;
    cachetail::prepare(&config_for(&options.dir, "drain.db", DELETE_RULE)?)?;
    write_backlog(&db, events)?;
    let read_after = bare_read(&db)?;
    let read_rate = read_before.max(read_after);
    eprintln!(
        "drain: {head} events in {drained:?} ({drain_rate:.0}/s; serving after {serving:?}); bare read {read_before:.0} rows/s before, {read_after:.0} after; the outbox pruned {pruned:?} after"
    );
    Ok(Row {
        figure: format!(
            "drain: {} outbox rows over 1k keys, delete strategy, applied end to end (read, decoded, mapped, invalidated, cursor written), from the daemon's start until `/v1/status` shows the cursor at the head",
            human(f64::from(events))
        ),
        measured: format!(
            "{} events/s; the applied rows pruned (when idle) {:.0} ms later",
            human(drain_rate),
            pruned.as_secs_f64() * 1e3
        ),
        baseline: format!(
            "bare sequential read of the same rows (every column the daemon reads, borrowed, text checked as UTF-8), the faster of one just before and one just after: {} rows/s ({} and {})",
            human(read_rate),
            human(read_before),
            human(read_after)
        ),
        ratio: format!("{:.2}× the bare read", drain_rate / read_rate),
        target: "≥ 0.6× the bare read",
    })
}

/// The backlog: `events` app writes over 1,000 distinct keys, in one transaction, while no
/// daemon runs. Returns the outbox head.
fn write_backlog(db: &Path, events: u32) -> anyhow::Result<u64> {
    let mut conn = Connection::open(db)?;
    let tx = conn.transaction()?;
    {
        let mut insert =
            tx.prepare("INSERT INTO reviews (book_id, user_id, rating) VALUES (?1, 1, 3)")?;
        for i in 0..events {
            insert.execute([i64::from(i % BOOKS) + 1])?;
        }
    }
    tx.commit()?;
    let head: i64 = conn.query_row("SELECT max(id) FROM cachetail_outbox", [], |r| r.get(0))?;
    Ok(u64::try_from(head)?)
}

/// The baseline: a bare sequential read of the outbox rows with rusqlite, with the daemon's
/// reading settings (a memory-mapped file), touching every column the daemon reads as cheaply as
/// it can be touched: each value borrowed from SQLite's buffers, the text checked as UTF-8 (as
/// the daemon must), nothing copied. Returns rows/s.
fn bare_read(db: &Path) -> anyhow::Result<f64> {
    use rusqlite::types::ValueRef;
    let start = Instant::now();
    let mut read = 0u64;
    let mut touched = 0u64;
    let conn = Connection::open(db)?;
    conn.pragma_update(None, "mmap_size", 256 * 1024 * 1024)?;
    let mut stmt =
        conn.prepare("SELECT id, capture, op, old, new, at FROM cachetail_outbox ORDER BY id")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        for column in 0..6 {
            touched = touched.wrapping_add(match row.get_ref(column)? {
                ValueRef::Integer(i) => i as u64,
                ValueRef::Real(r) => r.to_bits(),
                ValueRef::Text(text) => std::str::from_utf8(text).map_or(0, |t| t.len() as u64),
                ValueRef::Blob(blob) => blob.len() as u64,
                ValueRef::Null => 1,
            });
        }
        read += 1;
    }
    std::hint::black_box(touched);
    Ok(rate(read, start.elapsed()))
}

/// Waits until only the row at the cursor is left in the outbox; returns how long that took.
fn wait_pruned(db: &Path, head: u64) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let conn = Connection::open(db)?;
    let mut oldest = conn.prepare("SELECT coalesce(min(id), 0) FROM cachetail_outbox")?;
    while oldest.query_row([], |r| r.get::<_, i64>(0))? < i64::try_from(head)? {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "the outbox was not pruned within a minute of the drain"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(start.elapsed())
}
