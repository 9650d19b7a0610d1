//! Capture overhead: the app's writer (Rust, and python3) in 100-row transactions with the
//! reference config's capture and a release `cachetail run` applying beside it, beside the same
//! writer with no triggers, one minimal trigger, and the triggers alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cachetail::Config;
use rusqlite::{Connection, params};

use super::daemons::{DaemonProcess, free_port};
use super::{BOOKS, BenchOptions, Row, Spread, fresh_catalog, human, rate, rounds_text};
use crate::demo::{REFERENCE_CONFIG, Rng};

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

/// The reference config (`config.toml` at the top of the repository) on another database and
/// address: its rules on `reviews` decide which columns the triggers capture (`book_id`,
/// `user_id`).
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

/// What one writer's rounds measured: rows/s and CPU µs per row of each of `BESIDE`, and the
/// daemon's backlog after each burst on its database.
struct Rounds {
    rates: [Vec<f64>; 4],
    cpu: [Vec<f64>; 4],
    backlogs: Vec<Backlog>,
}

/// Rounds of the four, one after another (the machine's noise hits them alike); each ratio is
/// taken within its round, against that round's bare run. Each round starts with another of the
/// four, so that none always runs first.
fn measure_rounds(
    setup: &mut CaptureSetup,
    writer: Writer,
    transactions: u32,
    rounds: usize,
) -> anyhow::Result<Rounds> {
    let mut measured = Rounds {
        rates: Default::default(),
        cpu: Default::default(),
        backlogs: Vec::new(),
    };
    for round in 0..rounds {
        for k in 0..BESIDE.len() {
            let i = (round + k) % BESIDE.len();
            let run = writer(&setup.dbs[i], transactions)?;
            measured.rates[i].push(run.rows_per_second);
            measured.cpu[i].extend(run.cpu_per_row.map(|d| d.as_secs_f64() * 1e6));
            if BESIDE[i] == Beside::Daemon {
                measured.backlogs.push(setup.catch_up()?);
            }
        }
    }
    Ok(measured)
}

type Writer = fn(&Path, u32) -> anyhow::Result<WriterRun>;

pub(super) fn capture_overhead(options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    // Many short rounds: on a shared machine the load swings within seconds, and a ratio taken
    // within a round of a second or so is exposed to less of it than one over a minute.
    let transactions = if options.quick { 20 } else { 50 };
    let rounds = if options.quick { 2 } else { 21 };
    let mut rows = Vec::new();
    let writers: [(&str, &str, Writer); 2] = [
        ("rust", "Rust writer (rusqlite)", rust_writer),
        ("python", "python3 writer (sqlite3 module)", python_writer),
    ];
    for (short, name, writer) in writers {
        let mut setup = CaptureSetup::new(options, short)?;
        let measured = measure_rounds(&mut setup, writer, transactions, rounds)?;
        drop(setup);
        rows.push(capture_row(name, &measured, transactions, rounds));
    }
    Ok(rows)
}

/// One writer's row of the table.
fn capture_row(name: &str, measured: &Rounds, transactions: u32, rounds: usize) -> Row {
    let Rounds {
        rates,
        cpu,
        backlogs,
    } = measured;
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
    Row {
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
    }
}
