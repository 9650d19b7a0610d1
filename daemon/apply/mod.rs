//! Apply: carry out a batch's plan, per strategy, through the cache.
//!
//! - delete: remove the key (and supersede its fill in flight).
//! - write-through: recompute the key now, on the applying thread, before the cursor moves: the
//!   next read is a fresh hit. A key no family matches is removed instead.
//! - write-behind: remove now, queue a recompute; a key queued twice within the delay is
//!   recomputed once, by a bounded pool of workers (`write_behind`).
//! - tags and flushes: marks, O(1) however many keys they cover (see `cache`).
//!
//! Warm start (`warm`) fills the keys a family lists at start through the same fill path.

use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::Connection;

use crate::cache::{Cache, StoreError};
use crate::counters::Counter;
use crate::registry::Live;
use crate::types::{Change, Plan, Strategy};

pub mod lookups;
pub mod maintained;
pub mod warm;
pub mod write_behind;

use maintained::Maintainer;

pub use warm::WarmProgress;
pub use write_behind::WriteBehindQueue;

/// What applying did, for status and metrics.
#[derive(Debug, Default)]
pub struct ApplyCounters {
    /// Keys invalidated (each key once per batch), tags invalidated, and recomputes run
    /// (write-through and write-behind).
    pub invalidations: Counter,
    pub tag_invalidations: Counter,
    pub recomputes: Counter,
}

/// Applies plans: the tail's handle on the cache and the write-behind queue.
pub struct Applier {
    cache: Arc<Cache>,
    queue: Arc<WriteBehindQueue>,
    counters: Arc<ApplyCounters>,
    /// The incrementally maintained families' states (only the applying thread locks it).
    maintainer: Mutex<Maintainer>,
}

impl Applier {
    pub fn new(
        cache: Arc<Cache>,
        queue: Arc<WriteBehindQueue>,
        counters: Arc<ApplyCounters>,
    ) -> Applier {
        Applier {
            cache,
            queue,
            counters,
            maintainer: Mutex::default(),
        }
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Applies one batch's plan (for `changes`, which end at outbox position `last`); `cursor`
    /// is the position applied before it, `epoch` the lease epoch it is applied under. Blocking
    /// (write-through runs queries on `conn`): call it on the tail thread. Fails only when the
    /// Redis backend cannot be reached: the cursor must then stay where it is. `keep_lease` is
    /// called after each key's action (it renews the tail's lease when due): a batch of many
    /// write-through keys may take longer than the lease.
    pub fn apply(
        &self,
        (plan, changes): (&Plan, &[Change]),
        live: &Live,
        conn: &Connection,
        (cursor, last, epoch): (u64, u64, u64),
        keep_lease: &dyn Fn(),
    ) -> Result<(), StoreError> {
        let mut maintainer = self
            .maintainer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        maintainer.observe(live, conn, changes);
        keep_lease();
        self.cache.apply_plan(plan, live, cursor, last, epoch)?;
        keep_lease();
        self.counters.tag_invalidations.add(plan.tags.len() as u64);
        for (key, action) in &plan.keys {
            self.counters.invalidations.inc();
            match action.strategy {
                Strategy::Delete => {}
                Strategy::WriteBehind => {
                    if live.match_key(key).is_some() {
                        self.queue.push(key);
                    }
                }
                Strategy::WriteThrough => {
                    if let Some((family, params)) = live.match_key(key) {
                        self.counters.recomputes.inc();
                        if maintained::keeps_state(family) {
                            self.cache
                                .refresh_now_with(conn, key, family, &params, |conn| {
                                    maintainer.value(conn, family)
                                });
                        } else {
                            self.cache.refresh_now(conn, key, family, &params);
                        }
                    }
                }
            }
            keep_lease();
        }
        maintainer.settle_rest(live, conn);
        Ok(())
    }
}
