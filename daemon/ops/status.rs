//! The body of `GET /v1/status`, and the lighter snapshot the live feed (`/v1/events`, the
//! dashboard) sends every second.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{COUNTS, Sources};
use crate::api::{
    CaptureFailure, ConfigStatus, FamilyCounts, FamilyStatus, FeedFamily, Latencies, LiveStatus,
    Maintained, RemoteStatus, RuleStatus, Status, Warm,
};
use crate::config::tracking_gaps;
use crate::counters::now_ms;
use crate::registry::{FamilyState, Live};
use crate::tail::{Backlog, backlog};

/// The outbox's backlog behind the applied position (one read on the pool).
pub async fn read_backlog(sources: &Sources) -> Result<Backlog, String> {
    let cursor = sources.progress.applied();
    sources
        .pool
        .read(move |conn| backlog(conn, cursor))
        .await
        .map_err(|e| e.to_string())
}

/// The body of `GET /v1/status`.
pub async fn full(sources: &Sources) -> Status {
    let backlog = read_backlog(sources).await;
    let (entries, remote) = cache_status(sources).await;
    let bytes = sources.cache.bytes();
    let live = sources.registry.live();
    let warm = &sources.warm;
    Status {
        role: role(sources).to_owned(),
        backend: sources.cache.backend().to_owned(),
        remote,
        cursor: backlog
            .as_ref()
            .map_or_else(|_| sources.progress.applied(), |b| b.cursor),
        head: backlog.as_ref().ok().map(|b| b.head),
        lag: backlog.as_ref().ok().map(Backlog::events),
        lag_seconds: backlog.as_ref().ok().map(|b| lag_seconds(sources, b)),
        latency: latencies(sources),
        head_error: backlog.as_ref().err().cloned(),
        counters: counters(sources, false),
        entries,
        bytes: bytes.map(|(used, _)| used),
        max_bytes: bytes.map(|(_, bound)| bound),
        write_behind_queue: sources.write_behind.depth() as u64,
        warm: Warm {
            total: warm.total.get(),
            done: warm.done.get(),
            failed: warm.failed.get(),
            finished: warm.finished(),
        },
        paused: sources.progress.is_paused(),
        capture_failures: sources
            .progress
            .capture_failures()
            .into_iter()
            .map(|(table, error)| CaptureFailure { table, error })
            .collect(),
        config: config_status(sources, &live),
        now: now_ms() / 1000,
    }
}

/// The snapshot the live feed sends every second: the moving numbers, not the config.
pub async fn live(sources: &Sources) -> LiveStatus {
    let backlog = read_backlog(sources).await.ok();
    let live = sources.registry.live();
    let reload = sources.registry.reload_log();
    LiveStatus {
        cursor: backlog.map_or_else(|| sources.progress.applied(), |b| b.cursor),
        head: backlog.map(|b| b.head),
        lag: backlog.map(|b| b.events()),
        lag_seconds: backlog.map(|b| lag_seconds(sources, &b)),
        counters: counters(sources, true),
        write_behind_queue: sources.write_behind.depth() as u64,
        latency: latencies(sources),
        role: role(sources).to_owned(),
        backend: sources.cache.backend().to_owned(),
        remote_ok: sources
            .cache
            .remote_health()
            .map(|(_, _, health)| health.down_since.is_none()),
        paused: sources.progress.is_paused(),
        reloads: reload.reloads,
        reload_failures: reload.failures,
        last_reload_error: reload.last_error,
        families: live
            .families
            .iter()
            .map(|f| FeedFamily {
                family: f.def.pattern.source().to_owned(),
                counters: family_counts(f),
            })
            .collect(),
        now_ms: now_ms(),
    }
}

/// The counters of `COUNTS` (only those the feed carries, for the feed), by name.
fn counters(sources: &Sources, feed: bool) -> BTreeMap<String, u64> {
    COUNTS
        .iter()
        .filter(|count| count.feed || !feed)
        .map(|count| (count.status.to_owned(), (count.read)(sources)))
        .collect()
}

fn role(sources: &Sources) -> &'static str {
    if sources.progress.is_active() {
        "active"
    } else {
        "standby"
    }
}

fn lag_seconds(sources: &Sources, backlog: &Backlog) -> f64 {
    backlog.seconds(sources.progress.caught_up_at_ms(), now_ms())
}

/// The recent commit → fresh and fill-time percentiles, over the last minute.
pub fn latencies(sources: &Sources) -> Latencies {
    let now = now_ms();
    let minute = Duration::from_secs(60);
    Latencies {
        window_seconds: minute.as_secs(),
        commit_to_fresh: sources.tail.fresh.summary(now, minute),
        fill: sources.cache.counters().fill_latency.summary(now, minute),
    }
}

/// A family's counters, with the mean time of its queries.
fn family_counts(family: &FamilyState) -> FamilyCounts {
    let counters = &family.counters;
    let runs = counters.computes.get();
    FamilyCounts {
        hits: counters.hits.get(),
        misses: counters.misses.get(),
        fills: counters.fills.get(),
        mean_fill_ms: (runs > 0)
            .then(|| counters.compute_micros.get() as f64 / runs as f64 / 1000.0),
    }
}

/// A maintained family's shape and state (None for a family recomputed as a whole).
fn maintained(family: &FamilyState) -> Option<Maintained> {
    let shape = family.def.maintain.as_deref()?;
    let counters = &family.counters;
    Some(Maintained {
        shape: shape.name().to_owned(),
        state_rows: counters.state_rows.get(),
        state_bytes: counters.state_bytes.get(),
        state_builds: counters.state_builds.get(),
        incremental: counters.incremental.get(),
        recomputed: counters.recomputed.get(),
    })
}

/// How many values are cached, and Redis's state (None on the memory backend).
async fn cache_status(sources: &Sources) -> (Option<u64>, Option<RemoteStatus>) {
    let count = sources.cache.count().await;
    let remote = sources
        .cache
        .remote_health()
        .map(|(address, prefix, health)| RemoteStatus {
            address,
            prefix,
            ok: health.down_since.is_none() && count.is_ok(),
            down_since: health.down_since.map(unix_seconds),
            last_error: health.last_error,
            outages: health.outages,
        });
    (count.ok(), remote)
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The config in force: where it came from, its reloads, its families and rules.
fn config_status(sources: &Sources, live: &Live) -> ConfigStatus {
    let config = &live.config;
    let reload = sources.registry.reload_log();
    ConfigStatus {
        tracking_gaps: tracking_gaps(config, &live.reads),
        path: config.path.as_ref().map(|p| p.display().to_string()),
        database: config.database.display().to_string(),
        loaded_at: reload.loaded_at.map(unix_seconds),
        reloads: reload.reloads,
        reload_failures: reload.failures,
        last_reload_error: reload.last_error,
        families: live
            .families
            .iter()
            .map(|f| FamilyStatus {
                pattern: f.def.pattern.source().to_owned(),
                counters: family_counts(f),
                many: f.def.many,
                ttl_ms: f.def.ttl.as_millis() as u64,
                tags: f.def.tags.iter().map(|t| t.source().to_owned()).collect(),
                maintained: maintained(f),
            })
            .collect(),
        rules: config
            .rules
            .iter()
            .map(|r| RuleStatus {
                table: r.table.clone(),
                on: r.on.iter().map(|o| o.name().to_owned()).collect(),
                keys: r.keys.iter().map(|k| k.source().to_owned()).collect(),
                tags: r.tags.iter().map(|t| t.source().to_owned()).collect(),
                strategy: r.strategy.name().to_owned(),
                derived_from: r.derived_from.clone(),
            })
            .collect(),
    }
}
