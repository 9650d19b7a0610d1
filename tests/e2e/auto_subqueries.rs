//! `invalidate = "auto"` through correlated subqueries (scalar, `EXISTS`, `IN (SELECT ...)`,
//! nested), a self-join, and a family that cannot be analysed: after each kind of change exactly
//! the keys it can reach are refreshed, the others stay cached hits, and every value read with
//! `?fresh=1` equals the database's.

use crate::common::*;

const SCHEMA: &str = "
CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE series (id INTEGER PRIMARY KEY, author_id INTEGER NOT NULL);
CREATE INDEX series_author ON series(author_id);
CREATE TABLE books (id INTEGER PRIMARY KEY, author_id INTEGER NOT NULL, title TEXT NOT NULL,
                    series_id INTEGER NOT NULL DEFAULT 0);
CREATE INDEX books_author ON books(author_id);
CREATE INDEX books_series ON books(series_id);
CREATE TABLE reviews (id INTEGER PRIMARY KEY, book_id INTEGER NOT NULL, rating INTEGER NOT NULL);
CREATE INDEX reviews_book ON reviews(book_id);
INSERT INTO authors VALUES (1, 'Ann'), (2, 'Bo'), (3, 'Cy'), (4, 'Di');
INSERT INTO series VALUES (1, 1), (2, 2), (3, 3), (4, 4);
INSERT INTO books VALUES (10, 1, 'A1', 1), (11, 1, 'A2', 1), (20, 2, 'B1', 2), (30, 3, 'C1', 3),
                         (40, 4, 'D1', 4);
INSERT INTO reviews VALUES (1, 10, 4), (2, 20, 3), (3, 30, 5);
";

const FAMILIES: &str = r#"
[keys."author:{id}"]
query = """SELECT a.id, a.name,
             (SELECT count(*) FROM books b JOIN reviews r ON r.book_id = b.id WHERE b.author_id = a.id) AS reviews
           FROM authors a WHERE a.id = :id"""

[keys."author:{id}:series"]
query = """SELECT a.id, count(r.id) AS reviews FROM authors a
           JOIN series s ON s.author_id = a.id JOIN books b ON b.series_id = s.id
           JOIN reviews r ON r.book_id = b.id WHERE a.id = :id GROUP BY a.id"""
many = true

[keys."author:{id}:loved"]
query = """SELECT a.id FROM authors a WHERE a.id = :id AND EXISTS
             (SELECT 1 FROM books b WHERE b.author_id = a.id
              AND b.id IN (SELECT r.book_id FROM reviews r WHERE r.rating = 5))"""
many = true

[keys."book:{id}:loved"]
query = """SELECT b.id, EXISTS (SELECT 1 FROM reviews r WHERE r.book_id = b.id AND r.rating = 5) AS loved
           FROM books b WHERE b.id = :id"""

[keys."book:{id}:if-loved"]
query = """SELECT b.id, b.title FROM books b
           WHERE b.id = :id AND b.id IN (SELECT r.book_id FROM reviews r WHERE r.rating = 5)"""
many = true

[keys."book:{id}:siblings"]
query = """SELECT b2.id FROM books b1 JOIN books b2 ON b2.author_id = b1.author_id
           WHERE b1.id = :id ORDER BY b2.id"""
many = true

[keys."rated-at-least:{n}"]
query = "SELECT count(*) AS n FROM reviews WHERE rating >= :n"
"#;

const AUTHORS: [u32; 4] = [1, 2, 3, 4];
const BOOKS: [u32; 5] = [10, 11, 20, 30, 40];

fn config(port: u16) -> String {
    format!(
        "invalidate = \"auto\"\ndatabase = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n{FAMILIES}"
    )
}

fn catalog() -> Catalog {
    let catalog = Catalog {
        dir: tempfile::tempdir().expect("temp dir"),
    };
    catalog.python(&format!("con.executescript({SCHEMA:?})"));
    catalog
}

/// Every key of every family this test reads.
fn keys() -> Vec<String> {
    let mut keys = Vec::new();
    for id in AUTHORS {
        keys.push(format!("author:{id}"));
        keys.push(format!("author:{id}:series"));
        keys.push(format!("author:{id}:loved"));
    }
    for id in BOOKS {
        keys.push(format!("book:{id}:loved"));
        keys.push(format!("book:{id}:if-loved"));
        keys.push(format!("book:{id}:siblings"));
    }
    keys.extend((1..=5).map(|n| format!("rated-at-least:{n}")));
    keys
}

/// Every key read once, then cached.
fn cache_all(daemon: &mut Daemon) {
    for key in keys() {
        assert_eq!(daemon.get(&key).status, 200, "{key}");
        assert_eq!(x_cache(&daemon.peek(&key)), "hit", "{key} is cached");
    }
}

/// The keys no longer cached (refreshed by the change).
fn refreshed(daemon: &mut Daemon) -> Vec<String> {
    keys()
        .into_iter()
        .filter(|key| daemon.peek(key).status != 200)
        .collect()
}

/// Every key read with `?fresh=1` equals the database, and so does a plain read.
fn assert_fresh(daemon: &mut Daemon) {
    for key in keys() {
        let truth = json(&daemon.get_uncached(&key));
        let fresh = daemon.get_path(&format!("/v1/keys/{}?fresh=1", encode_key(&key)));
        assert_eq!(json(&fresh), truth, "{key} with ?fresh=1");
        assert_eq!(json(&daemon.get(&key)), truth, "{key}");
    }
}

fn names(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}

/// The unanalysable family: every key of it.
fn every_rated() -> Vec<&'static str> {
    vec![
        "rated-at-least:1",
        "rated-at-least:2",
        "rated-at-least:3",
        "rated-at-least:4",
        "rated-at-least:5",
    ]
}

#[test]
fn each_change_refreshes_exactly_the_keys_its_subqueries_reach() {
    let catalog = catalog();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &config(port), port);
    cache_all(&mut daemon);

    // A 5-star review of book 20 (author 2): its author's count and "loved", the book's two
    // subquery families, and the family that cannot be analysed; no sibling list.
    catalog.python("con.execute('INSERT INTO reviews (id, book_id, rating) VALUES (4, 20, 5)')");
    daemon.wait_caught_up();
    let mut expected = vec![
        "author:2",
        "author:2:series",
        "author:2:loved",
        "book:20:loved",
        "book:20:if-loved",
    ];
    expected.extend(every_rated());
    assert_eq!(refreshed(&mut daemon), names(&expected));
    assert_fresh(&mut daemon);

    // The review moved to book 30 (author 3) and down to 1 star: both ends.
    cache_all(&mut daemon);
    catalog.python("con.execute('UPDATE reviews SET book_id = 30, rating = 1 WHERE id = 4')");
    daemon.wait_caught_up();
    let mut expected = vec![
        "author:2",
        "author:2:series",
        "author:2:loved",
        "author:3",
        "author:3:series",
        "author:3:loved",
        "book:20:loved",
        "book:20:if-loved",
        "book:30:loved",
        "book:30:if-loved",
    ];
    expected.extend(every_rated());
    assert_eq!(refreshed(&mut daemon), names(&expected));
    assert_fresh(&mut daemon);

    // Book 11 moved from author 1 to author 4: both authors, and the sibling lists of the
    // books of both (the self-join), nothing about reviews; its series (author 1's) is
    // refreshed through a lookup from the book's row.
    cache_all(&mut daemon);
    catalog.python("con.execute('UPDATE books SET author_id = 4 WHERE id = 11')");
    daemon.wait_caught_up();
    let expected = [
        "author:1",
        "author:1:series",
        "author:1:loved",
        "author:4",
        "author:4:loved",
        "book:10:siblings",
        "book:11:loved",
        "book:11:if-loved",
        "book:11:siblings",
        "book:40:siblings",
    ];
    assert_eq!(refreshed(&mut daemon), names(&expected));
    assert_fresh(&mut daemon);

    // Three hops: series 3 handed from author 3 to author 2 refreshes both ends of the series
    // family, and nothing that does not read series.
    cache_all(&mut daemon);
    catalog.python("con.execute('UPDATE series SET author_id = 2 WHERE id = 3')");
    daemon.wait_caught_up();
    assert_eq!(
        refreshed(&mut daemon),
        names(&["author:2:series", "author:3:series"])
    );
    assert_fresh(&mut daemon);
    // And a review of book 30 (series 3, now author 2's) reaches author 2 through all three.
    cache_all(&mut daemon);
    catalog.python("con.execute('INSERT INTO reviews (id, book_id, rating) VALUES (5, 30, 2)')");
    daemon.wait_caught_up();
    let mut expected = vec![
        "author:2:series",
        "author:3",
        "author:3:loved",
        "book:30:loved",
        "book:30:if-loved",
    ];
    expected.extend(every_rated());
    assert_eq!(refreshed(&mut daemon), names(&expected));
    assert_fresh(&mut daemon);
}

#[test]
fn check_shows_the_rules_subqueries_derive() {
    let catalog = catalog();
    let config = catalog.write_config(&config(free_port()));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("cachetail check runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    for line in [
        "on `author:{id}`): a change to `reviews` → author:{id} via books.author_id where books.id = reviews.book_id",
        "on `author:{id}:series`): a change to `reviews` → author:{id}:series via series.author_id where series.id = books.series_id, books.id = reviews.book_id",
        "on `book:{id}:loved`): a change to `reviews` → book:{book_id}:loved",
        "on `book:{id}:if-loved`): a change to `reviews` → book:{book_id}:if-loved",
        "on `book:{id}:siblings`): a change to `books` → book:{id}:siblings, book:{id}:siblings via books.id where books.author_id = books.author_id",
        "on `rated-at-least:{n}`): a change to `reviews` → every key of the family",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }

    // `explain` runs the lookups on the database (capture installed: it reads the outbox).
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_cachetail"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("cachetail runs");
        assert!(output.status.success(), "{args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    run(&["install"]);
    let explained = run(&[
        "explain",
        "--table",
        "reviews",
        "--op",
        "update",
        "--old",
        r#"{"id": 2, "book_id": 20, "rating": 3}"#,
        "--new",
        r#"{"id": 2, "book_id": 30, "rating": 5}"#,
    ]);
    for line in [
        "key  author:2 ",
        "key  author:3 ",
        "key  book:20:loved ",
        "lookup  author:{id} via books.author_id where books.id = reviews.book_id for 20, 30: found 2, 3",
    ] {
        assert!(
            explained.contains(line),
            "missing `{line}` in:\n{explained}"
        );
    }
}
