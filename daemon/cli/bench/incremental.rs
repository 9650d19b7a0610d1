//! Aggregates kept fresh incrementally (issue 17): the reference config's costly values
//! (`top-books`, `catalog-stats`, `leaderboard:most-reviewed`, and `book:{id}`) written through
//! with `maintain = "incremental"`, on a catalog of 1M reviews over 10k books. Measured: what a
//! maintained value costs per review change (the family's mean compute time in `/v1/status`)
//! beside its full query's run time, commit → fresh of `top-books` (a review committed, then
//! `?fresh=1`), the app's write rate beside the same daemon with those keys on the delete
//! strategy (rounds alternating), and the state each family keeps.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};

use super::daemons::Running;
use super::{BenchOptions, Row, Spread, ms, percentile, rounds_text};
use crate::client::Client;
use crate::demo::Rng;

const QUERIES: [(&str, &str, bool); 4] = [
    (
        "top-books",
        "SELECT b.id, b.title, round(avg(r.rating), 2) AS avg_rating, count(r.id) AS review_count FROM books b JOIN reviews r ON r.book_id = b.id GROUP BY b.id HAVING count(r.id) >= 3 ORDER BY avg_rating DESC, review_count DESC, b.id LIMIT 10",
        true,
    ),
    (
        "catalog-stats",
        "SELECT (SELECT count(*) FROM books) AS books, (SELECT count(*) FROM users) AS users, (SELECT count(*) FROM reviews) AS reviews, (SELECT round(avg(rating), 3) FROM reviews) AS avg_rating",
        false,
    ),
    (
        "leaderboard:most-reviewed",
        "SELECT u.id, u.name, count(r.id) AS reviews FROM users u JOIN reviews r ON r.user_id = u.id GROUP BY u.id ORDER BY reviews DESC, u.id LIMIT 10",
        true,
    ),
    (
        "book:{id}",
        "SELECT b.id, b.title, round(avg(r.rating), 2) AS avg_rating, count(r.id) AS review_count FROM books b LEFT JOIN reviews r ON r.book_id = b.id WHERE b.id = :id GROUP BY b.id",
        false,
    ),
];

/// Keys with a placeholder (`book:{id}`) are not read as they are.
const PLACEHOLDER: char = '{';

struct Sizes {
    books: u32,
    users: u32,
    reviews: u32,
}

pub(super) fn incremental(options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    let sizes = match options.quick {
        true => Sizes {
            books: 1_000,
            users: 100,
            reviews: 20_000,
        },
        false => Sizes {
            books: 10_000,
            users: 1_000,
            reviews: 1_000_000,
        },
    };
    let db_name = "incremental.db";
    let db = options.dir.join(db_name);
    let full = build_catalog(&db, &sizes)?;
    let commits = if options.quick { 100 } else { 1_000 };
    let mut running = Running::start(config(&options.dir, db_name, "write-through", true)?)?;
    let mut client = Client::new(running.address);
    for (key, _, _) in QUERIES.iter().filter(|(k, _, _)| !k.contains(PLACEHOLDER)) {
        client.get(&format!("/v1/keys/{key}"))?;
    }
    let fresh = commit_to_fresh(&running, &db, &sizes, commits)?;
    let status = running.status()?;
    drop(running);
    let (cost, state) = per_family(&status);
    let writing = if options.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(4)
    };
    let rounds = if options.quick { 1 } else { 3 };
    let (mut incremental, mut delete) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        incremental.push(app_rate(
            options,
            db_name,
            &sizes,
            "write-through",
            writing,
        )?);
        delete.push(app_rate(options, db_name, &sizes, "delete", writing)?);
    }
    let ratios = Spread::of(
        incremental
            .iter()
            .zip(&delete)
            .map(|(i, d)| i / d)
            .collect(),
    );
    let (incremental, delete) = (Spread::of(incremental), Spread::of(delete));
    let scale = format!("{} reviews over {} books", sizes.reviews, sizes.books);
    Ok(vec![
        Row {
            figure: format!(
                "incremental aggregates: apply cost per review change, write-through ({scale}; mean over {commits} single-review commits)"
            ),
            measured: cost,
            baseline: format!("the full queries, same database: {full}"),
            ratio: "see each family".to_owned(),
            target: "≤ 1 ms per change",
        },
        Row {
            figure: format!(
                "incremental aggregates: commit → fresh of `top-books` ({scale}; a review committed, then `GET top-books?fresh=1`)"
            ),
            measured: format!(
                "p50 {} · p99 {}",
                ms(percentile(&fresh, 0.5)),
                ms(percentile(&fresh, 0.99))
            ),
            baseline: state,
            ratio: String::new(),
            target: "p50 ≤ 1 ms",
        },
        Row {
            figure: format!(
                "incremental aggregates: the app writing flat out (100-row transactions, {:.0} s) with the four keys written through incrementally ({})",
                writing.as_secs_f64(),
                rounds_text(rounds)
            ),
            measured: format!("{} rows/s", incremental.rate()),
            baseline: format!(
                "the same keys on delete, rounds alternating: {} rows/s",
                delete.rate()
            ),
            ratio: format!("{} the delete strategy's rate", ratios.times()),
            target: "≥ 0.8× the delete strategy's rate",
        },
    ])
}

/// The catalog: `books`, `users`, `reviews` (random books, users, ratings 1–5). Returns the
/// full aggregate queries' run times on it (median of 3), as text.
fn build_catalog(db: &Path, sizes: &Sizes) -> anyhow::Result<String> {
    let mut conn = crate::demo::empty_catalog(db)?;
    let tx = conn.transaction()?;
    {
        let mut book = tx.prepare("INSERT INTO books (id, title, author) VALUES (?1, ?2, 'A')")?;
        for id in 1..=sizes.books {
            book.execute(params![id, format!("Book {id}")])?;
        }
        let mut user = tx.prepare("INSERT INTO users (id, name) VALUES (?1, ?2)")?;
        for id in 1..=sizes.users {
            user.execute(params![id, format!("user {id}")])?;
        }
        let mut review =
            tx.prepare("INSERT INTO reviews (book_id, user_id, rating) VALUES (?1, ?2, ?3)")?;
        let mut rng = Rng::new(3);
        for _ in 0..sizes.reviews {
            review.execute(params![
                rng.pick(sizes.books),
                rng.pick(sizes.users),
                rng.pick(5)
            ])?;
        }
    }
    tx.commit()?;
    let mut times = Vec::new();
    for (key, query, _) in QUERIES.iter().filter(|(k, _, _)| !k.contains(PLACEHOLDER)) {
        let mut runs: Vec<Duration> = Vec::new();
        for _ in 0..3 {
            let began = Instant::now();
            let mut stmt = conn.prepare_cached(query)?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
            runs.push(began.elapsed());
        }
        runs.sort();
        times.push(format!("{key} {}", ms(runs[1])));
    }
    Ok(times.join(", "))
}

fn config(
    dir: &Path,
    db: &str,
    strategy: &str,
    maintained: bool,
) -> anyhow::Result<cachetail::Config> {
    let maintain = if maintained {
        "maintain = \"incremental\"\n"
    } else {
        ""
    };
    let mut text = format!(
        "database = \"{db}\"\nlisten = \"127.0.0.1:0\"\n[tail]\npoll_interval = \"50ms\"\n"
    );
    for (key, query, many) in QUERIES {
        text.push_str(&format!(
            "[keys.\"{key}\"]\nquery = \"{query}\"\nmany = {many}\n{maintain}"
        ));
    }
    text.push_str(&format!(
        "[[rules]]\ntable = \"reviews\"\nkeys = [\"book:{{book_id}}\", \"top-books\", \"catalog-stats\", \"leaderboard:most-reviewed\"]\nstrategy = \"{strategy}\"\n\
         [[rules]]\ntable = \"books\"\nkeys = [\"book:{{id}}\", \"top-books\", \"catalog-stats\"]\nstrategy = \"{strategy}\"\n\
         [[rules]]\ntable = \"users\"\nkeys = [\"leaderboard:most-reviewed\", \"catalog-stats\"]\nstrategy = \"{strategy}\"\n"
    ));
    Ok(cachetail::Config::parse(&text, "bench.toml", dir)?)
}

/// Single-review commits, each followed by `GET top-books?fresh=1`: sorted latencies from the
/// commit to the fresh answer.
fn commit_to_fresh(
    running: &Running,
    db: &Path,
    sizes: &Sizes,
    commits: u32,
) -> anyhow::Result<Vec<Duration>> {
    let conn = Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut client = Client::new(running.address);
    let mut rng = Rng::new(5);
    let mut latencies = Vec::with_capacity(commits as usize);
    for _ in 0..commits {
        conn.execute(
            "INSERT INTO reviews (book_id, user_id, rating) VALUES (?1, ?2, ?3)",
            params![rng.pick(sizes.books), rng.pick(sizes.users), rng.pick(5)],
        )?;
        let committed = Instant::now();
        let reply = client.get("/v1/keys/top-books?fresh=1")?;
        latencies.push(committed.elapsed());
        anyhow::ensure!(reply.status == 200, "top-books?fresh=1: {}", reply.status);
    }
    latencies.sort();
    Ok(latencies)
}

/// Per maintained family: the mean compute time per change (the family's `mean_fill_ms`: its
/// write-through values come from the state) and the state it keeps.
fn per_family(status: &serde_json::Value) -> (String, String) {
    let families = status["config"]["families"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let (mut cost, mut state) = (Vec::new(), Vec::new());
    for family in &families {
        let pattern = family["pattern"].as_str().unwrap_or("?");
        let mean = family["mean_fill_ms"].as_f64().unwrap_or(f64::NAN);
        let m = &family["maintained"];
        cost.push(format!(
            "{pattern} {mean:.3} ms ({}: {} incremental, {} recomputed, {} builds)",
            m["shape"].as_str().unwrap_or("recompute"),
            m["incremental"],
            m["recomputed"],
            m["state_builds"]
        ));
        if m["state_rows"].as_u64().unwrap_or(0) > 0 {
            state.push(format!(
                "{pattern}: {} rows, {} KiB",
                m["state_rows"],
                m["state_bytes"].as_u64().unwrap_or(0) / 1024
            ));
        }
    }
    (cost.join("; "), format!("state kept: {}", state.join(", ")))
}

/// One round: the catalog as built, the daemon with the four keys on `strategy` (maintained
/// when written through), each key read once, then the app writing flat out. Returns rows/s.
fn app_rate(
    options: &BenchOptions,
    db_name: &str,
    sizes: &Sizes,
    strategy: &str,
    writing: Duration,
) -> anyhow::Result<f64> {
    let db = options.dir.join(db_name);
    let running = Running::start(config(
        &options.dir,
        db_name,
        strategy,
        strategy == "write-through",
    )?)?;
    let mut client = Client::new(running.address);
    for (key, _, _) in QUERIES.iter().filter(|(k, _, _)| !k.contains(PLACEHOLDER)) {
        client.get(&format!("/v1/keys/{key}"))?;
    }
    let conn = Connection::open(&db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut rng = Rng::new(9);
    let (start, mut rows) = (Instant::now(), 0u64);
    while start.elapsed() < writing {
        let tx = conn.unchecked_transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO reviews (book_id, user_id, rating, body) VALUES (?1, ?2, ?3, 'bench')",
            )?;
            for _ in 0..100 {
                insert.execute(params![
                    rng.pick(sizes.books),
                    rng.pick(sizes.users),
                    rng.pick(5)
                ])?;
            }
        }
        tx.commit()?;
        rows += 100;
    }
    Ok(rows as f64 / start.elapsed().as_secs_f64().max(1e-9))
}
