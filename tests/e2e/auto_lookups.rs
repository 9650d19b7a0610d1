//! `invalidate = "auto"` through joins: a change to a table that reaches the pattern's
//! placeholder only through other tables (reviews → books → authors) refreshes exactly the keys
//! a lookup over the join path finds, both ends of a move, and nothing else: the other authors'
//! values stay cached hits.

use std::process::Command;

use crate::common::*;

const SCHEMA: &str = "
CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE books (id INTEGER PRIMARY KEY, author_id INTEGER NOT NULL, title TEXT NOT NULL);
CREATE INDEX books_author ON books(author_id);
CREATE TABLE reviews (id INTEGER PRIMARY KEY, book_id INTEGER NOT NULL, rating INTEGER NOT NULL);
CREATE INDEX reviews_book ON reviews(book_id);
INSERT INTO authors VALUES (1, 'Ann'), (2, 'Bo'), (3, 'Cy'), (4, 'Di');
INSERT INTO books VALUES (10, 1, 'A1'), (11, 1, 'A2'), (20, 2, 'B1'), (30, 3, 'C1'), (40, 4, 'D1');
INSERT INTO reviews VALUES (1, 10, 4), (2, 20, 5), (3, 30, 3);
";

const AUTHORS: [u32; 4] = [1, 2, 3, 4];

fn config(port: u16) -> String {
    format!(
        "invalidate = \"auto\"\ndatabase = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n{}",
        r#"
[keys."author:{id}"]
query = """SELECT a.id, a.name, count(r.id) AS reviews, group_concat(r.id) AS ids
           FROM authors a LEFT JOIN books b ON b.author_id = a.id
           LEFT JOIN reviews r ON r.book_id = b.id
           WHERE a.id = :id GROUP BY a.id"""
"#
    )
}

fn catalog() -> Catalog {
    let catalog = Catalog {
        dir: tempfile::tempdir().expect("temp dir"),
    };
    catalog.python(&format!("con.executescript({SCHEMA:?})"));
    catalog
}

/// Every author read once (a miss), then cached.
fn cache_all(daemon: &mut Daemon) {
    for id in AUTHORS {
        let key = format!("author:{id}");
        assert_eq!(daemon.get(&key).status, 200);
        assert_eq!(x_cache(&daemon.peek(&key)), "hit", "{key} is cached");
    }
}

/// Which authors' values are still cached (the others were refreshed: removed).
fn still_cached(daemon: &mut Daemon) -> Vec<u32> {
    AUTHORS
        .into_iter()
        .filter(|id| daemon.peek(&format!("author:{id}")).status == 200)
        .collect()
}

/// Every author read with `?fresh=1` equals the database, and so does a plain read.
fn assert_fresh(daemon: &mut Daemon) {
    for id in AUTHORS {
        let key = format!("author:{id}");
        let truth = json(&daemon.get_uncached(&key));
        let fresh = daemon.get_path(&format!("/v1/keys/{}?fresh=1", encode_key(&key)));
        assert_eq!(json(&fresh), truth, "{key} with ?fresh=1");
        assert_eq!(json(&daemon.get(&key)), truth, "{key}");
    }
}

#[test]
fn a_review_refreshes_exactly_its_authors_key() {
    let catalog = catalog();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &config(port), port);
    cache_all(&mut daemon);

    let before = daemon.status();
    catalog.python("con.execute('INSERT INTO reviews (id, book_id, rating) VALUES (4, 20, 1)')");
    let after = daemon.wait_caught_up();
    assert_eq!(
        still_cached(&mut daemon),
        [1, 3, 4],
        "a review of book 20 reaches author 2 only"
    );
    assert_fresh(&mut daemon);
    // The lookup is counted and timed beside the apply, in the status and the metrics.
    let counted =
        |name: &str| after[name].as_u64().unwrap_or(0) - before[name].as_u64().unwrap_or(0);
    assert_eq!(counted("lookups"), 1, "one lookup for the batch: {after}");
    assert_eq!(counted("lookup_fallbacks"), 0, "{after}");
    assert!(counted("lookup_micros") > 0, "the lookup's time: {after}");
    assert!(counted("apply_micros") > 0, "the apply's time: {after}");
    let metrics = daemon.get_path("/metrics").text();
    assert!(metrics.contains("cachetail_lookups_total 1\n"), "{metrics}");

    // An update moving a review between books of different authors: both ends.
    cache_all(&mut daemon);
    catalog.python("con.execute('UPDATE reviews SET book_id = 30 WHERE id = 1')");
    daemon.wait_caught_up();
    assert_eq!(
        still_cached(&mut daemon),
        [2, 4],
        "the review left author 1 for author 3"
    );
    assert_fresh(&mut daemon);

    // A delete: its author.
    cache_all(&mut daemon);
    catalog.python("con.execute('DELETE FROM reviews WHERE id = 2')");
    daemon.wait_caught_up();
    assert_eq!(still_cached(&mut daemon), [1, 3, 4]);
    assert_fresh(&mut daemon);
}

#[test]
fn a_book_moved_with_or_after_its_review_refreshes_both_authors() {
    let catalog = catalog();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &config(port), port);

    // In one transaction (so one batch): a review of book 11, then book 11 moved from author 1
    // to author 4. The lookup reads the books table after the move; the move's own rule
    // refreshes its old author.
    cache_all(&mut daemon);
    catalog.python(
        "con.execute('INSERT INTO reviews (id, book_id, rating) VALUES (5, 11, 2)')\n\
         con.execute('UPDATE books SET author_id = 4 WHERE id = 11')",
    );
    daemon.wait_caught_up();
    assert_eq!(still_cached(&mut daemon), [2, 3]);
    assert_fresh(&mut daemon);

    // The move in the batch after the review's: each batch refreshes its own ends.
    cache_all(&mut daemon);
    catalog.python("con.execute('INSERT INTO reviews (id, book_id, rating) VALUES (6, 20, 5)')");
    daemon.wait_caught_up();
    assert_eq!(still_cached(&mut daemon), [1, 3, 4]);
    assert_fresh(&mut daemon);
    cache_all(&mut daemon);
    catalog.python("con.execute('UPDATE books SET author_id = 3 WHERE id = 20')");
    daemon.wait_caught_up();
    assert_eq!(still_cached(&mut daemon), [1, 4]);
    assert_fresh(&mut daemon);

    // Back to back, many times, with `?fresh=1` reads of every author after each pair.
    for round in 0..20u32 {
        let (book, to) = ([10, 11, 20, 30, 40][round as usize % 5], round % 4 + 1);
        catalog.python(&format!(
            "con.execute('INSERT INTO reviews (book_id, rating) VALUES ({book}, 3)')\n\
             con.commit()\n\
             con.execute('UPDATE books SET author_id = {to} WHERE id = {book}')"
        ));
        assert_fresh(&mut daemon);
    }
}

#[test]
fn check_shows_the_derived_rule_with_its_lookup() {
    let catalog = catalog();
    let path = catalog.write_config(&config(free_port()));
    let out = Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check runs");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let derived: Vec<&str> = printed
        .lines()
        .filter(|l| l.starts_with("derived"))
        .collect();
    assert_eq!(
        derived,
        [
            "derived (invalidate = \"auto\" on `author:{id}`): a change to `authors` → author:{id} (delete)",
            "derived (invalidate = \"auto\" on `author:{id}`): a change to `books` → author:{author_id} (delete)",
            "derived (invalidate = \"auto\" on `author:{id}`): a change to `reviews` → author:{id} via books.author_id where books.id = reviews.book_id (delete)",
        ],
        "{printed}"
    );
}

/// `cachetail check` on `catalog`'s config: (stdout, stderr), after asserting it succeeded.
fn run_check(catalog: &Catalog, config: &str) -> (String, String) {
    let path = catalog.write_config(config);
    let out = Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

#[test]
fn check_warns_when_a_lookup_would_scan_a_table_and_names_the_index() {
    // Reviews name their book by ISBN, which books do not index: the lookup for a review
    // would read every book on each batch.
    let catalog = Catalog {
        dir: tempfile::tempdir().expect("temp dir"),
    };
    catalog.python(
        "con.executescript('''
         CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
         CREATE TABLE books (id INTEGER PRIMARY KEY, isbn TEXT NOT NULL, author_id INTEGER NOT NULL);
         CREATE INDEX books_author ON books(author_id);
         CREATE TABLE reviews (id INTEGER PRIMARY KEY, isbn TEXT NOT NULL);
         CREATE INDEX reviews_isbn ON reviews(isbn);
         ''')",
    );
    let config = r#"invalidate = "auto"
database = "catalog.db"
[keys."author:{id}"]
query = """SELECT a.id, count(r.id) FROM authors a LEFT JOIN books b ON b.author_id = a.id
           LEFT JOIN reviews r ON r.isbn = b.isbn WHERE a.id = :id GROUP BY a.id"""
"#;
    let (_, stderr) = run_check(&catalog, config);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("scans")).collect();
    assert_eq!(
        warnings,
        [
            "warning: lookup for author:{id} on a change to `reviews` (via books.author_id where books.isbn = reviews.isbn) scans `books` on every batch: CREATE INDEX books_isbn ON books(isbn)"
        ],
        "{stderr}"
    );

    // With the index it names, the lookup searches: no warning.
    catalog.python("con.execute('CREATE INDEX books_isbn ON books(isbn)')");
    let (_, stderr) = run_check(&catalog, config);
    assert!(!stderr.contains("scans"), "{stderr}");
}

#[test]
fn the_feed_shows_the_rule_and_lookup_that_reached_each_key() {
    let catalog = catalog();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &config(port), port);
    cache_all(&mut daemon);
    let mut feed = crate::feed::Subscriber::connect(daemon.address);

    // A review of book 20 (author 2), then a book moved from author 3 to author 4.
    catalog.python("con.execute('INSERT INTO reviews (id, book_id, rating) VALUES (7, 20, 1)')");
    catalog.python("con.execute('UPDATE books SET author_id = 4 WHERE id = 30')");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let raw = feed.next_raw();
        let Some(data) = raw.strip_prefix("data: ") else {
            continue;
        };
        let event: serde_json::Value = serde_json::from_str(data).expect("JSON event");
        if event["type"] == "change" {
            seen.push(event);
        }
    }
    let review = &seen[0];
    assert_eq!(review["table"], "reviews", "{review}");
    assert_eq!(
        review["keys"],
        serde_json::json!([{
            "key": "author:2",
            "strategy": "delete",
            "rule": 2,
            "via": "books.author_id where books.id = reviews.book_id",
        }]),
        "{review}"
    );
    assert!(review.get("fallbacks").is_none(), "{review}");
    // A direct tie: the rule, no lookup; both ends of the move.
    let moved = &seen[1];
    assert_eq!(moved["table"], "books", "{moved}");
    assert_eq!(
        moved["keys"],
        serde_json::json!([
            {"key": "author:3", "strategy": "delete", "rule": 1},
            {"key": "author:4", "strategy": "delete", "rule": 1},
        ]),
        "{moved}"
    );
    assert_eq!(still_cached(&mut daemon), [1]);
}

/// A review whose `book_id` is TEXT `'020'`: the query's join finds book 20 (numeric affinity
/// applied to the text), but the key rendered from the row would be `book:020`, not the
/// `book:20` readers' values are cached under. The family is dropped instead: never stale.
#[test]
fn a_key_rendered_from_a_column_of_another_type_drops_the_family() {
    let catalog = Catalog {
        dir: tempfile::tempdir().expect("temp dir"),
    };
    catalog.python(&format!(
        "con.executescript({:?})",
        "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT NOT NULL);
         CREATE TABLE reviews (id INTEGER PRIMARY KEY, book_id TEXT NOT NULL, rating INTEGER);
         INSERT INTO books VALUES (20, 'B'), (30, 'C');
         INSERT INTO reviews VALUES (1, '20', 4);"
    ));
    let port = free_port();
    let config = format!(
        "invalidate = \"auto\"\ndatabase = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n{}",
        r#"
[keys."book:{id}"]
query = """SELECT b.id, count(r.id) AS reviews FROM books b LEFT JOIN reviews r ON r.book_id = b.id
           WHERE b.id = :id GROUP BY b.id"""
"#
    );
    let mut daemon = Daemon::start(&catalog, &config, port);
    for key in ["book:20", "book:30"] {
        assert_eq!(daemon.get(key).status, 200);
    }
    catalog
        .python("con.execute(\"INSERT INTO reviews (id, book_id, rating) VALUES (2, '020', 5)\")");
    let fresh = daemon.get_path("/v1/keys/book:20?fresh=1");
    assert_eq!(json(&fresh), json(&daemon.get_uncached("book:20")));
    assert_eq!(json(&fresh)["reviews"], 2, "{}", fresh.text());
    // The whole family went: book:30 too.
    assert_ne!(daemon.peek("book:30").status, 200);
    let output = Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["check", "--config"])
        .arg(&daemon.config)
        .output()
        .expect("check runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("reviews.book_id (TEXT, collation BINARY) and books.id (INTEGER, collation BINARY) compare their values differently"),
        "{text}"
    );
}
