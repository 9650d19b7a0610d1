//! Redis Cluster (`[cache] cluster = [...]`) against a real 3-primary cluster the test starts
//! (`redis-server --cluster-enabled yes` ×3, `redis-cli --cluster create`): every strategy and
//! tags stay fresh with values sharded over the nodes, app servers read a value under `{prefix}`
//! plus the key on whichever node holds its slot, a key holding `{…}` keeps its bookkeeping in
//! its own slot, and slots moved between primaries while changes stream in (by hand:
//! `CLUSTER SETSLOT … MIGRATING/IMPORTING`, `MIGRATE` a key at a time) serve no stale read, the
//! cache ending equal to the database (`/v1/verify`).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::strategies::catalog_config;

/// One `redis-server --cluster-enabled yes` node.
struct Node {
    child: Child,
    port: u16,
    id: String,
}

/// Three primaries, every slot assigned; killed when dropped.
struct Cluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// `redis-cli -p port args…` (no redirects followed), its output trimmed.
fn cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--raw"])
        .args(args)
        .output()
        .expect("redis-cli runs (apt-get install redis-tools)");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir(&node_dir).expect("node dir");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server runs (apt-get install redis-server)");
            nodes.push(Node {
                child,
                port,
                id: String::new(),
            });
        }
        for node in &mut nodes {
            eventually("a cluster node answers PING", || {
                (cli(node.port, &["PING"]) == "PONG").then_some(())
            });
            node.id = cli(node.port, &["CLUSTER", "MYID"]);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create runs");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Cluster { nodes, _dir: dir };
        for node in &cluster.nodes {
            eventually("every node sees the cluster ok", || {
                cli(node.port, &["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
                    .then_some(())
            });
        }
        cluster
    }

    fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("\"127.0.0.1:{}\"", n.port))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `redis-cli -c` (follows redirects): reads a key wherever it lives, as an app server would.
    fn get(&self, key: &str) -> String {
        let output = Command::new("redis-cli")
            .args([
                "-c",
                "-h",
                "127.0.0.1",
                "-p",
                &self.nodes[0].port.to_string(),
            ])
            .args(["--raw", "GET", key])
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn slot(&self, key: &str) -> u16 {
        cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key])
            .parse()
            .expect("a slot number")
    }

    /// The node that serves `slot` now.
    fn owner(&self, slot: u16) -> usize {
        let slots = cli(self.nodes[0].port, &["CLUSTER", "NODES"]);
        for line in slots.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            for range in fields.iter().skip(8) {
                let (low, high) = match range.split_once('-') {
                    Some((l, h)) => (l.parse().ok(), h.parse().ok()),
                    None => (range.parse().ok(), range.parse().ok()),
                };
                if let (Some(low), Some(high)) = (low, high)
                    && (low..=high).contains(&slot)
                {
                    return self
                        .nodes
                        .iter()
                        .position(|n| n.id == fields[0])
                        .expect("a known node");
                }
            }
        }
        panic!("slot {slot} has no owner: {slots}");
    }

    /// Moves `slot` to the next node as `redis-cli --cluster reshard` does, by hand, one key
    /// at a time with a pause between (a wide migration window: some keys on each side).
    fn migrate(&self, slot: u16, pause: Duration) {
        let from = self.owner(slot);
        let to = (from + 1) % self.nodes.len();
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        let slot_text = slot.to_string();
        assert_eq!(
            cli(
                target.port,
                &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &source.id]
            ),
            "OK"
        );
        assert_eq!(
            cli(
                source.port,
                &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &target.id]
            ),
            "OK"
        );
        loop {
            let keys = cli(source.port, &["CLUSTER", "GETKEYSINSLOT", &slot_text, "1"]);
            let Some(key) = keys.lines().next().filter(|k| !k.is_empty()) else {
                break;
            };
            let moved = cli(
                source.port,
                &[
                    "MIGRATE",
                    "127.0.0.1",
                    &target.port.to_string(),
                    "",
                    "0",
                    "5000",
                    "REPLACE",
                    "KEYS",
                    key,
                ],
            );
            assert!(moved == "OK" || moved == "NOKEY", "MIGRATE: {moved}");
            std::thread::sleep(pause);
        }
        for node in [target, source].into_iter().chain(
            self.nodes
                .iter()
                .filter(|n| n.id != source.id && n.id != target.id),
        ) {
            assert_eq!(
                cli(
                    node.port,
                    &["CLUSTER", "SETSLOT", &slot_text, "NODE", &target.id]
                ),
                "OK"
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

/// The catalog config on the cluster, with one more family keyed by a book's title (text a
/// writer controls, braces included).
fn cluster_config(port: u16, strategy: &str, cluster: &Cluster, prefix: &str) -> String {
    catalog_config(port, strategy, "20ms").replace(
        "[tail]\npoll_interval = \"100ms\"",
        &format!(
            "[tail]\npoll_interval = \"20ms\"\n\n[cache]\nbackend = \"redis\"\nprefix = \"{prefix}\"\ncluster = [{}]\n\n[keys.\"title:{{title}}\"]\nquery = \"SELECT id, title FROM books WHERE title = :title\"\ntags = [\"titles\"]\n\n[[rules]]\ntable = \"books\"\nkeys = [\"title:{{title}}\"]",
            cluster.seeds()
        ),
    )
}

fn review_count(reply: &Reply) -> i64 {
    json(reply)["review_count"].as_i64().expect("review_count")
}

/// One strategy on the cluster: a miss stored under `{prefix}book:1` on the node of its slot,
/// a hit, a change fresh through the daemon and in Redis, a tag dropping every key carrying it,
/// a key holding `{…}` stored and invalidated, and the cache equal to the database at the end.
fn one_strategy(cluster: &Cluster, strategy: &str, prefix: &str) {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(
        &catalog,
        &cluster_config(port, strategy, cluster, prefix),
        port,
    );
    eventually("the daemon reaches the cluster", || {
        (daemon.status()["redis"]["ok"] == true).then_some(())
    });
    let first = daemon.get("book:1");
    assert_eq!((first.status, x_cache(&first)), (200, "miss"), "{strategy}");
    assert_eq!(x_cache(&daemon.get("book:1")), "hit", "{strategy}");
    let name = format!("{prefix}book:1");
    assert_eq!(
        cluster.get(&name),
        first.text(),
        "{strategy}: stored as {name}"
    );

    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 1)')");
    let fresh = daemon.get_path("/v1/keys/book:1?fresh=1");
    assert_eq!(fresh.status, 200, "{}", fresh.text());
    assert_eq!(review_count(&fresh), review_count(&first) + 1, "{strategy}");
    let expected = daemon.get_uncached("book:1").text();
    assert_eq!(
        fresh.text(),
        expected,
        "{strategy}: ?fresh=1 answers the change"
    );
    eventually("redis holds no stale book:1", || {
        let stored = cluster.get(&name);
        (stored.is_empty() || stored == expected).then_some(())
    });

    // A tag: `books` is carried by every book and by top-books, which live in several slots.
    for key in ["book:2", "book:3", "top-books"] {
        daemon.get(key);
        assert_eq!(x_cache(&daemon.get(key)), "hit", "{strategy} {key}");
    }
    catalog.python("con.execute(\"UPDATE books SET title = 'Renamed' WHERE id = 2\")");
    let renamed = daemon.get_path("/v1/keys/book:2?fresh=1");
    assert_eq!(json(&renamed)["title"], "Renamed", "{strategy}");
    for key in ["book:3", "top-books"] {
        assert_eq!(
            daemon.get(key).text(),
            daemon.get_uncached(key).text(),
            "{strategy}: {key} after the tag"
        );
    }

    // A key holding braces: its value's slot is that of the text inside them.
    catalog.python("con.execute(\"UPDATE books SET title = '{x}y' WHERE id = 4\")");
    daemon.wait_caught_up();
    let braces = daemon.get("title:{x}y");
    assert_eq!(braces.status, 200, "{}", braces.text());
    assert_eq!(x_cache(&daemon.get("title:{x}y")), "hit", "{strategy}");
    assert_eq!(
        cluster.get(&format!("{prefix}title:{{x}}y")),
        braces.text(),
        "{strategy}"
    );
    catalog.python("con.execute(\"UPDATE books SET year = 1999 WHERE id = 4\")");
    let after = daemon.get_path("/v1/keys/title:%7Bx%7Dy?fresh=1");
    assert_eq!(json(&after)["id"], 4, "{}", after.text());
    assert_eq!(
        daemon.get("title:{x}y").text(),
        daemon.get_uncached("title:{x}y").text()
    );

    daemon.wait_caught_up();
    let report = daemon.verify();
    assert_eq!(report["stale"], 0, "{strategy}: {report}");
    // A group's members stay listed after their values go (until their TTL): `gone`.
    let listed = report["checked"].as_u64().unwrap_or(0) + report["gone"].as_u64().unwrap_or(0);
    assert!(
        report["checked"].as_u64() >= Some(1) && listed >= 4,
        "{strategy}: {report}"
    );
    daemon.stop();
}

#[test]
fn every_strategy_and_tags_stay_fresh_on_a_three_primary_cluster() {
    let started = Instant::now();
    let cluster = Cluster::start();
    eprintln!("cluster started in {:?}", started.elapsed());
    std::thread::scope(|scope| {
        for strategy in ["delete", "write-through", "write-behind"] {
            let cluster = &cluster;
            scope.spawn(move || one_strategy(cluster, strategy, &format!("{strategy}:")));
        }
    });
}

#[test]
fn the_cluster_setting_is_checked() {
    let catalog = Catalog::new();
    let port = free_port();
    let base = catalog_config(port, "delete", "20ms");
    for (cache, wants) in [
        (
            "backend = \"redis\"\ncluster = []",
            "`cache.cluster` must list at least one",
        ),
        (
            "backend = \"redis\"\ncluster = [\"127.0.0.1\"]",
            "host:port",
        ),
        (
            "backend = \"redis\"\ncluster = [\"127.0.0.1:7000\"]\nprefix = \"a{b}:\"",
            "`cache.prefix` must not hold `{` or `}` with `cache.cluster`",
        ),
        (
            "cluster = [\"127.0.0.1:7000\"]",
            "`cache.cluster` is for `backend = \"redis\"`",
        ),
        (
            "backend = \"redis\"\ncluster = [\"127.0.0.1:7000\"]\nurl = \"redis://127.0.0.1:7000/3\"",
            "database 0",
        ),
    ] {
        let config = catalog.write_config(&base.replace(
            "[tail]\npoll_interval = \"100ms\"",
            &format!("[tail]\npoll_interval = \"100ms\"\n\n[cache]\n{cache}"),
        ));
        let out = Command::new(env!("CARGO_BIN_EXE_cachetail"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .expect("cachetail check runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cache}: accepted");
        assert!(stderr.contains(wants), "{cache}: {stderr}");
    }
}

/// A writer process (python3) adding reviews to books 1..=5 in turn; after each commit it prints
/// the book and its review count, which the readers treat as committed from then on.
fn start_writer(catalog: &Catalog, changes: usize) -> (Child, std::sync::mpsc::Receiver<String>) {
    let script = format!(
        "import sqlite3, sys, time\ncon = sqlite3.connect(sys.argv[1], timeout=5)\n\
         for i in range({changes}):\n    b = 1 + i % 5\n    con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, ?)', (b, 1 + i % 5))\n    if i % 7 == 0:\n        con.execute('UPDATE books SET year = year + 1 WHERE id = ?', (b,))\n    con.commit()\n    n = con.execute('SELECT count(*) FROM reviews WHERE book_id = ?', (b,)).fetchone()[0]\n    print(b, n, flush=True)\n    time.sleep(0.004)\n"
    );
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(catalog.db())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let lines = lines_of(child.stdout.take().expect("stdout"));
    (child, lines)
}

#[test]
fn slots_moved_between_primaries_during_a_stream_of_changes_serve_no_stale_read() {
    let cluster = Cluster::start();
    let catalog = Catalog::new();
    let port = free_port();
    let prefix = "mig:";
    let mut daemon = Daemon::start(
        &catalog,
        &cluster_config(port, "write-through", &cluster, prefix),
        port,
    );
    eventually("the daemon reaches the cluster", || {
        (daemon.status()["redis"]["ok"] == true).then_some(())
    });
    for b in 1..=5 {
        daemon.get(&format!("book:{b}"));
    }
    daemon.get("top-books");

    // What the writer has committed: per book, the review count.
    let committed: Arc<Vec<AtomicU64>> = Arc::new((0..=5).map(|_| AtomicU64::new(0)).collect());
    let (mut writer, lines) = start_writer(&catalog, 1500);
    let done = Arc::new(AtomicBool::new(false));
    let follower = {
        let (committed, done) = (Arc::clone(&committed), Arc::clone(&done));
        std::thread::spawn(move || {
            for line in lines {
                let mut parts = line.split(' ').map(|p| p.parse::<u64>().unwrap_or(0));
                let (b, n) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
                committed[b as usize].fetch_max(n, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // Readers: `?fresh=1` must reflect every commit the writer reported before the request.
    let stale = Arc::new(Mutex::new(Vec::<String>::new()));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (committed, done, stale, reads) = (
                Arc::clone(&committed),
                Arc::clone(&done),
                Arc::clone(&stale),
                Arc::clone(&reads),
            );
            let address = daemon.address;
            std::thread::spawn(move || {
                let mut client = Client::new(address);
                let mut i = r;
                while !done.load(Ordering::SeqCst) {
                    i += 1;
                    let b = 1 + i % 5;
                    let before = committed[b].load(Ordering::SeqCst);
                    let path = if i % 2 == 0 {
                        format!("/v1/keys/book:{b}?fresh=1")
                    } else {
                        format!("/v1/keys/book:{b}")
                    };
                    let Ok(reply) = client.get(&path) else {
                        client = Client::new(address);
                        continue;
                    };
                    reads.fetch_add(1, Ordering::Relaxed);
                    if reply.status != 200 {
                        stale.lock().expect("lock").push(format!(
                            "{path}: {} {}",
                            reply.status,
                            reply.text()
                        ));
                        continue;
                    }
                    let count = json(&reply)["review_count"].as_u64().unwrap_or(0);
                    if path.contains("fresh") && count < before {
                        stale.lock().expect("lock").push(format!(
                            "{path}: {count} reviews, {before} committed before the request ({})",
                            x_cache(&reply)
                        ));
                    }
                }
            })
        })
        .collect();

    // Move the slots of the books' values, of their bookkeeping and of the global state while the
    // changes stream in.
    let started = Instant::now();
    let mut slots: Vec<u16> = (1..=5)
        .map(|b| cluster.slot(&format!("{prefix}book:{b}")))
        .collect();
    slots.push(cluster.slot(&format!("{prefix}top-books")));
    slots.push(cluster.slot(&format!("{prefix}#invalidations")));
    slots.sort_unstable();
    slots.dedup();
    for slot in &slots {
        cluster.migrate(*slot, Duration::from_millis(30));
    }
    eprintln!(
        "moved {} slots in {:?} during the stream",
        slots.len(),
        started.elapsed()
    );
    assert!(
        !done.load(Ordering::SeqCst),
        "the writer was still writing when the last slot moved (make it longer)"
    );
    let status = writer.wait().expect("writer exits");
    assert!(status.success());
    follower.join().expect("follower");
    for reader in readers {
        reader.join().expect("reader");
    }
    let stale = stale.lock().expect("lock").clone();
    assert!(
        stale.is_empty(),
        "{} stale or failed reads: {:#?}",
        stale.len(),
        &stale[..stale.len().min(20)]
    );
    assert!(reads.load(Ordering::Relaxed) > 100, "readers ran");

    daemon.wait_caught_up();
    for b in 1..=5 {
        let key = format!("book:{b}");
        let expected = daemon.get_uncached(&key).text();
        assert_eq!(daemon.get(&key).text(), expected, "{key}");
        let stored = cluster.get(&format!("{prefix}{key}"));
        assert!(
            stored.is_empty() || stored == expected,
            "{key} in redis: {stored}"
        );
    }
    let report = daemon.verify();
    assert_eq!(report["stale"], 0, "{report}");
    daemon.stop();
}
