//! `cachetail watch`: the live feed in a terminal, for operators over ssh. It reads
//! `GET /v1/events` and prints a line per applied change (its keys and strategies) and a status
//! line a second; it reconnects when the daemon restarts.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// Follows the feed until the output fails (or `limit` change lines were printed).
pub fn follow(address: SocketAddr, out: &mut impl Write, limit: Option<usize>) -> io::Result<()> {
    let mut printed = 0usize;
    loop {
        match stream_events(address, out, &mut printed, limit) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => {
                writeln!(out, "-- {address}: {e}; reconnecting")?;
                out.flush()?;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn stream_events(
    address: SocketAddr,
    out: &mut impl Write,
    printed: &mut usize,
    limit: Option<usize>,
) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /v1/events HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.contains(" 200 ") {
        return Err(io::Error::other(format!(
            "the daemon answered {}",
            line.trim()
        )));
    }
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        chunked |= header == "transfer-encoding: chunked";
    }
    writeln!(out, "-- following {address} (Ctrl-C to stop)")?;
    let mut pending = String::new();
    loop {
        let data = if chunked {
            read_chunk(&mut reader)?
        } else {
            let mut buf = [0u8; 4096];
            let n = reader.read(&mut buf)?;
            buf[..n].to_vec()
        };
        if data.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            for payload in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if let Ok(value) = serde_json::from_str::<Value>(payload) {
                    let is_change = value["type"] == "change";
                    writeln!(out, "{}", describe(&value))?;
                    out.flush()?;
                    if is_change {
                        *printed += 1;
                        if limit.is_some_and(|l| *printed >= l) {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

fn read_chunk(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut size = String::new();
    reader.read_line(&mut size)?;
    let size = usize::from_str_radix(size.trim(), 16)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
    let mut data = vec![0u8; size];
    reader.read_exact(&mut data)?;
    let mut crlf = [0u8; 2];
    reader.read_exact(&mut crlf)?;
    Ok(data)
}

/// One feed event as a terminal line.
pub fn describe(event: &Value) -> String {
    match event["type"].as_str() {
        Some("change") => {
            let row: Vec<String> = event["row"]
                .as_object()
                .map(|o| o.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            let keys: Vec<String> = event["keys"]
                .as_array()
                .map(|ks| {
                    ks.iter()
                        .map(|k| {
                            format!(
                                "{} ({})",
                                k["key"].as_str().unwrap_or("?"),
                                k["strategy"].as_str().unwrap_or("?")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let tags: Vec<&str> = event["tags"]
                .as_array()
                .map(|ts| ts.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut line = format!(
                "#{} {} {} {{{}}} → {}",
                event["position"],
                event["op"].as_str().unwrap_or("?"),
                event["table"].as_str().unwrap_or("?"),
                row.join(", "),
                if keys.is_empty() {
                    "no keys".to_owned()
                } else {
                    keys.join(", ")
                }
            );
            if !tags.is_empty() {
                line.push_str(&format!("; tags {}", tags.join(", ")));
            }
            if event["flush"] == true {
                line.push_str("; drops everything");
            }
            line
        }
        Some("status") => {
            let fresh = &event["latency"]["commit_to_fresh"];
            let ms = |v: &Value| {
                v.as_f64()
                    .map_or_else(|| "–".to_owned(), |x| format!("{x:.1}"))
            };
            format!(
                "[status] {} · cursor {} · lag {} ({:.1} s) · events {} · hits {} · misses {} · fills {} · commit→fresh p50 {} p99 {} ms · write-behind queue {}",
                event["role"].as_str().unwrap_or("?"),
                event["cursor"],
                event["lag"],
                event["lag_seconds"].as_f64().unwrap_or(0.0),
                event["events"],
                event["hits"],
                event["misses"],
                event["fills"],
                ms(&fresh["p50_ms"]),
                ms(&fresh["p99_ms"]),
                event["write_behind_queue"]
            )
        }
        Some("skipped") => format!("… {} more changes not shown", event["count"]),
        _ => event.to_string(),
    }
}
