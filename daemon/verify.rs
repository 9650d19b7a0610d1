//! Verify: recompute a sample of cached values from the database and report any that differ.
//!
//! A cached value is compared with a fresh computation at a point the daemon has applied: read
//! the outbox head H, wait until the cursor reaches H, take the cached value, recompute it, and
//! compare only if the recompute read at H too (nothing committed in between). That is how an
//! operator proves the cache right in production (`cachetail verify`, `POST /v1/verify`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use crate::fill;
use crate::state::Shared;
use crate::tail;

/// Attempts per key before it counts as unverified (the database kept changing under it).
const ATTEMPTS: usize = 5;

#[derive(Debug, Default, Clone, Serialize)]
pub struct VerifyReport {
    /// Cached values compared with the database.
    pub checked: u64,
    /// Values that differed from the database: stale entries.
    pub stale: u64,
    /// Keys sampled but gone from the cache by the time they were compared (nothing to check).
    pub gone: u64,
    /// Keys that could not be compared because the database kept changing, or a query failed.
    pub unverified: u64,
    /// The first stale keys, for a look.
    pub stale_keys: Vec<String>,
}

/// Verifies up to `sample` cached values. Blocking: run it on a blocking thread.
pub fn verify(shared: &Shared, sample: usize, wait: Duration) -> VerifyReport {
    let mut report = VerifyReport::default();
    let keys: Vec<Arc<str>> = match &shared.redis {
        None => shared.cache.keys(sample),
        Some(redis) => {
            let groups: Vec<String> = shared
                .config()
                .families
                .iter()
                .map(|f| f.group.clone())
                .collect();
            match redis.keys(&groups, sample) {
                Ok(keys) => keys.into_iter().map(Arc::from).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "verify cannot list the keys in redis");
                    Vec::new()
                }
            }
        }
    };
    for key in keys {
        match verify_key(shared, &key, wait) {
            Outcome::Fresh => report.checked += 1,
            Outcome::Stale => {
                report.checked += 1;
                report.stale += 1;
                if report.stale_keys.len() < 20 {
                    report.stale_keys.push(key.to_string());
                }
                tracing::error!(key = %key, "verify found a stale cached value");
            }
            Outcome::Gone => report.gone += 1,
            Outcome::Unverified => report.unverified += 1,
        }
    }
    shared
        .stats
        .verified
        .fetch_add(report.checked, Ordering::Relaxed);
    shared
        .stats
        .stale_found
        .fetch_add(report.stale, Ordering::Relaxed);
    report
}

enum Outcome {
    Fresh,
    Stale,
    Gone,
    Unverified,
}

fn verify_key(shared: &Shared, key: &Arc<str>, wait: Duration) -> Outcome {
    let config = shared.config();
    let Some((family, params)) = config.match_key(key) else {
        return Outcome::Gone;
    };
    for _ in 0..ATTEMPTS {
        let Ok(head) = shared.pool.with(tail::head) else {
            return Outcome::Unverified;
        };
        if !wait_applied(shared, head, wait) {
            return Outcome::Unverified;
        }
        let cached = match &shared.redis {
            None => shared.cache.get(key).map(|entry| entry.body.clone()),
            Some(redis) => match redis.get_blocking(key) {
                Ok(body) => body.map(Some),
                Err(_) => return Outcome::Unverified,
            },
        };
        let Some(cached) = cached else {
            return Outcome::Gone;
        };
        let Ok(fresh) = shared
            .pool
            .with(|conn| fill::compute(conn, family, &params))
        else {
            return Outcome::Unverified;
        };
        if fresh.version == head {
            return if fresh.body == cached {
                Outcome::Fresh
            } else {
                Outcome::Stale
            };
        }
    }
    Outcome::Unverified
}

fn wait_applied(shared: &Shared, head: u64, wait: Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    let mut applied = shared.applied.subscribe();
    loop {
        if *applied.borrow_and_update() >= head {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        // A blocking thread: poll the watch channel briefly rather than park a runtime.
        std::thread::sleep(Duration::from_millis(1));
    }
}
