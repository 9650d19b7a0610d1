//! Invalidations, as each backend carries them out: a batch's plan (keys, tags, flushed
//! families, everything; operators' actions among them), a takeover (and its epoch's claim), a
//! pause, a reload's retirements.
//! In memory they are removals and marks (O(1) per tag or family); in Redis each is one
//! `Invalidation` run by one script, with its fan-out message.

use std::sync::Arc;

use super::redis::Invalidation;
use super::{Cache, Store, StoreError};
use crate::registry::{FamilyState, Live};
use crate::types::{Plan, Strategy};

impl Cache {
    /// Applies a batch's invalidations; the batch ends at outbox position `last`, `cursor` is the
    /// position applied before it, `epoch` this daemon's lease epoch (Redis refuses an older
    /// one). Blocking. Write-through keys keep their value in memory until their recompute
    /// lands (`refresh_now`): removing it first would open a window of misses whose fills, once
    /// superseded, could hand their waiters a value newer than the recompute stores. Fails only
    /// when Redis cannot apply it: the cursor must then stay where it is.
    pub fn apply_plan(
        &self,
        plan: &Plan,
        live: &Live,
        cursor: u64,
        last: u64,
        epoch: u64,
    ) -> Result<(), StoreError> {
        match &self.store {
            Store::Memory(memory) => {
                if let Some(position) = plan.flush_all {
                    memory.flush_all(position);
                }
                for (table, &position) in &plan.flush_tables {
                    for family in live.families_depending_on(table) {
                        family.raise_floor(position);
                    }
                }
                for (pattern, &position) in &plan.flush_families {
                    if let Some(family) = live.family_named(pattern) {
                        family.raise_floor(position);
                    }
                }
                for (tag, &position) in &plan.tags {
                    memory.invalidate_tag(tag, position);
                }
                for (key, action) in &plan.keys {
                    let recomputed =
                        action.strategy == Strategy::WriteThrough && live.match_key(key).is_some();
                    if !recomputed {
                        self.invalidate_key(key);
                    }
                }
            }
            Store::Redis(redis) => {
                let mut batch = Invalidation::for_plan(plan, live, last);
                batch.epoch = epoch;
                redis.apply(&batch, cursor)?;
                // This daemon's own fills in flight are superseded too (the Redis marks would
                // refuse them anyway; this keeps stampedes from joining a doomed fill).
                for key in plan.keys.keys() {
                    self.flights.supersede(key, || {});
                }
            }
        }
        Ok(())
    }

    /// Removes a key's value here (not in Redis) and supersedes its fill in flight.
    pub(super) fn invalidate_key(&self, key: &str) {
        match &self.store {
            Store::Memory(memory) => self.flights.supersede(key, || memory.remove(key)),
            Store::Redis(_) => self.flights.supersede(key, || {}),
        }
    }

    /// Drops the key's value if it was read before `version` (under the key's flight lock; its
    /// flight, if any, stays). In Redis there is nothing to drop: the batch that led to a
    /// recompute removed the key there, and the store script never stores a value below one
    /// read later.
    pub(super) fn drop_older(&self, key: &str, version: u64) {
        if let Store::Memory(memory) = &self.store {
            self.flights
                .locked(key, || memory.remove_older_than(key, version));
        }
    }

    /// This daemon takes over applying from `cursor` (the durable cursor; the outbox ends at
    /// `head`). In memory, values cached before (as a standby it cached nothing; after losing
    /// the lease it may have) are not trusted: nothing older than now is served. Redis is
    /// rebuilt if it has not applied everything up to the cursor. Blocking.
    pub fn take_over(&self, cursor: u64, head: u64) -> Result<(), StoreError> {
        self.flushed_for_pause
            .store(false, std::sync::atomic::Ordering::Release);
        match &self.store {
            Store::Memory(memory) => {
                memory.flush_all(head);
                Ok(())
            }
            Store::Redis(redis) => redis.reconcile(cursor, Some(head)),
        }
    }

    /// Before a new lease holder does anything else: claims its lease `epoch` in Redis, so a
    /// holder with an older (or the same) epoch is refused from now on. None when claimed (or
    /// on the memory backend, which no other daemon applies to); else the epoch Redis has seen,
    /// at or above this one (the lease row was deleted or reset since): the holder must take an
    /// epoch above it and claim again. Blocking.
    pub fn claim_epoch(&self, epoch: u64) -> Result<Option<u64>, StoreError> {
        match &self.store {
            Store::Memory(_) => Ok(None),
            Store::Redis(redis) => redis.claim_epoch(epoch),
        }
    }

    /// Capture was resumed: values cached before the pause may have gone stale meanwhile. The
    /// flush markers the resume wrote hide them, but only once applied; reads use the cache as
    /// soon as the pause is lifted, so they are hidden now (everything read before `head`).
    pub fn capture_resumed(&self, head: u64) {
        if let Store::Memory(memory) = &self.store {
            memory.flush_all(head);
        }
    }

    /// What must happen before the tail applies the next batch, on Redis: rebuild a Redis that
    /// failed or lost state since the last look; empty it once while capture is paused (app
    /// writes go uncaptured, so nothing there can be trusted, and app-local caches are told to
    /// drop everything); retire the families a reload replaced. Blocking.
    pub fn before_batch(
        &self,
        live: &Live,
        cursor: u64,
        head: impl FnOnce() -> rusqlite::Result<u64>,
        epoch: u64,
    ) -> Result<(), BeforeBatchError> {
        let Store::Redis(redis) = &self.store else {
            return Ok(());
        };
        redis.heal(cursor)?;
        let paused = self.progress.is_paused();
        let flushed = self
            .flushed_for_pause
            .load(std::sync::atomic::Ordering::Acquire);
        if paused && !flushed {
            let mut batch = Invalidation::for_pause(live, cursor, head()?);
            batch.epoch = epoch;
            redis.apply(&batch, cursor)?;
            tracing::info!("capture is paused: the values in redis were removed");
        }
        self.flushed_for_pause
            .store(paused, std::sync::atomic::Ordering::Release);
        self.retire_pending(cursor, epoch)?;
        Ok(())
    }

    /// Records families a reload replaced: in memory they are already hidden (retired); in
    /// Redis the tail removes their values before its next batch.
    pub fn retire(&self, families: &[Arc<FamilyState>]) {
        if let Store::Redis(_) = &self.store {
            self.retiring
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(
                    families
                        .iter()
                        .map(|f| (f.def.pattern.source().to_owned(), f.def.group.clone())),
                );
        }
    }

    fn retire_pending(&self, cursor: u64, epoch: u64) -> Result<(), StoreError> {
        let Store::Redis(redis) = &self.store else {
            return Ok(());
        };
        let pending = self
            .retiring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if pending.is_empty() {
            return Ok(());
        }
        let mut batch = Invalidation::for_retirement(&pending, cursor);
        batch.epoch = epoch;
        redis.apply(&batch, cursor)?;
        self.retiring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|f| !pending.contains(f));
        Ok(())
    }
}

/// Why the work before a batch failed: Redis, or reading the outbox head.
#[derive(Debug, thiserror::Error)]
pub enum BeforeBatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}
