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
    /// Killed by the test.
    dead: bool,
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

/// A replica's user for replication (every node knows it): a test disables it on a primary to cut
/// that primary's replica off without touching the daemon's connections.
const REPLICATION_USER: [&str; 5] = ["repl", "on", ">repl-secret", "~*", "+@all"];

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(0, "2000")
    }

    /// Three primaries, each with `replicas` replicas, failure detected after `node_timeout` ms.
    fn start_with(replicas: usize, node_timeout: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for i in 0..3 * (1 + replicas) {
            let port = free_port();
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir(&node_dir).expect("node dir");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    node_timeout,
                ])
                .args(["--save", "", "--appendonly", "no"])
                // A replica whose link is down still takes over (the loss test cuts it).
                .args(["--cluster-replica-validity-factor", "0"])
                .arg("--user")
                .args(REPLICATION_USER)
                .args(["--masteruser", "repl", "--masterauth", "repl-secret"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server runs (apt-get install redis-server)");
            nodes.push(Node {
                child,
                port,
                id: String::new(),
                dead: false,
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
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
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
        if replicas > 0 {
            for node in &cluster.nodes {
                eventually("every replica is in sync", || {
                    let info = cli(node.port, &["INFO", "replication"]);
                    (info.contains("role:master") || info.contains("master_link_status:up"))
                        .then_some(())
                });
            }
        }
        cluster
    }

    /// A node still running, to ask about the cluster.
    fn live(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| !n.dead)
            .expect("a live node")
            .port
    }

    /// Kills node `i` (SIGKILL: no goodbye to the cluster).
    fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.child.kill().expect("kill a node");
        node.child.wait().expect("reap a node");
        node.dead = true;
    }

    /// The replica of primary `i`.
    fn replica_of(&self, i: usize) -> usize {
        let primary = &self.nodes[i].id;
        let nodes = cli(self.live(), &["CLUSTER", "NODES"]);
        let line = nodes
            .lines()
            .find(|line| line.split(' ').nth(3) == Some(primary.as_str()))
            .unwrap_or_else(|| panic!("primary {i} has no replica: {nodes}"));
        let id = line.split(' ').next().expect("an id");
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .expect("a known node")
    }

    /// Waits until node `i` is a primary serving `slot`, as every live node sees it.
    fn wait_promoted(&self, i: usize, slot: u16) {
        eventually("the replica is promoted and the cluster ok", || {
            let role = cli(self.nodes[i].port, &["ROLE"]);
            let ok = self
                .nodes
                .iter()
                .filter(|n| !n.dead)
                .all(|n| cli(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            (role.starts_with("master") && ok && self.owner(slot) == i).then_some(())
        });
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
        self.redirected(&["GET", key])
    }

    /// `args` on the cluster, following redirects (`redis-cli -c`), the output trimmed.
    fn redirected(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-c", "-h", "127.0.0.1", "-p", &self.live().to_string()])
            .arg("--raw")
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn slot(&self, key: &str) -> u16 {
        cli(self.live(), &["CLUSTER", "KEYSLOT", key])
            .parse()
            .expect("a slot number")
    }

    /// The node that serves `slot` now.
    fn owner(&self, slot: u16) -> usize {
        let slots = cli(self.live(), &["CLUSTER", "NODES"]);
        for line in slots.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if !fields.get(2).is_some_and(|flags| flags.contains("master"))
                || fields[2].contains("fail")
            {
                continue;
            }
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

/// A writer process (python3) adding reviews to books 1..=5 in turn, at most `changes`, until
/// the file `stop` exists; after each commit it prints the book and its review count, which the
/// readers treat as committed from then on.
fn start_writer(
    catalog: &Catalog,
    changes: usize,
    stop: &std::path::Path,
) -> (Child, std::sync::mpsc::Receiver<String>) {
    let script = format!(
        "import os, sqlite3, sys, time\ncon = sqlite3.connect(sys.argv[1], timeout=5)\n\
         for i in range({changes}):\n    if os.path.exists(sys.argv[2]):\n        break\n    b = 1 + i % 5\n    con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (?, 1, ?)', (b, 1 + i % 5))\n    if i % 7 == 0:\n        con.execute('UPDATE books SET year = year + 1 WHERE id = ?', (b,))\n    con.commit()\n    n = con.execute('SELECT count(*) FROM reviews WHERE book_id = ?', (b,)).fetchone()[0]\n    print(b, n, flush=True)\n    time.sleep(0.004)\n"
    );
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(catalog.db())
        .arg(stop)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let lines = lines_of(child.stdout.take().expect("stdout"));
    (child, lines)
}

/// A stream of changes with readers checking every answer: a writer process (`start_writer`)
/// and 3 reader threads alternating plain and `?fresh=1` reads of books 1..=5 over HTTP; a
/// `?fresh=1` answer must count at least the reviews committed before the request was sent,
/// and every answer must be 200.
struct Stream {
    writer: Child,
    follower: std::thread::JoinHandle<()>,
    readers: Vec<std::thread::JoinHandle<()>>,
    done: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    reads: Arc<AtomicU64>,
    /// Answers from the database because Redis did not answer (`X-Cachetail-Bypass`).
    bypassed: Arc<AtomicU64>,
    /// Commits the writer reported.
    written: Arc<AtomicU64>,
    /// Created to stop the writer.
    stop: std::path::PathBuf,
    /// The slowest answers, in ms: plain, `?fresh=1`.
    slowest: [Arc<AtomicU64>; 2],
}

impl Stream {
    fn start(catalog: &Catalog, address: std::net::SocketAddr, changes: usize) -> Stream {
        // What the writer has committed: per book, the review count.
        let committed: Arc<Vec<AtomicU64>> = Arc::new((0..=5).map(|_| AtomicU64::new(0)).collect());
        let stop = catalog.path().join("stop-writing");
        let (writer, lines) = start_writer(catalog, changes, &stop);
        let done = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let follower = {
            let (committed, done, written) = (
                Arc::clone(&committed),
                Arc::clone(&done),
                Arc::clone(&written),
            );
            std::thread::spawn(move || {
                for line in lines {
                    written.fetch_add(1, Ordering::SeqCst);
                    let mut parts = line.split(' ').map(|p| p.parse::<u64>().unwrap_or(0));
                    let (b, n) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
                    committed[b as usize].fetch_max(n, Ordering::SeqCst);
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let (reads, bypassed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let slowest = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
        let readers = (0..3)
            .map(|r| {
                let (committed, done, failures) = (
                    Arc::clone(&committed),
                    Arc::clone(&done),
                    Arc::clone(&failures),
                );
                let counts = [&reads, &bypassed, &slowest[0], &slowest[1]].map(Arc::clone);
                std::thread::spawn(move || {
                    read_and_check(address, r, &committed, &done, &failures, &counts)
                })
            })
            .collect();
        Stream {
            writer,
            follower,
            readers,
            done,
            failures,
            reads,
            bypassed,
            written,
            stop,
            slowest,
        }
    }

    fn writing(&self) -> bool {
        !self.done.load(Ordering::SeqCst)
    }

    fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Lets the writer commit 300 more changes, stops it, waits for the readers; asserts no read
    /// failed or was stale, and some ran.
    /// Returns how many answers came from the database because Redis did not answer, and the
    /// slowest `?fresh=1` answer.
    fn finish(mut self, what: &str) -> (u64, Duration) {
        let more = self.written.load(Ordering::SeqCst) + 300;
        eventually("the writer commits 300 more changes", || {
            (self.written.load(Ordering::SeqCst) >= more || !self.writing()).then_some(())
        });
        assert!(
            self.writing(),
            "{what}: the writer ended early (make it longer)"
        );
        std::fs::write(&self.stop, b"").expect("the writer's stop file");
        let status = self.writer.wait().expect("writer exits");
        assert!(status.success(), "{what}: the writer failed");
        self.follower.join().expect("follower");
        for reader in self.readers {
            reader.join().expect("reader");
        }
        let failures = self.failures.lock().expect("lock").clone();
        assert!(
            failures.is_empty(),
            "{what}: {} stale or failed reads: {:#?}",
            failures.len(),
            &failures[..failures.len().min(20)]
        );
        let reads = self.reads.load(Ordering::Relaxed);
        assert!(reads > 100, "{what}: the readers ran ({reads} reads)");
        let [plain, fresh] = self.slowest.map(|s| s.load(Ordering::Relaxed));
        let bypassed = self.bypassed.load(Ordering::Relaxed);
        eprintln!(
            "{what}: {reads} reads ({bypassed} from the database, redis unavailable), the slowest {plain} ms (plain), {fresh} ms (?fresh=1)"
        );
        (bypassed, Duration::from_millis(fresh))
    }
}

/// One reader of a `Stream`.
fn read_and_check(
    address: std::net::SocketAddr,
    r: usize,
    committed: &[AtomicU64],
    done: &AtomicBool,
    failures: &Mutex<Vec<String>>,
    [reads, bypassed, slowest_plain, slowest_fresh]: &[Arc<AtomicU64>; 4],
) {
    let mut client = Client::new(address);
    let mut i = r;
    while !done.load(Ordering::SeqCst) {
        i += 1;
        let b = 1 + i % 5;
        let before = committed[b].load(Ordering::SeqCst);
        let fresh = i.is_multiple_of(2);
        let path = if fresh {
            format!("/v1/keys/book:{b}?fresh=1")
        } else {
            format!("/v1/keys/book:{b}")
        };
        let sent = Instant::now();
        let Ok(reply) = client.get(&path) else {
            client = Client::new(address);
            continue;
        };
        reads.fetch_add(1, Ordering::Relaxed);
        let slowest = if fresh { slowest_fresh } else { slowest_plain };
        slowest.fetch_max(sent.elapsed().as_millis() as u64, Ordering::Relaxed);
        if reply.header("x-cachetail-bypass") == Some("redis-unavailable") {
            bypassed.fetch_add(1, Ordering::Relaxed);
        }
        if reply.status != 200 {
            failures.lock().expect("lock").push(format!(
                "{path}: {} {}",
                reply.status,
                reply.text()
            ));
            continue;
        }
        let count = json(&reply)["review_count"].as_u64().unwrap_or(0);
        if fresh && count < before {
            failures.lock().expect("lock").push(format!(
                "{path}: {count} reviews, {before} committed before the request ({})",
                x_cache(&reply)
            ));
        }
    }
}

#[test]
fn slots_moved_between_primaries_during_a_stream_of_changes_serve_no_stale_read() {
    let cluster = Cluster::start();
    // Two strategies, each its own database and writer.
    let catalogs = [Catalog::new(), Catalog::new()];
    let prefixes = ["mig-d:", "mig:"];
    let mut daemons: Vec<Daemon> = ["delete", "write-through"]
        .into_iter()
        .zip(prefixes)
        .zip(&catalogs)
        .map(|((strategy, prefix), catalog)| {
            let port = free_port();
            let mut daemon = Daemon::start(
                catalog,
                &cluster_config(port, strategy, &cluster, prefix),
                port,
            );
            eventually("the daemon reaches the cluster", || {
                (daemon.status()["redis"]["ok"] == true).then_some(())
            });
            for b in 1..=5 {
                daemon.get(&format!("book:{b}"));
            }
            daemon.get("top-books");
            daemon
        })
        .collect();
    let streams: Vec<Stream> = daemons
        .iter()
        .zip(&catalogs)
        .map(|(daemon, catalog)| Stream::start(catalog, daemon.address, 20_000))
        .collect();

    // Move the slots of the books' values, of their bookkeeping and of the global state while the
    // changes stream in.
    let started = Instant::now();
    let mut slots = Vec::new();
    for prefix in prefixes {
        slots.extend((1..=5).map(|b| cluster.slot(&format!("{prefix}book:{b}"))));
        slots.push(cluster.slot(&format!("{prefix}top-books")));
        slots.push(cluster.slot(&format!("{prefix}#invalidations")));
    }
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
    for stream in streams {
        let (_, slowest) = stream.finish("slots moved");
        // A script meeting a slot in migration (`TRYAGAIN`) is retried within milliseconds: a
        // batch, and `?fresh=1` waiting for it, is not held back much longer than the move.
        assert!(
            slowest < Duration::from_millis(1000),
            "?fresh=1 took {slowest:?} during the slot moves"
        );
    }
    for (daemon, prefix) in daemons.iter_mut().zip(prefixes) {
        ends_equal_to_the_database(daemon, &cluster, prefix);
        daemon.stop();
    }
}

/// Once caught up: books 1..=5 through the daemon and in Redis equal the database, and
/// `/v1/verify` finds nothing stale.
fn ends_equal_to_the_database(daemon: &mut Daemon, cluster: &Cluster, prefix: &str) {
    daemon.wait_caught_up();
    for b in 1..=5 {
        let key = format!("book:{b}");
        let expected = daemon.get_uncached(&key).text();
        assert_eq!(daemon.get(&key).text(), expected, "{prefix}{key}");
        let stored = cluster.get(&format!("{prefix}{key}"));
        assert!(
            stored.is_empty() || stored == expected,
            "{prefix}{key} in redis: {stored}"
        );
    }
    let report = daemon.verify();
    assert_eq!(report["stale"], 0, "{prefix}: {report}");
}

/// A daemon on the cluster, its log read line by line.
fn logged_daemon(
    catalog: &Catalog,
    cluster: &Cluster,
    strategy: &str,
    prefix: &str,
    fresh_timeout: &str,
) -> (Daemon, std::sync::mpsc::Receiver<String>) {
    let port = free_port();
    let config = cluster_config(port, strategy, cluster, prefix).replacen(
        "\n\n[tail]",
        &format!("\nfresh_timeout = \"{fresh_timeout}\"\n\n[tail]"),
        1,
    );
    let config = catalog.write_config(&config);
    let mut command = Command::new(env!("CARGO_BIN_EXE_cachetail"));
    command
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn,cachetail=info");
    let (mut daemon, log) = Daemon::start_logged(command, &config, port);
    eventually("the daemon reaches the cluster", || {
        (daemon.status()["redis"]["ok"] == true).then_some(())
    });
    for b in 1..=5 {
        daemon.get(&format!("book:{b}"));
    }
    daemon.get("top-books");
    (daemon, log)
}

#[test]
fn a_primary_killed_during_a_stream_fails_over_to_its_replica_with_no_stale_read() {
    let started = Instant::now();
    // Failure detected after 3 s: longer than a request to Redis may take (2 s), so reads of
    // the dead primary's slots meet a Redis that does not answer.
    let mut cluster = Cluster::start_with(1, "3000");
    eprintln!("6-node cluster started in {:?}", started.elapsed());
    // Two strategies, each its own database and writer; the primary killed holds the
    // write-through daemon's global state (its batches cannot finish until the failover).
    let (delete_db, through_db) = (Catalog::new(), Catalog::new());
    // `?fresh=1` waits out the failover (else a 503 after `fresh_timeout`, as documented).
    let (mut delete, delete_log) = logged_daemon(&delete_db, &cluster, "delete", "fo-d:", "20s");
    let (mut through, through_log) =
        logged_daemon(&through_db, &cluster, "write-through", "fo-w:", "20s");
    let streams = [
        Stream::start(&delete_db, delete.address, 20_000),
        Stream::start(&through_db, through.address, 20_000),
    ];
    eventually("the readers read", || {
        streams.iter().all(|s| s.reads() > 30).then_some(())
    });

    let state_slot = cluster.slot("fo-w:#invalidations");
    let victim = cluster.owner(state_slot);
    let replica = cluster.replica_of(victim);
    let killed = Instant::now();
    cluster.kill(victim);
    cluster.wait_promoted(replica, state_slot);
    eprintln!("failed over in {:?}", killed.elapsed());
    // The daemons apply on the promoted replica again while the writers still write.
    for (daemon, stream) in [&mut delete, &mut through].into_iter().zip(&streams) {
        let cursor = daemon.status()["cursor"].as_u64().expect("cursor");
        eventually("the daemon applies again after the failover", || {
            (daemon.status()["cursor"].as_u64()? > cursor).then_some(())
        });
        assert!(
            stream.writing(),
            "the writer still writes after the failover"
        );
    }
    let [first, second] = streams;
    first.finish("delete, a primary killed");
    // Every read of this daemon asks the dead primary (its global state): some met no answer
    // and were answered from the database.
    let (bypassed, _) = second.finish("write-through, a primary killed");
    assert!(bypassed > 0, "reads met the dead primary");
    ends_equal_to_the_database(&mut delete, &cluster, "fo-d:");
    ends_equal_to_the_database(&mut through, &cluster, "fo-w:");
    delete.stop();
    through.stop();
    print_warnings("delete", delete_log.try_iter());
    print_warnings("write-through", through_log.try_iter());
}

#[test]
fn a_failover_to_a_replica_missing_the_last_batch_never_serves_the_older_value_and_rebuilds() {
    // The value's shard is not the global state's: the state's record of the slot survives.
    failover_losing_the_last_batch("loss:", false);
}

#[test]
fn a_failover_of_the_global_states_shard_missing_the_last_batch_is_rebuilt_too() {
    // The value and the global state on one shard: both lose the batch.
    failover_losing_the_last_batch("loss-s:", true);
}

/// A book cached; its shard's replica cut off; a change to the book applied (acknowledged by the
/// primary only); the primary killed and its replica promoted, holding the value the change
/// replaced: no read answers it, and the namespace is rebuilt.
fn failover_losing_the_last_batch(prefix: &str, on_state_shard: bool) {
    let mut cluster = Cluster::start_with(1, "1000");
    let catalog = Catalog::new();
    let (mut daemon, log) = logged_daemon(&catalog, &cluster, "write-through", prefix, "5s");
    let state_owner = cluster.owner(cluster.slot(&format!("{prefix}#invalidations")));
    let (b, victim) = (1..=5)
        .map(|b| (b, cluster.owner(cluster.slot(&format!("{prefix}book:{b}")))))
        .find(|(_, owner)| (*owner == state_owner) == on_state_shard)
        .expect("a book on the shard wanted (books 1..=5 spread over the three)");
    let (key, name) = (format!("book:{b}"), format!("{prefix}book:{b}"));
    let before = review_count(&daemon.get(&key));
    assert_eq!(x_cache(&daemon.get(&key)), "hit");
    let replica = cluster.replica_of(victim);
    let primary_port = cluster.nodes[victim].port;
    assert_eq!(
        cli(primary_port, &["WAIT", "1", "5000"]),
        "1",
        "the replica holds the cached value"
    );

    // Cut the replica off its primary (its replication user refused), then apply a change to
    // the book: acknowledged by the primary only.
    assert_eq!(cli(primary_port, &["ACL", "SETUSER", "repl", "off"]), "OK");
    cli(primary_port, &["CLIENT", "KILL", "USER", "repl"]);
    eventually("the replica's link is down", || {
        cli(cluster.nodes[replica].port, &["INFO", "replication"])
            .contains("master_link_status:down")
            .then_some(())
    });
    catalog.python(&format!(
        "con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES ({b}, 2, 5)')"
    ));
    daemon.wait_caught_up();
    let after = review_count(&daemon.get(&key));
    assert_eq!(after, before + 1);

    // The primary dies; its replica takes over with the value the change replaced.
    let slot = cluster.slot(&name);
    cluster.kill(victim);
    assert_eq!(
        cli(
            cluster.nodes[replica].port,
            &["CLUSTER", "FAILOVER", "TAKEOVER"]
        ),
        "OK"
    );
    cluster.wait_promoted(replica, slot);
    let stored = cluster.get(&name);
    let stored: serde_json::Value = serde_json::from_str(&stored)
        .unwrap_or_else(|_| panic!("the promoted replica holds {name}: {stored:?}"));
    assert_eq!(
        stored["review_count"].as_i64(),
        Some(before),
        "the promoted replica holds the value the change replaced: {stored}"
    );

    // No read answers the older value; the daemon notices the loss and rebuilds.
    for _ in 0..20 {
        let reply = daemon.get(&key);
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            review_count(&reply),
            after,
            "a read after the failover answered the value the last batch replaced ({})",
            x_cache(&reply)
        );
    }
    // The first rebuild is the namespace's start; the second, the loss's.
    let mut said = Vec::new();
    eventually("the daemon rebuilds the namespace", || {
        said.extend(log.try_iter());
        let rebuilds: Vec<&String> = said
            .iter()
            .filter(|l| l.contains("did not hold every applied invalidation"))
            .collect();
        (rebuilds.len() >= 2 && (on_state_shard || rebuilds[1].contains("slot_lost=true")))
            .then_some(())
    });
    eventually("redis no longer holds the older value", || {
        let stored = cluster.get(&name);
        (stored.is_empty() || stored == daemon.get_uncached(&key).text()).then_some(())
    });
    // App-local caches are told to drop everything: the rebuilt stream starts with `all`.
    let stream = format!("{prefix}#invalidations");
    let first = cluster.redirected(&["XRANGE", &stream, "-", "+", "COUNT", "1"]);
    assert!(
        first.contains("\"all\":true"),
        "the rebuilt stream starts with {first}"
    );
    ends_equal_to_the_database(&mut daemon, &cluster, prefix);
    daemon.stop();
    print_warnings(prefix, said.into_iter().chain(log.try_iter()));
}

/// A daemon's warnings and errors, for the test's output.
fn print_warnings(what: &str, log: impl Iterator<Item = String>) {
    for line in log
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("redis is back"))
        .filter(|l| !l.contains("redis::cluster_handling"))
        .take(30)
    {
        eprintln!("{what}: {line}");
    }
}
