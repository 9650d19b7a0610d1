//! `maintain = "incremental"` (issue 17): the reference aggregates kept fresh from the changes
//! themselves, byte for byte what their queries return.
//!
//! A separate python3 writer makes random changes in batches (inserts, rating updates, reviews
//! moved between books, NULL and REAL and TEXT ratings, deletes, REPLACEs, books renamed, added
//! and removed, users likewise); after each batch every maintained value read with `?fresh=1`
//! must be a hit equal, byte for byte, to the same key read from the database
//! (`Cache-Control: no-cache`, which runs the family's query).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crate::common::*;

/// A schema with loose types: `rating` has no affinity (a TEXT '4' stays text), `book_id` may
/// be NULL, and no foreign keys (a deleted book leaves its reviews behind).
const SCHEMA: &str = "
CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT, author TEXT, year INTEGER);
CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE reviews (id INTEGER PRIMARY KEY, book_id INTEGER, user_id INTEGER, rating, body TEXT DEFAULT '');
CREATE INDEX reviews_by_book ON reviews (book_id);
CREATE INDEX reviews_by_user ON reviews (user_id);
";

/// The maintained keys: the reference config's aggregates, all incremental and write-through.
pub const MAINTAINED: [&str; 3] = ["top-books", "catalog-stats", "leaderboard:most-reviewed"];
/// Those kept as one row per group.
const GROUPED: [&str; 2] = ["top-books", "leaderboard:most-reviewed"];

fn config(port: u16, backend: &str) -> String {
    format!(
        r#"database = "catalog.db"
listen = "127.0.0.1:{port}"
invalidate = "auto"
{backend}

[keys."book:{{id}}"]
query = """SELECT b.id, b.title, round(avg(r.rating), 2) AS avg_rating, count(r.id) AS review_count
           FROM books b LEFT JOIN reviews r ON r.book_id = b.id WHERE b.id = :id GROUP BY b.id"""
strategy = "write-through"
maintain = "incremental"

[keys."top-books"]
query = """SELECT b.id, b.title, round(avg(r.rating), 2) AS avg_rating, count(r.id) AS review_count
           FROM books b JOIN reviews r ON r.book_id = b.id
           GROUP BY b.id HAVING count(r.id) >= 3
           ORDER BY avg_rating DESC, review_count DESC, b.id LIMIT 10"""
many = true
strategy = "write-through"
maintain = "incremental"

[keys."catalog-stats"]
query = """SELECT (SELECT count(*) FROM books) AS books, (SELECT count(*) FROM users) AS users,
                  (SELECT count(*) FROM reviews) AS reviews, (SELECT round(avg(rating), 3) FROM reviews) AS avg_rating"""
strategy = "write-through"
maintain = "incremental"

[keys."leaderboard:most-reviewed"]
query = """SELECT u.id, u.name, count(r.id) AS reviews FROM users u JOIN reviews r ON r.user_id = u.id
           GROUP BY u.id ORDER BY reviews DESC, u.id LIMIT 10"""
many = true
strategy = "write-through"
maintain = "incremental"
"#
    )
}

/// The writer: reads a number of changes per line on stdin, makes them in one transaction,
/// answers `ok`. Seeded: a failure can be replayed.
const WRITER: &str = r#"
import random, sqlite3, sys
con = sqlite3.connect(sys.argv[1], timeout=5)
rng = random.Random(int(sys.argv[2]))
def top(table):
    return con.execute(f'SELECT coalesce(max(id), 0) FROM {table}').fetchone()[0]
def rating():
    r = rng.random()
    if r < 0.04: return None
    if r < 0.06: return rng.choice([2.5, 3.75, 1e-3])
    if r < 0.07: return rng.choice(['4', 'x', ''])
    return rng.randint(1, 5)
def book():
    return None if rng.random() < 0.02 else rng.randint(1, 70)
def one():
    op = rng.random()
    if op < 0.45:
        con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, ?, ?)', (book(), rng.randint(1, 25), rating()))
    elif op < 0.62:
        con.execute('UPDATE reviews SET rating = ? WHERE id = ?', (rating(), rng.randint(1, top('reviews') + 1)))
    elif op < 0.72:
        con.execute('UPDATE reviews SET book_id = ?, user_id = ? WHERE id = ?', (book(), rng.randint(1, 25), rng.randint(1, top('reviews') + 1)))
    elif op < 0.82:
        con.execute('DELETE FROM reviews WHERE id = ?', (rng.randint(1, top('reviews') + 1),))
    elif op < 0.87:
        con.execute('REPLACE INTO reviews (id, book_id, user_id, rating) VALUES (?, ?, ?, ?)', (rng.randint(1, top('reviews') + 1), book(), rng.randint(1, 25), rating()))
    elif op < 0.91:
        con.execute('UPDATE books SET title = ? WHERE id = ?', (f'Title {rng.randint(1, 10**6)}', rng.randint(1, 70)))
    elif op < 0.93:
        con.execute('INSERT OR IGNORE INTO books (id, title, author) VALUES (?, ?, ?)', (rng.randint(1, 70), f'New {rng.randint(1, 999)}', 'someone'))
    elif op < 0.945:
        con.execute('DELETE FROM books WHERE id = ?', (rng.randint(1, 70),))
    elif op < 0.97:
        con.execute('UPDATE users SET name = ? WHERE id = ?', (f'user {rng.randint(1, 999)}', rng.randint(1, 25)))
    elif op < 0.985:
        con.execute('INSERT OR REPLACE INTO users (id, name) VALUES (?, ?)', (rng.randint(1, 25), f'again {rng.randint(1, 999)}'))
    else:
        con.execute('DELETE FROM users WHERE id = ?', (rng.randint(1, 25),))
for line in sys.stdin:
    for _ in range(int(line)):
        one()
    con.commit()
    print('ok', flush=True)
"#;

/// The separate writer process, one transaction per `write` call.
pub struct Writer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Writer {
    pub fn start(catalog: &Catalog, seed: u64) -> Writer {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(WRITER)
            .arg(catalog.db())
            .arg(seed.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Writer {
            child,
            stdin,
            stdout,
        }
    }

    /// Makes `changes` random changes in one transaction, committed when this returns.
    pub fn write(&mut self, changes: u64) {
        writeln!(self.stdin, "{changes}").expect("ask the writer");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("the writer answers");
        assert_eq!(line.trim(), "ok", "the writer failed (see its stderr)");
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A catalog with the loose schema: 60 books, 20 users, 400 reviews.
pub fn loose_catalog() -> Catalog {
    let dir = tempfile::tempdir().expect("temp dir");
    let catalog = Catalog { dir };
    catalog.python(&format!(
        "con.executescript({SCHEMA:?})\n\
         con.executemany('INSERT INTO books (id, title, author) VALUES (?, ?, ?)', [(i, f'Book {{i}}', 'a') for i in range(1, 61)])\n\
         con.executemany('INSERT INTO users (id, name) VALUES (?, ?)', [(i, f'user{{i}}') for i in range(1, 21)])\n\
         con.executemany('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, ?, ?)', [(1 + i % 60, 1 + i % 20, 1 + i * 7 % 5) for i in range(400)])"
    ));
    catalog
}

/// Every maintained key (and one book), read `?fresh=1`: a hit, equal byte for byte to the
/// value read from the database. Returns how many values were compared.
pub fn compare_all(daemon: &mut Daemon, round: usize, book: u64) -> usize {
    let book_key = format!("book:{book}");
    let keys = MAINTAINED.iter().copied().chain([book_key.as_str()]);
    let mut compared = 0;
    for key in keys {
        let fresh = daemon.get_path(&format!("/v1/keys/{}?fresh=1", encode_key(key)));
        let truth = daemon.get_uncached(key);
        assert_eq!(
            (fresh.status, fresh.text()),
            (truth.status, truth.text()),
            "round {round}: {key} (?fresh=1, {}) differs from its query's value",
            x_cache(&fresh)
        );
        if round > 0 && fresh.status == 200 && MAINTAINED.contains(&key) {
            assert_eq!(
                x_cache(&fresh),
                "hit",
                "round {round}: {key} is written through"
            );
        }
        compared += 1;
    }
    compared
}

/// The maintained families' counters in `/v1/status`: (pattern, incremental, recomputed, builds).
pub fn maintained_counts(daemon: &mut Daemon) -> Vec<(String, u64, u64, u64)> {
    let status = daemon.status();
    status["config"]["families"]
        .as_array()
        .expect("families")
        .iter()
        .filter(|f| f["maintained"].is_object())
        .map(|f| {
            let m = &f["maintained"];
            (
                f["pattern"].as_str().unwrap_or("").to_owned(),
                m["incremental"].as_u64().unwrap_or(0),
                m["recomputed"].as_u64().unwrap_or(0),
                m["state_builds"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Batches: mostly small, some large; `total` changes in all.
fn batch_sizes(total: u64, seed: u64) -> Vec<u64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let mut sizes = Vec::new();
    let mut left = total;
    while left > 0 {
        let size = if next() % 4 == 0 {
            200 + next() % 1800
        } else {
            1 + next() % 20
        };
        let size = size.min(left);
        sizes.push(size);
        left -= size;
    }
    sizes
}

fn run_random(backend: &str, total: u64, seed: u64) {
    let catalog = loose_catalog();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &config(port, backend), port);
    compare_all(&mut daemon, 0, 1);
    let mut writer = Writer::start(&catalog, seed);
    let sizes = batch_sizes(total, seed);
    let mut compared = 0;
    for (round, &size) in sizes.iter().enumerate() {
        writer.write(size);
        compared += compare_all(&mut daemon, round + 1, 1 + (round as u64 * 7) % 70);
    }
    let counts = maintained_counts(&mut daemon);
    eprintln!(
        "{total} changes in {} batches, {compared} values compared; maintained (pattern, incremental, recomputed, builds): {counts:?}",
        sizes.len()
    );
    for (pattern, incremental, _, builds) in counts.iter().filter(|c| c.0 != "book:{id}") {
        // Grouped families follow every change of this writer from its rows. catalog-stats
        // (scalar) is built again after each row a conflict may have removed (the writer's
        // REPLACEs and INSERT OR IGNOREs: the change does not say whether the row is gone).
        let grouped = GROUPED.contains(&pattern.as_str());
        assert!(
            *incremental > 0 && (!grouped || *builds <= 3),
            "{pattern} must be kept up to date from the changes, not rebuilt: {counts:?}"
        );
    }
    let verify = daemon.verify();
    assert_eq!(verify["stale"], 0, "{verify}");
    assert_eq!(daemon.stop().code(), Some(0));
}

#[test]
fn maintained_values_equal_their_queries_byte_for_byte_over_a_hundred_thousand_random_changes() {
    run_random("", 100_000, 17);
}

#[test]
fn on_redis_maintained_values_equal_their_queries_byte_for_byte() {
    let redis = crate::redis::RedisServer::start();
    let backend = format!(
        "[cache]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"inc:\"",
        redis.url()
    );
    run_random(&backend, 20_000, 5);
}

/// The builds each grouped family's state had, by pattern (a scalar one is also built again
/// after each row a conflict may have removed, which this writer makes).
fn builds(daemon: &mut Daemon) -> Vec<(String, u64)> {
    maintained_counts(daemon)
        .into_iter()
        .filter(|(pattern, ..)| GROUPED.contains(&pattern.as_str()))
        .map(|(pattern, _, _, builds)| (pattern, builds))
        .collect()
}

/// Some random changes, then every maintained value compared; returns the round reached.
fn write_and_compare(
    daemon: &mut Daemon,
    writer: &mut Writer,
    rounds: usize,
    from: usize,
) -> usize {
    for round in from..from + rounds {
        writer.write(1 + (round as u64 * 37) % 300);
        compare_all(daemon, round, 1 + (round as u64 * 11) % 70);
    }
    from + rounds
}

#[test]
fn maintained_values_stay_exact_across_a_restart_a_reload_and_a_migration() {
    let catalog = loose_catalog();
    let port = free_port();
    let text = config(port, "");
    let mut daemon = Daemon::start(&catalog, &text, port);
    let mut writer = Writer::start(&catalog, 23);
    let round = write_and_compare(&mut daemon, &mut writer, 20, 1);
    assert!(
        builds(&mut daemon).iter().all(|(_, b)| *b == 1),
        "{:?}",
        builds(&mut daemon)
    );

    // kill -9: the state is gone with the process; the next one builds it again from the
    // database, and changes made while no daemon ran are in what it reads.
    daemon.kill();
    writer.write(500);
    let mut daemon = Daemon::start_existing(&daemon.config.clone(), port);
    let round = write_and_compare(&mut daemon, &mut writer, 20, round);
    assert!(
        builds(&mut daemon).iter().all(|(_, b)| *b == 1),
        "after the restart: {:?}",
        builds(&mut daemon)
    );

    // A reload that changes top-books' query: its new value is its new query's.
    let reloaded = text
        .replace("HAVING count(r.id) >= 3", "HAVING count(r.id) >= 2")
        .replace("LIMIT 10\"\"\"\nmany", "LIMIT 7\"\"\"\nmany");
    assert_ne!(reloaded, text);
    catalog.write_config(&reloaded);
    eventually("the reload is applied", || {
        (daemon.status()["config"]["reloads"] == 1).then_some(())
    });
    let round = write_and_compare(&mut daemon, &mut writer, 20, round);
    let top = json(&daemon.get("top-books"));
    assert!(top.as_array().is_some_and(|rows| rows.len() <= 7), "{top}");

    // A migration: capture paused, a column added, capture resumed (a flush of `reviews`): the
    // states reading it are dropped and built again.
    let before = builds(&mut daemon);
    cli_ok("pause", &daemon.config.clone());
    catalog.sqlite_cli("ALTER TABLE reviews ADD COLUMN helpful INTEGER DEFAULT 0");
    writer.write(200);
    cli_ok("resume", &daemon.config.clone());
    write_and_compare(&mut daemon, &mut writer, 20, round);
    let after = builds(&mut daemon);
    for ((pattern, b), (_, a)) in before.iter().zip(&after) {
        assert!(
            a > b,
            "{pattern}: the flush of `reviews` must drop its state (builds {b} → {a})"
        );
    }
    let verify = daemon.verify();
    assert_eq!(verify["stale"], 0, "{verify}");
}

/// Runs `cachetail VERB --config CONFIG ARGS...`: (exit code, stdout, stderr).
fn cli(verb: &str, config: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .arg(verb)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("the cachetail binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_shows_the_maintained_shapes_and_refuses_one_it_cannot_maintain_at_its_line() {
    let catalog = loose_catalog();
    let good = catalog.write_config(&config(free_port(), ""));
    let (code, out, err) = cli("check", &good, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    for (pattern, shape) in [
        ("top-books", "grouped"),
        ("catalog-stats", "scalar"),
        ("leaderboard:most-reviewed", "grouped"),
        ("book:{id}", "per key"),
    ] {
        assert!(
            out.contains(&format!(
                "maintained (maintain = \"incremental\" on `{pattern}`): {shape}"
            )),
            "{pattern} as {shape} in: {out}"
        );
    }
    let (code, out, err) = cli(
        "explain",
        &good,
        &[
            "--table",
            "reviews",
            "--op",
            "insert",
            "--new",
            r#"{"book_id": 3, "user_id": 1, "rating": 4, "id": 9}"#,
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("maintained  top-books  (grouped"), "{out}");
    assert!(out.contains("maintained  catalog-stats  (scalar"), "{out}");

    // An ORDER BY that leaves ties to the engine: refused, with the reason, at the query.
    let text = config(free_port(), "").replace(
        "ORDER BY reviews DESC, u.id LIMIT 10",
        "ORDER BY reviews DESC LIMIT 10",
    );
    let bad = catalog.write_config(&text);
    let line = text
        .lines()
        .position(|l| l.contains("SELECT u.id, u.name"))
        .expect("the leaderboard's query")
        + 1;
    let (code, out, err) = cli("check", &bad, &[]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains(&format!("config.toml:{line}:"))
            && err.contains("leaderboard:most-reviewed")
            && err.contains("cannot maintain this query"),
        "the refusal names the file, line, family and reason: {err}"
    );
    // `run` refuses it too.
    let (code, _, err) = cli("run", &bad, &[]);
    assert_eq!(code, Some(2), "{err}");
}
