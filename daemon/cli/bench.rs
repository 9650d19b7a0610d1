//! `cachetail bench`: the performance figures, each measured beside its baseline in the same run
//! (the machine is shared and noisy: ratios travel, absolute numbers do not). `--quick` is the
//! smoke version CI runs.
//!
//! Most figures run the daemon in this process (`Running`). Where the figure is about the daemon
//! as deployed, it runs as `cachetail run` processes of this same binary (`DaemonProcess`; the
//! release build under `cargo run --release -- bench`): capture overhead with the daemon applying
//! beside the app's writer, and takeover between two daemons (kill -9, SIGSTOP). Figures taken
//! over several runs report the median and the range; alternatives alternate run by run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};

use crate::client::Client;
use crate::demo::Rng;
use cachetail::Config;
use cachetail::Shared;

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
        rows.extend(capture_overhead(options)?);
    }
    if wanted("drain") {
        rows.push(drain(options)?);
    }
    if wanted("fresh") || wanted("strateg") {
        rows.extend(commit_to_fresh(options)?);
    }
    if wanted("redis") {
        rows.extend(redis_backend(options)?);
    }
    if wanted("stampede") {
        rows.push(stampede(options)?);
    }
    if wanted("memory") {
        rows.push(memory(options));
    }
    if wanted("takeover") {
        rows.extend(takeover(options)?);
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

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `cachetail run` as deployed: this very binary (the release build under `cargo run --release
/// -- bench`) in its own process, with its own config file; killed when dropped.
struct DaemonProcess {
    child: std::process::Child,
    client: Client,
    log: PathBuf,
}

impl DaemonProcess {
    /// Starts it and waits until it answers `/healthz`. Its log (warnings) goes to `dir/NAME.log`.
    fn start(dir: &Path, config: &Path, port: u16, name: &str) -> anyhow::Result<DaemonProcess> {
        let log = dir.join(format!("{name}.log"));
        let child = std::process::Command::new(std::env::current_exe()?)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut daemon = DaemonProcess {
            child,
            client: Client::new(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !daemon.client.get("/healthz").is_ok_and(|r| r.status == 200) {
            if let Some(exit) = daemon.child.try_wait()? {
                anyhow::bail!(
                    "{name}: `cachetail run` exited ({exit}): {}",
                    daemon.log_text()
                );
            }
            anyhow::ensure!(Instant::now() < deadline, "{name}: no answer on /healthz");
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(daemon)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&mut self) -> anyhow::Result<serde_json::Value> {
        let reply = self.client.get("/v1/status")?;
        anyhow::ensure!(reply.status == 200, "/v1/status: {}", reply.status);
        Ok(reply.json()?)
    }

    fn role(&mut self) -> anyhow::Result<String> {
        Ok(self.status()?["role"].as_str().unwrap_or("").to_owned())
    }

    /// Polls `/v1/status` (about every millisecond) until the role is `role`; returns how long
    /// that took.
    fn wait_role(&mut self, role: &str, within: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if self.role()? == role {
                return Ok(start.elapsed());
            }
            anyhow::ensure!(
                start.elapsed() < within,
                "the daemon was not {role} within {within:?}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends a signal (`-STOP`, `-CONT`) with kill(1).
    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} failed");
        Ok(())
    }

    /// kill -9, and reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

// ------------------------------------------------------------------------------------------
// Capture overhead.

/// One writer run: its rate, and the CPU time its thread spent per row (steadier than the rate
/// on a loaded machine, but blind to waiting: locks, a busy CPU).
struct WriterRun {
    rows_per_second: f64,
    cpu_per_row: Option<Duration>,
}

/// The calling thread's CPU time so far (`/proc/thread-self/schedstat`, Linux), if known.
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// 100-row transactions into `reviews` from a Rust writer (rusqlite, default pragmas).
fn rust_writer(db: &Path, transactions: u32) -> anyhow::Result<WriterRun> {
    let mut conn = Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut rng = Rng::new(3);
    let (start, cpu_start) = (Instant::now(), thread_cpu());
    for _ in 0..transactions {
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
    }
    let rows = transactions * 100;
    Ok(WriterRun {
        rows_per_second: rate(u64::from(rows), start.elapsed()),
        cpu_per_row: thread_cpu()
            .zip(cpu_start)
            .map(|(end, begin)| end.saturating_sub(begin) / rows.max(1)),
    })
}

/// The same from python3's sqlite3 module, timed by the script itself.
fn python_writer(db: &Path, transactions: u32) -> anyhow::Result<WriterRun> {
    let script = format!(
        "import sqlite3, sys, time, random\ncon = sqlite3.connect(sys.argv[1], timeout=5)\nr = random.Random(3)\nt = time.perf_counter()\nc = time.thread_time_ns()\n\
         for _ in range({transactions}):\n    con.executemany(\"INSERT INTO reviews (book_id, user_id, rating, body) VALUES (?, ?, ?, 'bench')\", [(r.randint(1, {BOOKS}), r.randint(1, 100), r.randint(1, 5)) for _ in range(100)])\n    con.commit()\n\
         print({transactions} * 100 / (time.perf_counter() - t), (time.thread_time_ns() - c) // ({transactions} * 100))\n"
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(db)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "python3 writer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let rows_per_second = fields
        .next()
        .ok_or_else(|| anyhow::anyhow!("python3 writer printed nothing"))?
        .parse()?;
    let cpu_per_row = fields
        .next()
        .and_then(|ns| ns.parse().ok())
        .map(Duration::from_nanos);
    Ok(WriterRun {
        rows_per_second,
        cpu_per_row,
    })
}

/// The reference config (`config.toml` at the top of the repository), compiled in: its rules on
/// `reviews` decide which columns the triggers capture (`book_id`, `user_id`).
const REFERENCE_CONFIG: &str = include_str!("../../config.toml");

/// The reference config on another database and address.
fn reference_config(db_name: &str, port: u16) -> anyhow::Result<String> {
    let (database, listen) = ("database = \"catalog.db\"", "listen = \"127.0.0.1:8080\"");
    anyhow::ensure!(
        REFERENCE_CONFIG.contains(database) && REFERENCE_CONFIG.contains(listen),
        "config.toml no longer has `{database}` and `{listen}`: update bench::reference_config"
    );
    Ok(REFERENCE_CONFIG
        .replacen(database, &format!("database = \"{db_name}\""), 1)
        .replacen(listen, &format!("listen = \"127.0.0.1:{port}\""), 1))
}

/// The least a trigger-based capture can cost: one `AFTER INSERT` trigger writing one row of
/// integers into a plain table (no JSON, no quoting, no AUTOINCREMENT).
const MINIMAL_TRIGGER: &str = "
CREATE TABLE minimal_log (id INTEGER PRIMARY KEY, op INTEGER NOT NULL, row_id INTEGER NOT NULL);
CREATE TRIGGER minimal_insert AFTER INSERT ON reviews BEGIN
  INSERT INTO minimal_log (op, row_id) VALUES (1, NEW.id);
END;";

/// What runs beside the app's writer in one capture-overhead measurement.
#[derive(Clone, Copy, PartialEq)]
enum Beside {
    /// No triggers: the app alone.
    Bare,
    /// `MINIMAL_TRIGGER`.
    Minimal,
    /// The reference config's triggers, no daemon (the outbox only grows).
    Triggers,
    /// The reference config's triggers and a release `cachetail run` of it, applying (write-through
    /// recomputes, write-behind, cursor writes, pruning) while the app writes.
    Daemon,
}

const BESIDE: [Beside; 4] = [
    Beside::Bare,
    Beside::Minimal,
    Beside::Triggers,
    Beside::Daemon,
];

/// What the daemon had left when a burst of writes finished, and how long it took to catch up.
struct Backlog {
    events_at_end: u64,
    caught_up: Duration,
}

/// The four databases of one writer's capture-overhead runs, set up once (and the daemon beside
/// the last one, running throughout).
struct CaptureSetup {
    dbs: [PathBuf; 4],
    daemon: DaemonProcess,
}

impl CaptureSetup {
    fn new(options: &BenchOptions, name: &str) -> anyhow::Result<CaptureSetup> {
        let mut dbs = Vec::new();
        let mut daemon = None;
        for beside in BESIDE {
            let db_name = format!("capture-{name}-{}.db", dbs.len());
            let db = options.dir.join(&db_name);
            let conn = fresh_catalog(&db, 10_000)?;
            drop(conn);
            let port = free_port()?;
            let config_path = options
                .dir
                .join(format!("capture-{name}-{}.toml", dbs.len()));
            std::fs::write(&config_path, reference_config(&db_name, port)?)?;
            match beside {
                Beside::Bare => {}
                Beside::Minimal => Connection::open(&db)?.execute_batch(MINIMAL_TRIGGER)?,
                Beside::Triggers => {
                    cachetail::prepare(&Config::load(&config_path)?)?;
                }
                Beside::Daemon => {
                    let mut started = DaemonProcess::start(
                        &options.dir,
                        &config_path,
                        port,
                        &format!("capture-{name}"),
                    )?;
                    started.wait_role("active", Duration::from_secs(30))?;
                    daemon = Some(started);
                }
            }
            dbs.push(db);
        }
        Ok(CaptureSetup {
            dbs: <[_; 4]>::try_from(dbs).map_err(|_| anyhow::anyhow!("four databases"))?,
            daemon: daemon.ok_or_else(|| anyhow::anyhow!("no daemon started"))?,
        })
    }

    /// After a burst on the daemon's database: its backlog then, and waits until it has applied
    /// everything (recomputes included), so that none of its work spills into the next run.
    fn catch_up(&mut self) -> anyhow::Result<Backlog> {
        let finished = Instant::now();
        let events_at_end = self.daemon.status()?["lag"].as_u64().unwrap_or(u64::MAX);
        loop {
            let status = self.daemon.status()?;
            if status["lag"].as_u64() == Some(0) && status["write_behind_queue"].as_u64() == Some(0)
            {
                return Ok(Backlog {
                    events_at_end,
                    caught_up: finished.elapsed(),
                });
            }
            anyhow::ensure!(
                finished.elapsed() < Duration::from_secs(60),
                "the daemon did not catch up with the writer within a minute: {status}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn capture_overhead(options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    // Many short rounds: on a shared machine the load swings within seconds, and a ratio taken
    // within a round of a second or so is exposed to less of it than one over a minute.
    let transactions = if options.quick { 20 } else { 50 };
    let rounds = if options.quick { 2 } else { 21 };
    let mut rows = Vec::new();
    type Writer = fn(&Path, u32) -> anyhow::Result<WriterRun>;
    let writers: [(&str, &str, Writer); 2] = [
        ("rust", "Rust writer (rusqlite)", rust_writer),
        ("python", "python3 writer (sqlite3 module)", python_writer),
    ];
    for (short, name, writer) in writers {
        let mut setup = CaptureSetup::new(options, short)?;
        // Rounds of the four, one after another (the machine's noise hits them alike); each
        // ratio is taken within its round, against that round's bare run. Each round starts
        // with another of the four, so that none always runs first.
        let mut rates: [Vec<f64>; 4] = Default::default();
        let mut cpu: [Vec<f64>; 4] = Default::default();
        let mut backlogs = Vec::new();
        for round in 0..rounds {
            for k in 0..BESIDE.len() {
                let i = (round + k) % BESIDE.len();
                let run = writer(&setup.dbs[i], transactions)?;
                rates[i].push(run.rows_per_second);
                cpu[i].extend(run.cpu_per_row.map(|d| d.as_secs_f64() * 1e6));
                if BESIDE[i] == Beside::Daemon {
                    backlogs.push(setup.catch_up()?);
                }
            }
        }
        drop(setup);
        let slower = |i: usize| -> Vec<f64> {
            rates[0]
                .iter()
                .zip(&rates[i])
                .map(|(bare, with)| bare / with)
                .collect()
        };
        let [bare, minimal, triggers, daemon] = [0, 1, 2, 3].map(|i| Spread::of(rates[i].clone()));
        let [minimal_x, triggers_x, daemon_x] = [1, 2, 3].map(|i| Spread::of(slower(i)));
        // CPU time per row, against the same round's bare run.
        let more_cpu = |i: usize| -> Spread {
            Spread::of(
                cpu[i]
                    .iter()
                    .zip(&cpu[0])
                    .map(|(with, bare)| with / bare)
                    .collect(),
            )
        };
        let cpu_ratios = if cpu.iter().all(|c| c.len() == rounds) {
            format!(
                "; the writer's CPU time per row ({:.1} µs bare): {} with the daemon, {} triggers alone, {} minimal trigger",
                Spread::of(cpu[0].clone()).median(),
                more_cpu(3).times(),
                more_cpu(2).times(),
                more_cpu(1).times()
            )
        } else {
            String::new()
        };
        let left = Spread::of(backlogs.iter().map(|b| b.events_at_end as f64).collect());
        let catch_up = Spread::of(
            backlogs
                .iter()
                .map(|b| b.caught_up.as_secs_f64() * 1e3)
                .collect(),
        );
        let rows_written = u64::from(transactions) * 100;
        eprintln!(
            "capture overhead ({name}), rows/s over {rounds} rounds: bare {bare}, minimal trigger {minimal}, triggers {triggers}, daemon applying {daemon}; daemon's backlog at the end of a burst {left}, caught up (ms) {catch_up}",
            bare = bare.all(),
            minimal = minimal.all(),
            triggers = triggers.all(),
            daemon = daemon.all(),
            left = left.all(),
            catch_up = catch_up.all(),
        );
        rows.push(Row {
            figure: format!(
                "capture overhead, {name}: bursts of {} rows in 100-row transactions into `reviews`, the reference config's capture (`book_id`, `user_id`), {}",
                human(rows_written as f64),
                rounds_text(rounds)
            ),
            measured: format!(
                "{} rows/s with the daemon running and applying (its backlog when a burst ended: {} events, all applied {} later); {} rows/s with the triggers alone",
                daemon.rate(),
                left.show(|x| format!("{x:.0}")),
                catch_up.millis(),
                triggers.rate()
            ),
            baseline: format!(
                "no triggers: {} rows/s; one minimal trigger (one row of integers into a plain table): {} rows/s",
                bare.rate(),
                minimal.rate()
            ),
            ratio: format!(
                "**{} slower** with the daemon; triggers alone {}; minimal trigger {}{cpu_ratios}",
                daemon_x.times(),
                triggers_x.times(),
                minimal_x.times()
            ),
            target: "≤ 1.4× slower",
        });
    }
    Ok(rows)
}

// ------------------------------------------------------------------------------------------
// Drain.

fn drain(options: &BenchOptions) -> anyhow::Result<Row> {
    let events: u32 = if options.quick { 100_000 } else { 1_000_000 };
    let db = options.dir.join("drain.db");
    fresh_catalog(&db, 0)?;
    let config = config_for(&options.dir, "drain.db", DELETE_RULE)?;
    let (mut outbox, _) = cachetail::prepare(&config)?;
    // The backlog: app writes while no daemon runs, over 1,000 distinct keys.
    {
        let mut conn = Connection::open(&db)?;
        let tx = conn.transaction()?;
        {
            let mut insert =
                tx.prepare("INSERT INTO reviews (book_id, user_id, rating) VALUES (?1, 1, 3)")?;
            for i in 0..events {
                insert.execute([i64::from(i % BOOKS) + 1])?;
            }
        }
        tx.commit()?;
    }
    // Baseline: a bare sequential read of the same rows with rusqlite.
    let read_start = Instant::now();
    let mut read = 0u64;
    {
        let conn = cachetail::sqlite::open(&db)?;
        let mut stmt =
            conn.prepare("SELECT id, capture, op, old, new, at FROM cachetail_outbox ORDER BY id")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let _: (i64, i64, i64, Option<String>, Option<String>, Option<f64>) = (
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
            );
            read += 1;
        }
    }
    let read_rate = rate(read, read_start.elapsed());

    let shared = Shared::new(config, outbox.cursor());
    let config = shared.config();
    let head = outbox.head()?;
    let start = Instant::now();
    while outbox.cursor() < head {
        cachetail::tail::step(&shared, &config, &mut outbox)?;
    }
    outbox.persist(true, false)?;
    let drain_rate = rate(head, start.elapsed());
    // Then the housekeeping the daemon does once idle: deleting the applied rows.
    let prune_start = Instant::now();
    outbox.persist(true, true)?;
    let prune_rate = rate(head, prune_start.elapsed());
    eprintln!(
        "drain: {head} events in {:?} ({drain_rate:.0}/s); bare read {read_rate:.0} rows/s; prune {prune_rate:.0} rows/s",
        start.elapsed()
    );
    Ok(Row {
        figure: format!(
            "drain: {} outbox rows over 1k keys, delete strategy, applied end to end (read, mapped, invalidated, cursor written)",
            human(f64::from(events))
        ),
        measured: format!(
            "{} events/s; then pruned (when idle) at {} rows/s",
            human(drain_rate),
            human(prune_rate)
        ),
        baseline: format!(
            "bare sequential read of the rows: {} rows/s",
            human(read_rate)
        ),
        ratio: format!("{:.2}× the bare read", drain_rate / read_rate),
        target: "≥ 1M events/s",
    })
}

// ------------------------------------------------------------------------------------------
// Commit → fresh, per strategy.

struct Running {
    shared: Arc<Shared>,
    address: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: tokio::runtime::Runtime,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn start(config: Config) -> anyhow::Result<Running> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let address = listener.local_addr()?;
        let (outbox, _) = cachetail::prepare(&config)?;
        let shared = Arc::new(Shared::new(config, outbox.cursor()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(cachetail::run_with(
            Arc::clone(&shared),
            outbox,
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        // Alone on its database, it takes the lease before it serves.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !shared.active.load(Ordering::Acquire) {
            anyhow::ensure!(Instant::now() < deadline, "the daemon never took the lease");
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Running {
            shared,
            address,
            stop: Some(stop),
            runtime,
            task: Some(task),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = self.runtime.block_on(task);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

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
    std::thread::spawn(move || {
        let mut conn = Connection::open(&db)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mut rng = Rng::new(5);
        let (start, mut rows) = (Instant::now(), 0u64);
        while !stop.load(Ordering::Relaxed) {
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
    })
}

fn commit_to_fresh(options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
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
        // The same while the app writes flat out beside it, measured meanwhile.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = writer_beside(db.clone(), Arc::clone(&stop));
        let busy = measure_fresh(&running, &db, busy_commits);
        stop.store(true, Ordering::Relaxed);
        let writes = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        let busy = busy?;
        let busy_took = measuring.elapsed() - alone_took;
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
                "GET of a cached key: p50 {} · p99 {}",
                ms(percentile(&hits, 0.5)),
                ms(percentile(&hits, 0.99))
            ),
            ratio: format!(
                "p50 {:.1}× a cached GET; {:.1}× with the app writing",
                p50.as_secs_f64() / hit_p50,
                busy_p50.as_secs_f64() / hit_p50
            ),
            target: if strategy == "write-through" {
                "p50 ≤ 1 ms, p99 ≤ 5 ms"
            } else {
                "state it"
            },
        });
    }
    Ok(rows)
}

// ------------------------------------------------------------------------------------------
// The Redis backend beside the in-process one.

/// A `redis-server` of the benchmark's own, on a free port; stopped when dropped.
struct RedisProcess {
    child: std::process::Child,
    port: u16,
}

impl RedisProcess {
    fn start() -> anyhow::Result<Option<RedisProcess>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let spawned = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn();
        let Ok(child) = spawned else {
            return Ok(None);
        };
        let server = RedisProcess { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(server))
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Commit → fresh (write-through) and cached GETs with values in Redis, beside the same with
/// values in memory, in one run.
fn redis_backend(options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
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

// ------------------------------------------------------------------------------------------
// Stampede.

/// `clients` threads, each on its own connection, released at once by a barrier, each GETting
/// `key(i)`. Returns how long until all were answered.
fn concurrent_gets(
    address: std::net::SocketAddr,
    clients: usize,
    key: impl Fn(usize) -> String,
) -> anyhow::Result<Duration> {
    let barrier = Arc::new(std::sync::Barrier::new(clients + 1));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (barrier, failures) = (Arc::clone(&barrier), Arc::clone(&failures));
            let path = format!("/v1/keys/{}", key(i));
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let mut client = Client::new(address).with_timeout(Duration::from_secs(600));
                    let ready = client.get("/healthz");
                    barrier.wait();
                    let answer = ready.and_then(|_| client.get(&path));
                    let failure = match answer {
                        Ok(reply) if reply.status == 200 => return,
                        Ok(reply) => format!("{path}: {} {}", reply.status, reply.text()),
                        Err(e) => format!("{path}: {e}"),
                    };
                    failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(failure);
                })
        })
        .collect::<Result<_, _>>()?;
    // Every client is connected and waiting: the clock starts when they are let go.
    barrier.wait();
    let start = Instant::now();
    for thread in threads {
        let _ = thread.join();
    }
    let elapsed = start.elapsed();
    let failures = failures.lock().unwrap_or_else(|e| e.into_inner());
    anyhow::ensure!(
        failures.is_empty(),
        "{} of the {clients} requests failed, first: {}",
        failures.len(),
        failures.first().map_or("", String::as_str)
    );
    Ok(elapsed)
}

fn stampede(options: &BenchOptions) -> anyhow::Result<Row> {
    let db = options.dir.join("stampede.db");
    fresh_catalog(&db, 1_000)?;
    // A query of about 10 ms (4 ms in --quick): 1,000 of them take a while.
    let spins = if options.quick { 20_000 } else { 50_000 };
    let rules = format!(
        "[keys.\"slow:{{id}}\"]\nquery = \"SELECT :id AS id, (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {spins}) SELECT count(*) FROM n) AS spins\"\n[http]\nrequest_timeout = \"300s\"\n"
    );
    let running = Running::start(config_for(&options.dir, "stampede.db", &rules)?)?;
    let config = running.shared.config();
    let fills = || {
        config
            .families
            .iter()
            .find(|f| f.pattern.source() == "slow:{id}")
            .map_or(0, |f| f.stats.fills.load(Ordering::Relaxed))
    };
    let clients = 1_000;
    // One cold GET alone: what one query costs.
    let mut client = Client::new(running.address);
    let single_start = Instant::now();
    anyhow::ensure!(client.get("/v1/keys/slow:0")?.status == 200, "slow:0");
    let single = single_start.elapsed();
    // 1,000 concurrent GETs of one cold key: they join one fill.
    let before = fills();
    let coalesced = concurrent_gets(running.address, clients, |_| "slow:1".to_owned())?;
    let coalesced_fills = fills() - before;
    // The same 1,000 concurrent cold GETs with nothing to coalesce: each a key of its own in
    // the same family.
    let before = fills();
    let spread = concurrent_gets(running.address, clients, |i| format!("slow:{}", 1_000 + i))?;
    let spread_fills = fills() - before;
    eprintln!(
        "stampede: one cold GET {single:?}; 1,000 on one key: {coalesced_fills} queries in {coalesced:?}; 1,000 on distinct keys: {spread_fills} queries in {spread:?}"
    );
    Ok(Row {
        figure: "stampede: 1,000 concurrent GETs of one cold key (a slow query)".to_owned(),
        measured: format!(
            "{coalesced_fills} query run; all 1,000 answered in {}",
            ms(coalesced)
        ),
        baseline: format!(
            "the same 1,000 concurrent cold GETs without coalescing (each a distinct key of the family): {spread_fills} queries, all answered in {}; one cold GET alone: {}",
            ms(spread),
            ms(single)
        ),
        ratio: format!(
            "{coalesced_fills}/{spread_fills} queries, {:.1}× faster",
            spread.as_secs_f64() / coalesced.as_secs_f64().max(1e-9)
        ),
        target: "exactly 1 query",
    })
}

// ------------------------------------------------------------------------------------------
// Takeover.

/// How often a standby looks at the lease (`tail::STANDBY_POLL`): the baseline of a takeover
/// after kill -9, when nothing else wakes the standby.
const STANDBY_POLL: Duration = Duration::from_millis(200);

/// Two daemons on one database (A, B): configs written, nothing started.
struct Pair {
    configs: [(PathBuf, u16); 2],
}

impl Pair {
    fn new(options: &BenchOptions, name: &str, lease: &str) -> anyhow::Result<Pair> {
        let db_name = format!("{name}.db");
        fresh_catalog(&options.dir.join(&db_name), 1_000)?;
        let mut configs = Vec::new();
        for side in ["a", "b"] {
            let port = free_port()?;
            let path = options.dir.join(format!("{name}-{side}.toml"));
            std::fs::write(
                &path,
                format!(
                    "database = \"{db_name}\"\nlisten = \"127.0.0.1:{port}\"\n[tail]\nlease = \"{lease}\"\n\
                     [keys.\"book:{{id}}\"]\nquery = \"SELECT count(*) AS reviews FROM reviews WHERE book_id = :id\"\n{DELETE_RULE}"
                ),
            )?;
            configs.push((path, port));
        }
        let configs = <[_; 2]>::try_from(configs).map_err(|_| anyhow::anyhow!("two configs"))?;
        Ok(Pair { configs })
    }

    fn start(&self, options: &BenchOptions, side: usize) -> anyhow::Result<DaemonProcess> {
        let (config, port) = &self.configs[side];
        let name = format!("takeover-{}", ["a", "b"][side]);
        DaemonProcess::start(&options.dir, config, *port, &name)
    }

    /// A active, then B standing by.
    fn start_both(&self, options: &BenchOptions) -> anyhow::Result<[DaemonProcess; 2]> {
        let mut a = self.start(options, 0)?;
        a.wait_role("active", Duration::from_secs(30))?;
        let mut b = self.start(options, 1)?;
        b.wait_role("standby", Duration::from_secs(30))?;
        Ok([a, b])
    }
}

/// Release daemons, as deployed (memory backend; the lease does not depend on it): kill -9 of
/// the active one with a long lease (so only the process-gone check can explain a fast
/// takeover), and SIGSTOP of the active one (only the lease's expiry frees it).
fn takeover(options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    let runs = if options.quick { 2 } else { 8 };
    let lease_long = Duration::from_secs(30);
    let pair = Pair::new(options, "takeover-kill", "30s")?;
    let mut daemons = pair.start_both(options)?;
    let mut active = 0;
    let mut killed = Vec::new();
    let mut rng = Rng::new(7);
    for _ in 0..runs {
        let standby = 1 - active;
        daemons[active].kill();
        killed.push(
            daemons[standby]
                .wait_role("active", lease_long / 2)?
                .as_secs_f64()
                * 1e3,
        );
        // The killed one comes back as the standby, for the next run.
        daemons[active] = pair.start(options, active)?;
        daemons[active].wait_role("standby", Duration::from_secs(30))?;
        // Let the new standby settle into its polling rhythm: the next kill lands at a random
        // point of it.
        std::thread::sleep(STANDBY_POLL + Duration::from_millis(rng.pick(200).unsigned_abs()));
        active = standby;
    }
    drop(daemons);

    let lease = Duration::from_secs(2);
    let stop_runs = if options.quick { 1 } else { 5 };
    let pair = Pair::new(options, "takeover-stop", "2s")?;
    let mut daemons = pair.start_both(options)?;
    let mut active = 0;
    let mut stopped = Vec::new();
    for _ in 0..stop_runs {
        let standby = 1 - active;
        // The active daemon renews each third of the lease: pause it at a random point of that
        // cycle (right after a takeover it has just renewed, which would always measure the
        // whole lease).
        let third = lease.as_millis() as u32 / 3;
        std::thread::sleep(
            Duration::from_millis(u64::from(third))
                + Duration::from_millis(rng.pick(third).unsigned_abs()),
        );
        daemons[active].signal("-STOP")?;
        stopped.push(
            daemons[standby]
                .wait_role("active", lease * 5)?
                .as_secs_f64()
                * 1e3,
        );
        // Resumed, it finds it lost the lease and stands by (applying nothing).
        daemons[active].signal("-CONT")?;
        daemons[active].wait_role("standby", lease * 5)?;
        active = standby;
    }
    drop(daemons);

    let killed = Spread::of(killed);
    let stopped = Spread::of(stopped);
    let poll_ms = STANDBY_POLL.as_secs_f64() * 1e3;
    let lease_ms = lease.as_secs_f64() * 1e3;
    eprintln!(
        "takeover after kill -9 (lease 30s): {} ms; after SIGSTOP (lease 2s): {} ms",
        killed.all(),
        stopped.all()
    );
    let build = if cfg!(debug_assertions) {
        "DEBUG build"
    } else {
        "release build"
    };
    Ok(vec![
        Row {
            figure: format!(
                "standby takeover after `kill -9` of the active daemon, two `cachetail run` processes ({build}) on one database, `lease = \"30s\"`, {}, observed through the standby's `/v1/status`",
                runs_text(runs)
            ),
            measured: killed.millis(),
            baseline: format!(
                "the standby polls the lease every {poll_ms:.0} ms (expected: {:.0} ms on average, at most {poll_ms:.0} ms); the lease, 30 s",
                poll_ms / 2.0
            ),
            ratio: format!(
                "median {:.2}× the poll interval, {:.3}× the lease",
                killed.median() / poll_ms,
                killed.median() / (lease_long.as_secs_f64() * 1e3)
            ),
            target: "at once: within one poll interval (+ a few ms)",
        },
        Row {
            figure: format!(
                "takeover from an active daemon paused (SIGSTOP), same pair, `lease = \"2s\"`, {}",
                runs_text(stop_runs)
            ),
            measured: stopped.millis(),
            baseline: format!(
                "the lease, {lease_ms:.0} ms (renewed each third of it, so expected between {:.0} and {:.0} ms)",
                lease_ms * 2.0 / 3.0,
                lease_ms + poll_ms
            ),
            ratio: format!("median {:.2}× the lease", stopped.median() / lease_ms),
            target: "≈ the lease",
        },
    ])
}

// ------------------------------------------------------------------------------------------
// Memory.

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn memory(options: &BenchOptions) -> Row {
    let values: u64 = if options.quick { 100_000 } else { 1_000_000 };
    let config = Config::parse(
        "database = \"x.db\"\n[keys.\"item:{id}\"]\nquery = \"SELECT :id AS id\"\n",
        "bench.toml",
        Path::new("."),
    )
    .expect("a valid config");
    let family = Arc::clone(&config.families[0]);
    let fill = |cache: &cachetail::cache::Cache, count: u64| {
        for i in 0..count {
            let key: Arc<str> = Arc::from(format!("item:{i}"));
            let ticket = cache.begin_refresh(key, &family);
            let mut body = format!(
                "{{\"id\":{i:>10},\"title\":\"{:<150}\",\"rating\":4.5}}",
                "x"
            );
            body.shrink_to_fit(); // as fill::encode_rows does
            cache.finish_fill(
                ticket,
                Ok(cachetail::cache::Filled {
                    version: 1,
                    body: Some(bytes::Bytes::from(body)),
                    tags: Box::new([]),
                }),
            );
        }
        cache.entry_count()
    };
    let before = rss_bytes();
    let cache = cachetail::cache::Cache::new(values * 2);
    let stored = fill(&cache, values);
    let used = rss_bytes().saturating_sub(before);
    drop(cache);
    let payload = values * 200;
    let bounded = cachetail::cache::Cache::new(values / 10);
    let bounded_count = fill(&bounded, values);
    eprintln!(
        "memory: {stored} values, {used} bytes RSS for {payload} bytes of payload; bounded cache kept {bounded_count}"
    );
    Row {
        figure: format!(
            "memory: {} cached values of ~200 bytes",
            human(values as f64)
        ),
        measured: format!(
            "{:.0} MiB RSS growth ({stored} stored); with max_entries = {} it kept {bounded_count}",
            used as f64 / 1048576.0,
            values / 10
        ),
        baseline: format!("payload {:.0} MiB", payload as f64 / 1048576.0),
        ratio: format!("{:.2}× payload", used as f64 / payload as f64),
        target: "≤ 1.5 × payload + 30 MiB, bounded by config",
    }
}
