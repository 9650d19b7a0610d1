//! Warm start: a family may name a query listing keys to prefill (`warm = "SELECT id FROM books
//! ORDER BY ... LIMIT 1000"`). At start, while the daemon already serves, those keys are filled
//! through the normal fill path (so the stale-fill guard holds), a few at a time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rusqlite::Connection;
use rusqlite::types::Value;

use crate::config::Family;
use crate::fill;
use crate::state::Shared;

/// Fills running at once, at most: warming must not crowd out the app's own reads.
const CONCURRENCY: usize = 4;

/// Progress, shown in `/v1/status` under `warm`.
#[derive(Debug, Default)]
pub struct WarmProgress {
    pub total: AtomicU64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub finished: AtomicBool,
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
pub async fn run(shared: Arc<Shared>) {
    let config = shared.config();
    let families: Vec<Arc<Family>> = config
        .families
        .iter()
        .filter(|f| f.warm.is_some())
        .cloned()
        .collect();
    let progress = &shared.warm;
    if families.is_empty() {
        progress.finished.store(true, Ordering::Release);
        return;
    }
    let mut listed: Vec<(Arc<Family>, String)> = Vec::new();
    for family in families {
        let lister = Arc::clone(&family);
        match shared.read(move |conn| keys(conn, &lister)).await {
            Ok(keys) => listed.extend(keys.into_iter().map(|k| (Arc::clone(&family), k))),
            Err(e) => tracing::warn!(family = %family.pattern, error = %e, "the warm query failed"),
        }
    }
    progress.total.store(listed.len() as u64, Ordering::Release);
    tracing::info!(keys = listed.len(), "warm start: filling");
    let limit = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut fills = tokio::task::JoinSet::new();
    for (family, key) in listed {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            break;
        };
        let shared = Arc::clone(&shared);
        fills.spawn(async move {
            let _permit = permit;
            let params = family.pattern.match_key(&key);
            let ok = match params {
                Some(params) => fill::fill(&shared, Arc::from(key.as_str()), &family, params)
                    .await
                    .is_ok(),
                None => false,
            };
            let progress = &shared.warm;
            if !ok {
                progress.failed.fetch_add(1, Ordering::Relaxed);
            }
            let done = progress.done.fetch_add(1, Ordering::Relaxed) + 1;
            let total = progress.total.load(Ordering::Relaxed);
            if done.is_multiple_of(1000) || done == total {
                tracing::info!(done, total, "warm start");
            }
        });
        while fills.try_join_next().is_some() {}
    }
    while fills.join_next().await.is_some() {}
    progress.finished.store(true, Ordering::Release);
    tracing::info!(
        filled = progress.done.load(Ordering::Relaxed) - progress.failed.load(Ordering::Relaxed),
        failed = progress.failed.load(Ordering::Relaxed),
        "warm start done"
    );
}
