//! Lookups through joins (issue 18): `author:{id}` over authors → books → reviews, every
//! author's value cached, one client reading `author:*` while a python3 writer in its own
//! process inserts reviews at a fixed rate. Reads and reviews are both skewed the same way
//! (Zipf, s = 1, over authors: the authors read most are reviewed most; a review goes to a
//! random book of its author). Measured in one run, on two copies of one database: the hit
//! ratio with `invalidate = "auto"` (a lookup per batch finds each review's author), and with
//! the old behaviour (a hand-written rule dropping the whole family on each review, through a
//! tag, as `auto` did before lookups); beside each, the exact bound computed from that run's own
//! reads and commits (a read must miss only when a review of one of its author's books was
//! committed since the author was last read). And the daemon's lookup time per change beside
//! its apply time, from `/v1/status` (`lookup_micros`, `apply_micros`, over the events applied).

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, params};

use super::daemons::Running;
use super::{BenchOptions, Row, human};
use crate::client::Client;
use crate::demo::Rng;

const BOOKS_PER_AUTHOR: u32 = 5;

const QUERY: &str = "SELECT a.id, a.name, count(r.id) AS reviews, round(avg(r.rating), 2) AS avg_rating FROM authors a LEFT JOIN books b ON b.author_id = a.id LEFT JOIN reviews r ON r.book_id = b.id WHERE a.id = :id GROUP BY a.id";

struct Sizes {
    authors: u32,
    reviews: u32,
    /// The writer's rate (reviews/s, one a transaction), the reader's ceiling (reads/s), and
    /// how long the writer writes.
    writes_per_second: u32,
    reads_per_second: u32,
    writing: Duration,
}

/// The two configurations measured.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    /// `invalidate = "auto"`: reviews reach their author through a lookup.
    Auto,
    /// Hand-written rules, each review dropping every `author:*` (through a tag).
    WholeFamily,
}

/// What one configuration's run measured.
struct Measured {
    reads: u64,
    hits: u64,
    /// The reads the exact bound says must miss.
    necessary_misses: u64,
    writes: usize,
    seconds: f64,
    events: u64,
    apply_micros: u64,
    lookup_micros: u64,
    lookups: u64,
    fallbacks: u64,
}

impl Measured {
    fn hit_ratio(&self) -> f64 {
        self.hits as f64 / self.reads.max(1) as f64
    }

    fn bound(&self) -> f64 {
        1.0 - self.necessary_misses as f64 / self.reads.max(1) as f64
    }

    fn per_change(&self, micros: u64) -> f64 {
        micros as f64 / self.events.max(1) as f64
    }
}

pub(super) fn lookups(options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    let sizes = match options.quick {
        true => Sizes {
            authors: 2_000,
            reviews: 20_000,
            writes_per_second: 100,
            reads_per_second: 2_000,
            writing: Duration::from_secs(2),
        },
        false => Sizes {
            authors: 10_000,
            reviews: 200_000,
            writes_per_second: 100,
            reads_per_second: 2_000,
            writing: Duration::from_secs(20),
        },
    };
    let auto_db = options.dir.join("lookups-auto.db");
    let whole_db = options.dir.join("lookups-whole.db");
    build(&auto_db, &sizes)?;
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", whole_db.display()));
    }
    std::fs::copy(&auto_db, &whole_db)?;
    let auto = measure(options, "lookups-auto.db", Setup::Auto, &sizes)?;
    let whole = measure(options, "lookups-whole.db", Setup::WholeFamily, &sizes)?;
    Ok(rows(&sizes, &auto, &whole))
}

/// The catalog: authors, `BOOKS_PER_AUTHOR` books each (book `b` is author `(b - 1) / 5 + 1`'s),
/// reviews of random books; indexes on `books.author_id` and `reviews.book_id`.
fn build(db: &Path, sizes: &Sizes) -> anyhow::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let mut conn = Connection::open(db)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
         CREATE TABLE books (id INTEGER PRIMARY KEY, author_id INTEGER NOT NULL, title TEXT NOT NULL);
         CREATE INDEX books_author ON books(author_id);
         CREATE TABLE reviews (id INTEGER PRIMARY KEY, book_id INTEGER NOT NULL, rating INTEGER NOT NULL);
         CREATE INDEX reviews_book ON reviews(book_id);",
    )?;
    let tx = conn.transaction()?;
    {
        let mut author = tx.prepare("INSERT INTO authors (id, name) VALUES (?1, ?2)")?;
        let mut book =
            tx.prepare("INSERT INTO books (id, author_id, title) VALUES (?1, ?2, ?3)")?;
        for id in 1..=sizes.authors {
            author.execute(params![id, format!("author {id}")])?;
            for n in 0..BOOKS_PER_AUTHOR {
                let book_id = (id - 1) * BOOKS_PER_AUTHOR + n + 1;
                book.execute(params![book_id, id, format!("book {book_id}")])?;
            }
        }
        let mut review = tx.prepare("INSERT INTO reviews (book_id, rating) VALUES (?1, ?2)")?;
        let mut rng = Rng::new(21);
        for _ in 0..sizes.reviews {
            review.execute(params![
                rng.pick(sizes.authors * BOOKS_PER_AUTHOR),
                rng.pick(5)
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn config(dir: &Path, db: &str, setup: Setup) -> anyhow::Result<cachetail::Config> {
    let (top, family, rules) = match setup {
        Setup::Auto => ("invalidate = \"auto\"\n", "", ""),
        Setup::WholeFamily => (
            "",
            "tags = [\"authors\"]\n",
            "[[rules]]\ntable = \"authors\"\nkeys = [\"author:{id}\"]\n\
             [[rules]]\ntable = \"books\"\nkeys = [\"author:{author_id}\"]\n\
             [[rules]]\ntable = \"reviews\"\ntags = [\"authors\"]\n",
        ),
    };
    let text = format!(
        "database = \"{db}\"\nlisten = \"127.0.0.1:0\"\n{top}[cache]\nmax_entries = 1000000\n[tail]\npoll_interval = \"50ms\"\n\
         [keys.\"author:{{id}}\"]\nquery = \"{QUERY}\"\n{family}{rules}"
    );
    Ok(cachetail::Config::parse(&text, "bench.toml", dir)?)
}

/// Authors drawn with Zipf (s = 1) weights: author `k` (1-based) `1/k` times as often as the
/// first.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: u32) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|k| {
                total += 1.0 / f64::from(k);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    fn draw(&self, rng: &mut Rng) -> u32 {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        self.cumulative.partition_point(|&c| c <= u) as u32 + 1
    }
}

/// The python3 writer: one review a transaction, of the books listed in a file, at `rate` a
/// second (paced from its start); prints each commit's wall-clock time (ns) when done.
const WRITER: &str = r"import sqlite3, sys, time
books = [int(x) for x in open(sys.argv[2]).read().split()]
rate = float(sys.argv[3])
con = sqlite3.connect(sys.argv[1], timeout=5)
out = []
start = time.monotonic()
for i, b in enumerate(books):
    wait = start + i / rate - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    con.execute('INSERT INTO reviews (book_id, rating) VALUES (?, ?)', (b, 1 + i % 5))
    con.commit()
    out.append(time.time_ns())
print('\n'.join(map(str, out)))
";

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// One configuration: its daemon, every author read once (cached), then the reader beside the
/// writer until the writer is done.
fn measure(
    options: &BenchOptions,
    db_name: &str,
    setup: Setup,
    sizes: &Sizes,
) -> anyhow::Result<Measured> {
    let db = options.dir.join(db_name);
    let mut running = Running::start(config(&options.dir, db_name, setup)?)?;
    let mut client = Client::new(running.address);
    for id in 1..=sizes.authors {
        let reply = client.get(&format!("/v1/keys/author:{id}"))?;
        anyhow::ensure!(reply.status == 200, "author:{id}: {}", reply.status);
    }
    let zipf = Zipf::new(sizes.authors);
    // The same reviews (and reads) in both configurations.
    let mut rng = Rng::new(7);
    let count = sizes.writes_per_second as u64 * sizes.writing.as_secs();
    let books: Vec<u32> = (0..count)
        .map(|_| {
            let author = zipf.draw(&mut rng);
            (author - 1) * BOOKS_PER_AUTHOR + rng.pick(BOOKS_PER_AUTHOR) as u32
        })
        .collect();
    let list = options.dir.join(format!("{db_name}.writes"));
    let text: Vec<String> = books.iter().map(u32::to_string).collect();
    std::fs::write(&list, text.join("\n"))?;
    let before = running.status()?;
    let writer = std::process::Command::new("python3")
        .arg("-c")
        .arg(WRITER)
        .arg(&db)
        .arg(&list)
        .arg(sizes.writes_per_second.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let Reading {
        reads,
        seconds,
        output,
    } = read_beside(&mut client, writer, &zipf, sizes)?;
    anyhow::ensure!(
        output.status.success(),
        "python3 writer: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let commits: Vec<u128> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(commits.len() == books.len(), "the writer's commits");
    wait_applied(&mut running)?;
    let after = running.status()?;
    let writes: Vec<(u128, u32)> = commits
        .into_iter()
        .zip(books.iter().map(|b| (b - 1) / BOOKS_PER_AUTHOR + 1))
        .collect();
    let delta = |name: &str| {
        after[name]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(before[name].as_u64().unwrap_or(0))
    };
    let family = |status: &serde_json::Value, name: &str| {
        status["config"]["families"][0][name].as_u64().unwrap_or(0)
    };
    let hits = family(&after, "hits").saturating_sub(family(&before, "hits"));
    let misses = family(&after, "misses").saturating_sub(family(&before, "misses"));
    anyhow::ensure!(
        hits + misses == reads.len() as u64,
        "the family counted {hits} hits and {misses} misses for {} reads",
        reads.len()
    );
    Ok(Measured {
        reads: reads.len() as u64,
        hits,
        necessary_misses: necessary_misses(&reads, &writes),
        writes: writes.len(),
        seconds,
        events: delta("events"),
        apply_micros: delta("apply_micros"),
        lookup_micros: delta("lookup_micros"),
        lookups: delta("lookups"),
        fallbacks: delta("lookup_fallbacks"),
    })
}

/// What the reader saw beside the writer: each read's wall-clock time (ns, taken before it is
/// sent) and author, the seconds it read, and the writer's output.
struct Reading {
    reads: Vec<(u128, u32)>,
    seconds: f64,
    output: std::process::Output,
}

/// Reads `author:*` (Zipf) at most `reads_per_second` until the writer exits.
fn read_beside(
    client: &mut Client,
    mut writer: std::process::Child,
    zipf: &Zipf,
    sizes: &Sizes,
) -> anyhow::Result<Reading> {
    let mut rng = Rng::new(13);
    let mut reads = Vec::new();
    let start = Instant::now();
    let pace = Duration::from_secs(1) / sizes.reads_per_second;
    while writer.try_wait()?.is_none() {
        let due = pace * reads.len() as u32;
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let author = zipf.draw(&mut rng);
        let at = unix_nanos();
        let reply = client.get(&format!("/v1/keys/author:{author}"))?;
        anyhow::ensure!(reply.status == 200, "author:{author}: {}", reply.status);
        reads.push((at, author));
        anyhow::ensure!(
            start.elapsed() < sizes.writing * 3 + Duration::from_secs(30),
            "the writer did not finish"
        );
    }
    Ok(Reading {
        reads,
        seconds: start.elapsed().as_secs_f64(),
        output: writer.wait_with_output()?,
    })
}

/// Waits until the daemon has applied everything committed.
fn wait_applied(running: &mut Running) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = running.status()?;
        if status["lag"].as_u64() == Some(0) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the daemon did not catch up");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The exact bound: a read of author A must miss only when a review of one of A's books was
/// committed after A was last read (every author was cached when the writer started). Reads
/// and commits ordered by their wall-clock times; a commit and a read at one instant, commit
/// first.
fn necessary_misses(reads: &[(u128, u32)], writes: &[(u128, u32)]) -> u64 {
    let mut events: Vec<(u128, bool, u32)> = writes
        .iter()
        .map(|&(at, author)| (at, false, author))
        .chain(reads.iter().map(|&(at, author)| (at, true, author)))
        .collect();
    events.sort_unstable();
    let mut touched: HashSet<u32> = HashSet::new();
    let mut misses = 0;
    for (_, is_read, author) in events {
        if !is_read {
            touched.insert(author);
        } else if touched.remove(&author) {
            misses += 1;
        }
    }
    misses
}

fn percent(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn rows(sizes: &Sizes, auto: &Measured, whole: &Measured) -> Vec<Row> {
    let points = |m: &Measured| {
        let below = (m.bound() - m.hit_ratio()) * 100.0;
        match below >= 0.0 {
            true => format!("{below:.2} points below"),
            false => format!("{:.2} points above", -below),
        }
    };
    let scale = format!(
        "{} authors' values cached, {} books, {} reviews",
        human(f64::from(sizes.authors)),
        human(f64::from(sizes.authors * BOOKS_PER_AUTHOR)),
        human(f64::from(sizes.reviews))
    );
    let rate = |m: &Measured| m.reads as f64 / m.seconds.max(1e-9);
    eprintln!(
        "lookups: auto {} hits of {} reads ({:.0}/s), bound {} ({} writes); whole family {} of {} ({:.0}/s), bound {} ({} writes)",
        percent(auto.hit_ratio()),
        auto.reads,
        rate(auto),
        percent(auto.bound()),
        auto.writes,
        percent(whole.hit_ratio()),
        whole.reads,
        rate(whole),
        percent(whole.bound()),
        whole.writes
    );
    vec![
        Row {
            figure: format!(
                "lookups through joins: hit ratio of `author:{{id}}` reads (authors → books → reviews; {scale}), one client reading at ≤ {}/s while a python3 process inserts one review a transaction at {}/s for {} s; reads and reviewed authors both Zipf (s = 1) over authors",
                human(f64::from(sizes.reads_per_second)),
                sizes.writes_per_second,
                sizes.writing.as_secs()
            ),
            measured: format!(
                "`invalidate = \"auto\"` with lookups: **{} hits** of {} reads ({}/s); the exact bound for the same reads and commits: {}",
                percent(auto.hit_ratio()),
                human(auto.reads as f64),
                human(rate(auto)),
                percent(auto.bound())
            ),
            baseline: format!(
                "each review dropping the whole family (a tag, as `auto` did before lookups), same reviews: {} hits of {} reads ({}/s); its exact bound {}",
                percent(whole.hit_ratio()),
                human(whole.reads as f64),
                human(rate(whole)),
                percent(whole.bound())
            ),
            ratio: format!(
                "auto {} its bound; the whole family {} its bound",
                points(auto),
                points(whole)
            ),
            target: "within a few points of the exact bound",
        },
        Row {
            figure: format!(
                "lookups through joins: the daemon's time per change, same run (`/v1/status`: `lookup_micros` and `apply_micros` over the {} reviews applied)",
                auto.events
            ),
            measured: format!(
                "lookup {:.1} µs per change ({} lookups, {} fell back to the whole family)",
                auto.per_change(auto.lookup_micros),
                auto.lookups,
                auto.fallbacks
            ),
            baseline: format!(
                "apply (rules and cache actions) {:.1} µs per change; with the whole family dropped instead: {:.1} µs",
                auto.per_change(auto.apply_micros),
                whole.per_change(whole.apply_micros)
            ),
            ratio: format!(
                "lookup {:.2}× the apply",
                auto.lookup_micros as f64 / auto.apply_micros.max(1) as f64
            ),
            target: "state it",
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_must_miss_only_after_a_review_of_its_author() {
        // Author 1 read, reviewed, read twice; author 2 read after a review of author 1.
        let reads = [(1, 1), (3, 1), (4, 1), (5, 2)];
        let writes = [(2, 1), (6, 2)];
        assert_eq!(necessary_misses(&reads, &writes), 1);
    }

    #[test]
    fn zipf_draws_the_first_most() {
        let zipf = Zipf::new(100);
        let mut rng = Rng::new(1);
        let draws: Vec<u32> = (0..10_000).map(|_| zipf.draw(&mut rng)).collect();
        let first = draws.iter().filter(|&&a| a == 1).count();
        let tenth = draws.iter().filter(|&&a| a == 10).count();
        assert!(draws.iter().all(|&a| (1..=100).contains(&a)));
        assert!(first > 5 * tenth, "{first} {tenth}");
    }
}
