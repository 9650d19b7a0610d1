//! What the daemon reports about itself: the body of `GET /v1/status`, and the lighter snapshot
//! the live feed (`/v1/events`, the dashboard) sends every second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::config::Family;
use crate::latency::now_ms;
use crate::state::Shared;
use crate::tail;

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A family's counters: hits, misses, fills and the mean time of its queries, with its pattern
/// under `name`.
fn counters(family: &Family, name: &str) -> Map<String, Value> {
    let stats = &family.stats;
    let runs = load(&stats.computes);
    let mean_fill_ms =
        (runs > 0).then(|| load(&stats.compute_micros) as f64 / runs as f64 / 1000.0);
    let mut map = Map::new();
    map.insert(name.into(), json!(family.pattern.source()));
    map.insert("hits".into(), json!(load(&stats.hits)));
    map.insert("misses".into(), json!(load(&stats.misses)));
    map.insert("fills".into(), json!(load(&stats.fills)));
    map.insert("mean_fill_ms".into(), json!(mean_fill_ms));
    map
}

fn role(shared: &Shared) -> &'static str {
    if shared.active.load(Ordering::Acquire) {
        "active"
    } else {
        "standby"
    }
}

fn backend(shared: &Shared) -> &'static str {
    if shared.redis.is_some() {
        "redis"
    } else {
        "memory"
    }
}

/// The snapshot the live feed sends every second: the moving numbers, not the config.
pub async fn live(shared: &Arc<Shared>) -> Value {
    let backlog = read_backlog(shared).await.ok();
    let s = &shared.stats;
    let config = shared.config();
    let reload = shared.reload_state();
    let families: Vec<_> = config
        .families
        .iter()
        .map(|f| Value::Object(counters(f, "family")))
        .collect();
    json!({
        "type": "status",
        "cursor": backlog.map_or_else(|| shared.applied(), |b| b.cursor),
        "head": backlog.map(|b| b.head),
        "lag": backlog.map(|b| b.events()),
        "lag_seconds": backlog.map(|b| b.seconds(load(&s.caught_up_at_ms), now_ms())),
        "events": load(&s.events),
        "hits": load(&s.hits),
        "misses": load(&s.misses),
        "fills": load(&s.fills),
        "fill_errors": load(&s.fill_errors),
        "write_behind_queue": shared.write_behind.depth(),
        "latency": latencies(shared),
        "role": role(shared),
        "backend": backend(shared),
        "redis_ok": shared.redis.as_ref().map(|r| r.health().down_since.is_none()),
        "paused": shared.paused.load(Ordering::Acquire),
        "reloads": reload.reloads,
        "reload_failures": reload.failures,
        "last_reload_error": reload.last_error,
        "families": families,
        "now_ms": now_ms(),
    })
}

/// The outbox's backlog behind the applied position (one read on the pool).
pub async fn read_backlog(shared: &Arc<Shared>) -> Result<tail::Backlog, String> {
    let cursor = shared.applied();
    shared.read(move |conn| tail::backlog(conn, cursor)).await
}

/// The recent commit → fresh and fill-time percentiles, over the last minute.
pub fn latencies(shared: &Shared) -> Value {
    let now = now_ms();
    let minute = Duration::from_secs(60);
    json!({
        "window_seconds": minute.as_secs(),
        "commit_to_fresh": shared.stats.fresh_recent.summary(now, minute),
        "fill": shared.stats.fill_recent.summary(now, minute),
    })
}

/// The body of `GET /v1/status`.
pub async fn full(shared: &Arc<Shared>) -> Value {
    let backlog = read_backlog(shared).await;
    let cursor = backlog
        .as_ref()
        .map_or_else(|_| shared.applied(), |b| b.cursor);
    let (head, head_error) = match &backlog {
        Ok(b) => (Some(b.head), None),
        Err(e) => (None, Some(e.clone())),
    };
    let s = &shared.stats;
    let lag_seconds = backlog
        .as_ref()
        .ok()
        .map(|b| b.seconds(load(&s.caught_up_at_ms), now_ms()));
    let config = shared.config();
    let reload = shared.reload_state();
    let families: Vec<_> = config
        .families
        .iter()
        .map(|f| {
            let mut family = counters(f, "pattern");
            family.insert("many".into(), json!(f.many));
            family.insert("ttl_ms".into(), json!(f.ttl.as_millis() as u64));
            let tags: Vec<_> = f.tags.iter().map(|t| t.source()).collect();
            family.insert("tags".into(), json!(tags));
            Value::Object(family)
        })
        .collect();
    let rules: Vec<_> = config
        .rules
        .iter()
        .map(|r| {
            json!({
                "table": r.table,
                "on": r.on.iter().map(|o| o.name()).collect::<Vec<_>>(),
                "keys": r.keys.iter().map(|k| k.source()).collect::<Vec<_>>(),
                "tags": r.tags.iter().map(|t| t.source()).collect::<Vec<_>>(),
                "strategy": r.strategy.name(),
                "derived_from": r.derived_from,
            })
        })
        .collect();
    let (entries, redis) = match &shared.redis {
        None => (Some(shared.cache.entry_count()), Value::Null),
        Some(redis) => {
            let groups: Vec<String> = config.families.iter().map(|f| f.group.clone()).collect();
            let count = redis.count(&groups).await;
            let health = redis.health();
            let since = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            (
                count.as_ref().ok().copied(),
                json!({
                    "address": redis.address(),
                    "prefix": redis.prefix,
                    "ok": health.down_since.is_none() && count.is_ok(),
                    "down_since": health.down_since.map(since),
                    "last_error": health.last_error,
                    "outages": health.outages,
                }),
            )
        }
    };
    json!({
        "role": role(shared),
        "backend": backend(shared),
        "redis": redis,
        "cursor": cursor,
        "head": head,
        "lag": backlog.as_ref().ok().map(tail::Backlog::events),
        "lag_seconds": lag_seconds,
        "latency": latencies(shared),
        "head_error": head_error,
        "events": load(&s.events),
        "batches": load(&s.batches),
        "invalidations": load(&s.invalidations),
        "tag_invalidations": load(&s.tag_invalidations),
        "recomputes": load(&s.recomputes),
        "hits": load(&s.hits),
        "misses": load(&s.misses),
        "fills": load(&s.fills),
        "fill_errors": load(&s.fill_errors),
        "apply_errors": load(&s.apply_errors),
        "verified": load(&s.verified),
        "stale_found": load(&s.stale_found),
        "entries": entries,
        "write_behind_queue": shared.write_behind.depth(),
        "warm": {
            "total": load(&shared.warm.total),
            "done": load(&shared.warm.done),
            "failed": load(&shared.warm.failed),
            "finished": shared.warm.finished.load(Ordering::Acquire),
        },
        "paused": shared.paused.load(Ordering::Acquire),
        "capture_failures": shared
            .capture_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(table, reason)| json!({"table": table, "error": reason}))
            .collect::<Vec<_>>(),
        "config": {
            "tracking_gaps": crate::check::tracking_gaps(&config),
            "path": config.path.as_ref().map(|p| p.display().to_string()),
            "database": config.database.display().to_string(),
            "loaded_at": reload.loaded_at.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
            "reloads": reload.reloads,
            "reload_failures": reload.failures,
            "last_reload_error": reload.last_error,
            "families": families,
            "rules": rules,
        },
        "now": now_ms() / 1000,
    })
}
