//! Memory: a release `cachetail run` process filled with values of ~192 bytes through
//! `POST /v1/keys` (a thousand keys a request), its RSS read from `/proc` before and after;
//! beside the payload. Then the same with `max_entries` a tenth of that: what it kept.

use std::path::Path;
use std::time::Duration;

use super::daemons::{DaemonProcess, free_port};
use super::{BenchOptions, Row, human};
use crate::client::Client;

/// A family whose values are 192 bytes of JSON, computed without reading a table:
/// `{"id":"0000000042","title":"x      …","rating":4.5}`.
const FAMILY: &str = "[keys.\"item:{id}\"]\nquery = \"SELECT printf('%010d', :id) AS id, printf('%-149s', 'x') AS title, 4.5 AS rating\"\n";

/// Keys per `POST /v1/keys` (the daemon's limit).
const PER_REQUEST: u64 = 1_000;

pub(super) fn memory(options: &BenchOptions) -> anyhow::Result<Row> {
    // The smoke run fills a few seconds' worth (a fill is a query each).
    let values: u64 = if options.quick { 20_000 } else { 1_000_000 };
    let db = options.dir.join("memory.db");
    drop(crate::demo::empty_catalog(&db)?);

    let mut daemon = start(options, "memory", values * 2)?;
    let value_bytes = daemon_value_bytes(&mut daemon)?;
    let before = rss_bytes(daemon.pid())?;
    let filling = std::time::Instant::now();
    fill(&mut daemon, values)?;
    let filled_in = filling.elapsed();
    let after = rss_bytes(daemon.pid())?;
    let stored = entries(&mut daemon)?;
    drop(daemon);
    let used = after.saturating_sub(before);

    let bound = values / 10;
    let mut bounded = start(options, "memory-bounded", bound)?;
    fill(&mut bounded, values)?;
    let kept = entries(&mut bounded)?;
    let bounded_rss = rss_bytes(bounded.pid())?;
    drop(bounded);

    let payload = values * value_bytes;
    let per_value = used.saturating_sub(payload) as f64 / values as f64;
    eprintln!(
        "memory: {stored} values of {value_bytes} bytes through POST /v1/keys (in {filled_in:?}): the daemon's RSS {before} → {after} bytes (+{used}) for {payload} bytes of payload, {per_value:.0} bytes per value beyond it; with max_entries = {bound}: kept {kept}, RSS {bounded_rss} bytes"
    );
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    Ok(Row {
        figure: format!(
            "memory: {} cached values of {value_bytes} bytes, filled through `POST /v1/keys`, the `cachetail run` process's RSS",
            human(values as f64)
        ),
        measured: format!(
            "{:.0} MiB RSS growth ({stored} stored; {per_value:.0} bytes per value beyond the payload); with max_entries = {bound} it kept {kept} ({:.0} MiB RSS)",
            mib(used),
            mib(bounded_rss)
        ),
        baseline: format!("payload {:.0} MiB", mib(payload)),
        ratio: format!("{:.2}× payload", used as f64 / payload as f64),
        target: "≤ 1.5 × payload + 30 MiB, bounded by config",
    })
}

/// A `cachetail run` of the item family, `max_entries` as given.
fn start(options: &BenchOptions, name: &str, max_entries: u64) -> anyhow::Result<DaemonProcess> {
    let port = free_port()?;
    let config = options.dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "database = \"memory.db\"\nlisten = \"127.0.0.1:{port}\"\n[cache]\nmax_entries = {max_entries}\n{FAMILY}"
        ),
    )?;
    DaemonProcess::start(&options.dir, &config, port, name)
}

/// The size of one value, as the daemon serves it (read through a key the fill reads anyway).
fn daemon_value_bytes(daemon: &mut DaemonProcess) -> anyhow::Result<u64> {
    let reply = Client::new(daemon.address()).get("/v1/keys/item:0")?;
    anyhow::ensure!(
        reply.status == 200,
        "item:0: {} {}",
        reply.status,
        reply.text()
    );
    Ok(reply.body.len() as u64)
}

/// `item:0` … `item:{values - 1}`, a thousand keys a request.
fn fill(daemon: &mut DaemonProcess, values: u64) -> anyhow::Result<()> {
    let mut client = Client::new(daemon.address()).with_timeout(Duration::from_secs(120));
    for first in (0..values).step_by(PER_REQUEST as usize) {
        let keys: Vec<String> = (first..(first + PER_REQUEST).min(values))
            .map(|i| format!("item:{i}"))
            .collect();
        let body = serde_json::to_vec(&keys)?;
        let reply = client.request(
            "POST",
            "/v1/keys",
            &[("Content-Type", "application/json")],
            &body,
        )?;
        anyhow::ensure!(
            reply.status == 200,
            "POST /v1/keys: {} {}",
            reply.status,
            reply.text()
        );
        if first == 0 {
            let results = reply.json()?;
            let all_found = results["results"]
                .as_array()
                .is_some_and(|r| r.len() == keys.len() && r.iter().all(|r| r["status"] == 200));
            anyhow::ensure!(all_found, "POST /v1/keys did not find every key: {results}");
        }
    }
    Ok(())
}

/// The daemon's cached entries, from `/v1/status`.
fn entries(daemon: &mut DaemonProcess) -> anyhow::Result<u64> {
    let status = daemon.status()?;
    status["entries"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no entries in /v1/status: {status}"))
}

/// A process's resident set, from `/proc/PID/status` (Linux).
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?
        .parse()?;
    Ok(kb * 1024)
}
