//! No client can lock the others out, and no request's work outlives it (issue 14, items 6 and
//! 7): event streams have a cap of their own and never take the connection slots of key reads,
//! health checks or admin calls; reads wait for a capped pool of SQLite readers in a bounded
//! queue (503 with `Retry-After` when it is full); a timed-out request's query is stopped;
//! duplicate keys of a multi-get are looked up once; `no-cache` reads of one key share a query;
//! verify's sample is capped; and cached reads keep their latency while fifty clients post cold
//! multi-gets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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
