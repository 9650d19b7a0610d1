//! `GET /metrics`: the counters the stages keep, as Prometheus (OpenMetrics) text, encoded by
//! `prometheus-client` from a snapshot at scrape time (the hot paths only bump atomics). The
//! plain counters come from `COUNTS`, the one list `/v1/status` reads too.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::{COUNTS, Sources};
use crate::counters::now_ms;
use crate::registry::{FamilyCounters, Live};
use crate::tail::Backlog;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics now; `backlog` is None when the outbox could not be read.
pub fn render(sources: Sources, backlog: Option<Backlog>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot { sources, backlog }));
    let mut text = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

struct Snapshot {
    sources: Sources,
    backlog: Option<Backlog>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Snapshot")
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let e = &mut encoder;
        let live = self.sources.registry.live();
        for count in COUNTS {
            if let Some((name, help)) = count.metric {
                counter(e, name, help, (count.read)(&self.sources))?;
            }
        }
        self.progress(e)?;
        rules(e, &live)?;
        families(e, &live)?;
        self.latencies(e)?;
        self.state(e)
    }
}

impl Snapshot {
    /// Where the tail stands: lag and cursor.
    fn progress(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let progress = &self.sources.progress;
        let lag = self.backlog.map_or(0, |b| b.events());
        gauge(
            e,
            "cachetail_lag_events",
            "Changes committed but not applied yet.",
            lag as f64,
        )?;
        let lag_seconds = self
            .backlog
            .map_or(0.0, |b| b.seconds(progress.caught_up_at_ms(), now_ms()));
        gauge(
            e,
            "cachetail_lag_seconds",
            "How long the oldest change not applied yet has waited, in seconds.",
            lag_seconds,
        )?;
        let cursor = self
            .backlog
            .map_or_else(|| progress.applied(), |b| b.cursor);
        gauge(
            e,
            "cachetail_cursor",
            "The last applied outbox id.",
            cursor as f64,
        )
    }

    fn latencies(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let fill = self.sources.cache.counters().fill_latency.histogram();
        fill.encode(e.encode_descriptor(
            "cachetail_fill_duration_seconds",
            "How long a fill's query took.",
            None,
            fill.metric_type(),
        )?)?;
        let fresh = self.sources.tail.fresh.histogram();
        fresh.encode(e.encode_descriptor(
            "cachetail_commit_to_fresh_seconds",
            "From a write (its captured time, millisecond precision) to its cache actions done.",
            None,
            fresh.metric_type(),
        )?)
    }

    /// The write-behind queue, reloads, reinstalls, role, pause, Redis.
    fn state(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let s = &self.sources;
        gauge(
            e,
            "cachetail_write_behind_queue_depth",
            "Keys waiting for a write-behind recompute.",
            s.write_behind.depth() as f64,
        )?;
        let reload = s.registry.reload_log();
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
            s.tail.reinstalls.get(),
        )?;
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        gauge(
            e,
            "cachetail_active",
            "1 while this daemon holds the lease and applies; 0 on a standby.",
            flag(s.progress.is_active()),
        )?;
        gauge(
            e,
            "cachetail_paused",
            "1 while capture is paused.",
            flag(s.progress.is_paused()),
        )?;
        if let Some((used, bound)) = s.cache.bytes() {
            gauge(
                e,
                "cachetail_cache_bytes",
                "The bytes cached values take, as [cache] max_bytes counts them.",
                used as f64,
            )?;
            gauge(
                e,
                "cachetail_cache_max_bytes",
                "The bound [cache] max_bytes sets.",
                bound as f64,
            )?;
        }
        if let Some((_, _, health)) = s.cache.remote_health() {
            gauge(
                e,
                "cachetail_redis_up",
                "1 while Redis answers.",
                flag(health.down_since.is_none()),
            )?;
        }
        Ok(())
    }
}

/// Per rule (label `rule`: its index in the config in force), what it named and recomputed.
fn rules(e: &mut DescriptorEncoder<'_>, live: &Live) -> fmt::Result {
    let labels = |index: usize| {
        let rule = &live.config.rules[index];
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
        live.rules
            .iter()
            .enumerate()
            .map(|(i, r)| (labels(i), r.invalidations.get()))
            .collect(),
    )?;
    labelled_counters(
        e,
        "cachetail_rule_recomputes",
        "Keys each rule had recomputed (write-through, write-behind).",
        live.rules
            .iter()
            .enumerate()
            .map(|(i, r)| (labels(i), r.recomputes.get()))
            .collect(),
    )
}

/// Per family (label `family`: its pattern), hits, misses and fills.
fn families(e: &mut DescriptorEncoder<'_>, live: &Live) -> fmt::Result {
    let per_family = |pick: fn(&FamilyCounters) -> u64| {
        live.families
            .iter()
            .map(|f| {
                let labels = vec![("family", f.def.pattern.source().to_owned())];
                (labels, pick(&f.counters))
            })
            .collect::<Vec<_>>()
    };
    labelled_counters(
        e,
        "cachetail_hits",
        "Reads answered from the cache.",
        per_family(|c| c.hits.get()),
    )?;
    labelled_counters(
        e,
        "cachetail_misses",
        "Reads that filled from the database.",
        per_family(|c| c.misses.get()),
    )?;
    labelled_counters(
        e,
        "cachetail_fills",
        "Values computed.",
        per_family(|c| c.fills.get()),
    )
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
