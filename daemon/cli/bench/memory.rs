//! Memory: a release `cachetail run` process filled with values of ~192 bytes through
//! `POST /v1/keys` (a thousand keys a request), its RSS read from `/proc` before and after;
//! beside the payload, and beside moka's own cost for the same keys (a moka cache built as the
//! daemon builds its own, holding empty values, in this process). Then the same fill with
//! `max_bytes` set to a tenth of what it took: what was kept, and the RSS beside the bound.

use std::path::Path;
use std::time::{Duration, Instant};

use compact_str::CompactString;

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

    let mut daemon = start(options, "memory", &format!("max_entries = {}", values * 2))?;
    let value_bytes = daemon_value_bytes(&mut daemon)?;
    let before = rss_bytes(daemon.pid())?;
    let filling = Instant::now();
    fill(&mut daemon, values)?;
    let filled_in = filling.elapsed();
    let after = rss_bytes(daemon.pid())?;
    let stored = entries(&mut daemon)?;
    drop(daemon);
    let used = after.saturating_sub(before);
    let moka = moka_own_bytes(values)?;

    let bound = (used / 10).max(1 << 20);
    let mut bounded = start(options, "memory-bounded", &format!("max_bytes = {bound}"))?;
    fill(&mut bounded, values)?;
    let status = bounded.status()?;
    let (kept, counted) = (status["entries"].as_u64(), status["bytes"].as_u64());
    let bounded_rss = rss_bytes(bounded.pid())?;
    drop(bounded);

    let payload = values * value_bytes;
    let per_value = used.saturating_sub(payload) as f64 / values as f64;
    let moka_per_value = moka as f64 / values as f64;
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    let limit = bound as f64 * 1.1 + 30.0 * 1048576.0;
    eprintln!(
        "memory: {stored} values of {value_bytes} bytes through POST /v1/keys (in {filled_in:?}): the daemon's RSS {before} → {after} bytes (+{used}) for {payload} bytes of payload, {per_value:.0} bytes per value beyond it; moka alone, same keys, empty values: {moka_per_value:.0} bytes per value; with max_bytes = {bound}: kept {kept:?} counted {counted:?} bytes, RSS {bounded_rss} bytes (limit {limit:.0})"
    );
    Ok(Row {
        figure: format!(
            "memory: {} cached values of {value_bytes} bytes, filled through `POST /v1/keys`, the `cachetail run` process's RSS; then the same fill with `max_bytes` a tenth of that",
            human(values as f64)
        ),
        measured: format!(
            "{per_value:.0} bytes per value beyond the payload ({:.0} MiB RSS growth, {stored} stored); with max_bytes = {:.0} MiB: {} kept, RSS {:.0} MiB",
            mib(used),
            mib(bound),
            kept.map_or_else(|| "?".to_owned(), |k| k.to_string()),
            mib(bounded_rss)
        ),
        baseline: format!(
            "moka alone, the same keys holding empty values: {moka_per_value:.0} bytes per value; RSS limit for the bound (+10% + 30 MiB): {:.0} MiB",
            limit / 1048576.0
        ),
        ratio: format!(
            "{:.2}× moka's own; bounded RSS {:.2}× the limit",
            per_value / moka_per_value.max(1.0),
            bounded_rss as f64 / limit
        ),
        target: "≤ 250 bytes per value beyond the payload; RSS ≤ max_bytes + 10% + 30 MiB",
    })
}

/// What moka itself takes for `values` keys spelled as the daemon's (`item:N`), held as the
/// daemon holds them (inline keys, per-entry expiry, a bound), with empty values: this
/// process's RSS growth, in bytes.
fn moka_own_bytes(values: u64) -> anyhow::Result<u64> {
    struct Ttl;
    impl moka::Expiry<CompactString, ()> for Ttl {
        fn expire_after_create(&self, _: &CompactString, _: &(), _: Instant) -> Option<Duration> {
            Some(Duration::from_secs(600))
        }
    }
    let before = rss_bytes(std::process::id())?;
    let cache = moka::sync::Cache::builder()
        .max_capacity(values * 2)
        .expire_after(Ttl)
        .build();
    for i in 0..values {
        cache.insert(CompactString::from(format!("item:{i}")), ());
    }
    cache.run_pending_tasks();
    let after = rss_bytes(std::process::id())?;
    anyhow::ensure!(
        cache.entry_count() == values,
        "moka kept {} of {values}",
        cache.entry_count()
    );
    Ok(after.saturating_sub(before))
}

/// A `cachetail run` of the item family, its bound (`max_entries = …` or `max_bytes = …`) as
/// given.
fn start(options: &BenchOptions, name: &str, bound: &str) -> anyhow::Result<DaemonProcess> {
    let port = free_port()?;
    let config = options.dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "database = \"memory.db\"\nlisten = \"127.0.0.1:{port}\"\n[cache]\n{bound}\n{FAMILY}"
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
