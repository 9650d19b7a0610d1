//! Stampede: 1,000 concurrent cold GETs of one key (a slow query), beside the same 1,000 with
//! nothing to coalesce (each a distinct key of the family), counting the family's queries in
//! `/v1/status`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::daemons::Running;
use super::{BenchOptions, Row, config_for, fresh_catalog, ms};
use crate::client::Client;

/// `clients` threads, each on its own connection, released at once by a barrier, each GETting
/// `key(i)`. Returns how long until all were answered.
fn concurrent_gets(
    address: SocketAddr,
    clients: usize,
    key: impl Fn(usize) -> String,
) -> anyhow::Result<Duration> {
    let barrier = Arc::new(std::sync::Barrier::new(clients + 1));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (barrier, failures) = (Arc::clone(&barrier), Arc::clone(&failures));
            let path = format!("/v1/keys/{}", key(i));
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let mut client = Client::new(address).with_timeout(Duration::from_secs(600));
                    let ready = client.get("/healthz");
                    barrier.wait();
                    let answer = ready.and_then(|_| client.get(&path));
                    let failure = match answer {
                        Ok(reply) if reply.status == 200 => return,
                        Ok(reply) => format!("{path}: {} {}", reply.status, reply.text()),
                        Err(e) => format!("{path}: {e}"),
                    };
                    failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(failure);
                })
        })
        .collect::<Result<_, _>>()?;
    // Every client is connected and waiting: the clock starts when they are let go.
    barrier.wait();
    let start = Instant::now();
    for thread in threads {
        let _ = thread.join();
    }
    let elapsed = start.elapsed();
    let failures = failures.lock().unwrap_or_else(|e| e.into_inner());
    anyhow::ensure!(
        failures.is_empty(),
        "{} of the {clients} requests failed, first: {}",
        failures.len(),
        failures.first().map_or("", String::as_str)
    );
    Ok(elapsed)
}

pub(super) fn stampede(options: &BenchOptions) -> anyhow::Result<Row> {
    let db = options.dir.join("stampede.db");
    fresh_catalog(&db, 1_000)?;
    // A query of about 10 ms (4 ms in --quick): 1,000 of them take a while.
    let spins = if options.quick { 20_000 } else { 50_000 };
    let rules = format!(
        "[keys.\"slow:{{id}}\"]\nquery = \"SELECT :id AS id, (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {spins}) SELECT count(*) FROM n) AS spins\"\n[http]\nrequest_timeout = \"300s\"\n"
    );
    let mut running = Running::start(config_for(&options.dir, "stampede.db", &rules)?)?;
    let address = running.address;
    // The family's query runs, as `/v1/status` counts them.
    let mut fills = || -> anyhow::Result<u64> {
        let status = running.status()?;
        let family = status["config"]["families"]
            .as_array()
            .and_then(|families| families.iter().find(|f| f["pattern"] == "slow:{id}"))
            .ok_or_else(|| anyhow::anyhow!("no family slow:{{id}} in /v1/status: {status}"))?;
        family["fills"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no fills count in /v1/status: {family}"))
    };
    let clients = 1_000;
    // One cold GET alone: what one query costs.
    let mut client = Client::new(address);
    let single_start = Instant::now();
    anyhow::ensure!(client.get("/v1/keys/slow:0")?.status == 200, "slow:0");
    let single = single_start.elapsed();
    // 1,000 concurrent GETs of one cold key: they join one fill.
    let before = fills()?;
    let coalesced = concurrent_gets(address, clients, |_| "slow:1".to_owned())?;
    let coalesced_fills = fills()? - before;
    // The same 1,000 concurrent cold GETs with nothing to coalesce: each a key of its own in
    // the same family.
    let before = fills()?;
    let spread = concurrent_gets(address, clients, |i| format!("slow:{}", 1_000 + i))?;
    let spread_fills = fills()? - before;
    eprintln!(
        "stampede: one cold GET {single:?}; 1,000 on one key: {coalesced_fills} queries in {coalesced:?}; 1,000 on distinct keys: {spread_fills} queries in {spread:?}"
    );
    Ok(Row {
        figure: "stampede: 1,000 concurrent GETs of one cold key (a slow query)".to_owned(),
        measured: format!(
            "{coalesced_fills} query run; all 1,000 answered in {}",
            ms(coalesced)
        ),
        baseline: format!(
            "the same 1,000 concurrent cold GETs without coalescing (each a distinct key of the family): {spread_fills} queries, all answered in {}; one cold GET alone: {}",
            ms(spread),
            ms(single)
        ),
        ratio: format!(
            "{coalesced_fills}/{spread_fills} queries, {:.1}× faster",
            spread.as_secs_f64() / coalesced.as_secs_f64().max(1e-9)
        ),
        target: "exactly 1 query",
    })
}
