//! The Redis backend against hostile input, with a real `redis-server` and the real binary:
//! keys (from clients, operators, and rows an attacker wrote) never read or overwrite
//! cachetail's bookkeeping, whatever the family's shape; invalidating a tag an attacker grew to
//! 200k keys never blocks Redis (a concurrent client's PING latency stays low) and leaves none of
//! them reachable; the connection pool is capped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::redis::{RedisServer, redis_config};

const PREFIX: &str = "ct:";

fn start_active(catalog: &Catalog, config: &str, port: u16) -> Daemon {
    let mut daemon = Daemon::start(catalog, config, port);
    eventually("the daemon holds the lease", || {
        (daemon.status()["role"] == "active").then_some(())
    });
    daemon
}

fn outbox_head(catalog: &Catalog) -> u64 {
    catalog
        .sqlite_cli("SELECT max(id) FROM cachetail_outbox")
        .parse()
        .expect("the outbox head")
}

fn applied(daemon: &mut Daemon, position: u64) {
    eventually("the change is applied", || {
        (daemon.status()["cursor"].as_u64()? >= position).then_some(())
    });
}

/// A family whose keys any client can name, and whose values are empty lists for most of them
/// (`titled:anything`), carrying the `books` tag: what an attacker grows a tag with.
const TITLED: &str = "\n[keys.\"titled:{q}\"]\nquery = \"SELECT id FROM books WHERE title = :q\"\nmany = true\ntags = [\"books\"]\n";

// ---- a tag of 200k keys ----------------------------------------------------------------------

/// Clients of Redis arriving once a millisecond, each sending a PING on a connection of a pool
/// of its own (as app servers reading Redis would), timed from when it arrived: a Redis blocked
/// for 500 ms shows as 500 late answers, not one; a Redis serving others between a daemon's
/// scripts shows as pings waiting at most one script.
struct Pinger {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Instant, Duration)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pinger {
    fn start(port: u16) -> Pinger {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (arrivals, due) = std::sync::mpsc::channel::<Instant>();
        let due = Arc::new(Mutex::new(due));
        let mut threads: Vec<std::thread::JoinHandle<()>> = (0..32)
            .map(|_| {
                let (due, sink) = (Arc::clone(&due), Arc::clone(&samples));
                let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
                conn.set_nodelay(true).expect("nodelay");
                std::thread::spawn(move || {
                    let mut answer = [0u8; 7];
                    loop {
                        let Ok(arrived) = due.lock().expect("arrivals").recv() else {
                            return;
                        };
                        conn.write_all(b"*1\r\n$4\r\nPING\r\n").expect("PING");
                        conn.read_exact(&mut answer).expect("PONG");
                        assert_eq!(&answer, b"+PONG\r\n");
                        sink.lock()
                            .expect("samples")
                            .push((arrived, arrived.elapsed()));
                    }
                })
            })
            .collect();
        let stop_flag = Arc::clone(&stop);
        threads.push(std::thread::spawn(move || {
            let mut next = Instant::now();
            while !stop_flag.load(Ordering::Acquire) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep(next - now);
                }
                if arrivals.send(next).is_err() {
                    return;
                }
                next += Duration::from_millis(1);
            }
        }));
        Pinger {
            stop,
            samples,
            threads,
        }
    }

    /// The 99th percentile and the worst of the PINGs that arrived within `from..to`, and how
    /// many.
    fn latency(&self, from: Instant, to: Instant) -> (Duration, Duration, usize) {
        let mut during: Vec<Duration> = self
            .samples
            .lock()
            .expect("samples")
            .iter()
            .filter(|(arrived, _)| *arrived >= from && *arrived <= to)
            .map(|(_, late)| *late)
            .collect();
        during.sort();
        let p99 = during
            .get(during.len() * 99 / 100)
            .copied()
            .unwrap_or_default();
        (
            p99,
            during.last().copied().unwrap_or_default(),
            during.len(),
        )
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Puts `count` keys of `titled:{q}` into the `books` tag's set, each with its value and its
/// mark, as that many reads of distinct empty keys would (in scripts of 20k, as an attacker's
/// reads would come: never one long block here).
fn grow_the_books_tag(redis: &RedisServer, count: u32, version: u64) {
    const GROW: &str = "local prefix, from, to, expiry, v = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
for i = from, to do
  local key = 'titled:x' .. i
  redis.call('SET', prefix .. key, '[]', 'PX', 600000)
  redis.call('HSET', prefix .. '#m:' .. key, 'v', v)
  redis.call('PEXPIRE', prefix .. '#m:' .. key, 600000)
  redis.call('ZADD', prefix .. '#g:t:books', expiry, key)
end
return to";
    let expiry = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis()
        + 600_000)
        .to_string();
    let mut from = 1;
    while from <= count {
        let to = (from + 19_999).min(count);
        redis.cli(&[
            "EVAL",
            GROW,
            "0",
            PREFIX,
            &from.to_string(),
            &to.to_string(),
            &expiry,
            &version.to_string(),
        ]);
        from = to + 1;
    }
}

/// Raises Redis's CPU priority (as root; else leaves it): on a machine shared with other work,
/// a CPU-bound Redis at the default priority is descheduled for tens of milliseconds at a time,
/// which the PING latency would show whatever cachetail does. Redis on its own core, as in
/// production, is what the test is about.
fn favour(redis: &RedisServer) {
    let info = redis.cli(&["INFO", "server"]);
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .expect("process_id")
        .trim()
        .to_owned();
    let reniced = Command::new("renice")
        .args(["-n", "-10", "-p", &pid])
        .output()
        .is_ok_and(|o| o.status.success());
    eprintln!("redis-server (pid {pid}) at a higher CPU priority: {reniced}");
}

fn title(reply: &Reply) -> String {
    json(reply)["title"].as_str().unwrap_or("").to_owned()
}

#[test]
fn invalidating_a_tag_grown_to_200k_keys_never_blocks_redis_and_leaves_none_reachable() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let config = format!("{}{TITLED}", redis_config(port, &redis, "delete"));
    let mut daemon = start_active(&catalog, &config, port);
    favour(&redis);
    // A few keys the daemon stores itself, in the tag too.
    for key in [
        "book:1",
        "book:2",
        "top-books",
        "titled:Book 3",
        "titled:nothing",
    ] {
        assert_eq!(daemon.get(key).status, 200, "{key}");
    }
    let before = daemon.get("book:1");
    assert_eq!(x_cache(&before), "hit");
    let head = outbox_head(&catalog);
    grow_the_books_tag(&redis, 200_000, head);
    let members: u64 = redis
        .cli(&["ZCARD", &format!("{PREFIX}#g:t:books")])
        .parse()
        .expect("ZCARD");
    assert!(members >= 200_000, "{members}");

    // A reader keeps reading book:1 (its old value until the change is applied, never after).
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, address) = (Arc::clone(&stop), daemon.address);
        std::thread::spawn(move || {
            let mut client = Client::new(address);
            let mut reads = 0;
            while !stop.load(Ordering::Acquire) {
                let reply = client.get("/v1/keys/book:1").expect("GET book:1");
                assert_eq!(reply.status, 200, "{}", reply.text());
                reads += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            reads
        })
    };
    let pinger = Pinger::start(redis.port);
    std::thread::sleep(Duration::from_millis(300));
    let quiet = pinger.latency(Instant::now() - Duration::from_millis(300), Instant::now());

    // One change to `books`: the tag is invalidated.
    let started = Instant::now();
    catalog.python("con.execute(\"UPDATE books SET title = 'Renamed' WHERE id = 1\")");
    let position = outbox_head(&catalog);
    applied(&mut daemon, position);
    let took = started.elapsed();
    let during = pinger.latency(started, Instant::now());
    drop(pinger);
    stop.store(true, Ordering::Release);
    let reads = reader.join().expect("reader");
    eprintln!(
        "tag of {members} keys invalidated in {took:?}; redis PING while it ran: p99 {:?}, worst {:?} ({} pings; quiet before: p99 {:?}, worst {:?}); {reads} reads of book:1 meanwhile",
        during.0, during.1, during.2, quiet.0, quiet.1
    );
    // Emptied in one script, the set blocked Redis for nearly the whole invalidation (measured:
    // PING p99 1.2 s of 1.4 s); emptied a page at a time, a PING waits at most a page (5-15 ms
    // at the 99th percentile, up to 75 ms with ten other processes on the 2 cores, of 2-3 s).
    // Compared with how long the invalidation took, the bound holds on a loaded machine and
    // fails on a blocking one, however fast.
    assert!(
        during.0 < took / 10 && during.0 < Duration::from_secs(1),
        "redis was blocked while the tag was invalidated ({took:?}): PING p99 {:?}, worst {:?} over {} pings (quiet: p99 {:?})",
        during.0,
        during.1,
        during.2,
        quiet.0
    );

    // None of the tag's keys is left, nor reachable; the change shows.
    let left: u64 = redis
        .cli(&[
            "EVAL",
            "return #redis.call('KEYS', ARGV[1])",
            "0",
            &format!("{PREFIX}titled:x*"),
        ])
        .parse()
        .expect("a count");
    assert_eq!(left, 0, "values of the invalidated tag are left in redis");
    // The set lists only what was read after the change (the reader's book:1).
    let listed = redis.cli(&["ZRANGE", &format!("{PREFIX}#g:t:books"), "0", "-1"]);
    assert!(
        listed.lines().all(|key| !key.starts_with("titled:x")),
        "the tag's set still lists invalidated keys: {}",
        listed.lines().take(5).collect::<Vec<_>>().join(", ")
    );
    if let Some(cached) = redis.value("book:1") {
        assert!(cached.contains("Renamed"), "{cached}");
    }
    let fresh = daemon.get_path("/v1/keys/book:1?fresh=1");
    assert_eq!(title(&fresh), "Renamed");
    let some = daemon.get("titled:x12345");
    assert_eq!((x_cache(&some), some.text().as_str()), ("miss", "[]"));
    assert_ne!(title(&before), "Renamed");
}

// ---- the connection pool ----------------------------------------------------------------------

/// Established TCP connections to `port` opened from this machine (their remote end is `port`).
fn connections_to(port: u16) -> usize {
    let remote = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    fields.get(2).is_some_and(|r| r.ends_with(&remote))
                        && fields.get(3) == Some(&"01")
                })
                .count()
        })
        .sum()
}

/// Blocks Redis for `millis` with a busy script, on a thread of its own.
fn block_redis(redis: &RedisServer, millis: u64) -> std::thread::JoinHandle<()> {
    let port = redis.port.to_string();
    std::thread::spawn(move || {
        let busy = "local t0 = redis.call('TIME')
repeat local t = redis.call('TIME') until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) >= tonumber(ARGV[1]) * 1000
return 1";
        let out = Command::new("redis-cli")
            .args(["-p", &port, "EVAL", busy, "0", &millis.to_string()])
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "{out:?}");
    })
}

/// `clients` clients, each connected to the daemon already, read book:1 at once while Redis
/// does not answer for `blocked_ms`: each answer (status, X-Cache, the bypass reason, how long
/// it took), and the most connections to Redis seen meanwhile.
type Answer = (u16, String, Option<String>, Duration);

fn burst(
    daemon: &Daemon,
    redis: &RedisServer,
    clients: usize,
    blocked_ms: u64,
) -> (Vec<Answer>, usize) {
    let go = Arc::new(std::sync::Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (address, go) = (daemon.address, Arc::clone(&go));
            std::thread::spawn(move || {
                let mut client = Client::new(address);
                assert_eq!(client.get("/healthz").expect("healthz").status, 200);
                go.wait();
                let started = Instant::now();
                let reply = client.get("/v1/keys/book:1").expect("GET book:1");
                let bypass = reply.header("x-cachetail-bypass").map(str::to_owned);
                (
                    reply.status,
                    x_cache(&reply).to_owned(),
                    bypass,
                    started.elapsed(),
                )
            })
        })
        .collect();
    let blocker = block_redis(redis, blocked_ms);
    wait_blocked(redis);
    let started = Instant::now();
    go.wait();
    let mut most = 0;
    while started.elapsed() < Duration::from_millis(blocked_ms * 4 / 5) {
        most = most.max(connections_to(redis.port));
        std::thread::sleep(Duration::from_millis(20));
    }
    let answers = threads
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    blocker.join().expect("blocker");
    (answers, most)
}

/// Waits until Redis is busy with `block_redis`'s script: a PING gets no answer in 30 ms.
fn wait_blocked(redis: &RedisServer) {
    eventually("redis is blocked", || {
        let mut conn = TcpStream::connect(("127.0.0.1", redis.port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_millis(30)))
            .ok()?;
        conn.write_all(b"*1\r\n$4\r\nPING\r\n").ok()?;
        let mut answer = [0u8; 7];
        conn.read_exact(&mut answer).is_err().then_some(())
    });
}

#[test]
fn the_redis_connection_pool_is_capped_and_requests_beyond_it_answer_from_the_database() {
    const CAP: usize = 64; // the default `[cache] max_connections`
    const CLIENTS: usize = 200;
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = start_active(&catalog, &redis_config(port, &redis, "delete"), port);
    daemon.get("book:1");
    assert_eq!(x_cache(&daemon.get("book:1")), "hit");

    // 200 clients, each connected to the daemon already, read at once while Redis does not
    // answer for 1.5 s.
    let (answers, most) = burst(&daemon, &redis, CLIENTS, 1500);
    // The daemon's connections (the pool, the tail's one, the blocking redis-cli's).
    eprintln!("connections to redis while it was blocked: at most {most} (cap {CAP})");
    assert!(
        most <= CAP + 2,
        "{most} connections to redis for {CLIENTS} concurrent requests: the pool is not capped at {CAP}"
    );
    for (status, _, _, _) in &answers {
        assert_eq!(*status, 200);
    }
    let bypassed: Vec<&Duration> = answers
        .iter()
        .filter(|(_, cache, why, _)| {
            cache == "bypass" && why.as_deref() == Some("redis-unavailable")
        })
        .map(|(_, _, _, took)| took)
        .collect();
    // (On a loaded machine a few clients' requests may come after Redis answers again.)
    assert!(
        bypassed.len() >= (CLIENTS - CAP) / 2,
        "only {} of {CLIENTS} requests answered from the database",
        bypassed.len()
    );
    let slowest = bypassed.iter().max().expect("some bypassed");
    assert!(
        **slowest < Duration::from_millis(1200),
        "a request beyond the cap waited {slowest:?}, until Redis answered again"
    );
    // Redis answers again: reads are served from it, on the capped pool.
    eventually("reads hit redis again", || {
        (x_cache(&daemon.get("book:1")) == "hit").then_some(())
    });
    let status = daemon.status();
    assert_eq!(
        status["redis"]["ok"], true,
        "a full pool is not an outage: {status}"
    );
    assert!(connections_to(redis.port) <= CAP + 1);
    daemon.stop();

    // Requests that go away while they hold a connection (here: past a 1 s request timeout,
    // Redis blocked for 1.5 s) give their slot back: the pool still serves afterwards.
    let port = free_port();
    let config = format!(
        "{}\n[http]\nrequest_timeout = \"1s\"\n",
        redis_config(port, &redis, "delete")
    );
    let mut daemon = start_active(&catalog, &config, port);
    daemon.get("book:1");
    assert_eq!(x_cache(&daemon.get("book:1")), "hit");
    let (answers, _) = burst(&daemon, &redis, CAP, 1500);
    let timed_out = answers.iter().filter(|a| a.0 == 503).count();
    assert!(
        timed_out > 0,
        "no request timed out while holding a connection"
    );
    for _ in 0..CAP * 2 {
        let reply = daemon.get("book:1");
        assert_eq!(
            x_cache(&reply),
            "hit",
            "the pool leaked the slots of the {timed_out} requests that timed out: {:?}",
            reply.header("x-cachetail-bypass")
        );
    }
}

// ---- hostile keys ------------------------------------------------------------------------------

const TOKEN: &str = "limits-admin-token-0123456789";

/// Families of every shape a pattern may have on Redis (a placeholder right after the leading
/// literal, a `#` after it, two placeholders), and rules rendering keys and tags from the
/// columns of `books` an attacker controls (a title, an author).
fn hostile_config(port: u16, redis: &RedisServer) -> String {
    let base = redis_config(port, redis, "delete").replacen(
        "\n[tail]",
        &format!("\nadmin_token = \"{TOKEN}\"\n\n[tail]"),
        1,
    );
    format!(
        "{base}{TITLED}
[keys.\"b#{{x}}\"]
query = \"SELECT :x AS x\"

[keys.\"pair:{{a}}:{{b}}\"]
query = \"SELECT :a AS a, :b AS b\"
tags = [\"{{a}}\", \"t:{{b}}\"]

[[rules]]
table = \"books\"
keys = [\"{{title}}\", \"titled:{{title}}\", \"pair:{{title}}:{{author}}\", \"b#{{author}}\"]
tags = [\"{{author}}\", \"t:{{title}}\", \"{{title}}\"]
"
    )
}

/// Every key under the prefix's bookkeeping (`{prefix}#…`) that is not of the shape cachetail
/// gives it: `#state` a hash of applied/floor/epoch, `#m:` hashes, `#g:` sorted sets, `#gm:`
/// strings.
fn misshapen_bookkeeping(redis: &RedisServer) -> Vec<String> {
    const CHECK: &str = "local bad = {}
for _, key in ipairs(redis.call('KEYS', ARGV[1] .. '#*')) do
  local rest = string.sub(key, #ARGV[1] + 1)
  local kind = redis.call('TYPE', key)['ok']
  local want
  if rest == '#state' then want = 'hash'
  elseif rest == '#invalidations' then want = 'stream'
  elseif string.sub(rest, 1, 3) == '#m:' then want = 'hash'
  elseif string.sub(rest, 1, 4) == '#gm:' then want = 'string'
  elseif string.sub(rest, 1, 3) == '#g:' then want = 'zset'
  end
  if kind ~= want then bad[#bad + 1] = key .. ' is a ' .. kind end
end
for _, field in ipairs(redis.call('HKEYS', ARGV[1] .. '#state')) do
  if field ~= 'applied' and field ~= 'floor' and field ~= 'epoch' then bad[#bad + 1] = '#state has ' .. field end
end
return bad";
    redis
        .cli(&["EVAL", CHECK, "0", PREFIX])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A percent-encoded key as the daemon decodes it (bytes that are not UTF-8 replaced).
fn percent_decoded(encoded: &str) -> String {
    let bytes = encoded.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `cachetail check`; its exit code and everything it printed.
fn check(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("the cachetail binary runs");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn state(redis: &RedisServer, field: &str) -> String {
    redis.cli(&["HGET", &format!("{PREFIX}#state"), field])
}

#[test]
fn hostile_keys_and_row_values_never_read_or_overwrite_redis_bookkeeping() {
    let redis = RedisServer::start();
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = start_active(&catalog, &hostile_config(port, &redis), port);
    for key in ["user:1", "book:2", "titled:Book 2", "pair:a:b", "b#c"] {
        assert_eq!(daemon.get(key).status, 200, "{key}");
    }
    assert_eq!(x_cache(&daemon.get("user:1")), "hit");
    let epoch = catalog.sqlite_cli("SELECT epoch FROM cachetail_lease");
    assert_eq!(state(&redis, "epoch"), epoch);
    let floor = state(&redis, "floor");
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];

    // Keys a client sends, as they arrive on the wire (percent-encoded).
    let long = "a".repeat(1024 - "titled:".len());
    let too_long = format!("{long}a");
    let mut paths: Vec<String> = Vec::new();
    for rest in [
        "%23state",
        "%23m:user:1",
        "%23g:t:books",
        "%23gm:t:books",
        "%23g:t:%23state",
        "%23",
        "%23%23",
        "ct:",
        "ct:%23state",
        "*",
        "%3F",
        "%5B",
        "%5Ba-z%5D*",
        "%23state%0D%0A",
        "%00",
        "%0D%0APING",
        "%FF",
        "%25",
        "a%2Fb",
    ] {
        for family in [
            "", "titled:", "b", "b%23", "pair:", "pair:x:", "user:", "book:",
        ] {
            paths.push(format!("{family}{rest}"));
        }
    }
    paths.push(format!("titled:{long}"));
    paths.push(format!("titled:{too_long}"));
    for path in &paths {
        for (method, query, headers) in [
            ("GET", "", &[][..]),
            ("GET", "?fresh=1", &[][..]),
            ("GET", "", &[("Cache-Control", "only-if-cached")][..]),
            ("GET", "", &[("Cache-Control", "no-cache")][..]),
            ("DELETE", "", &auth[..]),
        ] {
            let reply = daemon
                .request_with(method, &format!("/v1/keys/{path}{query}"), headers)
                .expect("an answer");
            let not_cached = headers.first().is_some_and(|h| h.1 == "only-if-cached");
            assert!(
                reply.status < 500 || (not_cached && reply.status == 504),
                "{method} /v1/keys/{path}{query}: {} {}",
                reply.status,
                reply.text()
            );
            assert!(
                !reply.text().contains("\"applied\""),
                "{path}: {}",
                reply.text()
            );
        }
    }
    // The same keys, decoded, in a multi-get.
    let decoded: Vec<String> = paths.iter().map(|p| percent_decoded(p)).collect();
    let mut client = Client::new(daemon.address);
    for chunk in decoded.chunks(500) {
        let body = serde_json::to_vec(chunk).expect("JSON");
        let reply = client
            .request("POST", "/v1/keys", &[], &body)
            .expect("multi-get");
        assert!(reply.status < 500, "{} {}", reply.status, reply.text());
    }

    // Rows an attacker wrote: titles and authors that name bookkeeping, glob characters,
    // control characters, a NUL, an empty string, a very long one.
    let values = [
        "#state",
        "#m:user:1",
        "#g:t:books",
        "#gm:t:books",
        "#g:f:user:{id}",
        "#",
        "ct:#state",
        "*",
        "?[a-z]*",
        "a\r\nb",
        "x\0#state",
        "",
        &"y".repeat(100_000),
    ];
    for (i, value) in values.iter().enumerate() {
        let author = values[(i + 1) % values.len()];
        catalog.python(&format!(
            "con.execute('UPDATE books SET title = ?, author = ? WHERE id = 2', ({value:?}, {author:?}))"
        ));
        let head = outbox_head(&catalog);
        applied(&mut daemon, head);
        for key in ["titled:Book 2", "pair:a:b"] {
            assert_eq!(daemon.get(key).status, 200, "{key} after a title {value:?}");
        }
    }
    let head = outbox_head(&catalog);
    applied(&mut daemon, head);

    // The bookkeeping is intact: its shape, the epoch, the floor, the applied position; nothing
    // was rebuilt (user:1 is still a hit), no batch failed, Redis never looked down.
    assert_eq!(misshapen_bookkeeping(&redis), Vec::<String>::new());
    assert_eq!(state(&redis, "epoch"), epoch);
    assert_eq!(state(&redis, "floor"), floor);
    assert_eq!(state(&redis, "applied"), head.to_string());
    assert_eq!(x_cache(&daemon.get("user:1")), "hit");
    let status = daemon.status();
    assert_eq!(status["apply_errors"], 0, "{status}");
    assert_eq!(status["redis"]["ok"], true, "{status}");
    assert_eq!(status["redis"]["outages"], 0, "{status}");

    // A config that could name bookkeeping is refused, at check and at reload.
    let other = catalog.path().join("other.toml");
    let with = |text: &str| {
        std::fs::write(&other, text).expect("write config");
        other.clone()
    };
    let empty_prefix = hostile_config(port, &redis).replace("prefix = \"ct:\"", "prefix = \"\"");
    assert!(empty_prefix.contains("prefix = \"\""));
    let (code, printed) = check(&with(&empty_prefix));
    assert_eq!(code, Some(2), "{printed}");
    assert!(
        printed.contains("`cache.prefix` must not be empty"),
        "{printed}"
    );
    let slug = format!(
        "{}\n[keys.\"{{slug}}\"]\nquery = \"SELECT :slug AS s\"\n",
        hostile_config(port, &redis)
    );
    catalog.write_config(&slug);
    eventually("the reload is refused", || {
        let status = daemon.status();
        status["config"]["last_reload_error"]
            .as_str()
            .filter(|e| e.contains("must begin with literal text other than `#`"))
            .map(str::to_owned)
    });
    assert_eq!(daemon.get_path("/v1/keys/%23state").status, 404);
    assert_eq!(misshapen_bookkeeping(&redis), Vec::<String>::new());
}
