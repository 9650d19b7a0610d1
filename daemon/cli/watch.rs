//! `cachetail watch`: the live feed in a terminal, for operators over ssh. It reads
//! `GET /v1/events` and prints a line per applied change (its keys and strategies) and a status
//! line a second; it reconnects when the daemon restarts.

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cachetail::Config;
use serde_json::Value;

/// How long the feed may stay silent before the daemon counts as gone (it sends a status a
/// second).
const SILENCE: Duration = Duration::from_secs(10);

/// `cachetail watch`: the daemon at `url`, or the one `config` (default `config.toml`) listens on.
pub fn run(config: Option<&Path>, url: Option<&str>) -> anyhow::Result<ExitCode> {
    let address: SocketAddr = match (config, url) {
        (_, Some(url)) => url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .with_context(|| format!("`--url {url}` is not like http://127.0.0.1:8080"))?,
        (Some(config), None) => Config::load(config)?.listen,
        (None, None) => Config::load(Path::new("config.toml"))?.listen,
    };
    follow(address, &mut io::stdout().lock())?;
    Ok(ExitCode::SUCCESS)
}

/// Follows the feed until the output fails.
fn follow(address: SocketAddr, out: &mut impl Write) -> io::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_per_read(Some(SILENCE))
        .build()
        .into();
    loop {
        match stream_events(&agent, address, out) {
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

/// One connection's worth of the feed: `GET /v1/events`, then a line per event until the stream
/// ends (an error: the daemon went away) or the output fails.
fn stream_events(agent: &ureq::Agent, address: SocketAddr, out: &mut impl Write) -> io::Result<()> {
    let response = agent
        .get(format!("http://{address}/v1/events"))
        .header("Accept", "text/event-stream")
        .call()
        .map_err(io::Error::other)?;
    if response.status() != 200 {
        return Err(io::Error::other(format!(
            "the daemon answered {}",
            response.status()
        )));
    }
    writeln!(out, "-- following {address} (Ctrl-C to stop)")?;
    let mut reader = BufReader::new(response.into_body().into_reader());
    // Server-Sent Events: `data:` lines, an event ended by a blank line.
    let (mut line, mut data) = (String::new(), String::new());
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(payload) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(payload.strip_prefix(' ').unwrap_or(payload));
        } else if line.is_empty() && !data.is_empty() {
            if let Ok(event) = serde_json::from_str::<Value>(&data) {
                writeln!(out, "{}", describe(&event))?;
                out.flush()?;
            }
            data.clear();
        }
    }
}

/// One feed event as a terminal line.
fn describe(event: &Value) -> String {
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
