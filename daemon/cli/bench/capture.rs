//! Capture cost: the app's writer (python3's sqlite3 module) in 100-row transactions into a
//! narrow rowid table, `ratings (id INTEGER PRIMARY KEY, book_id, rating)`, three ways in one
//! run: no triggers (bare), one minimal trigger, and cachetail's capture with a release
//! `cachetail run` applying beside it. The figure is cachetail against the minimal trigger.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::daemons::{DaemonProcess, free_port};
use super::{BOOKS, BenchOptions, Row, Spread, human, rounds_text};

/// One writer run: its rate, and the CPU time its thread spent per row (steadier than the rate
/// on a loaded machine, but blind to waiting: locks, a busy CPU).
struct WriterRun {
    rows_per_second: f64,
    cpu_per_row: Option<Duration>,
}

/// The app's table: narrow, its rowid chosen by SQLite, no other key.
const TABLE: &str =
    "CREATE TABLE ratings (id INTEGER PRIMARY KEY, book_id INTEGER, rating INTEGER);";

/// The python3 writer: 100-row transactions into `ratings` (sqlite3 module, default settings),
/// timed by the script itself.
fn writer_script(transactions: u32) -> String {
    format!(
        "import sqlite3, sys, time, random\ncon = sqlite3.connect(sys.argv[1], timeout=5)\nr = random.Random(3)\nt = time.perf_counter()\nc = time.thread_time_ns()\n\
         for _ in range({transactions}):\n    con.executemany(\"INSERT INTO ratings (book_id, rating) VALUES (?, ?)\", [(r.randint(1, {BOOKS}), r.randint(1, 5)) for _ in range(100)])\n    con.commit()\n\
         print({transactions} * 100 / (time.perf_counter() - t), (time.thread_time_ns() - c) // ({transactions} * 100))\n"
    )
}

/// One run of the python3 writer.
fn python_writer(db: &Path, transactions: u32) -> anyhow::Result<WriterRun> {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(writer_script(transactions))
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

/// The interpreter `python3` names (a launcher such as pyenv's shim runs it in another process,
/// which valgrind would not follow).
fn python_executable() -> anyhow::Result<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()?;
    anyhow::ensure!(out.status.success(), "python3 does not run");
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The instructions the python3 writer's process runs per row, counted by valgrind's callgrind:
/// the difference between a run of 60 transactions and one of 10, over the 5,000 rows between
/// (start-up cancels out). Unlike its rate and CPU time, blind to the machine's load. `None`
/// when valgrind is not installed.
fn instructions_per_row(python: &Path, db: &Path) -> anyhow::Result<Option<f64>> {
    let mut counted = Vec::new();
    for transactions in [10, 60] {
        let out = match std::process::Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(python)
            .arg("-c")
            .arg(writer_script(transactions))
            .arg(db)
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let log = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "valgrind python3 writer: {log}");
        let collected = log
            .lines()
            .find_map(|line| line.split_once("Collected :"))
            .and_then(|(_, n)| n.trim().parse::<f64>().ok())
            .ok_or_else(|| anyhow::anyhow!("callgrind printed no count: {log}"))?;
        counted.push(collected);
    }
    Ok(Some((counted[1] - counted[0]) / 5_000.0))
}

/// cachetail's config for the narrow table: one family reading it, one rule (the delete
/// strategy) keyed by `book_id`, so capture records that column.
fn narrow_config(db_name: &str, port: u16) -> String {
    format!(
        "database = \"{db_name}\"\nlisten = \"127.0.0.1:{port}\"\n\
         [keys.\"book:{{id}}\"]\nquery = \"SELECT count(*) AS ratings, avg(rating) AS avg_rating FROM ratings WHERE book_id = :id\"\n\
         [[rules]]\ntable = \"ratings\"\nkeys = [\"book:{{book_id}}\"]\n"
    )
}

/// The least a trigger-based capture can cost: one `AFTER INSERT` trigger writing one row of
/// integers into a plain table (no quoting, no AUTOINCREMENT).
const MINIMAL_TRIGGER: &str = "
CREATE TABLE minimal_log (id INTEGER PRIMARY KEY, op INTEGER NOT NULL, row_id INTEGER NOT NULL);
CREATE TRIGGER minimal_insert AFTER INSERT ON ratings BEGIN
  INSERT INTO minimal_log (op, row_id) VALUES (1, NEW.id);
END;";

/// What runs beside the app's writer in one measurement.
#[derive(Clone, Copy, PartialEq)]
enum Beside {
    /// No triggers: the app alone.
    Bare,
    /// `MINIMAL_TRIGGER`.
    Minimal,
    /// cachetail's capture, and a release `cachetail run` applying it as the app writes.
    Cachetail,
}

const BESIDE: [Beside; 3] = [Beside::Bare, Beside::Minimal, Beside::Cachetail];

/// What the daemon had left when a burst of writes finished, and how long it took to catch up.
struct Backlog {
    events_at_end: u64,
    caught_up: Duration,
}

/// The three databases, set up once, and the daemon beside the last one, running throughout.
struct CaptureSetup {
    dbs: [PathBuf; 3],
    daemon: DaemonProcess,
}

impl CaptureSetup {
    fn new(options: &BenchOptions) -> anyhow::Result<CaptureSetup> {
        let mut dbs = Vec::new();
        let mut daemon = None;
        for beside in BESIDE {
            let db_name = format!("capture-narrow-{}.db", dbs.len());
            let db = options.dir.join(&db_name);
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
            }
            let conn = Connection::open(&db)?;
            conn.execute_batch(&format!("PRAGMA journal_mode = WAL; {TABLE}"))?;
            if beside == Beside::Minimal {
                conn.execute_batch(MINIMAL_TRIGGER)?;
            }
            drop(conn);
            if beside == Beside::Cachetail {
                let port = free_port()?;
                let config_path = options.dir.join("capture-narrow.toml");
                std::fs::write(&config_path, narrow_config(&db_name, port))?;
                let mut started =
                    DaemonProcess::start(&options.dir, &config_path, port, "capture-narrow")?;
                started.wait_role("active", Duration::from_secs(30))?;
                daemon = Some(started);
            }
            dbs.push(db);
        }
        Ok(CaptureSetup {
            dbs: <[_; 3]>::try_from(dbs).map_err(|_| anyhow::anyhow!("three databases"))?,
            daemon: daemon.ok_or_else(|| anyhow::anyhow!("no daemon started"))?,
        })
    }

    /// After a burst on the daemon's database: its backlog then, and waits until it has applied
    /// everything, so that none of its work spills into the next run.
    fn catch_up(&mut self) -> anyhow::Result<Backlog> {
        let finished = Instant::now();
        let events_at_end = self.daemon.status()?["lag"].as_u64().unwrap_or(u64::MAX);
        loop {
            let status = self.daemon.status()?;
            if status["lag"].as_u64() == Some(0) {
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

/// What the rounds measured: rows/s and CPU µs per row of each of `BESIDE`, and the daemon's
/// backlog after each burst on its database.
struct Rounds {
    rates: [Vec<f64>; 3],
    cpu: [Vec<f64>; 3],
    backlogs: Vec<Backlog>,
}

/// Rounds of the three, one after another (the machine's noise hits them alike); each ratio is
/// taken within its round. Each round starts with another of the three, so that none always
/// runs first.
fn measure_rounds(
    setup: &mut CaptureSetup,
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
            let run = python_writer(&setup.dbs[i], transactions)?;
            measured.rates[i].push(run.rows_per_second);
            measured.cpu[i].extend(run.cpu_per_row.map(|d| d.as_secs_f64() * 1e6));
            if BESIDE[i] == Beside::Cachetail {
                measured.backlogs.push(setup.catch_up()?);
            }
        }
    }
    Ok(measured)
}

pub(super) fn capture_overhead(options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    // Many short rounds: on a shared machine the load swings within seconds, and a ratio taken
    // within a round of a second or so is exposed to less of it than one over a minute.
    let transactions = if options.quick { 20 } else { 50 };
    let rounds = if options.quick { 2 } else { 31 };
    let mut setup = CaptureSetup::new(options)?;
    let measured = measure_rounds(&mut setup, transactions, rounds)?;
    let mut instructions = Vec::new();
    if !options.quick {
        let python = python_executable()?;
        for (beside, db) in BESIDE.into_iter().zip(setup.dbs.clone()) {
            instructions.push(instructions_per_row(&python, &db)?);
            if beside == Beside::Cachetail {
                setup.catch_up()?;
            }
        }
    }
    drop(setup);
    let instructions = <[Option<f64>; 3]>::try_from(instructions)
        .ok()
        .and_then(|[a, b, c]| Some([a?, b?, c?]));
    Ok(vec![capture_row(
        &measured,
        instructions,
        transactions,
        rounds,
    )])
}

/// Per round, `rates[a] / rates[b]`: how many times slower `b` ran than `a`.
fn slower(rates: &[Vec<f64>; 3], a: usize, b: usize) -> Spread {
    Spread::of(rates[a].iter().zip(&rates[b]).map(|(a, b)| a / b).collect())
}

/// The table's row.
fn capture_row(
    measured: &Rounds,
    instructions: Option<[f64; 3]>,
    transactions: u32,
    rounds: usize,
) -> Row {
    let Rounds {
        rates,
        cpu,
        backlogs,
    } = measured;
    let [bare, minimal, cachetail] = [0, 1, 2].map(|i| Spread::of(rates[i].clone()));
    let (vs_minimal, minimal_x, cachetail_x) = (
        slower(rates, 1, 2),
        slower(rates, 0, 1),
        slower(rates, 0, 2),
    );
    // CPU time per row, against the same round's other run.
    let more_cpu = |a: usize, b: usize| -> Spread {
        Spread::of(cpu[b].iter().zip(&cpu[a]).map(|(b, a)| b / a).collect())
    };
    let cpu_ratios = if cpu.iter().all(|c| c.len() == rounds) {
        format!(
            ". The writer's CPU time per row ({:.1} µs bare): cachetail {} the minimal trigger's; {} bare with cachetail, {} with the minimal trigger",
            Spread::of(cpu[0].clone()).median(),
            more_cpu(1, 2).times(),
            more_cpu(0, 2).times(),
            more_cpu(0, 1).times()
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
    let counted = match instructions {
        Some([bare, minimal, cachetail]) => format!(
            "**{:.2}× the minimal trigger's instructions per row** (callgrind, the writer's process: bare {}, minimal trigger {} ({:.2}× bare), cachetail {} ({:.2}× bare)); by rate, ",
            cachetail / minimal,
            human(bare),
            human(minimal),
            minimal / bare,
            human(cachetail),
            cachetail / bare
        ),
        None => "(valgrind not installed: no instruction count); by rate, ".to_owned(),
    };
    let rows_written = u64::from(transactions) * 100;
    eprintln!(
        "capture cost (python3 writer, narrow table), rows/s over {rounds} rounds: bare {}, minimal trigger {}, cachetail {}; cachetail/minimal by round {}; daemon's backlog at the end of a burst {}, caught up (ms) {}",
        bare.all(),
        minimal.all(),
        cachetail.all(),
        vs_minimal.show(|x| format!("{x:.2}")),
        left.all(),
        catch_up.all(),
    );
    Row {
        figure: format!(
            "capture cost, python3 writer: bursts of {} rows in 100-row transactions into a narrow rowid table `ratings (id INTEGER PRIMARY KEY, book_id, rating)`, capture of `book_id` with the daemon running and applying, {}",
            human(rows_written as f64),
            rounds_text(rounds)
        ),
        measured: format!(
            "{} rows/s with cachetail (its backlog when a burst ended: {} events, all applied {} later)",
            cachetail.rate(),
            left.show(|x| format!("{x:.0}")),
            catch_up.millis(),
        ),
        baseline: format!(
            "no triggers: {} rows/s; one minimal trigger (one row of integers into a plain table): {} rows/s",
            bare.rate(),
            minimal.rate()
        ),
        ratio: format!(
            "{counted}{} the minimal trigger's time (cachetail {} slower than bare, the minimal trigger {}){cpu_ratios}",
            vs_minimal.times(),
            cachetail_x.times(),
            minimal_x.times()
        ),
        target: "≤ 1.1× the minimal trigger",
    }
}
