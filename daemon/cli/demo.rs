//! `cachetail demo`: a fresh book catalog, the daemon on it with the reference config, a
//! simulated app that posts, edits and deletes reviews from its own connection, readers, and a
//! live line of what the daemon does. The daemon runs in this process through `cachetail::run`
//! and is watched over HTTP (`/v1/status`), as any client would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};

use crate::client::Client;
use crate::embedded::Embedded;
use cachetail::Config;

/// The catalog's schema (an ordinary app schema: cachetail adds nothing to it by hand).
pub const CATALOG_SQL: &str = include_str!("../../examples/catalog.sql");
/// The reference config, written next to the demo's database.
pub const REFERENCE_CONFIG: &str = include_str!("../../config.toml");

/// The demo's database carries this `PRAGMA application_id` ("ctdm"), in the file's header.
const DEMO_APPLICATION_ID: u32 = 0x6374_646d;
/// The first line of the config the demo writes.
const DEMO_CONFIG_MARK: &str =
    "# Written by `cachetail demo`, which replaces this folder's files each time it runs.";

pub struct DemoOptions {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub books: u32,
    pub users: u32,
    pub reviews: u32,
    /// The simulated app's writes per second.
    pub writes_per_second: u32,
    /// Stop after this long (None: until Ctrl-C).
    pub duration: Option<Duration>,
}

/// A small deterministic generator (xorshift64*): the demo needs variety, not cryptography.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `1..=n`.
    pub fn pick(&mut self, n: u32) -> i64 {
        (self.next_u64() % u64::from(n.max(1))) as i64 + 1
    }

    /// A number in `1..=n`, skewed so that low numbers come up far more often (popular books).
    pub fn popular(&mut self, n: u32) -> i64 {
        let a = self.pick(n);
        let b = self.pick(n);
        let c = self.pick(n);
        a.min(b).min(c)
    }
}

/// Creates an empty catalog database at `path`, replacing any (with its `-wal` and `-shm`).
pub fn empty_catalog(path: &Path) -> rusqlite::Result<Connection> {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(file));
    }
    let conn = Connection::open(path)?;
    conn.execute_batch(CATALOG_SQL)?;
    Ok(conn)
}

/// Creates the catalog database at `path` (replacing any) with generated books, users, reviews,
/// marked as the demo's (`DEMO_APPLICATION_ID`).
pub fn build_catalog(path: &Path, books: u32, users: u32, reviews: u32) -> rusqlite::Result<()> {
    let mut conn = empty_catalog(path)?;
    conn.pragma_update(None, "application_id", DEMO_APPLICATION_ID as i32)?;
    let tx = conn.transaction()?;
    let mut rng = Rng::new(42);
    {
        let mut insert =
            tx.prepare("INSERT INTO books (id, title, author, year) VALUES (?1, ?2, ?3, ?4)")?;
        for id in 1..=books {
            let title = format!(
                "Book {id}: {}",
                WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]
            );
            insert.execute(params![
                id,
                title,
                format!("Author {}", rng.pick(500)),
                1900 + rng.pick(125)
            ])?;
        }
        let mut insert = tx.prepare("INSERT INTO users (id, name) VALUES (?1, ?2)")?;
        for id in 1..=users {
            insert.execute(params![id, format!("reader{id}")])?;
        }
        let mut insert = tx.prepare(
            "INSERT INTO reviews (book_id, user_id, rating, body) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for _ in 0..reviews {
            insert.execute(params![
                rng.popular(books),
                rng.pick(users),
                rng.pick(5),
                "A fine read."
            ])?;
        }
    }
    tx.commit()
}

const WORDS: [&str; 8] = [
    "Rivers",
    "Glass",
    "Northern Lights",
    "Ashes",
    "The Orchard",
    "Salt",
    "Ledger",
    "Harbor",
];

/// Latencies recorded by the simulated app, drained by the printer; and, once a posted review
/// shows on its book, whether the aggregates (`top-books`, `catalog-stats`) were already fresh
/// hits (asked with `Cache-Control: only-if-cached`).
#[derive(Default)]
struct Latencies {
    samples: std::sync::Mutex<Vec<Duration>>,
    aggregate_hits: AtomicU64,
    aggregates_asked: AtomicU64,
}

impl Latencies {
    fn record(&self, d: Duration) {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(d);
    }

    fn drain(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn aggregates(&self, client: &mut Client) {
        for key in ["top-books", "catalog-stats"] {
            let hit = client
                .request(
                    "GET",
                    &format!("/v1/keys/{key}"),
                    &[("Cache-Control", "only-if-cached")],
                    &[],
                )
                .is_ok_and(|reply| reply.status == 200);
            self.aggregates_asked.fetch_add(1, Ordering::Relaxed);
            self.aggregate_hits
                .fetch_add(u64::from(hit), Ordering::Relaxed);
        }
    }
}

/// Runs the demo until Ctrl-C (or the duration). Blocking: the daemon gets a runtime of its own.
pub fn run(options: DemoOptions) -> anyhow::Result<()> {
    ensure_ours(&options.dir)?;
    std::fs::create_dir_all(&options.dir)?;
    let database = options.dir.join("catalog.db");
    let config_path = options.dir.join("config.toml");
    println!(
        "building {} with {} books, {} users, {} reviews ...",
        database.display(),
        options.books,
        options.users,
        options.reviews
    );
    build_catalog(&database, options.books, options.users, options.reviews)?;
    let config_text = format!(
        "{DEMO_CONFIG_MARK}\n{}",
        REFERENCE_CONFIG.replace(
            "listen = \"127.0.0.1:8080\"",
            &format!("listen = \"{}\"", options.listen),
        )
    );
    std::fs::write(&config_path, config_text)?;
    let daemon = Embedded::start(Config::load(&config_path)?, options.listen, None)?;
    let address = daemon.address;
    print_intro(address, &database, &config_path);

    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Latencies::default());
    let writes = Arc::new(AtomicU64::new(0));
    let app = {
        let (stop, latencies, writes, database) = (
            Arc::clone(&stop),
            Arc::clone(&latencies),
            Arc::clone(&writes),
            database.clone(),
        );
        let (books, users, rate) = (options.books, options.users, options.writes_per_second);
        std::thread::spawn(move || {
            simulated_app(
                &database, address, books, users, rate, &stop, &latencies, &writes,
            )
        })
    };
    let reader = {
        let stop = Arc::clone(&stop);
        let books = options.books;
        std::thread::spawn(move || simulated_readers(address, books, &stop))
    };

    let (ctrl_c_tx, ctrl_c_rx) = mpsc::channel::<()>();
    daemon.handle().spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = ctrl_c_tx.send(());
    });
    let mut client = Client::new(address);
    live_lines(&mut client, &options, &ctrl_c_rx, &latencies, &writes)?;
    stop.store(true, Ordering::Release);
    let _ = app.join();
    let _ = reader.join();
    // The app has stopped: let the daemon apply its last writes, then stop it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = daemon_status(&mut client)?;
    while status["lag"].as_u64().is_some_and(|lag| lag > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        status = daemon_status(&mut client)?;
    }
    daemon.stop()?;
    println!("stopped; the cursor is at {}", status["cursor"]);
    Ok(())
}

/// Refuses a folder holding anything the demo did not write: it may be an app's database or
/// config. A missing or empty folder, or one holding only a demo's files, is the demo's to fill.
fn ensure_ours(dir: &Path) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => anyhow::bail!("cannot read {}: {e}", dir.display()),
    };
    let database_is_ours = is_demo_database(&dir.join("catalog.db"));
    let mut foreign = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = entry.file_type()?.is_file()
            && match name.as_str() {
                "catalog.db" | "catalog.db-wal" | "catalog.db-shm" => database_is_ours,
                "config.toml" => is_demo_config(&entry.path()),
                _ => false,
            };
        if !ours {
            foreign.push(name);
        }
    }
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    anyhow::bail!(
        "{} holds files `cachetail demo` did not create ({}); it writes its database and config \
         only into a new or empty folder, or over a demo of its own. Nothing was changed: pick \
         another --dir.",
        dir.display(),
        foreign.join(", ")
    )
}

/// Whether `path` is a SQLite database the demo built: its header's application id, read from
/// the file itself (opening it as a database could write beside it).
fn is_demo_database(path: &Path) -> bool {
    let mut header = [0u8; 72];
    std::fs::File::open(path)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut header))
        .is_ok_and(|()| {
            header.starts_with(b"SQLite format 3\0")
                && header[68..72] == DEMO_APPLICATION_ID.to_be_bytes()
        })
}

/// Whether `path` is a config the demo wrote: its first line.
fn is_demo_config(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| text.lines().next() == Some(DEMO_CONFIG_MARK))
}

fn print_intro(address: SocketAddr, database: &Path, config_path: &Path) {
    let base = format!("http://{address}");
    println!("\ncachetail is serving {base} for {}", database.display());
    println!("dashboard: {base}/ui  (open it in a browser: every change live)");
    println!("try, while the simulated app writes:");
    println!("  curl -i {base}/v1/keys/book:1");
    println!("  curl -i {base}/v1/keys/top-books");
    println!("  curl -i {base}/v1/keys/catalog-stats");
    println!("  curl -i '{base}/v1/keys/book:1?fresh=1'");
    println!("  curl -s {base}/v1/status");
    println!("  cargo run --release -- watch --url {base}");
    println!(
        "  sqlite3 {} \"INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 1, 5)\"",
        database.display()
    );
    println!(
        "edit {} while it runs: the rules reload live. Ctrl-C stops.\n",
        config_path.display()
    );
}

/// `GET /v1/status`.
fn daemon_status(client: &mut Client) -> anyhow::Result<serde_json::Value> {
    let reply = client.get("/v1/status")?;
    anyhow::ensure!(reply.status == 200, "/v1/status: {}", reply.status);
    Ok(reply.json()?)
}

/// A line a second, from the daemon's `/v1/status` and the app's own latencies, until Ctrl-C or
/// the duration.
fn live_lines(
    client: &mut Client,
    options: &DemoOptions,
    ctrl_c: &mpsc::Receiver<()>,
    latencies: &Latencies,
    writes: &AtomicU64,
) -> anyhow::Result<()> {
    let counters = |status: &serde_json::Value| {
        ["events", "hits", "misses"].map(|name| status[name].as_u64().unwrap_or(0))
    };
    let started = Instant::now();
    let mut last = counters(&daemon_status(client)?);
    loop {
        if ctrl_c.recv_timeout(Duration::from_secs(1)).is_ok() {
            return Ok(());
        }
        if options.duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
        let status = daemon_status(client)?;
        let now = counters(&status);
        let [events, hits, misses] = [0, 1, 2].map(|i| now[i].saturating_sub(last[i]));
        last = now;
        let mut lat = latencies.drain();
        lat.sort();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .copied()
        };
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 * 100.0 / (hits + misses) as f64
        };
        println!(
            "events applied {events:>6}/s | lag {:>4} | hit ratio {ratio:5.1}% ({hits} hits, {misses} misses) | commit→fresh p50 {} p99 {} ({} samples) | app writes {} | aggregates fresh hits {}/{}",
            status["lag"].as_u64().unwrap_or(0),
            fmt_latency(pct(0.5)),
            fmt_latency(pct(0.99)),
            lat.len(),
            writes.load(Ordering::Relaxed),
            latencies.aggregate_hits.load(Ordering::Relaxed),
            latencies.aggregates_asked.load(Ordering::Relaxed),
        );
    }
}

fn fmt_latency(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.2}ms", d.as_secs_f64() * 1000.0),
        None => "-".to_owned(),
    }
}

/// The app: posts (60%), edits (30%) and deletes (10%) reviews from its own connection. After each
/// posted review it reads the book back through the cache until the new count shows: that is
/// the commit → fresh latency.
#[allow(clippy::too_many_arguments)]
fn simulated_app(
    database: &Path,
    address: SocketAddr,
    books: u32,
    users: u32,
    rate: u32,
    stop: &AtomicBool,
    latencies: &Latencies,
    writes: &AtomicU64,
) -> rusqlite::Result<()> {
    let mut conn = Connection::open(database)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut client = Client::new(address);
    let mut rng = Rng::new(7);
    let pause = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    while !stop.load(Ordering::Acquire) {
        let book = rng.popular(books);
        let roll = rng.next_u64() % 10;
        let tx = conn.transaction()?;
        let mut expected = None;
        if roll < 6 {
            tx.execute(
                "INSERT INTO reviews (book_id, user_id, rating, body) VALUES (?1, ?2, ?3, 'posted by the demo')",
                params![book, rng.pick(users), rng.pick(5)],
            )?;
            let count: i64 = tx.query_row(
                "SELECT count(*) FROM reviews WHERE book_id = ?1",
                [book],
                |r| r.get(0),
            )?;
            expected = Some(count);
        } else if roll < 9 {
            tx.execute(
                "UPDATE reviews SET rating = ?1 WHERE id = (SELECT max(id) FROM reviews WHERE book_id = ?2)",
                params![rng.pick(5), book],
            )?;
        } else {
            tx.execute(
                "DELETE FROM reviews WHERE id = (SELECT min(id) FROM reviews WHERE book_id = ?1)",
                [book],
            )?;
        }
        tx.commit()?;
        let committed = Instant::now();
        writes.fetch_add(1, Ordering::Relaxed);
        if let Some(count) = expected {
            let path = format!("/v1/keys/book:{book}");
            while committed.elapsed() < Duration::from_secs(5) && !stop.load(Ordering::Acquire) {
                let fresh = client
                    .get(&path)
                    .ok()
                    .and_then(|reply| reply.json().ok())
                    .is_some_and(|v| v["review_count"].as_i64() == Some(count));
                if fresh {
                    latencies.record(committed.elapsed());
                    latencies.aggregates(&mut client);
                    break;
                }
                std::thread::yield_now();
            }
        }
        std::thread::sleep(pause.saturating_sub(committed.elapsed()));
    }
    Ok(())
}

/// Readers: popular books mostly, and the shared lists.
fn simulated_readers(address: SocketAddr, books: u32, stop: &AtomicBool) {
    let mut client = Client::new(address);
    let mut rng = Rng::new(99);
    while !stop.load(Ordering::Acquire) {
        let path = match rng.next_u64() % 10 {
            0 => "/v1/keys/top-books".to_owned(),
            1 => "/v1/keys/catalog-stats".to_owned(),
            2 => format!("/v1/keys/book:{}:reviews", rng.popular(books)),
            _ => format!("/v1/keys/book:{}", rng.popular(books)),
        };
        let _ = client.get(&path);
        std::thread::sleep(Duration::from_millis(2));
    }
}
