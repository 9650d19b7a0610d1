//! Fills in flight against what happens while their query runs: an admin action (delete a key,
//! invalidate a tag, flush a family, flush everything) after a change cachetail could not see,
//! and a hot reload that changes the family. A slow family query (a recursive CTE that spins
//! after the fill took its read snapshot) holds the fill open; the test sees the snapshot held
//! through SQLite itself (a checkpoint cannot pass a reader's snapshot).

use std::path::Path;
use std::thread::JoinHandle;

use serde_json::Value;

use crate::common::*;

const TOKEN: &str = "s3cret-admin-token-for-tests";

/// Iterations of the family query's spin: long enough (about a second here, more under load)
/// for the test to change the data and act while the fill runs; `spin = 0` makes it instant.
const SPIN: u64 = 3_000_000;

/// A family reading `notes`, a table no rule watches: a change to it is one cachetail cannot see.
/// `QUERY` is the family's query (the spin, then the row).
fn notes_config(port: u16, query: &str) -> String {
    format!(
        r#"
database = "catalog.db"
listen = "127.0.0.1:{port}"
admin_token = "{TOKEN}"

[keys."note:{{id}}"]
query = """{query}"""
tags = ["notes"]
"#
    )
}

/// The slow query: spins `notes.spin` times, then reads the note.
const SLOW_QUERY: &str = "WITH RECURSIVE spin(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM spin WHERE n < (SELECT spin FROM notes WHERE id = :id)) \
     SELECT id, name, (SELECT max(n) FROM spin) AS spun FROM notes WHERE id = :id";

/// A catalog with `notes` (ids 1 and 2, named `old`, spinning `SPIN` times) and `pad` (rows
/// written only to see whether a reader holds an older snapshot).
fn notes_catalog() -> Catalog {
    let catalog = Catalog::new();
    catalog.python(&format!(
        "con.executescript('''CREATE TABLE notes (id INTEGER PRIMARY KEY, name TEXT NOT NULL, spin INTEGER NOT NULL);\n\
         INSERT INTO notes VALUES (1, 'old', {SPIN}), (2, 'old', {SPIN});\n\
         CREATE TABLE pad (x);''')"
    ));
    catalog
}

/// The test's own connection to the database: a separate writer, and a probe for readers.
struct Probe {
    conn: rusqlite::Connection,
}

impl Probe {
    fn open(db: &Path) -> Probe {
        let conn = rusqlite::Connection::open(db).expect("open the database");
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .expect("busy timeout");
        Probe { conn }
    }

    /// Whether some reader holds a snapshot older than the database's newest state: after a
    /// write to `pad`, a passive checkpoint cannot copy the frames that reader may still need.
    /// The daemon's own reads are single short statements, so a reader seen twice, 20 ms apart,
    /// is a fill's query running.
    fn reader_holds_an_old_snapshot(&self) -> bool {
        let once = || {
            self.conn
                .execute("INSERT INTO pad VALUES (1)", [])
                .expect("write to pad");
            let (busy, log, done): (i64, i64, i64) = self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .expect("checkpoint");
            assert!(log >= 0, "the database is in WAL mode");
            busy != 0 || done < log
        };
        once() && {
            std::thread::sleep(std::time::Duration::from_millis(20));
            once()
        }
    }

    /// Changes a note behind cachetail's back (no trigger on `notes`) and ends its spin.
    fn rename_uncaptured(&self, id: i64, name: &str) {
        self.conn
            .execute(
                "UPDATE notes SET name = ?1, spin = 0 WHERE id = ?2",
                rusqlite::params![name, id],
            )
            .expect("update notes");
    }
}

/// `GET /v1/keys/{key}` on a thread of its own, on its own connection.
fn get_in_background(daemon: &Daemon, key: &str) -> JoinHandle<Reply> {
    let (address, path) = (daemon.address, format!("/v1/keys/{}", encode_key(key)));
    std::thread::spawn(move || Client::new(address).get(&path).expect("GET"))
}

fn name(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text());
    json(reply)["name"].as_str().expect("a name").to_owned()
}

/// A slow fill of `note:1` reads `old`; the note becomes `new` in a change cachetail cannot see;
/// the admin action runs while the fill is still in flight. From then on, every read answers
/// `new`: a read during the flight, and reads after it landed.
fn an_admin_action_drops_a_fill_in_flight(method: &str, path: &str) {
    let catalog = notes_catalog();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &notes_config(port, SLOW_QUERY), port);
    let probe = Probe::open(&catalog.db());
    eventually("no reader holds a snapshot before the fill", || {
        (!probe.reader_holds_an_old_snapshot()).then_some(())
    });

    let slow = get_in_background(&daemon, "note:1");
    eventually("the fill holds its read snapshot", || {
        probe.reader_holds_an_old_snapshot().then_some(())
    });
    probe.rename_uncaptured(1, "new");
    let bearer = format!("Bearer {TOKEN}");
    let reply = daemon
        .request_with(method, path, &[("Authorization", &bearer)])
        .expect("the admin request");
    assert_eq!(reply.status, 200, "{method} {path}: {}", reply.text());
    assert!(
        probe.reader_holds_an_old_snapshot() && !slow.is_finished(),
        "the slow fill ended before the admin action: SPIN is too short for this machine"
    );

    // A read after the action, while the fill that read before it is still in flight.
    assert_eq!(
        name(&daemon.get("note:1")),
        "new",
        "a read after {method} {path} was answered with a value read before it (it joined the fill in flight)"
    );
    assert_eq!(
        name(&slow.join().expect("the slow read")),
        "new",
        "the fill that read before {method} {path} is not handed out: its own request fills again"
    );
    assert_eq!(
        name(&daemon.get("note:1")),
        "new",
        "the fill that read before {method} {path} was stored and served after it"
    );
    let again = daemon.get("note:1");
    assert_eq!(
        (name(&again), x_cache(&again)),
        ("new".to_owned(), "hit"),
        "the refill after the action is cached as usual"
    );
}

#[test]
fn deleting_a_key_drops_its_fill_in_flight() {
    an_admin_action_drops_a_fill_in_flight("DELETE", "/v1/keys/note:1");
}

#[test]
fn invalidating_a_tag_drops_a_fill_in_flight() {
    an_admin_action_drops_a_fill_in_flight("POST", "/v1/admin/invalidate?tag=notes");
}

#[test]
fn flushing_a_family_drops_a_fill_in_flight() {
    an_admin_action_drops_a_fill_in_flight("POST", "/v1/admin/flush?family=note%3A%7Bid%7D");
}

#[test]
fn flushing_everything_drops_a_fill_in_flight() {
    an_admin_action_drops_a_fill_in_flight("POST", "/v1/admin/flush");
}

/// The shape of a note's value: its columns.
fn columns(reply: &Reply) -> Vec<String> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let value: Value = json(reply);
    let mut columns: Vec<String> = value
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect();
    columns.sort();
    columns
}

#[test]
fn a_fill_started_before_a_reload_is_not_served_under_the_new_definition() {
    let catalog = notes_catalog();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &notes_config(port, SLOW_QUERY), port);
    let probe = Probe::open(&catalog.db());

    // Two slow fills under the old definition (columns id, name, spun).
    let slow_1 = get_in_background(&daemon, "note:1");
    let slow_2 = get_in_background(&daemon, "note:2");
    eventually("both reads missed and fill", || {
        (daemon.status()["misses"].as_u64()? >= 2).then_some(())
    });
    eventually("a fill holds its read snapshot", || {
        probe.reader_holds_an_old_snapshot().then_some(())
    });

    // The new definition: another column, no spin.
    catalog.write_config(&notes_config(
        port,
        "SELECT id, name, 'v2' AS shape FROM notes WHERE id = :id",
    ));
    eventually("the reload took effect", || {
        (daemon.status()["config"]["reloads"] == 1).then_some(())
    });
    assert!(
        !slow_1.is_finished() && !slow_2.is_finished(),
        "a slow fill ended before the reload: SPIN is too short for this machine"
    );
    let new_shape = ["id", "name", "shape"].map(String::from).to_vec();

    // A read after the reload does not join the old definition's fill of its key.
    assert_eq!(
        columns(&daemon.get("note:1")),
        new_shape,
        "a read after the reload joined a fill of the old definition"
    );
    // The old definition's fill of note:2 lands after the reload: it is not served.
    let landed = slow_2.join().expect("the slow read");
    assert_eq!(
        columns(&daemon.get("note:2")),
        new_shape,
        "a fill of the old definition, landed after the reload, was served"
    );
    assert_eq!(
        columns(&landed),
        new_shape,
        "a read whose old-definition fill landed after the reload is answered under the new one"
    );
    assert_eq!(
        columns(&slow_1.join().expect("the slow read")),
        new_shape,
        "a read whose old-definition fill was superseded is answered under the new definition"
    );
    for key in ["note:1", "note:2"] {
        let reply = daemon.get(key);
        assert_eq!(columns(&reply), new_shape, "{key}");
        assert_eq!(
            x_cache(&reply),
            "hit",
            "{key}: the new definition's value is cached"
        );
    }
}
