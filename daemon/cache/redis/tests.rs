//! The Redis scripts against a real `redis-server` (started here, on a free loopback port, like
//! the end-to-end tests: it is required, not optional): fencing, and a replayed interleaving.

use super::*;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const PREFIX: &str = "p:";

/// A `redis-server` of the test's own; killed when dropped.
struct Server {
    child: Child,
    url: RedisUrl,
}

impl Server {
    fn start() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server): these tests need one");
        let url = RedisUrl::parse(&format!("redis://127.0.0.1:{port}/0")).expect("url");
        let started = Instant::now();
        while Conn::connect(&url, IO_TIMEOUT, false)
            .and_then(|mut c| c.cmd(&["PING"]))
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not answer"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Server { child, url }
    }

    /// One daemon's handle on the shared Redis.
    fn daemon(&self) -> RedisStore {
        RedisStore::new(self.url.clone(), PREFIX.to_owned(), (true, 100_000), 8)
    }

    fn conn(&self) -> Conn {
        Conn::connect(&self.url, IO_TIMEOUT, false).expect("connect")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn batch(epoch: u64, position: u64, keys: &[&str], message: &str) -> Invalidation {
    Invalidation {
        position,
        keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        groups: Vec::new(),
        floor: 0,
        message: message.to_owned(),
        epoch,
    }
}

/// A plain command's reply, as text (None for nil).
fn text(conn: &mut Conn, args: &[&str]) -> Option<String> {
    match conn.cmd(args).expect("redis answers") {
        Reply::Nil => None,
        Reply::Bulk(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        Reply::Int(i) => Some(i.to_string()),
        Reply::Status(s) => Some(s),
        other => panic!("{args:?} answered {other:?}"),
    }
}

/// The messages published on the channel, in order, until (and with) `last`; but the `all`
/// a rebuild announces (the store's first look at an empty Redis is one).
fn messages_until(subscriber: &mut Conn, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some(last) {
        match subscriber
            .next_push()
            .expect("a message before the timeout")
        {
            Reply::Array(parts) => match parts.as_slice() {
                [Reply::Bulk(kind), _, Reply::Bulk(body)] if kind == b"message" => {
                    let body = String::from_utf8_lossy(body).into_owned();
                    if !body.starts_with(r#"{"all":true"#) {
                        seen.push(body);
                    }
                }
                _ => {}
            },
            other => panic!("a push, got {other:?}"),
        }
    }
    seen
}

#[test]
fn a_batch_from_an_older_epoch_is_refused_whole_and_an_equal_or_newer_one_applies() {
    let server = Server::start();
    let mut subscriber = server.conn();
    subscriber
        .cmd(&["SUBSCRIBE", &format!("{PREFIX}invalidations")])
        .expect("subscribe");
    let mut probe = server.conn();
    let ttl = Duration::from_secs(60);
    let group = tag_group("books");

    // The first holder (epoch 1) applies up to 10 and caches `k` (tagged) read at 10.
    let first = server.daemon();
    first.reconcile(0, Some(0)).expect("reconcile");
    first
        .apply(&batch(1, 10, &["a"], "first@10"), 0)
        .expect("epoch 1 applies");
    assert!(
        first
            .store(
                "k",
                (10, 0),
                ttl,
                Some(b"v10"),
                std::slice::from_ref(&group)
            )
            .expect("store")
    );

    // A second daemon takes over (epoch 2) and applies up to 20.
    let second = server.daemon();
    second.reconcile(10, Some(20)).expect("reconcile");
    second
        .apply(&batch(2, 20, &["b"], "second@20"), 10)
        .expect("epoch 2 applies");

    // The first one resumes mid-stream and sends its next batch, still at epoch 1: a key, its
    // tag, a floor. Redis refuses all of it.
    let late = Invalidation {
        groups: vec![(group.clone(), 30)],
        floor: 30,
        ..batch(1, 30, &["k"], "first@30")
    };
    let refused = first.apply(&late, 10);
    assert!(
        matches!(refused, Err(RedisError::Fenced)),
        "a batch from an older epoch must be refused, got {refused:?}"
    );
    assert!(
        first.health().down_since.is_none(),
        "being fenced is not an outage"
    );
    let state = format!("{PREFIX}#state");
    assert_eq!(
        text(&mut probe, &["GET", &format!("{PREFIX}k")]).as_deref(),
        Some("v10"),
        "the refused batch removed a key"
    );
    assert_eq!(
        text(&mut probe, &["HGET", &format!("{PREFIX}#m:k"), "i"]),
        None,
        "the refused batch left an invalidation mark"
    );
    assert_eq!(
        text(&mut probe, &["GET", &format!("{PREFIX}#gm:{group}")]),
        None,
        "the refused batch marked the tag"
    );
    assert!(
        text(&mut probe, &["ZSCORE", &format!("{PREFIX}#g:{group}"), "k"]).is_some(),
        "the refused batch emptied the tag's group"
    );
    assert_eq!(
        text(&mut probe, &["HGET", &state, "applied"]).as_deref(),
        Some("20"),
        "the refused batch moved the applied position"
    );
    assert_eq!(
        text(&mut probe, &["HGET", &state, "floor"]).as_deref(),
        Some("0"),
        "the refused batch raised the floor"
    );
    assert_eq!(
        text(&mut probe, &["HGET", &state, "epoch"]).as_deref(),
        Some("2")
    );
    // The current holder's next batch (the same epoch) applies.
    second
        .apply(&batch(2, 40, &["k"], "second@40"), 20)
        .expect("an equal epoch applies");
    assert_eq!(text(&mut probe, &["GET", &format!("{PREFIX}k")]), None);
    assert_eq!(
        text(&mut probe, &["HGET", &state, "applied"]).as_deref(),
        Some("40")
    );

    // A third daemon takes over (epoch 3): from then on epoch 2 is the older one.
    let third = server.daemon();
    third.reconcile(40, Some(50)).expect("reconcile");
    third
        .apply(&batch(3, 50, &["c"], "third@50"), 40)
        .expect("a newer epoch applies");
    let refused = second.apply(&batch(2, 60, &["c"], "second@60"), 40);
    assert!(
        matches!(refused, Err(RedisError::Fenced)),
        "epoch 2 after epoch 3: {refused:?}"
    );
    third
        .apply(&batch(3, 70, &["d"], "third@70"), 50)
        .expect("epoch 3 applies");
    assert_eq!(
        text(&mut probe, &["HGET", &state, "applied"]).as_deref(),
        Some("70")
    );

    // The first daemon's every batch stays refused, whatever it carries.
    let refused = first.apply(&batch(1, 80, &["e"], "first@80"), 70);
    assert!(matches!(refused, Err(RedisError::Fenced)), "{refused:?}");
    assert_eq!(
        text(&mut probe, &["HGET", &state, "epoch"]).as_deref(),
        Some("3")
    );
    third
        .apply(&batch(3, 90, &["e"], "third@90"), 70)
        .expect("epoch 3 applies");

    // Nothing of a refused batch was published: app-local caches hear only the holders.
    assert_eq!(
        messages_until(&mut subscriber, "third@90"),
        [
            "first@10",
            "second@20",
            "second@40",
            "third@50",
            "third@70",
            "third@90"
        ]
    );
}

/// An interleaving the checker found on Redis, replayed against the store script. A daemon's
/// fill finds no row (the row was deleted at 6, not yet applied) and answers 404 at 7, while the
/// other daemon's slower fill, which read the row at 5 before the delete, has not stored yet.
/// When it does, it must be refused: else the next read answers the row again, going backwards.
#[test]
fn redis_refuses_a_value_read_before_a_404_that_was_answered() {
    let server = Server::start();
    let cache = server.daemon();
    cache.reconcile(0, None).expect("redis state");
    let (ttl, groups) = (Duration::from_secs(60), ["f:k".to_owned()]);
    let store = |version: u64, body: Option<&[u8]>| {
        cache
            .store("k:1", (version, 0), ttl, body, &groups)
            .expect("the store script runs")
    };
    assert!(store(4, Some(br#"{"n":4}"#)), "a value read at 4 is stored");
    assert!(
        store(7, None),
        "a read at 7 that found no row is current: answered 404"
    );
    assert_eq!(
        cache.get_blocking("k:1").expect("GET"),
        None,
        "the value read before the 404 is gone"
    );
    assert!(
        !store(5, Some(br#"{"n":5}"#)),
        "a value read at 5 must not land after a 404 read at 7 was answered"
    );
    assert_eq!(cache.get_blocking("k:1").expect("GET"), None);
}

/// A group too large for one script is emptied a page at a time behind its mark, raised first:
/// between pages a value read before the mark is refused and one read after it is stored and
/// kept; the batch counts as applied, and is published, only once the group is empty.
#[test]
fn a_large_group_is_emptied_a_page_at_a_time_behind_its_mark() {
    let server = Server::start();
    let mut subscriber = server.conn();
    subscriber
        .cmd(&["SUBSCRIBE", &format!("{PREFIX}invalidations")])
        .expect("subscribe");
    let mut probe = server.conn();
    let cache = server.daemon();
    cache.reconcile(0, None).expect("redis state");
    cache
        .apply(&batch(1, 5, &[], "start@5"), 0)
        .expect("a first batch");
    let (ttl, group) = (Duration::from_secs(60), tag_group("big"));
    let groups = std::slice::from_ref(&group);
    let keys = PURGE_PAGE * 5;
    for i in 0..keys {
        let stored = cache.store(&format!("k{i}"), (5, 5), ttl, Some(b"old"), groups);
        assert!(stored.expect("store"), "k{i} read at 5");
    }
    let state = format!("{PREFIX}#state");
    let big = Invalidation {
        groups: vec![(group.clone(), 10)],
        ..batch(1, 10, &[], "big@10")
    };
    let mut conn = server.conn();
    let Begun::Pending(pending) = cache.begin_batch(&mut conn, &big).expect("APPLY") else {
        panic!("a group of {keys} keys is too large for one script");
    };
    assert_eq!(pending, [(group.clone(), 10)]);
    let store = |key: &str, version: u64, body: &[u8]| {
        cache
            .store(key, (version, 5), ttl, Some(body), groups)
            .expect("store")
    };
    assert!(!store("k1", 7, b"read at 7"), "read before the mark");
    assert!(store("k2", 12, b"read at 12"), "read after the mark");
    let mut cursor = b"0".to_vec();
    let mut pages = 0;
    loop {
        assert_eq!(
            text(&mut probe, &["HGET", &state, "applied"]).as_deref(),
            Some("5"),
            "applied before the group is empty"
        );
        cursor = cache
            .purge_page(&mut conn, &group, 10, &cursor)
            .expect("PURGE");
        pages += 1;
        assert!(
            !store("k3", 9, b"read at 9"),
            "page {pages}: read before the mark"
        );
        if cursor == b"0" {
            break;
        }
    }
    assert!(pages >= 3, "{pages} pages for {keys} keys");
    for i in 0..keys {
        let value = text(&mut probe, &["GET", &format!("{PREFIX}k{i}")]);
        let expected = (i == 2).then(|| "read at 12".to_owned());
        assert_eq!(value, expected, "k{i}");
    }
    assert_eq!(
        cache.finish_batch(&mut conn, &big).expect("FINISH"),
        Some(1)
    );
    assert_eq!(
        text(&mut probe, &["HGET", &state, "applied"]).as_deref(),
        Some("10")
    );
    assert_eq!(
        messages_until(&mut subscriber, "big@10"),
        ["start@5", "big@10"]
    );
}

/// The lease row was reset (`uninstall` and `install`, a `DELETE`), so two daemons were given
/// one epoch by the database: the first to claim it in Redis has it, the other is refused and
/// must take one above Redis's. A holder that claimed an epoch is fenced off as soon as a newer
/// one is claimed, before that holder applies anything; and a rebuild keeps Redis's epoch.
#[test]
fn an_epoch_is_claimed_once_and_a_newer_claim_fences_the_older_holder_at_once() {
    let server = Server::start();
    let (old, new) = (server.daemon(), server.daemon());
    let mut probe = server.conn();
    let state = format!("{PREFIX}#state");
    old.reconcile(0, None).expect("redis state");
    assert_eq!(
        old.claim_epoch(5).expect("claim"),
        None,
        "the first claim of 5"
    );
    old.apply(&batch(5, 10, &["a"], "old@10"), 0)
        .expect("the claimer applies under its epoch");

    // The row was reset: the new holder was given 1, then (another reset) 5 again.
    assert_eq!(new.claim_epoch(1).expect("claim"), Some(5), "1 is below 5");
    assert_eq!(
        new.claim_epoch(5).expect("claim"),
        Some(5),
        "5 was claimed already"
    );
    // The old holder still applies: no newer holder has claimed yet.
    old.apply(&batch(5, 20, &["a"], "old@20"), 10)
        .expect("no newer claim yet");
    // The new holder raised its row above Redis's epoch, and claims that: the old holder is
    // refused from now on, though the new one has applied nothing yet.
    assert_eq!(new.claim_epoch(6).expect("claim"), None);
    let refused = old.apply(&batch(5, 30, &["a"], "old@30"), 20);
    assert!(matches!(refused, Err(RedisError::Fenced)), "{refused:?}");
    assert_eq!(
        text(&mut probe, &["HGET", &state, "applied"]).as_deref(),
        Some("20")
    );

    // A rebuild (Redis behind the cursor) removes every value and mark, but keeps the epoch.
    new.reconcile(50, None).expect("rebuilt");
    assert_eq!(
        text(&mut probe, &["HGET", &state, "applied"]).as_deref(),
        Some("50")
    );
    assert_eq!(
        text(&mut probe, &["HGET", &state, "epoch"]).as_deref(),
        Some("6"),
        "fencing never goes back"
    );
    new.apply(&batch(6, 60, &["a"], "new@60"), 50)
        .expect("the new holder applies");
    let refused = old.apply(&batch(5, 70, &["a"], "old@70"), 60);
    assert!(matches!(refused, Err(RedisError::Fenced)), "{refused:?}");
}
