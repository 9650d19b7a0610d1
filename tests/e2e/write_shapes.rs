//! Every write shape real apps make, from separate writer processes with no special pragma:
//! the keys of every row they touch are invalidated, and nothing cached is ever stale after.

use crate::common::*;

const SCHEMA: &str = r#"
CREATE TABLE items (id INTEGER PRIMARY KEY, sku TEXT UNIQUE, grp TEXT, qty INTEGER);
CREATE TABLE parents (id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE children (
    id INTEGER PRIMARY KEY,
    parent_id INTEGER REFERENCES parents (id) ON DELETE CASCADE,
    other_id INTEGER REFERENCES parents (id) ON DELETE SET NULL,
    label TEXT
);
CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID;
CREATE TABLE pairs (a INTEGER, b INTEGER, v TEXT, PRIMARY KEY (a, b));
CREATE TABLE "odd ""t""" ("key col" TEXT UNIQUE, "v" TEXT);
CREATE TABLE vals (id INTEGER PRIMARY KEY, k);
INSERT INTO items (id, sku, grp, qty) VALUES (1, 'A', 'g1', 1), (2, 'B', 'g1', 2), (3, 'C', 'g1', 3), (4, 'D', 'g2', 4);
INSERT INTO parents (id, name) VALUES (1, 'p1'), (2, 'p2'), (3, 'p3');
INSERT INTO children (parent_id, other_id, label) VALUES (1, 2, 'a'), (1, 3, 'b'), (2, 1, 'c'), (3, 1, 'd');
INSERT INTO kv VALUES ('x', 'old'), ('a:b/{c}', 'braces');
INSERT INTO pairs VALUES (1, 2, 'one-two'), (2, 1, 'two-one');
INSERT INTO "odd ""t""" VALUES ('k 1', 'v1');
"#;

fn config(port: u16) -> String {
    r#"
database = "shapes.db"
listen = "127.0.0.1:PORT"
[tail]
poll_interval = "100ms"

[keys."item:{id}"]
query = "SELECT id, sku, grp, qty FROM items WHERE id = :id"
[keys."sku:{sku}"]
query = "SELECT id, sku FROM items WHERE sku = :sku"
[keys."grp:{grp}"]
query = "SELECT count(*) AS n, sum(qty) AS q FROM items WHERE grp = :grp"
[keys."parent:{id}"]
query = """SELECT (SELECT count(*) FROM children WHERE parent_id = :id) AS kids,
                  (SELECT count(*) FROM children WHERE other_id = :id) AS others"""
[keys."kv:{k}"]
query = "SELECT v FROM kv WHERE k = :k"
[keys."pair:{a}/{b}"]
query = "SELECT v FROM pairs WHERE a = :a AND b = :b"
[keys."odd:{k}"]
query = '''SELECT "v" FROM "odd ""t""" WHERE "key col" = :k'''
[keys."val:{k}"]
query = "SELECT count(*) AS n FROM vals WHERE k = :k"

[[rules]]
table = "items"
keys = ["item:{id}", "sku:{sku}", "grp:{grp}"]
[[rules]]
table = "children"
keys = ["parent:{parent_id}", "parent:{other_id}"]
[[rules]]
table = "kv"
keys = ["kv:{k}"]
[[rules]]
table = "pairs"
keys = ["pair:{a}/{b}"]
[[rules]]
table = 'odd "t"'
keys = ["odd:{key col}"]
[[rules]]
table = "vals"
keys = ["val:{k}"]
"#
    .replace("PORT", &port.to_string())
}

struct Shapes {
    catalog: Catalog,
    daemon: Daemon,
}

impl Shapes {
    fn start() -> Shapes {
        let catalog = Catalog::new();
        let db = catalog.path().join("shapes.db");
        let script = format!(
            "import sqlite3, sys\ncon = sqlite3.connect(sys.argv[1])\ncon.executescript({SCHEMA:?})\ncon.commit()\n"
        );
        let ok = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&db)
            .status()
            .expect("python3");
        assert!(ok.success());
        let port = free_port();
        let daemon = Daemon::start(&catalog, &config(port), port);
        Shapes { catalog, daemon }
    }

    /// Python code run against shapes.db as its own process.
    fn write(&self, code: &str) {
        python_on(&self.catalog.path().join("shapes.db"), code);
    }

    /// Caches `keys`, runs `code` as a separate writer, waits for the daemon, then checks that
    /// each of `gone` was invalidated and that nothing cached differs from the database.
    fn scenario(&mut self, keys: &[&str], code: &str, gone: &[&str]) {
        for key in keys {
            let reply = self.daemon.get(key);
            assert!(
                reply.status == 200 || reply.status == 404,
                "{key}: {}",
                reply.text()
            );
        }
        self.write(code);
        self.daemon.wait_caught_up();
        for key in gone {
            assert_eq!(
                self.daemon.peek(key).status,
                504,
                "{key} was invalidated by: {code}"
            );
        }
        self.assert_nothing_stale(code);
        for key in keys {
            self.daemon.get(key);
        }
        self.assert_nothing_stale(code);
    }

    fn assert_nothing_stale(&mut self, code: &str) {
        let report = self.daemon.verify();
        assert_eq!(report["stale"], 0, "stale values after {code}: {report}");
        assert_eq!(report["unverified"], 0, "{report}");
    }
}

#[test]
fn replace_upsert_ignore_and_multi_row_inserts() {
    let mut s = Shapes::start();
    // INSERT OR REPLACE conflicting on a UNIQUE column: the replaced row (id 1) is refreshed too.
    s.scenario(
        &["item:1", "item:10", "sku:A", "grp:g1", "grp:g2", "item:2"],
        "con.execute(\"INSERT OR REPLACE INTO items (id, sku, grp, qty) VALUES (10, 'A', 'g2', 9)\")",
        &["item:1", "item:10", "sku:A", "grp:g1", "grp:g2"],
    );
    // REPLACE conflicting on the primary key.
    s.scenario(
        &["item:2", "sku:B", "sku:Z", "grp:g1", "grp:g3"],
        "con.execute(\"REPLACE INTO items (id, sku, grp, qty) VALUES (2, 'Z', 'g3', 1)\")",
        &["item:2", "sku:B", "sku:Z", "grp:g1", "grp:g3"],
    );
    // UPDATE OR REPLACE: item 3 takes item 4's sku, so item 4 is deleted.
    s.scenario(
        &["item:3", "item:4", "sku:C", "sku:D", "grp:g2"],
        "con.execute(\"UPDATE OR REPLACE items SET sku = 'D' WHERE id = 3\")",
        &["item:3", "item:4", "sku:C", "sku:D", "grp:g2"],
    );
    // UPSERT.
    s.scenario(
        &["item:3", "grp:g1", "grp:g5"],
        "con.execute(\"INSERT INTO items (id, sku, grp, qty) VALUES (3, 'C', 'g5', 5) ON CONFLICT (id) DO UPDATE SET grp = excluded.grp, qty = excluded.qty\")",
        &["item:3", "grp:g1", "grp:g5"],
    );
    // INSERT OR IGNORE that ignores: nothing changes, nothing cached may be wrong.
    s.scenario(
        &["item:3", "sku:D"],
        "con.execute(\"INSERT OR IGNORE INTO items (id, sku, grp) VALUES (3, 'D', 'g9')\")",
        &[],
    );
    // One statement, several rows.
    s.scenario(
        &["grp:m1", "grp:m2"],
        "con.execute(\"INSERT INTO items (sku, grp, qty) VALUES ('M1', 'm1', 1), ('M2', 'm2', 2), ('M3', 'm1', 3)\")",
        &["grp:m1", "grp:m2"],
    );
    // UPDATE of the primary key: old and new keys.
    s.scenario(
        &["item:10", "item:20"],
        "con.execute('UPDATE items SET id = 20 WHERE id = 10')",
        &["item:10", "item:20"],
    );
}

#[test]
fn cascades_set_null_and_composite_keys() {
    let mut s = Shapes::start();
    // ON DELETE CASCADE and ON DELETE SET NULL, from a writer with foreign keys on.
    s.scenario(
        &["parent:1", "parent:2", "parent:3"],
        "con.execute('PRAGMA foreign_keys = ON')\ncon.execute('DELETE FROM parents WHERE id = 1')",
        &["parent:1", "parent:2", "parent:3"],
    );
    assert_eq!(json(&s.daemon.get("parent:1"))["kids"], 0);
    assert_eq!(json(&s.daemon.get("parent:1"))["others"], 0);
    // A composite primary key, and a key column change within it.
    s.scenario(
        &["pair:1/2", "pair:2/1", "pair:1/3"],
        "con.execute(\"UPDATE pairs SET v = 'changed' WHERE a = 1 AND b = 2\")\ncon.execute('UPDATE pairs SET b = 3 WHERE a = 2 AND b = 1')",
        &["pair:1/2", "pair:2/1"],
    );
    // A WITHOUT ROWID table, replaced by primary key, with pattern characters in the key.
    s.scenario(
        &["kv:x", "kv:a:b/{c}"],
        "con.execute(\"INSERT OR REPLACE INTO kv VALUES ('x', 'new')\")\ncon.execute(\"UPDATE kv SET v = 'b2' WHERE k = 'a:b/{c}'\")",
        &["kv:x", "kv:a:b/{c}"],
    );
    assert_eq!(json(&s.daemon.get("kv:x"))["v"], "new");
    // A table and a column whose names need quoting.
    s.scenario(
        &["odd:k 1", "odd:k 2"],
        "con.execute('UPDATE \"odd \"\"t\"\"\" SET \"key col\" = ? WHERE \"key col\" = ?', ('k 2', 'k 1'))",
        &["odd:k 1", "odd:k 2"],
    );
}

#[test]
fn odd_values_in_key_columns() {
    let mut s = Shapes::start();
    let long = "L".repeat(600);
    let long_key = format!("val:{long}");
    s.scenario(
        &["val:7", "val:1.5", "val:ünï ✓", "val:0a0b", "val:a:b/{c}", &long_key],
        &format!(
            "con.executemany('INSERT INTO vals (k) VALUES (?)', [(7,), (1.5,), ('ünï ✓',), (b'\\x0a\\x0b',), ('a:b/{{c}}',), ('{long}',), (None,)])"
        ),
        &["val:7", "val:1.5", "val:ünï ✓", "val:0a0b", "val:a:b/{c}", &long_key],
    );
    assert_eq!(json(&s.daemon.get("val:ünï ✓"))["n"], 1);
    assert_eq!(json(&s.daemon.get("val:1.5"))["n"], 1);
    assert_eq!(json(&s.daemon.get(&long_key))["n"], 1);
}

#[test]
fn large_rolled_back_and_savepoint_transactions() {
    let mut s = Shapes::start();
    // 100k rows in one commit.
    s.scenario(
        &["grp:big"],
        "con.executemany('INSERT INTO items (sku, grp, qty) VALUES (?, ?, 1)', [(f'big{i}', 'big') for i in range(100000)])",
        &["grp:big"],
    );
    assert_eq!(json(&s.daemon.get("grp:big"))["n"], 100000);

    // A rolled-back transaction: nothing to apply.
    let before = s.daemon.wait_caught_up();
    s.scenario(
        &["grp:gone"],
        "con.execute(\"INSERT INTO items (sku, grp) VALUES ('RB', 'gone')\")\ncon.rollback()",
        &[],
    );
    let after = s.daemon.wait_caught_up();
    assert_eq!(
        after["head"], before["head"],
        "a rollback leaves nothing in the outbox"
    );
    assert_eq!(
        s.daemon.peek("grp:gone").status,
        200,
        "still cached: nothing happened"
    );

    // A savepoint rolled back inside a committed transaction.
    s.scenario(
        &["grp:sp", "grp:kept"],
        "con.isolation_level = None\ncon.execute('BEGIN')\ncon.execute('SAVEPOINT s')\ncon.execute(\"INSERT INTO items (sku, grp) VALUES ('SP', 'sp')\")\ncon.execute('ROLLBACK TO s')\ncon.execute(\"INSERT INTO items (sku, grp) VALUES ('KP', 'kept')\")\ncon.execute('COMMIT')",
        &["grp:kept"],
    );
    assert_eq!(
        s.daemon.peek("grp:sp").status,
        200,
        "the rolled-back savepoint invalidated nothing"
    );
    assert_eq!(json(&s.daemon.get("grp:kept"))["n"], 1);
}

#[test]
fn the_sqlite3_shell_is_captured_for_every_shape_too() {
    let mut s = Shapes::start();
    for key in ["item:1", "sku:A", "grp:g1"] {
        s.daemon.get(key);
    }
    let db = s.catalog.path().join("shapes.db");
    let out = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(&db)
        .arg("REPLACE INTO items (id, sku, grp, qty) VALUES (1, 'A2', 'g7', 1); INSERT INTO items (sku, grp) VALUES ('S1', 'g1') ON CONFLICT DO NOTHING;")
        .output()
        .expect("sqlite3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.daemon.wait_caught_up();
    for key in ["item:1", "sku:A", "grp:g1"] {
        assert_eq!(s.daemon.peek(key).status, 504, "{key}");
    }
    assert_eq!(s.daemon.verify()["stale"], 0);
}
