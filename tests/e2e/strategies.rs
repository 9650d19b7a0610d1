//! The three strategies and the rules' key mapping, as a user would check them.

use crate::common::*;

/// A catalog config with the reviews rule's strategy and the write-behind delay to choose.
pub fn catalog_config(port: u16, strategy: &str, delay: &str) -> String {
    r#"
database = "catalog.db"
listen = "127.0.0.1:PORT"

[tail]
poll_interval = "100ms"

[write_behind]
delay = "DELAY"

[keys."book:{id}"]
query = """SELECT b.id, b.title, round(avg(r.rating), 2) AS avg_rating, count(r.id) AS review_count
           FROM books b LEFT JOIN reviews r ON r.book_id = b.id WHERE b.id = :id GROUP BY b.id"""
tags = ["books"]

[keys."top-books"]
query = """SELECT b.id, round(avg(r.rating), 2) AS avg_rating FROM books b JOIN reviews r ON r.book_id = b.id
           GROUP BY b.id ORDER BY avg_rating DESC, b.id LIMIT 3"""
many = true
tags = ["books"]

[keys."user:{id}"]
query = "SELECT id, name FROM users WHERE id = :id"

[[rules]]
table = "reviews"
keys = ["book:{book_id}", "top-books"]
strategy = "STRATEGY"

[[rules]]
table = "books"
tags = ["books"]

[[rules]]
table = "users"
keys = ["user:{id}"]
"#
    .replace("PORT", &port.to_string())
    .replace("STRATEGY", strategy)
    .replace("DELAY", delay)
}

/// A catalog and a daemon running `catalog_config` on it.
pub fn catalog_daemon(strategy: &str, delay: &str) -> (Catalog, Daemon) {
    let catalog = Catalog::new();
    let port = free_port();
    let daemon = Daemon::start(&catalog, &catalog_config(port, strategy, delay), port);
    (catalog, daemon)
}

fn review_count(reply: &Reply) -> i64 {
    json(reply)["review_count"].as_i64().expect("review_count")
}

#[test]
fn delete_posting_a_review_drops_the_book_and_the_next_read_refills_it_fresh() {
    let (catalog, mut daemon) = catalog_daemon("delete", "50ms");

    let first = daemon.get("book:1");
    assert_eq!((first.status, x_cache(&first)), (200, "miss"));
    assert_eq!(review_count(&first), 2);
    assert_eq!(x_cache(&daemon.get("book:1")), "hit");

    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    daemon.wait_caught_up();
    assert_eq!(
        daemon.peek("book:1").status,
        504,
        "the entry is gone once the change is applied"
    );
    let after = daemon.get("book:1");
    assert_eq!(x_cache(&after), "miss");
    assert_eq!(review_count(&after), 3);
    assert_eq!(json(&after)["avg_rating"].as_f64(), Some(3.67));
}

#[test]
fn write_through_the_next_read_is_a_fresh_hit() {
    let (catalog, mut daemon) = catalog_daemon("write-through", "50ms");
    assert_eq!(review_count(&daemon.get("book:1")), 2);
    assert_eq!(json(&daemon.get("top-books"))[0]["id"], 2);

    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    daemon.wait_caught_up();
    let after = daemon.get("book:1");
    assert_eq!(
        x_cache(&after),
        "hit",
        "write-through stored the new value before the cursor moved"
    );
    assert_eq!(review_count(&after), 3);
    let top = daemon.get("top-books");
    assert_eq!(x_cache(&top), "hit");
    assert_eq!(json(&top)[1]["avg_rating"].as_f64(), Some(3.67));
}

#[test]
fn write_behind_drops_at_once_then_recomputes_without_a_read() {
    let catalog = Catalog::new();
    let port = free_port();
    // A long delay, so that "gone at once" is observable before the recompute runs.
    let mut daemon = Daemon::start(
        &catalog,
        &catalog_config(port, "write-behind", "1500ms"),
        port,
    );
    assert_eq!(review_count(&daemon.get("book:1")), 2);
    let recomputes_before = daemon.status()["recomputes"].as_u64().expect("recomputes");

    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 1)')");
    daemon.wait_caught_up();
    assert_eq!(
        daemon.peek("book:1").status,
        504,
        "dropped as soon as the change is applied"
    );

    // Back, fresh, without any read filling it: peeking never fills.
    let back = eventually("the write-behind recompute stores book:1", || {
        Some(daemon.peek("book:1")).filter(|r| r.status == 200)
    });
    assert_eq!(review_count(&back), 3);
    assert_eq!(x_cache(&daemon.get("book:1")), "hit");
    let status = daemon.status();
    assert!(status["recomputes"].as_u64().expect("recomputes") > recomputes_before);
    assert_eq!(status["write_behind_queue"], 0);
}

#[test]
fn write_behind_coalesces_a_burst_of_changes_to_one_key() {
    let (catalog, mut daemon) = catalog_daemon("write-behind", "1s");
    daemon.get("book:1");
    let fills_before = daemon.status()["fills"].as_u64().expect("fills");
    // 20 separate commits, each its own transaction, within the coalescing window.
    catalog.python(
        "for i in range(20):\n    con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')\n    con.commit()",
    );
    daemon.wait_caught_up();
    let back = eventually("book:1 is recomputed", || {
        Some(daemon.peek("book:1")).filter(|r| r.status == 200)
    });
    assert_eq!(review_count(&back), 22);
    eventually("top-books is recomputed", || {
        Some(daemon.peek("top-books")).filter(|r| r.status == 200)
    });
    let fills = daemon.status()["fills"].as_u64().expect("fills") - fills_before;
    assert!(
        fills <= 4,
        "20 changes to 2 keys within the window ran {fills} recomputes"
    );
}

#[test]
fn an_update_moving_a_review_to_another_book_refreshes_both_books() {
    let (catalog, mut daemon) = catalog_daemon("write-through", "50ms");
    assert_eq!(review_count(&daemon.get("book:1")), 2);
    assert_eq!(review_count(&daemon.get("book:3")), 0);

    catalog.python("con.execute('UPDATE reviews SET book_id = 3 WHERE id = (SELECT min(id) FROM reviews WHERE book_id = 1)')");
    daemon.wait_caught_up();
    let (one, three) = (daemon.get("book:1"), daemon.get("book:3"));
    assert_eq!((x_cache(&one), review_count(&one)), ("hit", 1));
    assert_eq!((x_cache(&three), review_count(&three)), ("hit", 1));
}

#[test]
fn deleting_a_review_refreshes_its_book() {
    let (catalog, mut daemon) = catalog_daemon("delete", "50ms");
    assert_eq!(review_count(&daemon.get("book:2")), 1);
    catalog.sqlite_cli("DELETE FROM reviews WHERE book_id = 2");
    daemon.wait_caught_up();
    let after = daemon.get("book:2");
    assert_eq!(review_count(&after), 0);
    assert_eq!(json(&after)["avg_rating"], serde_json::Value::Null);
}

#[test]
fn a_tag_drops_every_key_carrying_it() {
    let (catalog, mut daemon) = catalog_daemon("delete", "50ms");
    for key in ["book:1", "book:2", "top-books", "user:1"] {
        daemon.get(key);
        assert_eq!(daemon.peek(key).status, 200, "{key} cached");
    }
    catalog.python("con.execute(\"UPDATE books SET title = 'Renamed' WHERE id = 4\")");
    daemon.wait_caught_up();
    for key in ["book:1", "book:2", "top-books"] {
        assert_eq!(
            daemon.peek(key).status,
            504,
            "{key} carries the tag `books`"
        );
    }
    assert_eq!(daemon.peek("user:1").status, 200, "user:1 carries no tag");
    assert!(
        daemon.status()["tag_invalidations"]
            .as_u64()
            .expect("count")
            >= 1
    );
}

#[test]
fn writers_from_python_and_the_sqlite3_cli_are_both_captured() {
    let (catalog, mut daemon) = catalog_daemon("write-through", "50ms");
    assert_eq!(review_count(&daemon.get("book:4")), 0);
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (4, 1, 3)')");
    eventually("python's review shows", || {
        (review_count(&daemon.get("book:4")) == 1).then_some(())
    });
    catalog.sqlite_cli("INSERT INTO reviews (book_id, user_id, rating) VALUES (4, 2, 4);");
    eventually("the CLI's review shows", || {
        (review_count(&daemon.get("book:4")) == 2).then_some(())
    });
    catalog.python("con.execute(\"UPDATE users SET name = 'Ada' WHERE id = 1\")");
    daemon.get("user:1");
    catalog.sqlite_cli("UPDATE users SET name = 'Grace' WHERE id = 1;");
    eventually("the CLI's user rename shows", || {
        (json(&daemon.get("user:1"))["name"] == "Grace").then_some(())
    });
}

#[test]
fn a_value_expires_after_its_ttl() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms").replace(
        "[keys.\"user:{id}\"]\n",
        "[keys.\"user:{id}\"]\nttl = \"300ms\"\n",
    );
    let mut daemon = Daemon::start(&catalog, &config, port);
    assert_eq!(x_cache(&daemon.get("user:2")), "miss");
    daemon.get("book:1");
    // No change happens: only the TTL can remove it.
    eventually("user:2 expires", || {
        (daemon.peek("user:2").status == 504).then_some(())
    });
    assert_eq!(
        daemon.peek("book:1").status,
        200,
        "book:1 has the default 10m TTL"
    );
    assert_eq!(x_cache(&daemon.get("user:2")), "miss");
}

#[test]
fn auto_rules_refresh_exactly_the_matching_keys() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = r#"
database = "catalog.db"
listen = "127.0.0.1:PORT"

[keys."book:{id}"]
query = """SELECT b.id, b.title, round(avg(r.rating), 2) AS avg_rating, count(r.id) AS review_count
           FROM books b LEFT JOIN reviews r ON r.book_id = b.id WHERE b.id = :id GROUP BY b.id"""
invalidate = "auto"
strategy = "write-through"

[keys."reviews-by-user:{id}"]
query = "SELECT count(*) AS n FROM reviews r JOIN users u ON u.id = r.user_id WHERE u.id = :id"
invalidate = "auto"

[keys."top-books"]
query = "SELECT b.id, avg(r.rating) AS avg FROM books b JOIN reviews r ON r.book_id = b.id GROUP BY b.id ORDER BY avg DESC, b.id LIMIT 3"
many = true
invalidate = "auto"
"#
    .replace("PORT", &port.to_string());
    let mut daemon = Daemon::start(&catalog, &config, port);
    let fills = |daemon: &mut Daemon, family: &str| -> u64 {
        let status = daemon.wait_caught_up();
        status["config"]["families"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["pattern"] == family))
            .and_then(|f| f["fills"].as_u64())
            .expect("family fills")
    };
    for key in [
        "book:3",
        "book:4",
        "reviews-by-user:1",
        "reviews-by-user:2",
        "top-books",
    ] {
        assert_eq!(daemon.get(key).status, 200, "{key}");
    }
    assert_eq!(fills(&mut daemon, "book:{id}"), 2);

    // A review of book 3 by user 1: book:3 is recomputed (write-through), and only it.
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (3, 1, 5)')");
    eventually("book:3 is recomputed", || {
        let reply = daemon.peek("book:3");
        (reply.status == 200 && json(&reply)["review_count"] == 1).then_some(())
    });
    assert_eq!(fills(&mut daemon, "book:{id}"), 3, "book:4 was not touched");
    assert_eq!(x_cache(&daemon.get("book:4")), "hit");
    assert_eq!(
        daemon.peek("reviews-by-user:1").status,
        504,
        "user 1's count is dropped"
    );
    assert_eq!(
        daemon.peek("reviews-by-user:2").status,
        200,
        "user 2's stays"
    );
    assert_eq!(
        daemon.peek("top-books").status,
        504,
        "no key to tie: the family"
    );

    // A change to book 4 itself refreshes book:4 only.
    catalog.sqlite_cli("UPDATE books SET title = 'Four' WHERE id = 4;");
    eventually("book:4 is recomputed", || {
        let reply = daemon.peek("book:4");
        (reply.status == 200 && json(&reply)["title"] == "Four").then_some(())
    });
    assert_eq!(fills(&mut daemon, "book:{id}"), 4, "book:3 was not touched");
    assert_eq!(daemon.verify()["stale"], 0);

    let rules = daemon.status()["config"]["rules"].clone();
    let derived: Vec<(String, String)> = rules
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            (
                r["table"].as_str().unwrap_or("").to_owned(),
                r["keys"].to_string(),
            )
        })
        .collect();
    assert!(
        derived.contains(&("reviews".to_owned(), "[\"book:{book_id}\"]".to_owned())),
        "{rules}"
    );
}
