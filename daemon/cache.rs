//! The in-process cache (moka), with the guard that keeps it exactly as fresh as the database.
//!
//! Every value carries the outbox position its query read at (its *version*: the outbox head
//! read in the same read transaction as the query). Three mechanisms keep stale values out:
//!
//! - **Fills are flights.** At most one fill per key is in flight; concurrent misses join it (one
//!   query for a stampede), and a miss that looks for the flight after it landed finds the value. Invalidating a key removes its value *and* supersedes its flight under
//!   the same lock, so a fill that may have read before the invalidation can never store after it.
//!   A fill started after the invalidation reads at a later position, so it is fresh.
//! - **Never backwards.** A fill is stored only over a value of the same or an older version.
//! - **Marks for groups.** Invalidating a tag, a family or everything records the position it
//!   happened at; a value whose version is older than a mark that applies to it is not served.
//!   That is O(1) per invalidation, however many keys carry the tag. A fill that read before a
//!   mark raised while it ran is not stored, nor handed to the requests that joined it.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use tokio::sync::watch;

use crate::config::Family;

/// A cached value.
#[derive(Debug)]
pub struct Entry {
    /// The outbox position the value's query read at.
    pub version: u64,
    /// The JSON body, or `None` when a one-row family's query found no row (a cached 404).
    pub body: Option<Bytes>,
    pub family: Arc<Family>,
    pub tags: Box<[Arc<str>]>,
    pub stored_at: Instant,
}

/// What a fill produced, shared with every request that joined it.
pub type FillOutcome = Result<Arc<Entry>, FillError>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    /// The query failed.
    #[error("{0}")]
    Failed(Arc<str>),
    /// The value was read before an invalidation that another daemon applied meanwhile (Redis
    /// refused it): a request that joined this fill late must not get it. Fill again.
    #[error("the value changed while it was computed")]
    Superseded,
}

/// The receiving side of a flight: resolves once the fill is done.
pub type FillWaiter = watch::Receiver<Option<FillOutcome>>;

struct Flight {
    id: u64,
    family: Arc<Family>,
    done: FillWaiter,
}

/// The right to store one fill's result, if nothing supersedes it first.
pub struct FillTicket {
    key: Arc<str>,
    id: u64,
    family: Arc<Family>,
    done: watch::Sender<Option<FillOutcome>>,
}

impl FillTicket {
    #[allow(clippy::type_complexity)]
    fn resolve(
        self,
        computed: Result<Filled, Arc<str>>,
    ) -> (
        Arc<str>,
        u64,
        watch::Sender<Option<FillOutcome>>,
        FillOutcome,
    ) {
        let FillTicket {
            key,
            id,
            family,
            done,
        } = self;
        let outcome = computed.map_err(FillError::Failed).map(
            |Filled {
                 version,
                 body,
                 tags,
             }| {
                Arc::new(Entry {
                    version,
                    body,
                    family,
                    tags,
                    stored_at: Instant::now(),
                })
            },
        );
        (key, id, done, outcome)
    }

    pub fn family(&self) -> &Arc<Family> {
        &self.family
    }

    pub fn key(&self) -> &Arc<str> {
        &self.key
    }
}

/// Either this request leads the fill (and must finish it), or it joins one already in flight,
/// or a fill landed since it missed and the value is cached now.
pub enum Begin {
    Lead(FillTicket, FillWaiter),
    Join(FillWaiter),
    Cached(Arc<Entry>),
}

struct PerEntryTtl;

impl Expiry<Arc<str>, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _: &Arc<str>,
        value: &Arc<Entry>,
        _: Instant,
    ) -> Option<Duration> {
        Some(value.family.ttl)
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        value: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.family.ttl)
    }
}

const SHARDS: usize = 64;

type FlightShard = Mutex<HashMap<Arc<str>, Flight>>;

/// A computed value, ready to store: its version, its body (None: no row), its rendered tags.
pub struct Filled {
    pub version: u64,
    pub body: Option<Bytes>,
    pub tags: Box<[Arc<str>]>,
}

/// The cache: values, flights in progress, and invalidation marks.
pub struct Cache {
    entries: moka::sync::Cache<Arc<str>, Arc<Entry>>,
    flights: Box<[FlightShard]>,
    hasher: RandomState,
    next_flight: AtomicU64,
    tag_marks: RwLock<HashMap<Arc<str>, u64>>,
    /// The highest tag mark: a value at least this recent needs no tag look-up.
    max_tag_mark: AtomicU64,
    /// Values older than this are not served (a flush of everything).
    floor: AtomicU64,
}

/// Past this many remembered tag marks, they are folded into one flush of everything: memory
/// stays bounded whatever tags the rules render.
const MAX_TAG_MARKS: usize = 1_000_000;

impl Cache {
    pub fn new(max_entries: u64) -> Cache {
        Cache {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(PerEntryTtl)
                .build(),
            flights: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            next_flight: AtomicU64::new(1),
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
        let family = &entry.family;
        if family.retired.load(Ordering::Acquire)
            || entry.version < family.floor.load(Ordering::Acquire)
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

    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<Arc<str>, Flight>> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.flights[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a fill for a missed key, or joins the one in flight.
    pub fn begin_fill(&self, key: Arc<str>, family: &Arc<Family>) -> Begin {
        let mut flights = self.shard(&key);
        if let Some(flight) = flights.get(&key)
            && Arc::ptr_eq(&flight.family, family)
        {
            return Begin::Join(flight.done.clone());
        }
        // A flight that landed between this request's miss and now stored its value under this
        // lock (and left the map): serve that rather than run the query again. Without this,
        // a stampede's late arrivals could start a second query.
        if let Some(entry) = self.get(&key)
            && Arc::ptr_eq(&entry.family, family)
        {
            return Begin::Cached(entry);
        }
        let (ticket, waiter) = self.new_flight(&mut flights, key, family);
        Begin::Lead(ticket, waiter)
    }

    /// Starts a recompute that supersedes any fill in flight (write-through): a fill that started
    /// before the change being applied must not store after it.
    pub fn begin_refresh(&self, key: Arc<str>, family: &Arc<Family>) -> FillTicket {
        let mut flights = self.shard(&key);
        self.new_flight(&mut flights, key, family).0
    }

    fn new_flight(
        &self,
        flights: &mut HashMap<Arc<str>, Flight>,
        key: Arc<str>,
        family: &Arc<Family>,
    ) -> (FillTicket, FillWaiter) {
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let (done, waiter) = watch::channel(None);
        flights.insert(
            Arc::clone(&key),
            Flight {
                id,
                family: Arc::clone(family),
                done: waiter.clone(),
            },
        );
        let ticket = FillTicket {
            key,
            id,
            family: Arc::clone(family),
            done,
        };
        (ticket, waiter)
    }

    /// Finishes a fill: stores the value unless the flight was superseded, a mark that applies
    /// to it came after its read, or a newer value is already cached, then wakes every request
    /// waiting on it (with `Superseded` when it was not stored). Returns whether it was stored.
    pub fn finish_fill(&self, ticket: FillTicket, computed: Result<Filled, Arc<str>>) -> bool {
        let (key, id, done, outcome) = ticket.resolve(computed);
        let mut stored = false;
        {
            let mut flights = self.shard(&key);
            if flights.get(&key).is_some_and(|f| f.id == id) {
                flights.remove(&key);
                // Tags, family floors, flushes and reloads do not supersede flights: they are
                // marks. A value read before one of them is already hidden, and a request may
                // have joined after it was applied: `store_if_newer` refuses it.
                if let Ok(entry) = &outcome {
                    stored = self.store_if_newer(&key, entry);
                }
            }
        }
        // A value that was not stored (its flight was superseded, or a newer one is cached) is
        // not handed out either: it may be newer than what the superseding flight will store, or
        // older than what is cached, and either way a later read could go backwards. The
        // waiters fill again (joining the superseding flight, or hitting the newer value).
        let outcome = match outcome {
            Ok(_) if !stored => Err(FillError::Superseded),
            other => other,
        };
        done.send_replace(Some(outcome));
        stored
    }

    /// Finishes a fill whose value is kept elsewhere (Redis, which guards it by version): `store`
    /// keeps the value (or, for a value without a row, checks it). If the store refused it, the
    /// waiters get `Superseded`: an invalidation (perhaps another daemon's) came after this
    /// fill's read, and a request may have joined after it.
    pub fn finish_fill_with(
        &self,
        ticket: FillTicket,
        computed: Result<Filled, Arc<str>>,
        store: impl FnOnce(&str, &Entry) -> bool,
    ) -> bool {
        let (key, id, done, outcome) = ticket.resolve(computed);
        {
            let mut flights = self.shard(&key);
            if flights.get(&key).is_some_and(|f| f.id == id) {
                flights.remove(&key);
            }
        }
        // Stored even if a local invalidation superseded the flight: Redis's version guard is
        // exact, and a stored newer value keeps an older read from landing after this answer.
        let stored = outcome.as_ref().is_ok_and(|entry| store(&key, entry));
        let outcome = match outcome {
            Ok(_) if !stored => Err(FillError::Superseded),
            other => other,
        };
        done.send_replace(Some(outcome));
        stored
    }

    /// Stores `entry` unless it could not be served (it read before a tag, family or flush mark
    /// raised while its query ran, or a reload retired its family) or a value read at a later
    /// position is cached (called under the key's flight lock, so no invalidation of the key
    /// runs in between). A value refused for a mark is not handed to the requests that joined
    /// its fill either: one may have joined after the mark, and must see what the mark stands for.
    fn store_if_newer(&self, key: &Arc<str>, entry: &Arc<Entry>) -> bool {
        if !self.is_current(entry) {
            return false;
        }
        if let Some(existing) = self.entries.get(key)
            && existing.version > entry.version
            && self.is_current(&existing)
        {
            return false;
        }
        self.entries.insert(Arc::clone(key), Arc::clone(entry));
        true
    }

    /// Removes a key's value and supersedes its fill in flight.
    pub fn invalidate(&self, key: &str) {
        let mut flights = self.shard(key);
        flights.remove(key);
        self.entries.invalidate(key);
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
            .map(|(key, _)| Arc::clone(&*key))
            .collect()
    }

    /// How many values are stored (some may be expired or marked stale and not yet evicted).
    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn family() -> Arc<Family> {
        let config = Config::parse(
            "database = \"x.db\"\n[keys.\"k:{id}\"]\nquery = \"SELECT :id AS id\"\ntags = [\"t\"]\n",
            "test.toml",
            Path::new("."),
        )
        .expect("valid");
        Arc::clone(&config.families[0])
    }

    fn value(version: u64, text: &'static str) -> Result<Filled, Arc<str>> {
        Ok(Filled {
            version,
            body: Some(Bytes::from_static(text.as_bytes())),
            tags: vec![Arc::from("t")].into(),
        })
    }

    fn lead(cache: &Cache, key: &str, family: &Arc<Family>) -> FillTicket {
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
        let (old, new) = (family(), family());
        // The reload: `new` replaces `old`, and a read under `new` stores its value.
        old.retired.store(true, Ordering::Release);
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
