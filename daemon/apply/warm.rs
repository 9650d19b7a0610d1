//! Warm start: a family may name a query listing keys to prefill (`warm = "SELECT id FROM books
//! ORDER BY ... LIMIT 1000"`). At start, while the daemon already serves, those keys are filled
//! through the normal fill path (so the stale-fill guard holds), a few at a time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rusqlite::Connection;
use rusqlite::types::Value;

use crate::cache::Cache;
use crate::config::Family;
use crate::counters::Counter;
use crate::db::ReadPool;
use crate::escape::Escaped;
use crate::registry::{FamilyState, Registry};

/// Fills running at once, at most: warming must not crowd out the app's own reads.
const CONCURRENCY: usize = 4;

/// Progress, shown in `/v1/status` under `warm`.
#[derive(Debug, Default)]
pub struct WarmProgress {
    pub total: Counter,
    pub done: Counter,
    pub failed: Counter,
    finished: AtomicBool,
}

impl WarmProgress {
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
}

/// The keys a family's warm query lists. Blocking.
pub fn keys(conn: &Connection, family: &Family) -> rusqlite::Result<Vec<String>> {
    let Some(query) = &family.warm else {
        return Ok(Vec::new());
    };
    let mut stmt = conn.prepare(query)?;
    let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let params = family.pattern.params();
    // A pattern with one placeholder takes a one-column query's column whatever its name.
    let single = (params.len() == 1 && names.len() == 1).then(|| params[0].to_owned());
    let mut rows = stmt.query([])?;
    let mut keys = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values: HashMap<&str, Value> = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            let value: Value = row.get(i)?;
            match &single {
                Some(param) => values.insert(param.as_str(), value),
                None => values.insert(name.as_str(), value),
            };
        }
        if let Some(key) = family.pattern.render(|name| values.get(name)) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Warms every family that has a warm query; returns when done.
pub async fn run(
    cache: Arc<Cache>,
    registry: Arc<Registry>,
    pool: Arc<ReadPool>,
    progress: Arc<WarmProgress>,
) {
    let live = registry.live();
    let families: Vec<Arc<FamilyState>> = live
        .families
        .iter()
        .filter(|f| f.def.warm.is_some())
        .cloned()
        .collect();
    if families.is_empty() {
        progress.finished.store(true, Ordering::Release);
        return;
    }
    let mut listed: Vec<(Arc<FamilyState>, String)> = Vec::new();
    for family in families {
        let def = Arc::clone(&family.def);
        match pool.read(move |conn| keys(conn, &def)).await {
            Ok(keys) => listed.extend(keys.into_iter().map(|k| (Arc::clone(&family), k))),
            Err(e) => {
                tracing::warn!(family = %family.def.pattern, error = %Escaped(&e), "the warm query failed")
            }
        }
    }
    progress.total.set(listed.len() as u64);
    tracing::info!(keys = listed.len(), "warm start: filling");
    let limit = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut fills = tokio::task::JoinSet::new();
    for (family, key) in listed {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            break;
        };
        let (cache, progress) = (Arc::clone(&cache), Arc::clone(&progress));
        fills.spawn(async move {
            let _permit = permit;
            warm_one(&cache, &family, &key, &progress).await;
        });
        while fills.try_join_next().is_some() {}
    }
    while fills.join_next().await.is_some() {}
    progress.finished.store(true, Ordering::Release);
    tracing::info!(
        filled = progress.done.get() - progress.failed.get(),
        failed = progress.failed.get(),
        "warm start done"
    );
}

/// Fills one listed key through the normal fill path, so the stale-fill guard holds.
async fn warm_one(
    cache: &Arc<Cache>,
    family: &Arc<FamilyState>,
    key: &str,
    progress: &WarmProgress,
) {
    let ok = match family.def.pattern.match_key(key) {
        Some(params) => cache.fill(Arc::from(key), family, params).await.is_ok(),
        None => false,
    };
    if !ok {
        progress.failed.inc();
    }
    progress.done.inc();
    let (done, total) = (progress.done.get(), progress.total.get());
    if done.is_multiple_of(1000) || done == total {
        tracing::info!(done, total, "warm start");
    }
}
