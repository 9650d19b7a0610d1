//! Apply: carry out a batch's plan on the cache, per strategy.
//!
//! - delete: remove the key (and supersede its fill in flight).
//! - write-through: recompute the key now, on the applying thread, before the cursor moves: the
//!   next read is a fresh hit. A key no family matches is removed instead.
//! - write-behind: remove now, queue a recompute; a key queued twice within the delay is
//!   recomputed once, by a bounded pool of workers.
//! - tags and flushes: marks (see `cache`), O(1) however many keys they cover.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{Config, Strategy};
use crate::fill;
use crate::redis_cache::{self, Invalidation};
use crate::resp::RedisError;
use crate::rules::Plan;
use crate::state::Shared;

/// Applies one batch's plan, which ends at outbox position `last`; `cursor` is the position
/// applied before it. Blocking (write-through runs queries): call it on the tail thread. Fails
/// only when the Redis backend cannot be reached: the cursor must then stay where it is.
pub fn apply(
    shared: &Shared,
    config: &Config,
    plan: &Plan,
    conn: &Connection,
    cursor: u64,
    last: u64,
) -> Result<(), RedisError> {
    let stats = &shared.stats;
    match &shared.redis {
        None => invalidate_in_memory(shared, config, plan),
        Some(redis) => {
            let mut batch = redis_batch(config, plan, last);
            batch.epoch = shared.epoch.load(Ordering::Acquire);
            redis.apply(&batch, cursor)?;
            // This daemon's own fills in flight are superseded too (the Redis marks would
            // refuse them anyway; this keeps stampedes from joining a doomed fill).
            for key in plan.keys.keys() {
                shared.cache.invalidate(key);
            }
        }
    }
    stats
        .tag_invalidations
        .fetch_add(plan.tags.len() as u64, Ordering::Relaxed);
    for (key, action) in &plan.keys {
        stats.invalidations.fetch_add(1, Ordering::Relaxed);
        match action.strategy {
            Strategy::Delete => {}
            Strategy::WriteBehind => {
                if config.match_key(key).is_some() {
                    shared.write_behind.push(key);
                }
            }
            Strategy::WriteThrough => {
                if let Some((family, params)) = config.match_key(key) {
                    stats.recomputes.fetch_add(1, Ordering::Relaxed);
                    fill::refresh_now(shared, conn, key, family, &params);
                }
            }
        }
    }
    Ok(())
}

fn invalidate_in_memory(shared: &Shared, config: &Config, plan: &Plan) {
    if let Some(position) = plan.flush_all {
        shared.cache.flush_all(position);
    }
    for (table, &position) in &plan.flush_tables {
        for family in config.families.iter().filter(|f| f.reads_table(table)) {
            family.floor.fetch_max(position, Ordering::AcqRel);
        }
    }
    for (tag, &position) in &plan.tags {
        shared.cache.invalidate_tag(tag, position);
    }
    for (key, action) in &plan.keys {
        // A write-through key keeps its value until the recompute lands (which supersedes any
        // fill in flight): removing it first would open a window of misses whose fills, once
        // superseded, could hand their waiters a value newer than the recompute stores.
        if action.strategy == Strategy::WriteThrough && config.match_key(key).is_some() {
            continue;
        }
        shared.cache.invalidate(key);
    }
}

/// The plan as one Redis invalidation: keys, tag groups, family groups (flushed tables), and
/// the message app-local caches receive.
fn redis_batch(config: &Config, plan: &Plan, last: u64) -> Invalidation {
    let mut groups: Vec<(String, u64)> = plan
        .tags
        .iter()
        .map(|(tag, &position)| (redis_cache::tag_group(tag), position))
        .collect();
    let mut families: Vec<&str> = Vec::new();
    for family in &config.families {
        let flushed = plan.flush_all.or_else(|| {
            plan.flush_tables
                .iter()
                .filter(|(table, _)| family.reads_table(table))
                .map(|(_, &position)| position)
                .max()
        });
        if let Some(position) = flushed {
            groups.push((family.group.clone(), position));
            families.push(family.pattern.source());
        }
    }
    let mut keys: Vec<String> = plan.keys.keys().cloned().collect();
    keys.sort_unstable();
    let mut tags: Vec<&str> = plan.tags.keys().map(String::as_str).collect();
    tags.sort_unstable();
    let key_names: Vec<&str> = keys.iter().map(String::as_str).collect();
    let message =
        redis_cache::fan_out_message(last, &key_names, &tags, &families, plan.flush_all.is_some());
    Invalidation {
        epoch: 0,
        position: last,
        keys,
        groups,
        floor: plan.flush_all.unwrap_or(0),
        message,
    }
}

/// While capture is paused, app writes go uncaptured, so nothing in Redis can be trusted: every
/// family's values are removed (and app-local caches told to drop everything), and fills that
/// read before `head` are refused. Resuming flushes the families again (the flush markers).
pub fn flush_redis_for_pause(
    shared: &Shared,
    config: &Config,
    cursor: u64,
    head: u64,
) -> Result<(), RedisError> {
    let Some(redis) = &shared.redis else {
        return Ok(());
    };
    let batch = Invalidation {
        position: cursor,
        keys: Vec::new(),
        groups: config
            .families
            .iter()
            .map(|f| (f.group.clone(), head.saturating_add(1)))
            .collect(),
        floor: head.saturating_add(1),
        message: redis_cache::fan_out_message(cursor, &[], &[], &[], true),
        epoch: shared.epoch.load(Ordering::Acquire),
    };
    redis.apply(&batch, cursor)
}

/// Retires the Redis groups of families a reload replaced: their values are removed and no fill
/// of theirs is stored again. Called by the tail (which retries on failure).
pub fn retire_families(shared: &Shared, cursor: u64) -> Result<(), RedisError> {
    let Some(redis) = &shared.redis else {
        return Ok(());
    };
    let pending = shared.retired_families();
    if pending.is_empty() {
        return Ok(());
    }
    let families: Vec<&str> = pending
        .iter()
        .map(|(pattern, _)| pattern.as_str())
        .collect();
    let message = redis_cache::fan_out_message(cursor, &[], &[], &families, false);
    let batch = Invalidation {
        position: cursor,
        keys: Vec::new(),
        groups: pending
            .iter()
            .map(|(_, group)| (group.clone(), redis_cache::RETIRED_MARK))
            .collect(),
        floor: 0,
        message,
        epoch: shared.epoch.load(Ordering::Acquire),
    };
    redis.apply(&batch, cursor)?;
    shared.forget_retired(&pending);
    Ok(())
}

/// Keys waiting for a write-behind recompute, each at most once.
pub struct WriteBehindQueue {
    delay: Duration,
    state: Mutex<Pending>,
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    keys: HashSet<String>,
    due: VecDeque<(Instant, String)>,
}

impl WriteBehindQueue {
    pub fn new(delay: Duration) -> WriteBehindQueue {
        WriteBehindQueue {
            delay,
            state: Mutex::new(Pending::default()),
            wake: Notify::new(),
        }
    }

    /// Queues a recompute of `key` after the delay, unless one is already queued.
    pub fn push(&self, key: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.keys.insert(key.to_owned()) {
            let was_empty = state.due.is_empty();
            state
                .due
                .push_back((Instant::now() + self.delay, key.to_owned()));
            if was_empty {
                self.wake.notify_waiters();
            }
        }
    }

    pub fn depth(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .due
            .len()
    }

    /// The next key that is due, or how long to wait for one (None: the queue is empty).
    fn take_due(&self) -> Result<String, Option<Instant>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.due.front() {
            None => Err(None),
            Some((at, _)) if *at > Instant::now() => Err(Some(*at)),
            Some(_) => {
                let (_, key) = state.due.pop_front().ok_or(None)?;
                state.keys.remove(&key);
                Ok(key)
            }
        }
    }
}

/// One write-behind worker: recomputes due keys until the daemon stops.
pub async fn write_behind_worker(shared: Arc<Shared>) {
    let queue = &shared.write_behind;
    loop {
        let notified = queue.wake.notified();
        match queue.take_due() {
            // Paused: nothing is cached (reads answer from the database).
            Ok(_) if shared.paused.load(Ordering::Acquire) => {}
            Ok(key) => {
                // A reader's miss may have refilled it since: then there is nothing to redo.
                if shared.redis.is_none() && shared.cache.get(&key).is_some() {
                    continue;
                }
                let config = shared.config();
                if let Some((family, params)) = config.match_key(&key) {
                    shared.stats.recomputes.fetch_add(1, Ordering::Relaxed);
                    let _ = fill::fill(&shared, Arc::from(key.as_str()), family, params).await;
                }
            }
            Err(None) => notified.await,
            Err(Some(at)) => {
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
        }
    }
}
