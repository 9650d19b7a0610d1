//! The randomized checker for `invalidate = "auto"` over joins and subqueries: a python3 process
//! commits random changes to authors → books → reviews (reviews posted, moved between books,
//! re-rated, deleted; books moved between authors, added, deleted; authors renamed) in
//! transactions of one to four changes, while a reader thread fills the cache with random keys
//! of families that reach the changed rows through two-hop joins, correlated subqueries,
//! `EXISTS`, `IN (SELECT ...)` and a self-join, under each strategy. After each round of
//! writes: every key read with `?fresh=1` equals the database, and once the daemon has caught
//! up every value still cached does too. Changes whose rules are lookups commit while the tail
//! applies the batch before them, so lookups read the database past their batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::common::*;

const SCHEMA: &str = "
CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE series (id INTEGER PRIMARY KEY, author_id INTEGER NOT NULL);
CREATE INDEX series_author ON series(author_id);
CREATE TABLE books (id INTEGER PRIMARY KEY, author_id INTEGER NOT NULL, title TEXT NOT NULL,
                    series_id INTEGER NOT NULL DEFAULT 1);
CREATE INDEX books_author ON books(author_id);
CREATE INDEX books_series ON books(series_id);
CREATE TABLE reviews (id INTEGER PRIMARY KEY, book_id INTEGER NOT NULL, rating INTEGER NOT NULL);
CREATE INDEX reviews_book ON reviews(book_id);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 6)
INSERT INTO authors SELECT i, 'author ' || i FROM n;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 12)
INSERT INTO books SELECT i, i % 6 + 1, 'book ' || i, i % 4 + 1 FROM n;
INSERT INTO series VALUES (1, 1), (2, 2), (3, 3), (4, 4);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30)
INSERT INTO reviews SELECT i, i % 12 + 1, i % 5 + 1 FROM n;
";

const FAMILIES: &str = r#"
[keys."author:{id}"]
query = """SELECT a.id, a.name, count(r.id) AS reviews, group_concat(r.id) AS ids
           FROM authors a LEFT JOIN books b ON b.author_id = a.id
           LEFT JOIN reviews r ON r.book_id = b.id
           WHERE a.id = :id GROUP BY a.id"""
strategy = "write-through"

[keys."author:{id}:count"]
query = """SELECT a.id,
             (SELECT count(*) FROM books b JOIN reviews r ON r.book_id = b.id WHERE b.author_id = a.id) AS reviews
           FROM authors a WHERE a.id = :id"""

[keys."author:{id}:series"]
query = """SELECT a.id, count(r.id) AS reviews FROM authors a
           JOIN series s ON s.author_id = a.id JOIN books b ON b.series_id = s.id
           JOIN reviews r ON r.book_id = b.id WHERE a.id = :id GROUP BY a.id"""
many = true
strategy = "write-through"

[keys."author:{id}:loved"]
query = """SELECT a.id FROM authors a WHERE a.id = :id AND EXISTS
             (SELECT 1 FROM books b WHERE b.author_id = a.id
              AND b.id IN (SELECT r.book_id FROM reviews r WHERE r.rating = 5))"""
many = true
strategy = "write-behind"

[keys."book:{id}:loved"]
query = """SELECT b.id, EXISTS (SELECT 1 FROM reviews r WHERE r.book_id = b.id AND r.rating = 5) AS loved
           FROM books b WHERE b.id = :id"""
many = true
strategy = "write-through"

[keys."book:{id}:siblings"]
query = """SELECT b2.id FROM books b1 JOIN books b2 ON b2.author_id = b1.author_id
           WHERE b1.id = :id ORDER BY b2.id"""
many = true
"#;

/// One round of writes, from its own python3 process: `transactions` commits of 1-4 random
/// changes each.
fn writes(seed: u64, transactions: u32) -> String {
    format!(
        r#"
import random
rng = random.Random({seed})
def some(table):
    row = con.execute(f"SELECT id FROM {{table}} ORDER BY random() LIMIT 1").fetchone()
    return row[0] if row else None
for _ in range({transactions}):
    with con:
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(8)
            if kind <= 1:
                con.execute("INSERT INTO reviews (book_id, rating) VALUES (?, ?)", (rng.randint(1, 14), rng.randint(1, 5)))
            elif kind == 2:
                con.execute("UPDATE reviews SET book_id = ? WHERE id = ?", (rng.randint(1, 14), some("reviews")))
            elif kind == 3:
                con.execute("UPDATE reviews SET rating = ? WHERE id = ?", (rng.randint(1, 5), some("reviews")))
            elif kind == 4:
                con.execute("DELETE FROM reviews WHERE id = ?", (some("reviews"),))
            elif kind == 5 and rng.random() < 0.5:
                con.execute("UPDATE books SET author_id = ? WHERE id = ?", (rng.randint(1, 7), some("books")))
            elif kind == 5:
                if rng.random() < 0.5:
                    con.execute("UPDATE books SET series_id = ? WHERE id = ?", (rng.randint(1, 5), some("books")))
                else:
                    con.execute("UPDATE series SET author_id = ? WHERE id = ?", (rng.randint(1, 7), rng.randint(1, 4)))
            elif kind == 6:
                if rng.random() < 0.5:
                    con.execute("DELETE FROM books WHERE id = ?", (some("books"),))
                else:
                    con.execute("INSERT OR IGNORE INTO books (id, author_id, title) VALUES (?, ?, 'new')", (rng.randint(1, 14), rng.randint(1, 7)))
            else:
                con.execute("UPDATE authors SET name = ? WHERE id = ?", (f"renamed {{rng.random()}}", rng.randint(1, 7)))
"#
    )
}

fn keys() -> Vec<String> {
    let mut keys = Vec::new();
    for id in 1..=7 {
        keys.push(format!("author:{id}"));
        keys.push(format!("author:{id}:count"));
        keys.push(format!("author:{id}:series"));
        keys.push(format!("author:{id}:loved"));
    }
    for id in 1..=14 {
        keys.push(format!("book:{id}:loved"));
        keys.push(format!("book:{id}:siblings"));
    }
    keys
}

/// Reads random keys until told to stop: fills racing the writes' invalidations.
fn reader(address: std::net::SocketAddr, stop: Arc<AtomicBool>, seed: u64) -> u64 {
    let keys = keys();
    let mut client = Client::new(address);
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut reads = 0;
    while !stop.load(Ordering::Acquire) {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let key = &keys[(state >> 33) as usize % keys.len()];
        let reply = client
            .get(&format!("/v1/keys/{}", encode_key(key)))
            .expect("GET");
        assert!(matches!(reply.status, 200 | 404), "{key}: {}", reply.text());
        reads += 1;
    }
    reads
}

#[test]
fn random_changes_through_joins_and_subqueries_leave_no_stale_value() {
    let catalog = Catalog {
        dir: tempfile::tempdir().expect("temp dir"),
    };
    catalog.python(&format!("con.executescript({SCHEMA:?})"));
    let port = free_port();
    let config = format!(
        "invalidate = \"auto\"\ndatabase = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n[tail]\npoll_interval = \"20ms\"\n{FAMILIES}"
    );
    let mut daemon = Daemon::start(&catalog, &config, port);
    let (mut checked, mut cached, mut reads) = (0, 0, 0);
    for round in 0..12 {
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|i| {
                let (address, stop) = (daemon.address, Arc::clone(&stop));
                std::thread::spawn(move || reader(address, stop, round * 2 + i))
            })
            .collect();
        catalog.python(&writes(round, 40));
        stop.store(true, Ordering::Release);
        reads += readers
            .into_iter()
            .map(|r| r.join().expect("reader"))
            .sum::<u64>();
        // Quiet now: `?fresh=1` waits for every change committed, then answers the truth (half
        // the keys each round: the values the others hold were filled while the writes ran).
        for key in keys().into_iter().skip(round as usize % 2).step_by(2) {
            let truth = daemon.get_uncached(&key);
            let fresh = daemon.get_path(&format!("/v1/keys/{}?fresh=1", encode_key(&key)));
            assert_eq!(
                (fresh.status, fresh.text()),
                (truth.status, truth.text()),
                "round {round}: {key} with ?fresh=1"
            );
            checked += 1;
        }
        daemon.wait_caught_up();
        for key in keys() {
            let held = daemon.peek(&key);
            if held.status == 200 {
                let truth = daemon.get_uncached(&key);
                assert_eq!(held.text(), truth.text(), "round {round}: {key} cached");
                cached += 1;
            }
        }
    }
    eprintln!("{checked} fresh reads and {cached} cached values checked; {reads} random reads");
    assert!(
        cached > 100,
        "too few values were cached to check: {cached}"
    );
}
