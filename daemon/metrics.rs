//! `GET /metrics`: the counters the stages keep, as Prometheus (OpenMetrics) text, encoded by
//! `prometheus-client` from a snapshot at scrape time (the hot paths only bump atomics).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::state::Shared;
use crate::tail::Backlog;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics now; `backlog` is None when the outbox could not be read.
pub fn render(shared: Arc<Shared>, backlog: Option<Backlog>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot { shared, backlog }));
    let mut text = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

struct Snapshot {
    shared: Arc<Shared>,
    backlog: Option<Backlog>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Snapshot")
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: f64) -> fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// One counter per label set.
fn labelled_counters(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: Vec<(Vec<(&'static str, String)>, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, value) in values {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let shared = &self.shared;
        let stats = &shared.stats;
        let config = shared.config();
        let e = &mut encoder;
        counter(
            e,
            "cachetail_events_applied",
            "Outbox rows applied.",
            load(&stats.events),
        )?;
        counter(
            e,
            "cachetail_batches_applied",
            "Batches applied.",
            load(&stats.batches),
        )?;
        let cursor = self.backlog.map_or_else(|| shared.applied(), |b| b.cursor);
        let lag = self.backlog.map_or(0, |b| b.events());
        gauge(
            e,
            "cachetail_lag_events",
            "Changes committed but not applied yet.",
            lag as f64,
        )?;
        let lag_seconds = self.backlog.map_or(0.0, |b| {
            b.seconds(load(&stats.caught_up_at_ms), crate::latency::now_ms())
        });
        gauge(
            e,
            "cachetail_lag_seconds",
            "How long the oldest change not applied yet has waited, in seconds.",
            lag_seconds,
        )?;
        gauge(
            e,
            "cachetail_cursor",
            "The last applied outbox id.",
            cursor as f64,
        )?;
        counter(
            e,
            "cachetail_invalidations",
            "Keys invalidated (any strategy).",
            load(&stats.invalidations),
        )?;
        counter(
            e,
            "cachetail_tag_invalidations",
            "Tags invalidated.",
            load(&stats.tag_invalidations),
        )?;
        counter(
            e,
            "cachetail_recomputes",
            "Write-through and write-behind recomputes.",
            load(&stats.recomputes),
        )?;
        let rule_labels = |index: usize, rule: &crate::config::Rule| {
            vec![
                ("rule", index.to_string()),
                ("table", rule.table.clone()),
                ("strategy", rule.strategy.name().to_owned()),
            ]
        };
        labelled_counters(
            e,
            "cachetail_rule_invalidations",
            "Keys and tags each rule named (rule: its index in the config in force).",
            config
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| (rule_labels(i, r), load(&r.invalidations)))
                .collect(),
        )?;
        labelled_counters(
            e,
            "cachetail_rule_recomputes",
            "Keys each rule had recomputed (write-through, write-behind).",
            config
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| (rule_labels(i, r), load(&r.recomputes)))
                .collect(),
        )?;
        let per_family = |pick: fn(&crate::config::FamilyStats) -> &AtomicU64| {
            config
                .families
                .iter()
                .map(|f| {
                    (
                        vec![("family", f.pattern.source().to_owned())],
                        load(pick(&f.stats)),
                    )
                })
                .collect::<Vec<_>>()
        };
        labelled_counters(
            e,
            "cachetail_hits",
            "Reads answered from the cache.",
            per_family(|s| &s.hits),
        )?;
        labelled_counters(
            e,
            "cachetail_misses",
            "Reads that filled from the database.",
            per_family(|s| &s.misses),
        )?;
        labelled_counters(
            e,
            "cachetail_fills",
            "Values computed.",
            per_family(|s| &s.fills),
        )?;
        counter(
            e,
            "cachetail_fill_errors",
            "Fills whose query failed.",
            load(&stats.fill_errors),
        )?;
        stats.fill_seconds.encode(e.encode_descriptor(
            "cachetail_fill_duration_seconds",
            "How long a fill's query took.",
            None,
            stats.fill_seconds.metric_type(),
        )?)?;
        stats.fresh_seconds.encode(e.encode_descriptor(
            "cachetail_commit_to_fresh_seconds",
            "From a write (its captured time, millisecond precision) to its cache actions done.",
            None,
            stats.fresh_seconds.metric_type(),
        )?)?;
        gauge(
            e,
            "cachetail_write_behind_queue_depth",
            "Keys waiting for a write-behind recompute.",
            shared.write_behind.depth() as f64,
        )?;
        counter(
            e,
            "cachetail_apply_errors",
            "Batches that failed and were retried.",
            load(&stats.apply_errors),
        )?;
        let reload = shared.reload_state();
        counter(
            e,
            "cachetail_reloads",
            "Config reloads that took effect.",
            reload.reloads,
        )?;
        counter(
            e,
            "cachetail_reload_failures",
            "Config reloads refused (the running config stayed).",
            reload.failures,
        )?;
        counter(
            e,
            "cachetail_capture_reinstalls",
            "Capture trigger (re)installs after start (migrations, reloads, pause/resume).",
            load(&stats.reinstalls),
        )?;
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        gauge(
            e,
            "cachetail_active",
            "1 while this daemon holds the lease and applies; 0 on a standby.",
            flag(shared.active.load(Ordering::Acquire)),
        )?;
        gauge(
            e,
            "cachetail_paused",
            "1 while capture is paused.",
            flag(shared.paused.load(Ordering::Acquire)),
        )?;
        if let Some(redis) = &shared.redis {
            gauge(
                e,
                "cachetail_redis_up",
                "1 while Redis answers.",
                flag(redis.health().down_since.is_none()),
            )?;
        }
        Ok(())
    }
}
