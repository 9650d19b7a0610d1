//! Commit → fresh: a writer commits, a reader polls `GET /v1/keys/book:N` until the commit shows;
//! per strategy, alone and beside an app writing flat out, and on the Redis backend beside the
//! in-process one. The baseline is a GET of a cached key by the same client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::daemons::{RedisProcess, Running};
use super::{
    BOOKS, BenchOptions, DELETE_RULE, Row, config_for, config_with, fresh_catalog, human, ms,
    percentile,
};
use crate::client::Client;
use crate::demo::Rng;

/// Commits reviews at about 1,000/s; after each, polls `GET /v1/keys/book:N` until the new
/// count (or a later one) shows. Returns sorted latencies.
fn measure_fresh(running: &Running, db: &Path, commits: u32) -> anyhow::Result<Vec<Duration>> {
    let mut conn = Connection::open(db)?;
    // Beside an app writing flat out, SQLite's default busy handler (sleeps growing to 100 ms)
    // would spend most of the run waiting for a gap; looking every 100 µs takes the next one.
    // The clock starts after the commit either way.
    conn.busy_handler(Some(|attempt| {
        std::thread::sleep(Duration::from_micros(100));
        attempt < 50_000
    }))?;
    let mut client = Client::new(running.address);
    let mut rng = Rng::new(11);
    let mut latencies = Vec::with_capacity(commits as usize);
    let pace = Duration::from_millis(1);
    for _ in 0..commits {
        let began = Instant::now();
        let book = rng.pick(BOOKS);
        let path = format!("/v1/keys/book:{book}");
        client.get(&path)?; // cached before the write, as in a warm cache
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO reviews (book_id, user_id, rating) VALUES (?1, 1, 4)",
            [book],
        )?;
        let expected: i64 = tx.query_row(
            "SELECT count(*) FROM reviews WHERE book_id = ?1",
            [book],
            |r| r.get(0),
        )?;
        tx.commit()?;
        let committed = Instant::now();
        loop {
            let reply = client.get(&path)?;
            // At least: a writer beside this one may have added more since.
            if reply.json()?["review_count"]
                .as_i64()
                .is_some_and(|count| count >= expected)
            {
                latencies.push(committed.elapsed());
                break;
            }
            anyhow::ensure!(
                committed.elapsed() < Duration::from_secs(10),
                "book:{book} never became fresh"
            );
        }
        std::thread::sleep(pace.saturating_sub(began.elapsed()));
    }
    latencies.sort();
    Ok(latencies)
}

/// The floor's parts and their sum, for the baseline column.
fn floor_text(floor: &super::floor::Floor, hits: &[Duration]) -> String {
    let poll = percentile(hits, 0.5) / 2;
    format!(
        "; the floor: a bare watcher's wake-up and read p50 {} · p99 {}, the recompute's query p50 {} · p99 {}, half a cached GET {}: p50 {} · p99 {}",
        ms(percentile(&floor.wake_and_read, 0.5)),
        ms(percentile(&floor.wake_and_read, 0.99)),
        ms(percentile(&floor.query, 0.5)),
        ms(percentile(&floor.query, 0.99)),
        ms(poll),
        ms(floor.sum(0.5, poll)),
        ms(floor.sum(0.99, poll))
    )
}

/// Sorted latencies of `count` GETs of one cached key, one client, keep-alive.
fn cached_gets(running: &Running, count: usize) -> anyhow::Result<Vec<Duration>> {
    let mut client = Client::new(running.address);
    client.get("/v1/keys/book:1")?;
    let mut hits: Vec<Duration> = (0..count)
        .map(|_| {
            let t = Instant::now();
            let _ = client.get("/v1/keys/book:1");
            t.elapsed()
        })
        .collect();
    hits.sort();
    Ok(hits)
}

/// The app writing flat out beside a measurement: 100-row transactions into `reviews` from its
/// own connection (on a thread of its own) until `stop`. Returns rows/s.
fn writer_beside(
    db: PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<f64>> {
    std::thread::spawn(move || super::app_writes(&db, 5, || stop.load(Ordering::Relaxed)))
}

pub(super) fn commit_to_fresh(options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    let commits = if options.quick { 300 } else { 10_000 };
    let busy_commits = if options.quick { 100 } else { 2_000 };
    let mut rows = Vec::new();
    for strategy in ["write-through", "delete", "write-behind"] {
        let db_name = format!("fresh-{strategy}.db");
        let db = options.dir.join(&db_name);
        fresh_catalog(&db, 20_000)?;
        let rule =
            format!("{DELETE_RULE}strategy = \"{strategy}\"\n[write_behind]\ndelay = \"1ms\"\n");
        let running = Running::start(config_for(&options.dir, &db_name, &rule)?)?;
        // Baseline: the same client's round trip for a cached key.
        let hits = cached_gets(&running, 2_000)?;
        let measuring = Instant::now();
        let alone = measure_fresh(&running, &db, commits)?;
        let alone_took = measuring.elapsed();
        // The floor, with the daemon running beside the watcher as in the measurement.
        let floor = if strategy == "write-through" {
            Some(super::floor::measure(&db, commits.min(2_000))?)
        } else {
            None
        };
        let busy_began = Instant::now();
        // The same while the app writes flat out beside it, measured meanwhile.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = writer_beside(db.clone(), Arc::clone(&stop));
        let busy = measure_fresh(&running, &db, busy_commits);
        stop.store(true, Ordering::Relaxed);
        let writes = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        let busy = busy?;
        let busy_took = busy_began.elapsed();
        drop(running);
        let (p50, p99) = (percentile(&alone, 0.5), percentile(&alone, 0.99));
        let (busy_p50, busy_p99) = (percentile(&busy, 0.5), percentile(&busy, 0.99));
        let hit_p50 = percentile(&hits, 0.5).as_secs_f64().max(1e-9);
        eprintln!(
            "commit→fresh ({strategy}): p50 {p50:?} p99 {p99:?}; with a writer beside it ({writes:.0} rows/s meanwhile): p50 {busy_p50:?} p99 {busy_p99:?} (took {alone_took:?}, then {busy_took:?})"
        );
        rows.push(Row {
            figure: format!(
                "commit → fresh, {strategy}, {commits} commits at ≤1k/s (reader polls GET book:N); then {busy_commits} more while the app writes flat out (100-row transactions) beside it"
            ),
            measured: format!(
                "p50 {} · p99 {}; with the app writing meanwhile: p50 {} · p99 {}, the app writing {} rows/s meanwhile",
                ms(p50),
                ms(p99),
                ms(busy_p50),
                ms(busy_p99),
                human(writes)
            ),
            baseline: format!(
                "GET of a cached key: p50 {} · p99 {}{}",
                ms(percentile(&hits, 0.5)),
                ms(percentile(&hits, 0.99)),
                floor.as_ref().map_or_else(String::new, |f| floor_text(f, &hits))
            ),
            ratio: format!(
                "p50 {:.1}× a cached GET; {:.1}× with the app writing{}",
                p50.as_secs_f64() / hit_p50,
                busy_p50.as_secs_f64() / hit_p50,
                floor.as_ref().map_or_else(String::new, |f| {
                    let poll = percentile(&hits, 0.5) / 2;
                    format!(
                        "; p50 {:.2}×, p99 {:.2}× the floor",
                        p50.as_secs_f64() / f.sum(0.5, poll).as_secs_f64().max(1e-9),
                        p99.as_secs_f64() / f.sum(0.99, poll).as_secs_f64().max(1e-9)
                    )
                })
            ),
            target: if strategy == "write-through" {
                "p50 ≤ 0.25 ms, p99 ≤ 1 ms"
            } else {
                "state it"
            },
        });
    }
    Ok(rows)
}

/// Commit → fresh (write-through) and cached GETs with values in Redis, beside the same with
/// values in memory, in one run.
pub(super) fn redis_backend(options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    let Some(redis) = RedisProcess::start()? else {
        eprintln!("redis: redis-server not found (apt-get install -y redis-server); skipped");
        return Ok(Vec::new());
    };
    let commits = if options.quick { 300 } else { 5_000 };
    let rule = format!("{DELETE_RULE}strategy = \"write-through\"\n");
    let mut results = Vec::new();
    for backend in ["memory", "redis"] {
        let db_name = format!("backend-{backend}.db");
        let db = options.dir.join(&db_name);
        fresh_catalog(&db, 20_000)?;
        let cache = if backend == "redis" {
            format!(
                "backend = \"redis\"\nurl = \"redis://127.0.0.1:{}/0\"\nprefix = \"bench:\"",
                redis.port
            )
        } else {
            String::new()
        };
        let running = Running::start(config_with(&options.dir, &db_name, &cache, &rule)?)?;
        let hits = cached_gets(&running, 5_000)?;
        let latencies = measure_fresh(&running, &db, commits)?;
        drop(running);
        eprintln!(
            "{backend}: commit→fresh p50 {:?} p99 {:?}; cached GET p50 {:?}",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            percentile(&hits, 0.5)
        );
        results.push((latencies, hits));
    }
    let [(mem_fresh, mem_hits), (redis_fresh, redis_hits)] =
        <[_; 2]>::try_from(results).map_err(|_| anyhow::anyhow!("two backends measured"))?;
    let ratio = |a: &[Duration], b: &[Duration], p: f64| {
        percentile(a, p).as_secs_f64() / percentile(b, p).as_secs_f64().max(1e-9)
    };
    Ok(vec![
        Row {
            figure: format!(
                "commit → fresh, write-through, Redis backend, {commits} commits at ≤1k/s"
            ),
            measured: format!(
                "p50 {} · p99 {}",
                ms(percentile(&redis_fresh, 0.5)),
                ms(percentile(&redis_fresh, 0.99))
            ),
            baseline: format!(
                "in-process backend: p50 {} · p99 {}",
                ms(percentile(&mem_fresh, 0.5)),
                ms(percentile(&mem_fresh, 0.99))
            ),
            ratio: format!(
                "p50 {:.2}×, p99 {:.2}×",
                ratio(&redis_fresh, &mem_fresh, 0.5),
                ratio(&redis_fresh, &mem_fresh, 0.99)
            ),
            target: "state it",
        },
        Row {
            figure: "GET of a cached key, one client, Redis backend".to_owned(),
            measured: format!(
                "p50 {} · p99 {}",
                ms(percentile(&redis_hits, 0.5)),
                ms(percentile(&redis_hits, 0.99))
            ),
            baseline: format!(
                "in-process backend: p50 {} · p99 {}",
                ms(percentile(&mem_hits, 0.5)),
                ms(percentile(&mem_hits, 0.99))
            ),
            ratio: format!("p50 {:.2}×", ratio(&redis_hits, &mem_hits, 0.5)),
            target: "state it",
        },
    ])
}
