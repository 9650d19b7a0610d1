//! A mutation fuzzer for the HTTP endpoint: valid requests, mutated byte by byte (flips,
//! inserted escapes, braces, NULs, CR/LF, unicode, truncations, odd lengths), each sent on its own
//! connection to the real daemon. The seeds reach the limits too: live feeds opened and dropped
//! (far more than `max_event_streams`), foreign `Host`s and cross-site writes, multi-gets full of
//! duplicates, `no-cache` reads, verify with a huge sample. No answer may be a 5xx but the
//! documented 503s (a live feed past its cap, no reader free), each with its JSON error; the
//! daemon must stay up, give back every place a dropped feed held, and nothing cached may go
//! stale. It runs for `CACHETAIL_FUZZ_SECONDS` (default 3).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::{eventually, json};
use crate::strategies::catalog_daemon;

/// A live feed, if the daemon serves one now: its connection, kept open.
fn open_feed(address: std::net::SocketAddr) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!("GET /v1/events HTTP/1.1\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut line = [0u8; 12];
    stream.read_exact(&mut line).ok()?;
    (&line == b"HTTP/1.1 200").then_some(stream)
}

const SEEDS: &[&[u8]] = &[
    b"GET /v1/keys/book:1 HTTP/1.1\r\nHost: HOST\r\n\r\n",
    b"GET /v1/keys/book%3A2?fresh=1 HTTP/1.1\r\nHost: HOST\r\n\r\n",
    b"GET /v1/keys/user:1 HTTP/1.1\r\nHost: HOST\r\nCache-Control: only-if-cached\r\n\r\n",
    b"GET /v1/keys/top-books HTTP/1.1\r\nHost: HOST\r\nIf-None-Match: \"abc\", *\r\n\r\n",
    b"POST /v1/keys HTTP/1.1\r\nHost: HOST\r\nContent-Length: 29\r\n\r\n[\"book:1\", \"user:2\", \"x:1\"]  ",
    b"POST /v1/keys HTTP/1.1\r\nHost: HOST\r\nContent-Length: 20\r\n\r\n{\"keys\": [\"book:3\"]}",
    b"GET /v1/status HTTP/1.1\r\nHost: HOST\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: HOST\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: HOST\r\n\r\n",
    b"GET /v1/keys/book:1'%20OR%201=1-- HTTP/1.1\r\nHost: HOST\r\n\r\n",
    b"GET /v1/events HTTP/1.1\r\nHost: HOST\r\nAccept: text/event-stream\r\n\r\n",
    b"GET /v1/keys/book:2 HTTP/1.1\r\nHost: rebind.example:8080\r\n\r\n",
    b"GET http://HOST/v1/status HTTP/1.1\r\nHost: HOST\r\n\r\n",
    b"GET /v1/keys/user:3 HTTP/1.0\r\n\r\n",
    b"POST /v1/admin/flush HTTP/1.1\r\nHost: HOST\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/keys HTTP/1.1\r\nHost: HOST\r\nSec-Fetch-Site: cross-site\r\nContent-Length: 10\r\n\r\n[\"book:1\"]",
    b"POST /v1/keys HTTP/1.1\r\nHost: HOST\r\nOrigin: http://HOST\r\nContent-Length: 48\r\n\r\n[\"user:1\", \"user:1\", \"book:4\", \"user:1\", \"x\"]",
    b"GET /v1/keys/user:2 HTTP/1.1\r\nHost: HOST\r\nCache-Control: no-cache\r\n\r\n",
    b"POST /v1/verify?sample=100000 HTTP/1.1\r\nHost: HOST\r\nContent-Length: 0\r\n\r\n",
];

const INTERESTING: &[&[u8]] = &[
    b"%",
    b"%zz",
    b"%00",
    b"%ff",
    b"{",
    b"}",
    b"{{",
    b":",
    b"\0",
    b"\r\n",
    b"\n",
    b" ",
    b"?",
    b"&fresh=1",
    b"/..",
    b"\xff\xfe",
    "é".as_bytes(),
    "\u{202e}".as_bytes(),
    b"\"",
    b"'",
    b"Content-Length: 99999999999\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"9999999999",
    b"-1",
    b"[",
    b"]",
    b"null",
    b"\\u0000",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(6) {
            0 if !bytes.is_empty() => {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            1 => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                bytes.splice(at..at, piece.iter().copied());
            }
            2 if at < bytes.len() => {
                bytes.truncate(at);
            }
            3 => {
                let end = (at + rng.below(16)).min(bytes.len());
                bytes.drain(at..end);
            }
            4 => {
                let repeat = vec![b'a' + rng.below(26) as u8; rng.below(3000)];
                bytes.splice(at..at, repeat);
            }
            _ => {
                let random: Vec<u8> = (0..rng.below(8)).map(|_| rng.next() as u8).collect();
                bytes.splice(at..at, random);
            }
        }
    }
    bytes
}

/// Sends raw bytes, half-closes, and returns the status code answered (None: closed without an
/// answer, which a server may do with a request it cannot parse), with the body of a 503. A
/// daemon that neither answers nor closes within 10 s is hung on the request: that fails the test.
fn send(address: std::net::SocketAddr, request: &[u8]) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = stream.write_all(request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "no answer and the connection still open after 10 s ({e}) for {:?}",
                String::from_utf8_lossy(&request[..request.len().min(300)])
            ),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())?;
    if status != 503 {
        return Some((status, String::new()));
    }
    // A 503 says why in its (short) JSON body: read the answer to its end.
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || head.len() > 64 * 1024 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some((status, String::from_utf8_lossy(&head).into_owned()))
}

/// The 503s the README documents, and only those: a live feed past `max_event_streams`, or no
/// SQLite reader free (each with `Retry-After` and its JSON error).
fn documented_503(answer: &str) -> bool {
    let answer = answer.to_ascii_lowercase();
    answer.contains("retry-after: 1")
        && (answer.contains("`http.max_event_streams`") || answer.contains("no sqlite reader free"))
}

#[test]
fn mutated_requests_never_get_a_5xx_or_take_the_daemon_down() {
    let (_catalog, mut daemon) = catalog_daemon("write-through", "50ms");
    let seconds: u64 = std::env::var("CACHETAIL_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // For the first half, sixteen feeds (`max_event_streams`) are held open: every feed the
    // mutations ask for is then past the cap, and everything else must be served beside them.
    let mut held: Vec<TcpStream> = (0..16)
        .map(|_| open_feed(daemon.address).expect("a feed"))
        .collect();
    let started = Instant::now();
    let (mut sent, mut answered) = (0u64, 0u64);
    let mut statuses = std::collections::BTreeMap::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        if started.elapsed() > Duration::from_secs(seconds) / 2 {
            held.clear();
        }
        // Seeds name the daemon in their `Host`, or every request would be refused before routing.
        let seed = String::from_utf8_lossy(SEEDS[rng.below(SEEDS.len())])
            .replace("HOST", &daemon.address.to_string());
        let request = mutate(&mut rng, seed.as_bytes());
        let status = send(daemon.address, &request);
        sent += 1;
        if let Some((status, answer)) = status {
            answered += 1;
            *statuses.entry(status).or_insert(0u64) += 1;
            // RFC 9111: `only-if-cached` on a key not cached is answered 504, by design.
            let asked_only_cached = request.windows(14).any(|w| w == b"only-if-cached");
            assert!(
                status < 500
                    || (status == 504 && asked_only_cached)
                    || (status == 503 && documented_503(&answer)),
                "a {status} for {:?}: {answer}",
                String::from_utf8_lossy(&request)
            );
        }
    }
    eprintln!(
        "fuzz: {sent} mutated requests in {seconds}s, {answered} answered, statuses {statuses:?}"
    );
    assert!(sent > 100, "only {sent} requests in {seconds}s");
    assert_eq!(daemon.get_path("/healthz").status, 200, "still up");
    // Every dropped feed gave its place back: all of them can be taken again.
    let feeds: Vec<TcpStream> = eventually("every feed's place is free again", || {
        let feeds: Vec<_> = (0..16).map(|_| open_feed(daemon.address)).collect();
        feeds
            .iter()
            .all(Option::is_some)
            .then(|| feeds.into_iter().flatten().collect())
    });
    assert_eq!(
        daemon.get_path("/healthz").status,
        200,
        "served beside 16 feeds"
    );
    drop(feeds);
    let report = eventually("a verify runs (none is left running)", || {
        let reply = daemon.post("/v1/verify?sample=100000");
        (reply.status == 200).then(|| json(&reply))
    });
    assert_eq!(report["stale"], 0, "{report}");
}
