//! The in-process store (moka) and the guard that keeps it exactly as fresh as the database.
//!
//! Every value carries the outbox position its query read at (its *version*). With the flights
//! (`flights.rs`), three mechanisms keep stale values out:
//!
//! - **Invalidating a key** removes its value and supersedes its flight under the same lock, so
//!   a fill that may have read before the invalidation can never store after it.
//! - **Never backwards.** A fill is stored only over a value of the same or an older version.
//! - **Marks for groups.** Invalidating a tag, a family or everything records the position it
//!   happened at; a value whose version is older than a mark that applies to it is not served.
//!   That is O(1) per invalidation, however many keys carry the tag. A fill that read before a
//!   mark raised while it ran is not stored, nor handed to the requests that joined it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use compact_str::CompactString;
use moka::Expiry;

use super::Entry;
use crate::registry::FamilyState;

/// A key as moka holds it: moka wraps every key in an `Arc` of its own, so a key of up to 24
/// bytes is kept inline there, with no allocation of its own (48 bytes an entry saved).
type Key = CompactString;

struct PerEntryTtl;

impl Expiry<Key, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(&self, _: &Key, value: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(value.family.def.ttl)
    }

    fn expire_after_update(
        &self,
        _: &Key,
        value: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.family.def.ttl)
    }
}

/// Past this many remembered tag marks, they are folded into one flush of everything: memory
/// stays bounded whatever tags the rules render.
const MAX_TAG_MARKS: usize = 1_000_000;

/// What moka and this store spend on one entry beyond its key, body and tags: moka's own
/// (its hash table, entry, policy nodes and per-entry expiry: 353 bytes measured with these
/// keys and empty values, moka 0.12), the `Entry` (96 bytes with its allocation's header) and
/// the body's allocation header: 500 bytes measured in all (`cachetail bench --only memory`).
pub const ENTRY_OVERHEAD: u64 = 500;

/// What one more tag costs an entry: its `Arc<str>` (header and allocation) and its slot.
const TAG_OVERHEAD: u64 = 48;

/// The bytes an entry takes, counted as `max_bytes` counts them: its key (beyond what fits
/// inline), body and tags, and the per-entry overhead.
pub fn entry_bytes(key: &str, entry: &Entry) -> u64 {
    let key_heap = if key.len() > 24 {
        key.len() as u64 + 16
    } else {
        0
    };
    let body = entry.body.as_ref().map_or(0, |b| b.len() as u64);
    let tags: u64 = entry
        .tags
        .iter()
        .map(|t| t.len() as u64 + TAG_OVERHEAD)
        .sum();
    ENTRY_OVERHEAD + key_heap + body + tags
}

/// How the store is bounded: by a count of values, or by the bytes they take (`max_bytes`),
/// optionally with a count too (each value then weighs at least `max_bytes / max_entries`, so
/// neither bound is passed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_entries: Option<u64>,
    pub max_bytes: Option<u64>,
}

/// Values and invalidation marks.
pub struct MemoryStore {
    entries: moka::sync::Cache<Key, Arc<Entry>>,
    bounds: Bounds,
    tag_marks: RwLock<HashMap<Arc<str>, u64>>,
    /// The highest tag mark: a value at least this recent needs no tag look-up.
    max_tag_mark: AtomicU64,
    /// Values older than this are not served (a flush of everything).
    floor: AtomicU64,
}

impl MemoryStore {
    pub fn new(bounds: Bounds) -> MemoryStore {
        let builder = moka::sync::Cache::builder().expire_after(PerEntryTtl);
        let entries = match bounds.max_bytes {
            None => builder
                .max_capacity(bounds.max_entries.unwrap_or(u64::MAX))
                .build(),
            Some(max_bytes) => {
                let least = bounds
                    .max_entries
                    .map_or(0, |n| max_bytes.div_ceil(n.max(1)));
                builder
                    .max_capacity(max_bytes)
                    .weigher(move |key: &Key, entry: &Arc<Entry>| {
                        let bytes = entry_bytes(key, entry).max(least);
                        u32::try_from(bytes).unwrap_or(u32::MAX)
                    })
                    .build()
            }
        };
        MemoryStore {
            entries,
            bounds,
            tag_marks: RwLock::new(HashMap::new()),
            max_tag_mark: AtomicU64::new(0),
            floor: AtomicU64::new(0),
        }
    }

    /// The value cached for `key`, if there is one that may still be served.
    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key)?;
        self.is_current(&entry).then_some(entry)
    }

    fn is_current(&self, entry: &Entry) -> bool {
        let family: &FamilyState = &entry.family;
        if family.is_retired()
            || entry.version < family.floor()
            || entry.version < self.floor.load(Ordering::Acquire)
        {
            return false;
        }
        if entry.tags.is_empty() || entry.version >= self.max_tag_mark.load(Ordering::Acquire) {
            return true;
        }
        let marks = self.tag_marks.read().unwrap_or_else(|e| e.into_inner());
        entry
            .tags
            .iter()
            .all(|tag| marks.get(tag).is_none_or(|&mark| entry.version >= mark))
    }

    /// Stores `entry` unless it could not be served (it read before a tag, family or flush mark
    /// raised while its query ran, or a reload retired its family) or a value read at a later
    /// position is cached. Called under the key's flight lock, so no invalidation of the key
    /// runs in between. A value refused for a mark is not handed to the requests that joined
    /// its fill either: one may have joined after the mark, and must see what the mark stands for.
    pub fn store_if_newer(&self, key: &Arc<str>, entry: &Arc<Entry>) -> bool {
        if !self.is_current(entry) {
            return false;
        }
        if let Some(existing) = self.entries.get(&**key)
            && existing.version > entry.version
            && self.is_current(&existing)
        {
            return false;
        }
        self.entries.insert(Key::from(&**key), Arc::clone(entry));
        true
    }

    /// Removes a key's value (under its flight lock: see `Flights::supersede`).
    pub fn remove(&self, key: &str) {
        self.entries.invalidate(key);
    }

    /// Removes a key's value if it was read before `version` (under its flight lock).
    pub fn remove_older_than(&self, key: &str, version: u64) {
        if self.entries.get(key).is_some_and(|e| e.version < version) {
            self.entries.invalidate(key);
        }
    }

    /// Drops every value carrying `tag` that was read before `position`.
    pub fn invalidate_tag(&self, tag: &str, position: u64) {
        let mut marks = self.tag_marks.write().unwrap_or_else(|e| e.into_inner());
        if marks.len() >= MAX_TAG_MARKS {
            let highest = marks.values().copied().max().unwrap_or(0);
            marks.clear();
            self.floor.fetch_max(highest, Ordering::AcqRel);
        }
        let mark = marks.entry(Arc::from(tag)).or_insert(0);
        *mark = (*mark).max(position);
        self.max_tag_mark.fetch_max(position, Ordering::AcqRel);
    }

    /// Drops every value read before `position`.
    pub fn flush_all(&self, position: u64) {
        self.floor.fetch_max(position, Ordering::AcqRel);
    }

    /// Up to `limit` cached keys, in no particular order (a sample for `verify`).
    pub fn keys(&self, limit: usize) -> Vec<Arc<str>> {
        self.entries
            .iter()
            .take(limit)
            .map(|(key, _)| Arc::from(key.as_str()))
            .collect()
    }

    /// How many values are stored (some may be expired or marked stale and not yet evicted).
    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// The bytes the stored values take, as `max_bytes` counts them (with `max_bytes` set), and
    /// the bound.
    pub fn bytes(&self) -> Option<(u64, u64)> {
        let max_bytes = self.bounds.max_bytes?;
        self.entries.run_pending_tasks();
        Some((self.entries.weighted_size(), max_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::FillError;
    use crate::cache::flights::{Begin, FillTicket, Filled, Flights};
    use crate::config::{Config, Reads};
    use crate::registry::Registry;
    use std::path::Path;

    fn registry() -> Registry {
        let config = Config::parse(
            "database = \"x.db\"\n[keys.\"k:{id}\"]\nquery = \"SELECT :id AS id\"\ntags = [\"t\"]\n",
            "test.toml",
            Path::new("."),
        )
        .expect("valid");
        Registry::new(config, Reads::default())
    }

    fn family() -> Arc<FamilyState> {
        Arc::clone(&registry().live().families[0])
    }

    /// The memory backend as the cache drives it: flights and the store, one lock per key.
    struct Cache {
        flights: Flights,
        store: MemoryStore,
    }

    impl Cache {
        fn new(max_entries: u64) -> Cache {
            Cache {
                flights: Flights::new(),
                store: MemoryStore::new(Bounds {
                    max_entries: Some(max_entries),
                    max_bytes: None,
                }),
            }
        }

        fn get(&self, key: &str) -> Option<Arc<Entry>> {
            self.store.get(key)
        }

        fn begin_fill(&self, key: Arc<str>, family: &Arc<FamilyState>) -> Begin {
            self.flights.begin(key, family, |k| self.store.get(k))
        }

        fn begin_refresh(&self, key: Arc<str>, family: &Arc<FamilyState>) -> FillTicket {
            self.flights.begin_refresh(key, family)
        }

        fn finish_fill(&self, ticket: FillTicket, computed: Result<Filled, Arc<str>>) -> bool {
            self.flights
                .finish(ticket, computed, |k, e| self.store.store_if_newer(k, e))
        }

        fn invalidate(&self, key: &str) {
            self.flights.supersede(key, || self.store.remove(key));
        }

        fn invalidate_tag(&self, tag: &str, position: u64) {
            self.store.invalidate_tag(tag, position);
        }

        fn flush_all(&self, position: u64) {
            self.store.flush_all(position);
        }
    }

    fn value(version: u64, text: &'static str) -> Result<Filled, Arc<str>> {
        Ok(Filled {
            version,
            body: Some(text.as_bytes().into()),
            tags: vec![Arc::from("t")].into(),
        })
    }

    fn lead(cache: &Cache, key: &str, family: &Arc<FamilyState>) -> FillTicket {
        match cache.begin_fill(Arc::from(key), family) {
            Begin::Lead(ticket, _) => ticket,
            Begin::Join(_) | Begin::Cached(_) => panic!("expected to lead the fill"),
        }
    }

    #[test]
    fn a_fill_that_read_before_an_invalidation_is_not_stored_after_it() {
        let cache = Cache::new(100);
        let family = family();
        // A reader misses and reads the database at position 5 ...
        let ticket = lead(&cache, "k:1", &family);
        // ... the daemon applies change 6, which touches k:1 ...
        cache.invalidate("k:1");
        // ... and only then does the reader's fill try to store what it read at 5.
        assert!(!cache.finish_fill(ticket, value(5, "old")));
        assert!(cache.get("k:1").is_none());
    }

    #[test]
    fn a_fill_never_overwrites_a_value_read_later() {
        let cache = Cache::new(100);
        let family = family();
        // Two recomputes of one key: the later one read at 9 and lands first.
        let early = cache.begin_refresh(Arc::from("k:1"), &family);
        let late = cache.begin_refresh(Arc::from("k:1"), &family);
        assert!(cache.finish_fill(late, value(9, "new")));
        // A superseded ticket cannot store; and a current one that read earlier cannot either.
        assert!(!cache.finish_fill(early, value(7, "old")));
        // (A miss finds the cached value now, so the current ticket here is a recompute's.)
        let again = cache.begin_refresh(Arc::from("k:1"), &family);
        assert!(!cache.finish_fill(again, value(8, "older")));
        let body = cache.get("k:1").and_then(|e| e.body.clone());
        assert_eq!(body.as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn a_fill_that_read_before_a_mark_is_neither_stored_nor_handed_to_its_waiters() {
        let family = family();
        for mark in ["tag", "flush"] {
            let cache = Cache::new(100);
            // A reader misses and reads at position 5; while its query runs, a tag (or
            // everything) is invalidated at 6, and then a second request joins the fill ...
            let ticket = lead(&cache, "k:1", &family);
            match mark {
                "tag" => cache.invalidate_tag("t", 6),
                _ => cache.flush_all(6),
            }
            let Begin::Join(mut waiter) = cache.begin_fill(Arc::from("k:1"), &family) else {
                panic!("expected to join");
            };
            // ... which must not be answered with what was read at 5: it fills again.
            assert!(!cache.finish_fill(ticket, value(5, "old")), "{mark}");
            let seen = waiter.borrow_and_update().clone();
            assert!(
                matches!(seen, Some(Err(FillError::Superseded))),
                "{mark}: {seen:?}"
            );
            let ticket = lead(&cache, "k:1", &family);
            assert!(cache.finish_fill(ticket, value(6, "new")), "{mark}");
        }
    }

    #[test]
    fn a_fill_of_a_family_a_reload_retired_is_not_stored() {
        let cache = Cache::new(100);
        let registry = registry();
        let old = Arc::clone(&registry.live().families[0]);
        // The reload: `new` replaces `old`, and a read under `new` stores its value.
        let config = Config::parse(
            "database = \"x.db\"\n[keys.\"k:{id}\"]\nquery = \"SELECT :id AS id, 2 AS v\"\ntags = [\"t\"]\n",
            "test.toml",
            Path::new("."),
        )
        .expect("valid");
        let diff = crate::config::diff::diff(&registry.config(), &config);
        let retired = registry.apply(config, Reads::default(), &diff);
        assert!(retired[0].is_retired() && Arc::ptr_eq(&retired[0], &old));
        let new = Arc::clone(&registry.live().families[0]);
        let current = lead(&cache, "k:1", &new);
        assert!(cache.finish_fill(current, value(5, "new shape")));
        // A request that resolved the key before the reload fills under `old`, at the same
        // position: its value replaces nothing.
        let late = lead(&cache, "k:1", &old);
        assert!(!cache.finish_fill(late, value(5, "old shape")));
        let body = cache.get("k:1").and_then(|e| e.body.clone());
        assert_eq!(body.as_deref(), Some(&b"new shape"[..]));
    }

    #[test]
    fn concurrent_misses_join_one_flight() {
        let cache = Cache::new(100);
        let family = family();
        let ticket = lead(&cache, "k:1", &family);
        let Begin::Join(mut waiter) = cache.begin_fill(Arc::from("k:1"), &family) else {
            panic!("expected to join");
        };
        assert!(cache.finish_fill(ticket, value(3, "v")));
        let seen = waiter.borrow_and_update().clone();
        assert!(matches!(seen, Some(Ok(entry)) if entry.version == 3));
    }

    #[test]
    fn a_tag_mark_hides_older_values_only() {
        let cache = Cache::new(100);
        let family = family();
        let ticket = lead(&cache, "k:1", &family);
        assert!(cache.finish_fill(ticket, value(4, "v")));
        cache.invalidate_tag("other", 10);
        assert!(cache.get("k:1").is_some());
        cache.invalidate_tag("t", 4);
        assert!(cache.get("k:1").is_some(), "read at 4, so it saw change 4");
        cache.invalidate_tag("t", 5);
        assert!(cache.get("k:1").is_none());
        let ticket = lead(&cache, "k:1", &family);
        assert!(cache.finish_fill(ticket, value(5, "v2")));
        assert!(cache.get("k:1").is_some());
        cache.flush_all(6);
        assert!(cache.get("k:1").is_none());
    }

    #[test]
    fn a_miss_that_reaches_the_flights_after_its_fill_landed_runs_no_second_query() {
        let cache = Cache::new(100);
        let family = family();
        let ticket = lead(&cache, "k:1", &family);
        // A request of the stampede looks the key up: not cached yet ...
        assert!(cache.get("k:1").is_none());
        // ... the fill lands (and leaves the flights) ...
        assert!(cache.finish_fill(ticket, value(3, "v")));
        // ... and only then does that request look for a flight to join.
        match cache.begin_fill(Arc::from("k:1"), &family) {
            Begin::Cached(entry) => assert_eq!(entry.version, 3),
            Begin::Lead(..) => panic!("a second query for a value that was just stored"),
            Begin::Join(_) => panic!("joined a flight that had finished"),
        }
    }
}
