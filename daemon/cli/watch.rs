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
use cachetail::api::{ChangeEvent, FeedEvent, LiveStatus};
use cachetail::escape::Escaped;

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
    // A daemon listening on every interface is followed on loopback (a `Host` it answers to).
    follow(crate::client::reachable(address), &mut io::stdout().lock())?;
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
                writeln!(out, "-- {address}: {}; reconnecting", Escaped(&e))?;
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
            let described = match serde_json::from_str::<FeedEvent>(&data) {
                Ok(event) => describe(&event),
                // An event this build does not know (a newer daemon): shown as it came.
                Err(_) => data.clone(),
            };
            // Row values, keys and tags are the app's data: no terminal sequence, line break or
            // bidi override in them reaches the terminal.
            writeln!(out, "{}", Escaped(&described))?;
            out.flush()?;
            data.clear();
        }
    }
}

/// One feed event as a terminal line.
fn describe(event: &FeedEvent) -> String {
    match event {
        FeedEvent::Change(change) => describe_change(change),
        FeedEvent::Status(status) => describe_status(status),
        FeedEvent::Skipped { count } => format!("… {count} more changes not shown"),
    }
}

fn describe_change(change: &ChangeEvent) -> String {
    let row: Vec<String> = change
        .row
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let keys: Vec<String> = change
        .keys
        .iter()
        .map(|k| match &k.via {
            Some(via) => format!("{} ({}, via {via})", k.key, k.strategy),
            None => format!("{} ({})", k.key, k.strategy),
        })
        .collect();
    let mut line = format!(
        "#{} {} {} {{{}}} → {}",
        change.position,
        change.op,
        change.table.as_deref().unwrap_or("?"),
        row.join(", "),
        if keys.is_empty() {
            "no keys".to_owned()
        } else {
            keys.join(", ")
        }
    );
    if !change.tags.is_empty() {
        line.push_str(&format!("; tags {}", change.tags.join(", ")));
    }
    if change.flush {
        line.push_str("; drops everything");
    }
    for fallback in &change.fallbacks {
        line.push_str(&format!(
            "; drops every {} ({}: lookup via {})",
            fallback.family, fallback.reason, fallback.via
        ));
    }
    line
}

fn describe_status(status: &LiveStatus) -> String {
    let fresh = &status.latency.commit_to_fresh;
    let ms = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |x| format!("{x:.1}"));
    let count = |name: &str| status.counters.get(name).copied().unwrap_or(0);
    format!(
        "[status] {} · cursor {} · lag {} ({:.1} s) · events {} · hits {} · misses {} · fills {} · commit→fresh p50 {} p99 {} ms · write-behind queue {}",
        status.role,
        status.cursor,
        status
            .lag
            .map_or_else(|| "null".to_owned(), |lag| lag.to_string()),
        status.lag_seconds.unwrap_or(0.0),
        count("events"),
        count("hits"),
        count("misses"),
        count("fills"),
        ms(fresh.p50_ms),
        ms(fresh.p99_ms),
        status.write_behind_queue
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_line_names_the_lookup_and_the_families_dropped() {
        let change: ChangeEvent = serde_json::from_str(
            r#"{"position": 7, "table": "reviews", "op": "insert", "row": {"book_id": 20},
                "keys": [{"key": "author:2", "strategy": "delete", "rule": 2,
                          "via": "books.author_id where books.id = reviews.book_id"}],
                "tags": [], "flush": false,
                "fallbacks": [{"family": "user:{id}", "rule": 3, "via": "x.y where x.z = reviews.w",
                               "reason": "the lookup failed"}]}"#,
        )
        .expect("a change event");
        assert_eq!(
            describe_change(&change),
            "#7 insert reviews {book_id=20} → author:2 (delete, via books.author_id where books.id = reviews.book_id); drops every user:{id} (the lookup failed: lookup via x.y where x.z = reviews.w)"
        );
    }
}
