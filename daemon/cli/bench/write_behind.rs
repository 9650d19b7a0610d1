//! Write-behind beside the app: the app writing flat out while the daemon applies its changes
//! with a write-behind rule (every touched `book:N` recomputed after the delay), against the same
//! app beside the same daemon with the rule on delete (nothing recomputed). Rounds alternate the
//! two strategies; each starts from a fresh database with every key cached (read once), so the
//! write-behind recomputes have values to refresh.

use std::path::Path;
use std::time::{Duration, Instant};

use super::daemons::Running;
use super::{
    BOOKS, BenchOptions, DELETE_RULE, Row, Spread, config_for, fresh_catalog, rounds_text,
};
use crate::client::Client;

pub(super) fn write_behind(options: &BenchOptions) -> anyhow::Result<Row> {
    let rounds = if options.quick { 1 } else { 3 };
    let writing = if options.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(4)
    };
    let (mut delete, mut behind, mut recomputes) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for strategy in ["delete", "write-behind"] {
            let (rows_per_second, recomputed) = app_rate(options, strategy, writing)?;
            eprintln!(
                "write-behind bench, round {round}, {strategy}: the app wrote {rows_per_second:.0} rows/s; {recomputed} recomputes"
            );
            if strategy == "delete" {
                delete.push(rows_per_second);
            } else {
                behind.push(rows_per_second);
                recomputes.push(recomputed as f64);
            }
        }
    }
    let ratios = Spread::of(
        delete
            .iter()
            .zip(&behind)
            .map(|(delete, behind)| behind / delete)
            .collect(),
    );
    let (delete, behind, recomputes) = (
        Spread::of(delete),
        Spread::of(behind),
        Spread::of(recomputes),
    );
    Ok(Row {
        figure: format!(
            "app writes with write-behind rules: the app writing flat out (100-row transactions into `reviews`, {:.0} s) while the daemon applies, `book:{{book_id}}` on write-behind with a 1 ms delay, all 1k keys cached first ({})",
            writing.as_secs_f64(),
            rounds_text(rounds)
        ),
        measured: format!(
            "{} rows/s, {} recomputes meanwhile",
            behind.rate(),
            recomputes.rate()
        ),
        baseline: format!(
            "the same rule on delete, rounds alternating: {} rows/s",
            delete.rate()
        ),
        ratio: format!("{} the delete strategy's rate", ratios.times()),
        target: "≥ 0.9× the delete strategy's rate",
    })
}

/// One round: a fresh catalog, the daemon with the rule on `strategy`, every key read once, then
/// the app writing flat out for `writing`. Returns the app's rows/s and the recomputes the
/// daemon ran meanwhile.
fn app_rate(
    options: &BenchOptions,
    strategy: &str,
    writing: Duration,
) -> anyhow::Result<(f64, u64)> {
    let db_name = format!("write-behind-{strategy}.db");
    let db = options.dir.join(&db_name);
    fresh_catalog(&db, 20_000)?;
    let rule = format!("{DELETE_RULE}strategy = \"{strategy}\"\n[write_behind]\ndelay = \"1ms\"\n");
    let mut running = Running::start(config_for(&options.dir, &db_name, &rule)?)?;
    let mut client = Client::new(running.address);
    for book in 1..=BOOKS {
        client.get(&format!("/v1/keys/book:{book}"))?;
    }
    let before = running.status()?["recomputes"].as_u64().unwrap_or(0);
    let rows_per_second = write_flat_out(&db, writing)?;
    let recomputed = running.status()?["recomputes"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(before);
    Ok((rows_per_second, recomputed))
}

/// The app: 100-row transactions into `reviews` from its own connection, for `writing`.
fn write_flat_out(db: &Path, writing: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    super::app_writes(db, 7, || start.elapsed() >= writing)
}
