//! Verify: recompute a sample of cached values from the database and report any that differ.
//!
//! A cached value is compared with a fresh computation at a point the daemon has applied: read
//! the outbox head H, wait until the cursor reaches H, take the cached value, recompute it, and
//! compare only if the recompute read at H too (nothing committed in between). That is how an
//! operator proves the cache right in production (`cachetail verify`, `POST /v1/verify`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Sources;
use crate::api::VerifyReport;
use crate::db::{compute, read_head};
use crate::escape::Escaped;

/// Attempts per key: the database may change between the applied point and the recompute.
const ATTEMPTS: usize = 5;

/// Verifies up to `sample` cached values, until `stop` is set (the request went away). Blocking:
/// run it on a blocking thread.
pub fn verify(sources: &Sources, sample: usize, wait: Duration, stop: &AtomicBool) -> VerifyReport {
    let mut report = VerifyReport::default();
    let keys = sources.cache.sample(sample).unwrap_or_else(|e| {
        tracing::warn!(error = %Escaped(&e), "verify cannot list the cached keys");
        Vec::new()
    });
    for key in keys {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match verify_key(sources, &key, wait) {
            Outcome::Fresh => report.checked += 1,
            Outcome::Stale => {
                report.checked += 1;
                report.stale += 1;
                if report.stale_keys.len() < 20 {
                    report.stale_keys.push(key.to_string());
                }
                tracing::error!(key = %Escaped(&key), "verify found a stale cached value");
            }
            Outcome::Gone => report.gone += 1,
            Outcome::Unverified => report.unverified += 1,
        }
    }
    sources.verify.verified.add(report.checked);
    sources.verify.stale_found.add(report.stale);
    report
}

enum Outcome {
    Fresh,
    Stale,
    Gone,
    Unverified,
}

fn verify_key(sources: &Sources, key: &Arc<str>, wait: Duration) -> Outcome {
    let live = sources.registry.live();
    let Some((family, params)) = live.match_key(key) else {
        return Outcome::Gone;
    };
    for _ in 0..ATTEMPTS {
        let Ok(head) = sources.pool.read_blocking(read_head) else {
            return Outcome::Unverified;
        };
        if !wait_applied(sources, head, wait) {
            return Outcome::Unverified;
        }
        let cached = match sources.cache.stored(key) {
            Ok(Some(cached)) => cached,
            Ok(None) => return Outcome::Gone,
            Err(_) => return Outcome::Unverified,
        };
        let (def, params) = (Arc::clone(&family.def), params.clone());
        let Ok(fresh) = sources
            .pool
            .read_blocking(move |conn| compute(conn, &def.query, def.many, &params))
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

fn wait_applied(sources: &Sources, head: u64, wait: Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    let mut applied = sources.progress.subscribe();
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
