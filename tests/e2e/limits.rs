//! No client can lock the others out, and no request's work outlives it (issue 14, items 6 and
//! 7): event streams have a cap of their own and never take the connection slots of key reads,
//! health checks or admin calls; reads wait for a capped pool of SQLite readers in a bounded
//! queue (503 with `Retry-After` when it is full); a timed-out request's query is stopped;
//! duplicate keys of a multi-get are looked up once; `no-cache` reads of one key share a query;
//! verify's sample is capped; and cached reads keep their latency while fifty clients post cold
//! multi-gets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::strategies::catalog_config;

/// A raw HTTP/1.1 request on a connection of its own, the answer read within `timeout`:
/// (status, head lines lowercased, body). Err: no complete answer in time.
pub fn raw(
    address: SocketAddr,
    request: &str,
    timeout: Duration,
) -> Result<(u16, Vec<String>, String), String> {
    let mut stream = TcpStream::connect(address).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(parsed) = complete(&answer) {
            return Ok(parsed);
        }
        if started.elapsed() > timeout {
            return Err(format!("no answer within {timeout:?}"));
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                return Err(format!(
                    "closed after {:?}",
                    String::from_utf8_lossy(&answer)
                ));
            }
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("no answer within {timeout:?} ({e})")),
        }
    }
}

/// A whole answer with a `Content-Length` body, parsed.
fn complete(answer: &[u8]) -> Option<(u16, Vec<String>, String)> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let lines: Vec<String> = head.lines().map(str::to_ascii_lowercase).collect();
    let length: usize = lines
        .iter()
        .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())?;
    if body.len() < length {
        return None;
    }
    let status = lines.first()?.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, lines, body[..length].to_owned()))
}

/// An open `GET /v1/events` stream: its connection, and the status line it was answered with.
fn open_stream(address: SocketAddr) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    stream
        .write_all(
            format!(
                "GET /v1/events HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let line = String::from_utf8_lossy(&head).trim().to_owned();
    (stream, line)
}

/// The daemon process's CPU time so far (user + system), from `/proc`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a stat line")
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 1000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

/// A `/proc/PID/status` figure in KiB (`VmRSS`, `RssAnon`, `Threads`...).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// How many files the daemon has open on `db` (one per SQLite connection).
fn open_on(pid: u32, db: &std::path::Path) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(Result::ok)
                .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == db))
                .count()
        })
        .unwrap_or(0)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[index]
}

#[test]
fn cached_reads_keep_their_p99_while_fifty_clients_post_cold_multi_gets() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &catalog_config(port, "delete", "50ms"), port);
    let address = daemon.address;
    let pid = daemon.pid().expect("running");
    let cached = ["book:1", "book:2", "book:3", "user:1", "user:2"];
    for key in cached {
        assert_eq!(daemon.get(key).status, 200);
    }
    let mut reader = Client::new(address);
    let mut time_reads = |until: &dyn Fn(usize, Duration) -> bool| {
        let mut samples = Vec::new();
        let started = Instant::now();
        while !until(samples.len(), started.elapsed()) {
            let key = cached[samples.len() % cached.len()];
            let sent = Instant::now();
            let reply = reader.get(&format!("/v1/keys/{key}")).expect("GET");
            samples.push(sent.elapsed());
            assert_eq!((reply.status, x_cache(&reply)), (200, "hit"), "{key}");
        }
        samples
    };
    let mut alone = time_reads(&|n, _| n >= 3000);
    let p99_alone = percentile(&mut alone, 0.99);

    // Fifty clients, each posting multi-gets of 1,000 keys no one asked for before.
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let loaders: Vec<_> = (0..50u64)
        .map(|client| {
            let (stop, statuses) = (Arc::clone(&stop), Arc::clone(&statuses));
            std::thread::spawn(move || {
                let mut http = Client::new(address);
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let keys: Vec<String> = (0..1000)
                        .map(|i| format!("book:{}", 1_000_000 * (client + 1) + round * 1000 + i))
                        .collect();
                    round += 1;
                    let body = serde_json::to_vec(&keys).expect("JSON");
                    let tally = match http.request("POST", "/v1/keys", &[], &body) {
                        Ok(reply) if reply.status == 200 => {
                            let answer = json(&reply);
                            let results = answer["results"].as_array().expect("results");
                            assert_eq!(results.len(), 1000);
                            results
                                .iter()
                                .map(|r| {
                                    let error = r["error"].as_str().unwrap_or("");
                                    match r["status"].as_u64() {
                                        Some(s) if s >= 500 => format!("key {s}: {error}"),
                                        Some(s) => format!("key {s}"),
                                        None => "key without a status".to_owned(),
                                    }
                                })
                                .collect()
                        }
                        Ok(reply) => vec![format!("request {}: {}", reply.status, reply.text())],
                        Err(e) => vec![format!("request failed: {e}")],
                    };
                    let mut statuses = statuses.lock().expect("lock");
                    for status in tally {
                        *statuses.entry(status).or_insert(0) += 1;
                    }
                }
            })
        })
        .collect();
    // The daemon answers /healthz throughout; its memory is sampled meanwhile.
    let health = {
        let stop = Arc::clone(&stop);
        let db = catalog.db();
        std::thread::spawn(move || {
            let (mut slowest, mut answered, mut peak_rss, mut peak_threads, mut peak_connections) =
                (Duration::ZERO, 0u64, 0u64, 0u64, 0usize);
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let answer = raw(
                    address,
                    &format!(
                        "GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
                    ),
                    Duration::from_secs(5),
                );
                assert_eq!(answer.map(|a| a.0), Ok(200), "/healthz under load");
                slowest = slowest.max(sent.elapsed());
                answered += 1;
                peak_rss = peak_rss.max(proc_status(pid, "VmRSS"));
                peak_threads = peak_threads.max(proc_status(pid, "Threads"));
                peak_connections = peak_connections.max(open_on(pid, &db));
                std::thread::sleep(Duration::from_millis(100));
            }
            (slowest, answered, peak_rss, peak_threads, peak_connections)
        })
    };
    // Under load: the load ramps up for a second, then the same reads are timed for 8 s.
    std::thread::sleep(Duration::from_secs(1));
    let mut loaded = time_reads(&|_, elapsed| elapsed >= Duration::from_secs(8));
    let p99_loaded = percentile(&mut loaded, 0.99);
    stop.store(true, Ordering::Relaxed);
    for loader in loaders {
        loader.join().expect("a loading client");
    }
    let (slowest_health, health_checks, peak_rss, peak_threads, peak_connections) =
        health.join().expect("the health checker");
    let statuses = statuses.lock().expect("lock").clone();
    let keys_answered: u64 = statuses.values().sum();
    eprintln!(
        "load: cached GET p99 alone {p99_alone:?} ({} reads), under load {p99_loaded:?} ({} reads); \
         multi-get keys answered {keys_answered} {statuses:?}; /healthz slowest {slowest_health:?} of {health_checks}; \
         peak RSS {} MiB, peak threads {peak_threads}, peak SQLite connections {peak_connections}",
        alone.len(),
        loaded.len(),
        peak_rss / 1024
    );
    for status in statuses.keys() {
        assert!(
            status.starts_with("key 200")
                || status.starts_with("key 404")
                || status.starts_with("key 503: no SQLite reader free"),
            "an answer other than a value, a 404 or the documented 503 under load: {status} ({statuses:?})"
        );
    }
    // Measured on the project's 2-core machine (shared, load average about 10): before the
    // bound, 112 ms under load for 0.35 ms alone; with it, 6.5-15 ms for 0.3-3.5 ms alone.
    assert!(
        p99_loaded <= (p99_alone * 10).max(Duration::from_millis(40)),
        "cached GETs: p99 {p99_loaded:?} under load, {p99_alone:?} alone"
    );
    // Before: a blocking thread (tokio's cap: 512) and a SQLite connection per fill at once.
    let readers = std::thread::available_parallelism().map_or(2, std::num::NonZero::get) * 2;
    assert!(
        peak_connections <= readers.max(4) + 2,
        "{peak_connections} SQLite connections open under load (readers: {})",
        readers.max(4)
    );
    assert!(
        peak_threads < 100,
        "{peak_threads} threads in the daemon under load"
    );
    // The cache holds at most `max_entries` (100,000) values: memory stops there.
    assert!(peak_rss < 256 * 1024, "peak RSS {} MiB", peak_rss / 1024);
    assert_eq!(daemon.get("user:3").status, 200, "still serving");
}

#[test]
fn event_streams_have_a_cap_of_their_own_and_never_take_the_slots_of_other_requests() {
    let catalog = Catalog::new();
    let port = free_port();
    let token = "a-long-enough-admin-token";
    let config = catalog_config(port, "delete", "50ms")
        .replace("listen =", &format!("admin_token = \"{token}\"\nlisten ="))
        + "\n[http]\nmax_connections = 16\n";
    let mut daemon = Daemon::start(&catalog, &config, port);
    let address = daemon.address;
    // As many streams as there are connection slots: every one is a dashboard tab left open.
    let streams: Vec<(TcpStream, String)> = (0..16).map(|_| open_stream(address)).collect();
    for (_, line) in &streams {
        assert_eq!(line, "HTTP/1.1 200 OK");
    }
    // Key reads, health checks, status and admin calls are still answered, at once.
    let wait = Duration::from_secs(5);
    let host = format!("Host: {address}\r\nConnection: close");
    for (request, expected) in [
        (format!("GET /healthz HTTP/1.1\r\n{host}\r\n\r\n"), 200),
        (
            format!("GET /v1/keys/book:1 HTTP/1.1\r\n{host}\r\n\r\n"),
            200,
        ),
        (format!("GET /v1/status HTTP/1.1\r\n{host}\r\n\r\n"), 200),
        (
            format!(
                "POST /v1/admin/invalidate?tag=books HTTP/1.1\r\n{host}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
            ),
            200,
        ),
    ] {
        let answer = raw(address, &request, wait)
            .unwrap_or_else(|e| panic!("with 16 event streams open: {request:?}: {e}"));
        assert_eq!(answer.0, expected, "{request:?}: {}", answer.2);
    }
    // One stream more than `max_event_streams` (default 16): a clear 503, at once.
    let extra = raw(
        address,
        &format!("GET /v1/events HTTP/1.1\r\n{host}\r\n\r\n"),
        wait,
    )
    .expect("the 17th stream is answered");
    assert_eq!(extra.0, 503, "{}", extra.2);
    assert!(extra.2.contains("max_event_streams"), "{}", extra.2);
    assert!(
        extra.1.iter().any(|h| h.starts_with("retry-after:")),
        "{:?}",
        extra.1
    );
    // A closed stream frees its place: the next one is served.
    drop(streams);
    eventually("a stream is served again once the others closed", || {
        let (_stream, line) = open_stream(address);
        (line == "HTTP/1.1 200 OK").then_some(())
    });
    assert_eq!(daemon.get("user:1").status, 200);
}

/// A family whose query spins `spins` steps (about 0.15 s per million here): a slow report.
fn slow_family(spins: u64) -> String {
    format!(
        "\n[keys.\"slow:{{id}}\"]\nquery = \"\"\"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {spins})\n           SELECT :id AS id, count(*) AS spins FROM n\"\"\"\n"
    )
}

/// The share of samples, taken every 20 ms over `span`, in which one of the daemon's threads
/// was running or waiting for a CPU (state `R`): about 1 while a query spins, whatever else the
/// machine runs; about 0 when the daemon is idle.
fn running_share(pid: u32, span: Duration) -> f64 {
    let started = Instant::now();
    let (mut samples, mut running) = (0u32, 0u32);
    while started.elapsed() < span {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task");
        let any_running = tasks.filter_map(Result::ok).any(|task| {
            std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|stat| Some(stat.rsplit_once(')')?.1.trim_start().starts_with('R')))
                .unwrap_or(false)
        });
        samples += 1;
        running += u32::from(any_running);
        std::thread::sleep(Duration::from_millis(20));
    }
    f64::from(running) / f64::from(samples)
}

#[test]
fn a_timed_out_requests_query_is_stopped_not_left_running() {
    let catalog = Catalog::new();
    let port = free_port();
    // Seconds of work: far past the request's timeout.
    let config = catalog_config(port, "delete", "50ms")
        + "\n[http]\nrequest_timeout = \"300ms\"\n"
        + &slow_family(100_000_000);
    let mut daemon = Daemon::start(&catalog, &config, port);
    let pid = daemon.pid().expect("running");
    let reply = daemon.get("slow:1");
    assert_eq!(reply.status, 503, "{}", reply.text());
    // Nobody waits for that query any more: it stops, and the daemon goes idle again.
    std::thread::sleep(Duration::from_millis(500));
    let running = running_share(pid, Duration::from_secs(1));
    assert!(
        running < 0.3,
        "a thread of the daemon was running in {:.0}% of the second after the request timed out: its query still runs",
        running * 100.0
    );
    // A multi-get that times out stops its queries likewise.
    let mut client = Client::new(daemon.address);
    let reply = client
        .request(
            "POST",
            "/v1/keys",
            &[],
            br#"["slow:2", "slow:3", "user:1"]"#,
        )
        .expect("POST");
    assert_eq!(reply.status, 503, "{}", reply.text());
    std::thread::sleep(Duration::from_millis(500));
    let running = running_share(pid, Duration::from_secs(1));
    assert!(
        running < 0.3,
        "a thread of the daemon was running in {:.0}% of the second after the multi-get timed out: its queries still run",
        running * 100.0
    );
    assert_eq!(daemon.get("user:1").status, 200, "still serving");
}

#[test]
fn duplicate_keys_in_a_multi_get_are_looked_up_once_and_every_position_answered() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &catalog_config(port, "delete", "50ms"), port);
    let lookups = |daemon: &mut Daemon| {
        let status = daemon.status();
        status["hits"].as_u64().expect("hits") + status["misses"].as_u64().expect("misses")
    };
    let before = lookups(&mut daemon);
    let mut keys = vec!["user:1"; 998];
    keys.extend(["user:2", "nothing:1"]);
    let mut client = Client::new(daemon.address);
    let reply = client
        .request(
            "POST",
            "/v1/keys",
            &[],
            &serde_json::to_vec(&keys).expect("JSON"),
        )
        .expect("POST");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer = json(&reply);
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), 1000, "every position is answered");
    for (i, result) in results.iter().enumerate().take(998) {
        assert_eq!(result["key"], "user:1", "position {i}");
        assert_eq!(result["value"]["name"], "user1", "position {i}");
    }
    assert_eq!(results[998]["value"]["name"], "user2");
    assert_eq!(results[999]["status"], 404);
    // `nothing:1` matches no family: not a lookup. user:1 and user:2: one each.
    assert_eq!(
        lookups(&mut daemon) - before,
        2,
        "one lookup per distinct key"
    );
}

#[test]
fn concurrent_no_cache_reads_of_one_key_share_a_query() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms") + &slow_family(2_000_000);
    let mut daemon = Daemon::start(&catalog, &config, port);
    let pid = daemon.pid().expect("running");
    // What one query costs.
    let before = cpu_time(pid);
    let single = daemon.get_uncached("slow:1");
    assert_eq!((single.status, x_cache(&single)), (200, "bypass"));
    let one = cpu_time(pid).saturating_sub(before);
    // Twenty at once.
    let address = daemon.address;
    let barrier = Arc::new(std::sync::Barrier::new(20));
    let before = cpu_time(pid);
    let readers: Vec<_> = (0..20)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut client = Client::new(address);
                client.get("/healthz").expect("connect");
                barrier.wait();
                client
                    .request(
                        "GET",
                        "/v1/keys/slow:1",
                        &[("Cache-Control", "no-cache")],
                        &[],
                    )
                    .expect("GET")
            })
        })
        .collect();
    for reader in readers {
        let reply = reader.join().expect("a reader");
        assert_eq!(
            (reply.status, x_cache(&reply)),
            (200, "bypass"),
            "{}",
            reply.text()
        );
        assert_eq!(json(&reply)["spins"], 2_000_000);
    }
    let twenty = cpu_time(pid).saturating_sub(before);
    eprintln!("no-cache: one read {one:?} of CPU, twenty concurrent reads {twenty:?}");
    assert!(
        twenty < one * 6,
        "twenty concurrent no-cache reads of one key took {twenty:?} of CPU, one alone {one:?}: they did not share a query"
    );
}

#[test]
fn verify_checks_at_most_ten_thousand_values_whatever_the_sample_asked() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &catalog_config(port, "delete", "50ms"), port);
    let mut client = Client::new(daemon.address);
    for round in 0..11 {
        let keys: Vec<String> = (0..1000)
            .map(|i| format!("book:{}", 100 + round * 1000 + i))
            .collect();
        let reply = client
            .request(
                "POST",
                "/v1/keys",
                &[],
                &serde_json::to_vec(&keys).expect("JSON"),
            )
            .expect("POST");
        assert_eq!(reply.status, 200);
    }
    let report = daemon.verify();
    let looked_at = ["checked", "gone", "unverified"]
        .iter()
        .map(|field| report[field].as_u64().expect(field))
        .sum::<u64>();
    assert_eq!(report["stale"], 0, "{report}");
    assert_eq!(
        looked_at, 10_000,
        "sample=100000 is capped at 10,000: {report}"
    );
}

#[test]
fn reads_wait_for_a_capped_pool_of_readers_in_a_bounded_queue() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms")
        + "\n[http]\nreaders = 1\nread_queue = 1\n"
        + &slow_family(8_000_000);
    let mut daemon = Daemon::start(&catalog, &config, port);
    assert_eq!(daemon.get("user:1").status, 200);
    let address = daemon.address;
    // Four cold keys at once: one reader runs a query, one request waits, the others are told
    // to come back.
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let readers: Vec<_> = (1..=4)
        .map(|id| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut client = Client::new(address);
                client.get("/healthz").expect("connect");
                barrier.wait();
                client.get(&format!("/v1/keys/slow:{id}")).expect("GET")
            })
        })
        .collect();
    // Meanwhile a cached key is served without waiting for a reader.
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let hit = daemon.get("user:1");
    assert_eq!((hit.status, x_cache(&hit)), (200, "hit"));
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let replies: Vec<Reply> = readers
        .into_iter()
        .map(|r| r.join().expect("a reader"))
        .collect();
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    let served = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!((served, busy.len()), (2, 2), "{replies:?}");
    for reply in busy {
        let error = json(reply)["error"].as_str().unwrap_or("").to_owned();
        assert!(error.contains("http.read_queue"), "{error}");
        assert_eq!(reply.header("retry-after"), Some("1"));
    }
}
