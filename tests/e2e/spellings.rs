//! Keys spelled differently from the way rules render them (issue 14, item 2). SQLite compares
//! a bound parameter with a column through the column's affinity and collation, so `book:042`,
//! `book:+42`, `book:42.0`, `book: 42` or `book:4.2e1` all read book 42's row, and on a
//! `COLLATE NOCASE` column `tag:RUST` reads the row `rust`; yet the rules render `book:42` and
//! `tag:rust` from the rows. Such a spelling is answered from the database every time
//! (`X-Cache: bypass`, `X-Cachetail-Bypass: key-spelling`) and never stored, a "no row" answer
//! included; text keys a column holds as written (zip codes, ISBNs with leading zeros in a TEXT
//! column) are cached as usual.

use serde_json::Value;

use crate::common::*;

/// Book 1 as clients may spell it: SQLite's numeric affinity reads each as the integer 1.
const BOOK_1_SPELLINGS: [&str; 8] = [
    "book:01",
    "book:+1",
    "book:1.0",
    "book: 1",
    "book:1 ",
    "book:1e0",
    "book:0.1e1",
    "book:001",
];

fn review_count(reply: &Reply) -> i64 {
    assert_eq!(reply.status, 200, "{}", reply.text());
    json(reply)["review_count"].as_i64().expect("review_count")
}

fn bypass_reason(reply: &Reply) -> (&str, &str) {
    (
        x_cache(reply),
        reply.header("x-cachetail-bypass").unwrap_or(""),
    )
}

/// A multi-get's results, in order.
fn multi_get(daemon: &mut Daemon, keys: &[&str], fresh: bool) -> Vec<Value> {
    let body = serde_json::to_vec(keys).expect("json");
    let path = if fresh {
        "/v1/keys?fresh=1"
    } else {
        "/v1/keys"
    };
    let mut client = Client::new(daemon.address);
    let reply = client
        .request("POST", path, &[("Content-Type", "application/json")], &body)
        .expect("POST /v1/keys");
    assert_eq!(reply.status, 200, "{}", reply.text());
    json(&reply)["results"].as_array().expect("results").clone()
}

#[test]
fn a_number_spelled_differently_is_answered_fresh_and_never_cached() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &reference_config(port), port);

    // Book 1 has 2 reviews. Every spelling reads it; the canonical key is cached as usual.
    assert_eq!(review_count(&daemon.get("book:1")), 2);
    let canonical = daemon.get("book:1");
    assert_eq!(x_cache(&canonical), "hit", "book:1 is cached");
    for key in BOOK_1_SPELLINGS {
        for _ in 0..2 {
            assert_eq!(review_count(&daemon.get(key)), 2, "{key}");
        }
    }
    let results = multi_get(&mut daemon, &BOOK_1_SPELLINGS, false);
    for (key, result) in BOOK_1_SPELLINGS.iter().zip(&results) {
        assert_eq!(result["value"]["review_count"], 2, "{key}: {result}");
    }

    // A new review of book 1 (write-through on book:{book_id}): every spelling sees it at once.
    catalog.sqlite_cli("INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)");
    for key in BOOK_1_SPELLINGS {
        let reply = daemon.get_path(&format!("/v1/keys/{}?fresh=1", encode_key(key)));
        assert_eq!(
            review_count(&reply),
            3,
            "{key}?fresh=1 answered a value from before the applied review"
        );
    }
    let results = multi_get(&mut daemon, &BOOK_1_SPELLINGS, true);
    for (key, result) in BOOK_1_SPELLINGS.iter().zip(&results) {
        assert_eq!(result["value"]["review_count"], 3, "{key}: {result}");
    }
    let canonical = daemon.get("book:1");
    assert_eq!(
        (review_count(&canonical), x_cache(&canonical)),
        (3, "hit"),
        "book:1 was recomputed (write-through)"
    );

    // How: none of them is cached, each is answered from the database and says why.
    for key in BOOK_1_SPELLINGS {
        let reply = daemon.get(key);
        assert_eq!(review_count(&reply), 3, "{key}");
        assert_eq!(
            bypass_reason(&reply),
            ("bypass", "key-spelling"),
            "{key} reads book 1's row but no rule renders it: it must not be cached"
        );
        assert_eq!(
            daemon.peek(key).status,
            504,
            "{key}: nothing is stored under it (only-if-cached)"
        );
    }
    let results = multi_get(&mut daemon, &BOOK_1_SPELLINGS, false);
    for (key, result) in BOOK_1_SPELLINGS.iter().zip(&results) {
        assert_eq!(result["cache"], "bypass", "{key} in a multi-get: {result}");
    }
}

#[test]
fn a_no_row_answer_under_another_spelling_does_not_outlive_the_row() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &reference_config(port), port);

    // No user 7 yet: 404 under every spelling (user:{id} has no tag: only `user:{id}` rules).
    let spellings = ["user:07", "user:+7", "user:7.0", "user:7e0"];
    for key in spellings {
        assert_eq!(daemon.get(key).status, 404, "{key}");
        assert_eq!(daemon.get(key).status, 404, "{key}");
    }
    assert_eq!(daemon.get("user:7").status, 404);
    assert_eq!(
        daemon.peek("user:7").status,
        404,
        "the 404 of user:7 is cached"
    );

    catalog.sqlite_cli("INSERT INTO users (id, name) VALUES (7, 'grace')");
    for key in spellings {
        let reply = daemon.get_path(&format!("/v1/keys/{}?fresh=1", encode_key(key)));
        assert_eq!(
            reply.status, 200,
            "{key}?fresh=1 still answers the 404 from before user 7 was inserted"
        );
        assert_eq!(json(&reply)["name"], "grace", "{key}");
    }
    assert_eq!(json(&daemon.get("user:7"))["name"], "grace");
}

/// A tag table whose name is `COLLATE NOCASE`, and zip codes and ISBNs held as TEXT.
fn text_keys_config(port: u16) -> String {
    format!(
        r#"database = "catalog.db"
listen = "127.0.0.1:{port}"

[keys."tag:{{name}}"]
query = "SELECT name, uses FROM tags WHERE name = :name"

[keys."zip:{{zip}}"]
query = "SELECT zip, city FROM places WHERE zip = :zip"

[keys."isbn:{{isbn}}"]
query = "SELECT isbn, title FROM editions WHERE isbn = :isbn"

[keys."code:{{code}}"]
query = "SELECT code, label FROM codes WHERE code = :code"

[[rules]]
table = "tags"
keys = ["tag:{{name}}"]

[[rules]]
table = "places"
keys = ["zip:{{zip}}"]

[[rules]]
table = "editions"
keys = ["isbn:{{isbn}}"]

[[rules]]
table = "codes"
keys = ["code:{{code}}"]
"#
    )
}

fn text_keys_catalog() -> Catalog {
    let catalog = Catalog::new();
    catalog.sqlite_cli(
        "CREATE TABLE tags (name TEXT PRIMARY KEY COLLATE NOCASE, uses INTEGER NOT NULL);
         INSERT INTO tags VALUES ('rust', 1), ('2024', 1);
         CREATE TABLE places (zip TEXT PRIMARY KEY, city TEXT NOT NULL);
         INSERT INTO places VALUES ('02134', 'Allston'), ('2134', 'Nowhere');
         CREATE TABLE editions (isbn TEXT PRIMARY KEY, title TEXT NOT NULL);
         INSERT INTO editions VALUES ('0262510871', 'SICP');
         CREATE TABLE codes (code INTEGER PRIMARY KEY, label TEXT NOT NULL);
         INSERT INTO codes VALUES (7, 'seven');",
    );
    catalog
}

#[test]
fn a_letter_case_a_nocase_column_ignores_is_never_cached() {
    let catalog = text_keys_catalog();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &text_keys_config(port), port);

    // Every case of `rust` reads the row `rust`; a change to it renders `tag:rust` only, and the
    // column could as well hold `Rust`: no spelling with a letter is cached.
    let spellings = ["tag:RUST", "tag:Rust", "tag:rust"];
    for key in spellings {
        assert_eq!(json(&daemon.get(key))["uses"], 1, "{key}");
        assert_eq!(json(&daemon.get(key))["uses"], 1, "{key}");
    }
    // A name without letters compares the same whatever the case: cached.
    assert_eq!(json(&daemon.get("tag:2024"))["uses"], 1);
    assert_eq!(x_cache(&daemon.get("tag:2024")), "hit");

    catalog.sqlite_cli("UPDATE tags SET uses = 2");
    for key in spellings.iter().chain(&["tag:2024"]) {
        let reply = daemon.get_path(&format!("/v1/keys/{}?fresh=1", encode_key(key)));
        assert_eq!(
            json(&reply)["uses"],
            2,
            "{key}?fresh=1 answered a stale value"
        );
    }
    // A new row in another case: the key spelled as the new row is written sees it at once.
    assert_eq!(daemon.get("tag:GO").status, 404);
    catalog.sqlite_cli("INSERT INTO tags VALUES ('go', 5)");
    let reply = daemon.get_path("/v1/keys/tag:GO?fresh=1");
    assert_eq!(
        reply.status, 200,
        "tag:GO still answers 404 after `go` was inserted"
    );
    for key in spellings.iter().chain(&["tag:GO"]) {
        let reply = daemon.get(key);
        assert_eq!(bypass_reason(&reply), ("bypass", "key-spelling"), "{key}");
    }

    // `check` says so, before anyone wonders why `tag:{name}` never hits.
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["check", "--config"])
        .arg(&daemon.config)
        .output()
        .expect("cachetail check runs");
    let said = String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "{said}");
    assert!(
        said.contains("warning: key family `tag:{name}`: `{name}` is compared with `tags.name` under the collation NoCase")
            && said.contains("keys whose `{name}` holds a letter are answered from the database every time, never cached"),
        "{said}"
    );
    assert!(!said.contains("zip:{zip}"), "{said}");
}

#[test]
fn text_keys_that_look_like_numbers_are_cached_where_the_column_holds_text() {
    let catalog = text_keys_catalog();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &text_keys_config(port), port);

    // A TEXT column compares text as written: `02134` and `2134` are two rows, each key is the
    // one its row renders, so both are cached.
    for (key, field, expected) in [
        ("zip:02134", "city", "Allston"),
        ("zip:2134", "city", "Nowhere"),
        ("isbn:0262510871", "title", "SICP"),
    ] {
        let first = daemon.get(key);
        assert_eq!(json(&first)[field], expected, "{key}");
        assert_eq!(x_cache(&first), "miss", "{key}");
        let again = daemon.get(key);
        assert_eq!(
            (json(&again)[field].as_str(), x_cache(&again)),
            (Some(expected), "hit"),
            "{key} is a key its row renders: it must be cached"
        );
    }
    catalog.sqlite_cli("UPDATE places SET city = 'Boston' WHERE zip = '02134'");
    let reply = daemon.get_path("/v1/keys/zip:02134?fresh=1");
    assert_eq!(json(&reply)["city"], "Boston");
    assert_eq!(json(&daemon.get("zip:2134"))["city"], "Nowhere");

    // The same spelling against an INTEGER column reads the row 7, which renders `code:7`.
    assert_eq!(x_cache(&daemon.get("code:7")), "miss");
    assert_eq!(x_cache(&daemon.get("code:7")), "hit");
    let reply = daemon.get("code:007");
    assert_eq!(json(&reply)["label"], "seven");
    assert_eq!(bypass_reason(&reply), ("bypass", "key-spelling"));
}

#[test]
fn a_migration_that_changes_how_a_column_compares_changes_which_keys_are_cached() {
    let catalog = Catalog::new();
    catalog.sqlite_cli(
        "CREATE TABLE lots (lot TEXT PRIMARY KEY, owner TEXT NOT NULL);
         INSERT INTO lots VALUES ('0042', 'ada');",
    );
    let port = free_port();
    let config = format!(
        r#"database = "catalog.db"
listen = "127.0.0.1:{port}"

[keys."lot:{{lot}}"]
query = "SELECT lot, owner FROM lots WHERE lot = :lot"

[[rules]]
table = "lots"
keys = ["lot:{{lot}}"]
"#
    );
    let mut daemon = Daemon::start(&catalog, &config, port);
    // As TEXT, `0042` is the row's own spelling: cached.
    assert_eq!(json(&daemon.get("lot:0042"))["owner"], "ada");
    assert_eq!(x_cache(&daemon.get("lot:0042")), "hit");

    // The app rebuilds the table with an INTEGER key: the row is now 42, which renders `lot:42`.
    catalog.sqlite_cli(
        "BEGIN;
         CREATE TABLE lots_new (lot INTEGER PRIMARY KEY, owner TEXT NOT NULL);
         INSERT INTO lots_new SELECT lot, owner FROM lots;
         DROP TABLE lots;
         ALTER TABLE lots_new RENAME TO lots;
         COMMIT;",
    );
    // The daemon reinstalls capture on the new table (values read before are dropped) ...
    eventually("capture is reinstalled on the rebuilt table", || {
        let metrics = daemon.get_path("/metrics").text();
        metrics
            .lines()
            .any(|l| l == "cachetail_capture_reinstalls_total 1")
            .then_some(())
    });
    // ... and reads after that, under the new schema, must not cache `lot:0042`.
    for _ in 0..3 {
        let reply = daemon.get_path("/v1/keys/lot:0042?fresh=1");
        assert_eq!(json(&reply)["owner"], "ada");
    }
    catalog.sqlite_cli("UPDATE lots SET owner = 'grace' WHERE lot = 42");
    let reply = daemon.get_path("/v1/keys/lot:0042?fresh=1");
    assert_eq!(
        json(&reply)["owner"],
        "grace",
        "lot:0042 was cached under the new schema, where no rule renders it"
    );
    assert_eq!(
        bypass_reason(&daemon.get("lot:0042")),
        ("bypass", "key-spelling")
    );
    assert_eq!(json(&daemon.get("lot:42"))["owner"], "grace");
    assert_eq!(x_cache(&daemon.get("lot:42")), "hit");
}
