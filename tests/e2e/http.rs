//! The HTTP endpoint: answers, errors, limits (431, 413), stampedes, read-your-writes (a slow
//! write-through recompute makes the apply late, so only waiting reads the write), each
//! `X-Cachetail-Bypass` reason, `no-cache` leaving the cache alone, slow clients, metrics, admin.

use std::sync::{Arc, Barrier};

use crate::common::*;
use crate::strategies::{catalog_config, catalog_daemon};

#[test]
fn clients_mistakes_get_clear_4xx_answers() {
    let (_catalog, mut daemon) = catalog_daemon("delete", "50ms");

    let unknown = daemon.get("nothing:1");
    assert_eq!(unknown.status, 404);
    assert!(
        json(&unknown)["error"]
            .as_str()
            .expect("error")
            .contains("no key family matches")
    );

    let no_row = daemon.get("book:999");
    assert_eq!(no_row.status, 404);
    assert!(
        json(&no_row)["error"]
            .as_str()
            .expect("error")
            .contains("no row")
    );

    for path in [
        "/v1/keys/bad%zz",
        "/v1/keys/%FF%FE",
        "/v1/keys/a%0Ab",
        "/v1/keys/",
    ] {
        let reply = daemon.get_path(path);
        assert_eq!(reply.status, 400, "{path}");
        assert!(
            json(&reply)["error"]
                .as_str()
                .expect("error")
                .contains("malformed key")
        );
    }
    let long = format!("/v1/keys/book:{}", "9".repeat(5000));
    assert_eq!(daemon.get_path(&long).status, 400);
    assert_eq!(daemon.get_path("/nope").status, 404);
    let mut client = Client::new(daemon.address);
    let post = client
        .request("POST", "/v1/keys/book:1", &[], b"{}")
        .expect("POST");
    assert_eq!(post.status, 405);

    // A percent-encoded key is the same key.
    let encoded = daemon.get_path("/v1/keys/book%3A1");
    assert_eq!(json(&encoded)["id"], 1);
    assert_eq!(encoded.header("content-type"), Some("application/json"));
}

#[test]
fn key_parameters_are_bound_never_spliced() {
    let (catalog, mut daemon) = catalog_daemon("delete", "50ms");
    for attack in [
        "1 OR 1=1",
        "1; DROP TABLE reviews",
        "1' OR '1'='1",
        "1) UNION SELECT 1,2,3,4 --",
    ] {
        let reply = daemon.get(&format!("book:{attack}"));
        assert_eq!(
            reply.status, 404,
            "{attack} matched no row, as a literal value"
        );
    }
    assert_eq!(catalog.sqlite_cli("SELECT count(*) FROM reviews"), "3");
}

/// A family's counters in `/v1/status`.
fn family_stats(daemon: &mut Daemon, pattern: &str) -> serde_json::Value {
    daemon.status()["config"]["families"]
        .as_array()
        .expect("families")
        .iter()
        .find(|f| f["pattern"] == pattern)
        .unwrap_or_else(|| panic!("no family {pattern}"))
        .clone()
}

#[test]
fn a_hundred_concurrent_misses_of_one_key_run_one_query() {
    let catalog = Catalog::new();
    let port = free_port();
    // A deliberately slow family (half a second or more), so that requests sent at once all
    // arrive while the first one's query runs. (Without coalescing, a hundred such queries at
    // once take far longer than the request timeout.)
    let config = catalog_config(port, "delete", "50ms")
        + r#"
[http]
request_timeout = "10s"

[keys."slow:{id}"]
query = """WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000)
           SELECT :id AS id, count(*) AS spins FROM n"""
"#;
    let mut daemon = Daemon::start(&catalog, &config, port);
    let address = daemon.address;
    let barrier = Arc::new(Barrier::new(100));
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut client = Client::new(address);
                client.get("/healthz").expect("connect");
                barrier.wait();
                client.get("/v1/keys/slow:7").expect("GET")
            })
        })
        .collect();
    let replies: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let family = family_stats(&mut daemon, "slow:{id}");
    let wrong: Vec<String> = replies
        .iter()
        .filter(|r| !(r.status == 200 && json(r)["spins"] == 3000000))
        .map(|r| format!("{} {}", r.status, r.text()))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} requests not answered with the value, e.g. {:?}; the family's counters: {family}",
        wrong.len(),
        wrong.first()
    );
    let count = |name: &str| family[name].as_u64().expect("a count");
    assert_eq!(count("hits") + count("misses"), 100, "{family}");
    // A request that finds the key missing counts a miss, whether it leads the fill or joins
    // the one in flight; one that comes after the fill counts a hit.
    assert!(
        count("misses") >= 80,
        "most requests overlapped the first one's query and joined it: {family}"
    );
    assert_eq!(
        count("fills"),
        1,
        "one query for {} concurrent misses: {family}",
        count("misses")
    );
}

/// The catalog config plus `slow-book:{id}`: a book's review count whose query spins for most of
/// a second, recomputed write-through when the book's reviews change. A write-through key keeps
/// its value until the recompute lands, so for that long after a review is committed the old
/// count is what the cache serves: the apply is late, and only waiting for it reads the write.
fn slow_apply_config(port: u16, fresh_timeout: &str) -> String {
    catalog_config(port, "delete", "50ms").replacen(
        "\n[tail]",
        &format!("\nfresh_timeout = \"{fresh_timeout}\"\n\n[tail]"),
        1,
    ) + r#"
[keys."slow-book:{id}"]
query = """SELECT b.id, count(r.id) AS review_count,
                  (WITH RECURSIVE spin(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM spin WHERE i < 4000000)
                   SELECT count(*) FROM spin) AS spins
           FROM books b LEFT JOIN reviews r ON r.book_id = b.id WHERE b.id = :id GROUP BY b.id"""

[[rules]]
table = "reviews"
keys = ["slow-book:{book_id}"]
strategy = "write-through"
"#
}

/// A review of book 5, committed by a separate process.
fn review_book_5(catalog: &Catalog) {
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (5, 2, 4)')");
}

fn review_count(value: &serde_json::Value) -> i64 {
    value["review_count"].as_i64().expect("review_count")
}

#[test]
fn fresh_reads_see_the_readers_own_write_under_concurrent_writes() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &slow_apply_config(port, "30s"), port);
    assert_eq!(review_count(&json(&daemon.get("slow-book:5"))), 0);
    // A background writer keeps the outbox moving meanwhile.
    let db = catalog.db();
    let noise = std::thread::spawn(move || {
        let script = "import sqlite3, sys, time\ncon = sqlite3.connect(sys.argv[1], timeout=5)\nfor i in range(300):\n    con.execute('UPDATE users SET name = ? WHERE id = 3', (f'user3-{i}',))\n    con.commit()\n    time.sleep(0.005)\n";
        std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(db)
            .status()
            .expect("noise writer")
    });
    let mut late = 0;
    for round in 1..=3 {
        review_book_5(&catalog);
        // Without waiting, the old count is served while the recompute runs.
        if review_count(&json(&daemon.get("slow-book:5"))) < round {
            late += 1;
        }
        let reply = daemon.get_path("/v1/keys/slow-book:5?fresh=1");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            review_count(&json(&reply)),
            round,
            "round {round} reads its own write"
        );
    }
    eprintln!("fresh: the plain read was late in {late} of 3 rounds");
    assert!(
        late >= 1,
        "a plain read never saw the apply late: the reads above prove nothing"
    );
    assert!(noise.join().expect("noise").success());
}

#[test]
fn a_fresh_read_the_daemon_cannot_catch_up_with_in_time_gets_a_503() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &slow_apply_config(port, "200ms"), port);
    assert_eq!(review_count(&json(&daemon.get("slow-book:5"))), 0);
    review_book_5(&catalog);
    let started = std::time::Instant::now();
    let reply = daemon.get_path("/v1/keys/slow-book:5?fresh=1");
    let waited = started.elapsed();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let error = json(&reply)["error"]
        .as_str()
        .expect("a JSON error")
        .to_owned();
    assert!(error.contains("not fresh within 200ms"), "{error}");
    assert!(
        waited >= std::time::Duration::from_millis(200),
        "it waited fresh_timeout first: {waited:?}"
    );
    // Once the recompute lands, the same request answers the write.
    let answered = eventually("a fresh read answers once the apply is done", || {
        let reply = daemon.get_path("/v1/keys/slow-book:5?fresh=1");
        (reply.status == 200).then(|| review_count(&json(&reply)))
    });
    assert_eq!(answered, 1, "the reader's own write");
}

#[test]
fn a_fresh_multi_get_waits_for_the_apply_of_the_readers_own_write() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &slow_apply_config(port, "30s"), port);
    assert_eq!(review_count(&json(&daemon.get("slow-book:5"))), 0);
    let mut client = Client::new(daemon.address);
    let mut multi_get = |path: &str| {
        let reply = client
            .request("POST", path, &[], br#"["slow-book:5", "book:5", "user:1"]"#)
            .expect("POST");
        assert_eq!(reply.status, 200, "{}", reply.text());
        json(&reply)["results"].clone()
    };
    review_book_5(&catalog);
    let plain = multi_get("/v1/keys");
    let fresh = multi_get("/v1/keys?fresh=1");
    assert_eq!(
        review_count(&fresh[0]["value"]),
        1,
        "the write-through key, once its recompute landed: {fresh}"
    );
    assert_eq!(fresh[0]["cache"], "hit");
    assert_eq!(review_count(&fresh[1]["value"]), 1, "{fresh}");
    assert_eq!(fresh[2]["value"]["name"], "user1");
    assert_eq!(
        review_count(&plain[0]["value"]),
        0,
        "without waiting, the old value was still served: the fresh read proves something"
    );
}

#[test]
fn every_bypass_answers_from_the_database_and_says_why() {
    let catalog = Catalog::new();
    let (port_a, port_b) = (free_port(), free_port());
    let mut active = Daemon::start(&catalog, &catalog_config(port_a, "delete", "50ms"), port_a);
    let standby_config = catalog.path().join("standby.toml");
    std::fs::write(&standby_config, catalog_config(port_b, "delete", "50ms")).expect("write");
    let mut standby = Daemon::start_existing(&standby_config, port_b);
    assert_eq!(standby.status()["role"], "standby");
    let review_book_1 = |catalog: &Catalog| {
        catalog.python(
            "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')",
        )
    };
    let assert_bypass = |reply: &Reply, reason: &str, reviews: i64| {
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(x_cache(reply), "bypass", "{reason}");
        assert_eq!(reply.header("x-cachetail-bypass"), Some(reason));
        assert_eq!(reply.header("cache-control"), Some("no-cache"), "{reason}");
        assert_eq!(
            review_count(&json(reply)),
            reviews,
            "{reason}: the database's value now"
        );
    };

    // `standby`: a standby on the memory backend does not use its memory, which nobody keeps
    // fresh; a write shows at once, without waiting for the active daemon.
    assert_bypass(&standby.get("book:1"), "standby", 2);
    assert_bypass(&standby.get("book:1"), "standby", 2);
    review_book_1(&catalog);
    assert_bypass(&standby.get("book:1"), "standby", 3);
    drop(standby);

    // `no-cache`: asked for.
    active.wait_caught_up();
    assert_eq!(x_cache(&active.get("book:1")), "miss");
    assert_bypass(&active.get_uncached("book:1"), "no-cache", 3);

    // `paused`: capture is off, so the cached value may be stale: a write made during the pause
    // (no trigger sees it) shows at once.
    assert_eq!(x_cache(&active.get("book:1")), "hit");
    cli_ok("pause", &active.config);
    eventually("the daemon sees the pause", || {
        (active.status()["paused"] == true).then_some(())
    });
    review_book_1(&catalog);
    let paused = active.get("book:1");
    assert_bypass(&paused, "paused", 4);
    assert_eq!(paused.header("x-cachetail-paused"), Some("1"));
}

#[test]
fn with_redis_down_the_database_answers_and_says_why() {
    let mut redis = crate::redis::RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms").replace(
        "[tail]",
        &format!(
            "[cache]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"bypass:\"\n\n[tail]",
            redis.url()
        ),
    );
    let mut daemon = Daemon::start(&catalog, &config, port);
    assert_eq!(x_cache(&daemon.get("book:1")), "miss");
    assert_eq!(x_cache(&daemon.get("book:1")), "hit");
    redis.kill();
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    let reply = daemon.get("book:1");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(x_cache(&reply), "bypass");
    assert_eq!(
        reply.header("x-cachetail-bypass"),
        Some("redis-unavailable")
    );
    assert_eq!(reply.header("cache-control"), Some("no-cache"));
    assert_eq!(
        review_count(&json(&reply)),
        3,
        "the database's value now, though the daemon cannot apply the change"
    );
}

#[test]
fn no_cache_answers_from_the_database_and_leaves_the_cache_alone() {
    let catalog = Catalog::new();
    let port = free_port();
    // Notes are read by a family, but no rule watches their table: a change to one is never
    // applied, so the cached value stays as it was, and only `no-cache` reads the new one.
    catalog.python(
        "con.execute('CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)')\n\
         con.execute(\"INSERT INTO notes VALUES (1, 'first')\")",
    );
    let config = catalog_config(port, "delete", "50ms")
        + "\n[keys.\"note:{id}\"]\nquery = \"SELECT id, text FROM notes WHERE id = :id\"\n";
    let mut daemon = Daemon::start(&catalog, &config, port);
    let filled = daemon.get("note:1");
    assert_eq!(
        (x_cache(&filled), json(&filled)["text"].as_str()),
        ("miss", Some("first"))
    );
    let etag = filled.header("etag").expect("an ETag").to_owned();
    let age = |reply: &Reply| -> u64 {
        reply
            .header("age")
            .and_then(|a| a.parse().ok())
            .expect("an Age")
    };
    // The cached value ages: a value stored again would be 0 seconds old.
    eventually("the cached value is a second old", || {
        (age(&daemon.peek("note:1")) >= 1).then_some(())
    });

    let uncached = daemon.get_uncached("note:1");
    assert_eq!(x_cache(&uncached), "bypass");
    assert_eq!(uncached.header("x-cachetail-bypass"), Some("no-cache"));
    assert_eq!(uncached.text(), filled.text());
    let cached = daemon.peek("note:1");
    assert_eq!(cached.status, 200, "not removed");
    assert_eq!(cached.header("etag"), Some(etag.as_str()));
    assert!(age(&cached) >= 1, "not stored again: Age {}", age(&cached));

    catalog.sqlite_cli("UPDATE notes SET text = 'second' WHERE id = 1;");
    let uncached = daemon.get_uncached("note:1");
    assert_eq!(
        (x_cache(&uncached), json(&uncached)["text"].as_str()),
        ("bypass", Some("second")),
        "the database's value now"
    );
    let cached = daemon.peek("note:1");
    assert_eq!(
        (cached.status, json(&cached)["text"].as_str()),
        (200, Some("first")),
        "the cached value is neither replaced nor removed"
    );
    assert_eq!(cached.header("etag"), Some(etag.as_str()));
    assert!(age(&cached) >= 1, "not stored again: Age {}", age(&cached));
    assert_eq!(x_cache(&daemon.get("note:1")), "hit");
}

#[test]
fn status_reports_cursor_head_lag_and_counts() {
    let (catalog, mut daemon) = catalog_daemon("delete", "50ms");
    // The first install writes one flush marker per watched table.
    let installed = daemon.wait_caught_up()["events"].as_u64().expect("events");
    assert_eq!(installed, 3);
    daemon.get("book:1");
    daemon.get("book:1");
    catalog.python("con.executemany('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, 3)', [(3,), (4,)])");
    let status = daemon.wait_caught_up();
    assert_eq!(status["cursor"], status["head"]);
    assert_eq!(status["lag"], 0);
    assert_eq!(status["events"].as_u64(), Some(installed + 2));
    assert_eq!(status["hits"], 1);
    assert_eq!(status["misses"], 1);
    assert!(status["config"]["last_reload_error"].is_null());
    assert_eq!(daemon.get_path("/healthz").text(), "ok\n");
}

#[test]
fn etag_revalidation_answers_304_until_the_value_changes() {
    let (catalog, mut daemon) = crate::strategies::catalog_daemon("write-through", "50ms");
    let first = daemon.get("book:1");
    let tag = first.header("etag").expect("an ETag").to_owned();
    let control = first.header("cache-control").expect("Cache-Control");
    let max_age: u64 = control
        .strip_prefix("max-age=")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("max-age in {control:?}"));
    assert!(
        max_age > 590 && max_age <= 600,
        "the family's 10m TTL: {control}"
    );
    assert!(first.header("age").is_some());
    let conditional = |daemon: &mut Daemon, tag: &str| {
        daemon
            .request_with("GET", "/v1/keys/book:1", &[("If-None-Match", tag)])
            .expect("GET")
    };
    let again = conditional(&mut daemon, &tag);
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    assert_eq!(again.header("etag"), Some(tag.as_str()));
    assert_eq!(conditional(&mut daemon, "\"other\", *").status, 304);
    assert_eq!(conditional(&mut daemon, &format!("W/{tag}")).status, 304);
    assert_eq!(conditional(&mut daemon, "\"nope\"").status, 200);

    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    let changed = eventually("the new value is served", || {
        let reply = conditional(&mut daemon, &tag);
        (reply.status == 200).then_some(reply)
    });
    assert_ne!(changed.header("etag"), Some(tag.as_str()));
    assert!(
        changed.text().contains("\"review_count\":3"),
        "{}",
        changed.text()
    );
}

#[test]
fn a_multi_get_answers_each_key_on_its_own() {
    let (_catalog, mut daemon) = catalog_daemon("delete", "50ms");
    let single = daemon.get("book:2");
    let mut client = Client::new(daemon.address);
    let body = br#"["book:2", "book:3", "book:999", "nothing:1", "", "top-books"]"#;
    let reply = client
        .request(
            "POST",
            "/v1/keys",
            &[("Content-Type", "application/json")],
            body,
        )
        .expect("POST");
    assert_eq!(reply.status, 200, "{}", reply.text());
    // The value is embedded exactly as GET returns it (same bytes, same column order).
    assert!(
        reply
            .text()
            .contains(&format!("\"value\":{}", single.text())),
        "{}",
        reply.text()
    );
    let results = json(&reply)["results"].as_array().expect("results").clone();
    let summary: Vec<(String, i64, String)> = results
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap_or("?").to_owned(),
                r["status"].as_i64().unwrap_or(0),
                r["cache"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, i64, String)> = [
        ("book:2", 200, "hit"),
        ("book:3", 200, "miss"),
        ("book:999", 404, "-"),
        ("nothing:1", 404, "-"),
        ("", 400, "-"),
        ("top-books", 200, "miss"),
    ]
    .iter()
    .map(|(k, s, c)| ((*k).to_owned(), *s, (*c).to_owned()))
    .collect();
    assert_eq!(summary, expected);
    assert!(
        results[3]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no key family"))
    );
    assert_eq!(
        x_cache(&daemon.get("book:3")),
        "hit",
        "the multi-get filled it"
    );

    let object = client
        .request("POST", "/v1/keys", &[], br#"{"keys": ["user:1"]}"#)
        .expect("POST");
    assert_eq!(json(&object)["results"][0]["value"]["name"], "user1");
    for bad in [&b"{\"keys\": 5}"[..], b"not json", b"[1, 2]"] {
        let reply = client.request("POST", "/v1/keys", &[], bad).expect("POST");
        assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(bad));
    }
    let many = format!(
        "[{}]",
        (0..1001)
            .map(|i| format!("\"user:{i}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let reply = client
        .request("POST", "/v1/keys", &[], many.as_bytes())
        .expect("POST");
    assert_eq!(reply.status, 413);
    assert_eq!(client.get("/v1/keys").expect("GET").status, 405);
}

/// Sends `request` on a new connection in one write, and returns the status and body answered.
/// The daemon may answer and close before it has read all of a request it refuses: a failed
/// write is not an error, the answer is what counts.
fn raw_answer(address: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |answer: &[u8]| {
        let text = String::from_utf8_lossy(answer);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0);
        (body.len() >= length).then(|| {
            let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            (
                status.unwrap_or_else(|| panic!("no status in {head:?}")),
                body.to_owned(),
            )
        })
    };
    loop {
        if let Some(answer) = complete(&answer) {
            return answer;
        }
        match stream.read(&mut buf) {
            Ok(0) => panic!(
                "closed without a whole answer to a {}-byte request: {:?}",
                request.len(),
                String::from_utf8_lossy(&answer)
            ),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => panic!("no answer to a {}-byte request: {e}", request.len()),
        }
    }
}

#[test]
fn request_heads_over_64_kib_get_a_431() {
    let (_catalog, daemon) = catalog_daemon("delete", "50ms");
    // A GET whose head (request line, headers, blank line) is exactly `size` bytes.
    let head = |size: usize| {
        let start = format!(
            "GET /v1/keys/book:1 HTTP/1.1\r\nHost: {}\r\nX-Padding: ",
            daemon.address
        );
        let end = "\r\n\r\n";
        format!("{start}{}{end}", "a".repeat(size - start.len() - end.len())).into_bytes()
    };
    const LIMIT: usize = 64 * 1024;
    let (status, body) = raw_answer(daemon.address, &head(LIMIT));
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            r#"{"id":1,"title":"Book 1","avg_rating":3.0,"review_count":2}"#
        ),
        "at the limit"
    );
    for size in [LIMIT + 1, LIMIT + 1024, 100_000, 200_000, 1 << 20] {
        let (status, body) = raw_answer(daemon.address, &head(size));
        assert_eq!(status, 431, "a {size}-byte head: {body}");
    }
}

#[test]
fn a_multi_get_body_over_1_mib_gets_a_413() {
    let (_catalog, mut daemon) = catalog_daemon("delete", "50ms");
    let mut client = Client::new(daemon.address);
    // A list of two keys padded with spaces to exactly `size` bytes.
    let body = |size: usize| {
        let keys = r#"["book:1", "user:2"]"#;
        format!("{keys}{}", " ".repeat(size - keys.len())).into_bytes()
    };
    const LIMIT: usize = 1 << 20;
    let at_limit = client
        .request("POST", "/v1/keys", &[], &body(LIMIT))
        .expect("POST");
    assert_eq!(at_limit.status, 200, "{}", at_limit.text());
    assert_eq!(json(&at_limit)["results"][1]["value"]["name"], "user2");
    for size in [LIMIT + 1, 2 * LIMIT] {
        let mut request = format!(
            "POST /v1/keys HTTP/1.1\r\nHost: {}\r\nContent-Length: {size}\r\n\r\n",
            daemon.address
        )
        .into_bytes();
        request.extend(body(size));
        let (status, error) = raw_answer(daemon.address, &request);
        assert_eq!(status, 413, "a {size}-byte body: {error}");
        assert!(error.contains("over 1048576 bytes"), "{error}");
    }
    assert_eq!(daemon.get("user:2").status, 200, "still serving");
}

#[test]
fn slow_clients_and_slow_requests_cannot_hold_the_daemon() {
    use std::io::{Read, Write};
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms")
        + "\n[http]\nmax_connections = 2\nheader_timeout = \"300ms\"\nrequest_timeout = \"300ms\"\n\
           [keys.\"slow:{id}\"]\nquery = \"SELECT :id AS id, (WITH RECURSIVE spin(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM spin WHERE i < 50000000) SELECT count(*) FROM spin) AS n\"\n";
    let mut daemon = Daemon::start(&catalog, &config, port);

    // Two clients take every connection slot and send half a request, then nothing.
    let slow: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(daemon.address).expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHo").expect("write");
            s
        })
        .collect();
    // They are cut off, and a well-behaved client is served.
    let started = std::time::Instant::now();
    assert_eq!(daemon.get("user:1").status, 200);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    for mut s in slow {
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        // Closed: the end of the stream (or a reset). Still open after 5 s: a failure.
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(n) => panic!(
                "the slow client got {:?} instead of being disconnected",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) => panic!("the slow client was not disconnected within 5 s: {e}"),
        }
    }

    // A request that takes too long (a very slow query) gets a 503, not a hung connection.
    let started = std::time::Instant::now();
    let reply = daemon.get("slow:1");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        json(&reply)["error"]
            .as_str()
            .unwrap_or("")
            .contains("request_timeout")
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(daemon.get("user:2").status, 200, "still serving");
}

/// `/metrics` parsed by the Prometheus project's own Python parser (OpenMetrics):
/// sample name + labels → value.
fn scrape(daemon: &mut Daemon) -> std::collections::HashMap<String, f64> {
    let reply = daemon.get_path("/metrics");
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .unwrap_or("")
            .starts_with("application/openmetrics-text"),
        "{:?}",
        reply.header("content-type")
    );
    let mut parser = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, json\n\
             from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
             out = {}\n\
             for family in text_string_to_metric_families(sys.stdin.read()):\n\
             \x20   for s in family.samples:\n\
             \x20       labels = ','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))\n\
             \x20       out[s.name + '{' + labels + '}'] = s.value\n\
             print(json.dumps(out))\n",
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (pip install prometheus-client)");
    std::io::Write::write_all(&mut parser.stdin.take().expect("stdin"), &reply.body)
        .expect("write");
    let out = parser.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "the metrics do not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parsed samples")
}

#[test]
fn metrics_parse_as_openmetrics_and_count_what_happened() {
    let (catalog, mut daemon) = catalog_daemon("write-through", "50ms");
    daemon.get("book:1");
    daemon.get("book:1");
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    daemon.wait_caught_up();
    let m = scrape(&mut daemon);
    let get = |name: &str| *m.get(name).unwrap_or_else(|| panic!("no {name} in {m:?}"));
    assert!(get("cachetail_events_applied_total{}") >= 1.0);
    assert_eq!(get("cachetail_lag_events{}"), 0.0);
    assert_eq!(get("cachetail_lag_seconds{}"), 0.0);
    assert_eq!(get("cachetail_hits_total{family=book:{id}}"), 1.0);
    assert_eq!(get("cachetail_misses_total{family=book:{id}}"), 1.0);
    assert!(
        get("cachetail_rule_invalidations_total{rule=0,strategy=write-through,table=reviews}")
            >= 2.0
    );
    assert!(
        get("cachetail_rule_recomputes_total{rule=0,strategy=write-through,table=reviews}") >= 2.0
    );
    assert_eq!(
        get("cachetail_rule_invalidations_total{rule=2,strategy=delete,table=users}"),
        0.0
    );
    assert!(
        get("cachetail_fill_duration_seconds_count{}") >= 2.0,
        "the miss and the recompute"
    );
    assert_eq!(get("cachetail_write_behind_queue_depth{}"), 0.0);
    assert_eq!(get("cachetail_active{}"), 1.0);
    // Commit → fresh, from the captured write time: the review (and the install's markers).
    let fresh = get("cachetail_commit_to_fresh_seconds_count{}");
    let took = get("cachetail_commit_to_fresh_seconds_sum{}");
    assert!(fresh >= 1.0, "the review was timed");
    assert!(
        took > 0.0 && took / fresh < 5.0,
        "a plausible mean: {took} s over {fresh}"
    );
    let latency = &daemon.status()["latency"]["commit_to_fresh"];
    assert!(latency["count"].as_u64() >= Some(1), "{latency}");
    assert!(latency["p99_ms"].as_f64() >= latency["p50_ms"].as_f64());

    // Reloads: one that takes effect, one refused.
    let config = std::fs::read_to_string(&daemon.config).expect("config");
    catalog.write_config(&format!("{config}\n# touched\n"));
    eventually("a reload", || {
        (scrape(&mut daemon).get("cachetail_reloads_total{}") == Some(&1.0)).then_some(())
    });
    catalog.write_config("database = \"catalog.db\"\nnonsense = 1\n");
    eventually("a refused reload", || {
        (scrape(&mut daemon).get("cachetail_reload_failures_total{}") == Some(&1.0)).then_some(())
    });
}

const TOKEN: &str = "s3cret-admin-token-for-tests";

fn admin(daemon: &mut Daemon, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("Authorization", b)])
        .unwrap_or_default();
    let reply = daemon
        .request_with(method, path, &headers)
        .expect("request");
    (reply.status, reply.text())
}

#[test]
fn admin_actions_need_the_token_and_drop_what_they_name() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms").replacen(
        "\n[tail]",
        &format!("\nadmin_token = \"{TOKEN}\"\n\n[tail]"),
        1,
    );
    let mut daemon = Daemon::start(&catalog, &config, port);
    for key in ["book:1", "book:2", "top-books", "user:1", "user:2"] {
        daemon.get(key);
    }
    assert_eq!(admin(&mut daemon, "DELETE", "/v1/keys/book:1", None).0, 401);
    assert_eq!(
        admin(
            &mut daemon,
            "DELETE",
            "/v1/keys/book:1",
            Some("wrong-token-but-long")
        )
        .0,
        401
    );
    assert_eq!(
        daemon.peek("book:1").status,
        200,
        "nothing happened without the token"
    );

    assert_eq!(
        admin(&mut daemon, "DELETE", "/v1/keys/book:1", Some(TOKEN)).0,
        200
    );
    assert_eq!(daemon.peek("book:1").status, 504);
    assert_eq!(daemon.peek("book:2").status, 200);
    assert_eq!(
        admin(
            &mut daemon,
            "POST",
            "/v1/admin/invalidate?tag=books",
            Some(TOKEN)
        )
        .0,
        200
    );
    assert_eq!(daemon.peek("book:2").status, 504, "tagged books");
    assert_eq!(daemon.peek("top-books").status, 504, "tagged books");
    assert_eq!(daemon.peek("user:1").status, 200);
    assert_eq!(
        admin(
            &mut daemon,
            "POST",
            "/v1/admin/flush?family=user%3A%7Bid%7D",
            Some(TOKEN)
        )
        .0,
        200
    );
    assert_eq!(daemon.peek("user:1").status, 504);
    assert_eq!(
        admin(
            &mut daemon,
            "POST",
            "/v1/admin/flush?family=nope",
            Some(TOKEN)
        )
        .0,
        404
    );
    daemon.get("user:2");
    assert_eq!(
        admin(&mut daemon, "POST", "/v1/admin/flush", Some(TOKEN)).0,
        200
    );
    assert_eq!(daemon.peek("user:2").status, 504, "everything");
    // Refilled afterwards, fresh, as usual.
    assert_eq!(x_cache(&daemon.get("user:2")), "miss");
    assert_eq!(x_cache(&daemon.get("user:2")), "hit");
    // With a token set, verify needs it too.
    assert_eq!(admin(&mut daemon, "POST", "/v1/verify", None).0, 401);
    assert_eq!(admin(&mut daemon, "POST", "/v1/verify", Some(TOKEN)).0, 200);
}

#[test]
fn admin_actions_are_disabled_without_a_token() {
    let (_catalog, mut daemon) = catalog_daemon("delete", "50ms");
    daemon.get("book:1");
    let (status, text) = admin(&mut daemon, "DELETE", "/v1/keys/book:1", Some(TOKEN));
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("admin_token"), "{text}");
    assert_eq!(admin(&mut daemon, "POST", "/v1/admin/flush", None).0, 403);
    assert_eq!(daemon.peek("book:1").status, 200);
}
