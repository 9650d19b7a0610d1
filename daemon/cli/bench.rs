//! `cachetail bench`: the performance figures, each measured beside its baseline in the same run
//! (the machine is shared and noisy: ratios travel, absolute numbers do not). `--quick` is the
//! smoke version CI runs.
//!
//! The bench drives the daemon as its users do, through the library's public surface and HTTP:
//! most figures run it in this process (`Running`: `cachetail::run` on a runtime of its own) and
//! observe it through `/v1/status` and `/v1/keys`. Where the figure is about the daemon as
//! deployed, it runs as `cachetail run` processes of this same binary (`DaemonProcess`; the
//! release build under `cargo run --release -- bench`): capture cost with the daemon applying
//! beside the app's writer, takeover between two daemons (kill -9, SIGSTOP), and memory (the
//! daemon's own RSS). Figures taken over several runs report the median and the range;
//! alternatives alternate run by run.

mod capture;
mod daemons;
mod drain;
mod floor;
mod fresh;
mod incremental;
mod lookups;
mod memory;
mod stampede;
mod takeover;
mod write_behind;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cachetail::Config;
use rusqlite::{Connection, params};

use crate::demo::Rng;

pub struct BenchOptions {
    pub dir: PathBuf,
    pub quick: bool,
    /// Run only the figures whose name contains this.
    pub only: Option<String>,
}

/// One line of the table.
struct Row {
    figure: String,
    measured: String,
    baseline: String,
    ratio: String,
    target: &'static str,
}

const BOOKS: u32 = 1_000;

/// Runs the suite and prints the table.
pub fn run(options: &BenchOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.dir)?;
    let wanted = |name: &str| options.only.as_deref().is_none_or(|o| name.contains(o));
    let mut rows = Vec::new();
    if wanted("capture") {
        rows.extend(capture::capture_overhead(options)?);
    }
    if wanted("drain") {
        rows.push(drain::drain(options)?);
    }
    if wanted("fresh") || wanted("strateg") {
        rows.extend(fresh::commit_to_fresh(options)?);
    }
    if wanted("write-behind") {
        rows.push(write_behind::write_behind(options)?);
    }
    if wanted("redis") {
        rows.extend(fresh::redis_backend(options)?);
    }
    if wanted("stampede") {
        rows.push(stampede::stampede(options)?);
    }
    if wanted("memory") {
        rows.push(memory::memory(options)?);
    }
    if wanted("takeover") {
        rows.extend(takeover::takeover(options)?);
    }
    if wanted("incremental") {
        rows.extend(incremental::incremental(options)?);
    }
    if wanted("lookups") {
        rows.extend(lookups::lookups(options)?);
    }
    println!();
    println!("| figure | measured | baseline (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.figure, row.measured, row.baseline, row.ratio, row.target
        );
    }
    Ok(())
}

fn fresh_catalog(path: &Path, reviews: u32) -> anyhow::Result<Connection> {
    let mut conn = crate::demo::empty_catalog(path)?;
    let tx = conn.transaction()?;
    {
        let mut book = tx.prepare("INSERT INTO books (id, title, author) VALUES (?1, ?2, 'A')")?;
        for id in 1..=BOOKS {
            book.execute(params![id, format!("Book {id}")])?;
        }
        tx.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) INSERT INTO users (id, name) SELECT i, 'u' || i FROM n",
        )?;
        let mut review =
            tx.prepare("INSERT INTO reviews (book_id, user_id, rating) VALUES (?1, ?2, ?3)")?;
        let mut rng = Rng::new(1);
        for _ in 0..reviews {
            review.execute(params![rng.pick(BOOKS), rng.pick(100), rng.pick(5)])?;
        }
    }
    tx.commit()?;
    Ok(conn)
}

/// The app writing flat out: 100-row transactions into `reviews` from its own connection (its
/// random books, users and ratings from `seed`) until `done`. Returns rows/s.
fn app_writes(db: &Path, seed: u64, done: impl Fn() -> bool) -> anyhow::Result<f64> {
    let mut conn = Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut rng = Rng::new(seed);
    let (start, mut rows) = (std::time::Instant::now(), 0u64);
    while !done() {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO reviews (book_id, user_id, rating, body) VALUES (?1, ?2, ?3, 'bench')",
            )?;
            for _ in 0..100 {
                insert.execute(params![rng.pick(BOOKS), rng.pick(100), rng.pick(5)])?;
            }
        }
        tx.commit()?;
        rows += 100;
    }
    Ok(rate(rows, start.elapsed()))
}

fn config_for(dir: &Path, db: &str, rules: &str) -> anyhow::Result<Config> {
    config_with(dir, db, "", rules)
}

/// `config_for` with more settings in `[cache]` (the backend).
fn config_with(dir: &Path, db: &str, cache: &str, rules: &str) -> anyhow::Result<Config> {
    let text = format!(
        "database = \"{db}\"\nlisten = \"127.0.0.1:0\"\n[cache]\nmax_entries = 1000000\n{cache}\n[tail]\npoll_interval = \"50ms\"\n\
         [keys.\"book:{{id}}\"]\nquery = \"SELECT b.id, count(r.id) AS review_count, round(avg(r.rating), 2) AS avg_rating FROM books b LEFT JOIN reviews r ON r.book_id = b.id WHERE b.id = :id GROUP BY b.id\"\n{rules}"
    );
    Ok(Config::parse(&text, "bench.toml", dir)?)
}

const DELETE_RULE: &str = "[[rules]]\ntable = \"reviews\"\nkeys = [\"book:{book_id}\"]\n";

fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// A figure over several runs: the median, and the range.
struct Spread {
    sorted: Vec<f64>,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        Spread { sorted: values }
    }

    fn median(&self) -> f64 {
        let n = self.sorted.len();
        match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => self.sorted[n / 2],
            _ => (self.sorted[n / 2 - 1] + self.sorted[n / 2]) / 2.0,
        }
    }

    fn range(&self) -> (f64, f64) {
        (
            self.sorted.first().copied().unwrap_or(f64::NAN),
            self.sorted.last().copied().unwrap_or(f64::NAN),
        )
    }

    /// `median (min–max)` through `show`; just the value for one run.
    fn show(&self, show: impl Fn(f64) -> String) -> String {
        let (low, high) = self.range();
        if self.sorted.len() < 2 {
            show(self.median())
        } else {
            format!("{} ({}–{})", show(self.median()), show(low), show(high))
        }
    }

    fn rate(&self) -> String {
        self.show(human)
    }

    fn times(&self) -> String {
        self.show(|x| format!("{x:.2}×"))
    }

    fn millis(&self) -> String {
        self.show(|x| format!("{x:.0} ms"))
    }

    /// Every value, for the log.
    fn all(&self) -> String {
        let all: Vec<String> = self.sorted.iter().map(|&x| format!("{x:.0}")).collect();
        all.join(" ")
    }
}

/// "median of N rounds", or "one round".
fn rounds_text(rounds: usize) -> String {
    if rounds == 1 {
        "one round".to_owned()
    } else {
        format!("median and range of {rounds} rounds")
    }
}

/// "median and range of N runs", or "one run".
fn runs_text(runs: usize) -> String {
    if runs == 1 {
        "one run".to_owned()
    } else {
        format!("median and range of {runs} runs")
    }
}

/// The value at `p` (0..1) of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}
