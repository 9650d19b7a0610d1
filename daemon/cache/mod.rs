//! The cache: one interface, whichever backend keeps the values — in the daemon's memory (moka,
//! `memory.rs`) or in Redis (`redis/`). Reads, fills, the stale-fill guard, applying a batch's
//! plan, operators' invalidations, marks, counts and health all go through `Cache`; nothing
//! outside this folder asks which backend is in use.
//!
//! Every value carries the outbox position its query read at (its *version*): the guard refuses
//! a fill that read before an invalidation it did not see (`flights.rs`, `memory.rs`, and the
//! Lua scripts in `redis/`). When the cache cannot be trusted (capture paused, a standby whose
//! memory is not kept fresh, Redis down or rebuilding), reads answer from the database and store
//! nothing.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

mod apply;
mod bypass;
mod fill;
mod flights;
mod memory;
mod redis;

pub use apply::BeforeBatchError;
/// Why the store failed: only a remote store (Redis) fails, the in-process one cannot.
pub use redis::client::RedisError as StoreError;

use crate::config::{Backend, Config};
use crate::counters::{Counter, Latency, Striped};
use crate::db::{Body, ReadError, ReadPool};
use crate::progress::Progress;
use crate::registry::{FamilyState, Registry};
use crate::types::Params;
use flights::Flights;
use memory::{Bounds, MemoryStore};
use redis::RedisStore;

/// A cached value.
#[derive(Debug)]
pub struct Entry {
    /// The outbox position the value's query read at.
    pub version: u64,
    /// The JSON body, or `None` when a one-row family's query found no row (a cached 404).
    pub body: Option<Body>,
    pub family: Arc<FamilyState>,
    pub tags: Box<[Arc<str>]>,
    pub stored_at: Instant,
    /// The body's hash (FNV-1a), its `ETag`: computed once here, not on every read. (It fits
    /// the allocation `Entry` had already: 88 bytes in a 96-byte chunk with the `Arc`'s counts.)
    pub etag: u64,
}

impl Entry {
    pub fn new(
        version: u64,
        body: Option<Body>,
        family: Arc<FamilyState>,
        tags: Box<[Arc<str>]>,
        stored_at: Instant,
    ) -> Entry {
        let etag = body.as_deref().map_or(0, crate::fnv1a);
        Entry {
            version,
            body,
            family,
            tags,
            stored_at,
            etag,
        }
    }

    /// The body as an HTTP body, without copying it: it keeps the entry alive while sent (the
    /// entry is moved in, so no second count is taken on a line every reader of the key shares).
    pub fn into_body_bytes(self: Arc<Self>) -> Option<Bytes> {
        self.body.as_ref()?;
        Some(Bytes::from_owner(EntryBody(self)))
    }

    /// How long ago it was computed.
    pub fn age(&self) -> Duration {
        self.stored_at.elapsed()
    }

    /// The rest of its TTL.
    pub fn max_age(&self) -> Duration {
        self.family.def.ttl.saturating_sub(self.age())
    }
}

/// An entry seen as its body's bytes (empty without one).
struct EntryBody(Arc<Entry>);

impl AsRef<[u8]> for EntryBody {
    fn as_ref(&self) -> &[u8] {
        self.0.body.as_deref().unwrap_or_default()
    }
}

/// What a fill produced, shared with every request that joined it.
pub type FillOutcome = Result<Arc<Entry>, FillError>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    /// The query failed.
    #[error("{0}")]
    Failed(Arc<str>),
    /// The value was not stored (an invalidation came after its read: a request that joined
    /// this fill late must not get it), or the read was abandoned. Fill again.
    #[error("the value changed while it was computed")]
    Superseded,
    /// Too many reads wait for a reader already: come back in a moment.
    #[error("{0}")]
    Busy(Arc<str>),
}

impl From<ReadError> for FillError {
    fn from(error: ReadError) -> FillError {
        match error {
            ReadError::Busy { .. } => FillError::Busy(Arc::from(error.to_string())),
            ReadError::Abandoned => FillError::Superseded,
            other => FillError::Failed(Arc::from(other.to_string())),
        }
    }
}

/// The bypass reason of a key spelled otherwise than rules render the rows it reads.
const KEY_SPELLING: &str = "key-spelling";

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Hit,
    Miss,
    /// Straight from the database, stored nowhere, with why: `paused`, `standby`,
    /// `redis-unavailable`, `no-cache`, `key-spelling`.
    Bypass(&'static str),
}

/// What a lookup of one key found.
#[derive(Debug)]
pub enum Lookup {
    Value(Arc<Entry>, Source),
    /// Asked for from the cache only (`only-if-cached`), and not cached.
    NotCached,
    /// The family's query failed.
    Failed(String),
    /// Too many reads wait for a reader: come back in a moment.
    Busy(String),
}

impl Lookup {
    fn of(outcome: FillOutcome, source: Source) -> Lookup {
        match outcome {
            Ok(entry) => Lookup::Value(entry, source),
            Err(FillError::Busy(message)) => Lookup::Busy(message.to_string()),
            Err(e) => Lookup::Failed(e.to_string()),
        }
    }
}

/// How a request wants its key.
#[derive(Debug, Clone, Copy, Default)]
pub struct Want {
    /// From the cache or nothing, never running the query (`Cache-Control: only-if-cached`).
    pub only_if_cached: bool,
    /// From the database now, leaving the cache alone (`Cache-Control: no-cache`).
    pub uncached: bool,
    /// A `?fresh=1` read found capture paused: from the database (bypass reason `paused`),
    /// whether or not this daemon has noticed the pause yet (writes made since have no outbox
    /// row, so no wait for the apply can cover them).
    pub paused: bool,
}

impl Want {
    /// Whether a value cached in memory may answer this request as it is (neither `no-cache`
    /// nor a fresh read that found capture paused).
    pub fn may_use_cached(&self) -> bool {
        !self.uncached && !self.paused
    }
}

/// What reads and fills did, for status and metrics.
#[derive(Debug)]
pub struct CacheCounters {
    /// Bumped by every hit from every thread: striped.
    pub hits: Striped,
    pub misses: Counter,
    pub fills: Counter,
    pub fill_errors: Counter,
    /// How long fills' queries took: 50 µs to ~1.6 s, doubling.
    pub fill_latency: Latency,
}

/// Whether Redis answers, for `/v1/status` and the logs.
pub use redis::Health;

/// Where values live.
enum Store {
    Memory(MemoryStore),
    Redis(Box<RedisStore>),
}

pub struct Cache {
    store: Store,
    flights: Flights,
    bypasses: bypass::Bypasses,
    pool: Arc<ReadPool>,
    registry: Arc<Registry>,
    progress: Progress,
    counters: CacheCounters,
    /// Redis groups of families a reload replaced, (pattern, group), not yet retired in Redis.
    retiring: Mutex<Vec<(String, String)>>,
    /// Redis was emptied for the pause in force.
    flushed_for_pause: AtomicBool,
}

impl Cache {
    pub fn new(
        config: &Config,
        pool: Arc<ReadPool>,
        registry: Arc<Registry>,
        progress: Progress,
    ) -> Cache {
        let store = match &config.cache.backend {
            Backend::Memory => Store::Memory(MemoryStore::new(Bounds {
                max_entries: config.cache.max_entries,
                max_bytes: config.cache.max_bytes,
            })),
            Backend::Redis {
                url,
                prefix,
                publish,
                max_connections,
                stream_max_len,
            } => Store::Redis(Box::new(RedisStore::new(
                url.clone(),
                prefix.clone(),
                (*publish, *stream_max_len),
                *max_connections,
            ))),
        };
        Cache {
            store,
            flights: Flights::new(),
            bypasses: bypass::Bypasses::default(),
            pool,
            registry,
            progress,
            counters: CacheCounters {
                hits: Striped::default(),
                misses: Counter::default(),
                fills: Counter::default(),
                fill_errors: Counter::default(),
                fill_latency: Latency::new(0.000_05, 16),
            },
            retiring: Mutex::new(Vec::new()),
            flushed_for_pause: AtomicBool::new(false),
        }
    }

    /// `memory` or `redis`.
    pub fn backend(&self) -> &'static str {
        match self.store {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }

    pub fn counters(&self) -> &CacheCounters {
        &self.counters
    }

    /// Why reads must not use the cache now, if they must not: capture is paused, or this daemon
    /// is a standby on the memory backend (it applies nothing, so its memory would go stale).
    pub fn bypass_reason(&self) -> Option<&'static str> {
        if self.progress.is_paused() {
            return Some("paused");
        }
        match self.store {
            Store::Memory(_) if !self.progress.is_active() => Some("standby"),
            _ => None,
        }
    }

    /// The hot path: a value in memory that may be served, found without matching the key to a
    /// family (the entry knows its own). Counted as a hit. Redis values are read by `lookup`.
    pub fn hot(&self, key: &str) -> Option<Arc<Entry>> {
        let Store::Memory(memory) = &self.store else {
            return None;
        };
        if self.bypass_reason().is_some() {
            return None;
        }
        let entry = memory.get(key)?;
        self.counters.hits.inc();
        entry.family.counters.hits.inc();
        Some(entry)
    }

    /// One key of `family` (with the parameters the key gave it): from the cache, filled from
    /// the database on a miss (concurrent misses run one query), or straight from the database
    /// when the cache cannot be trusted now or the request asks for it.
    pub async fn lookup(
        self: &Arc<Self>,
        key: &str,
        family: &Arc<FamilyState>,
        params: Params,
        want: Want,
    ) -> Lookup {
        if let Some(problem) = family.spelling_problem(&params) {
            // No rule renders this spelling (`book:042` reads book 42, whose changes refresh
            // `book:42`): whatever is stored under it would never be refreshed.
            tracing::debug!(key = %crate::escape::Escaped(key), %problem, "a key spelled otherwise than rules render it: answered from the database");
            if want.only_if_cached {
                return Lookup::NotCached;
            }
            return self
                .database_answer(key, family, params, KEY_SPELLING)
                .await;
        }
        let bypass = if want.uncached {
            Some("no-cache")
        } else if want.paused {
            Some("paused")
        } else {
            self.bypass_reason()
        };
        if let Some(reason) = bypass {
            return self.database_answer(key, family, params, reason).await;
        }
        let cached = match &self.store {
            Store::Memory(memory) => memory.get(key),
            Store::Redis(redis) => match redis.get(key, self.progress.applied()).await {
                Ok(found) => found.map(|(body, remaining)| redis_entry(body, remaining, family)),
                Err(_) => {
                    return self
                        .database_answer(key, family, params, "redis-unavailable")
                        .await;
                }
            },
        };
        if let Some(entry) = cached {
            self.counters.hits.inc();
            family.counters.hits.inc();
            return Lookup::Value(entry, Source::Hit);
        }
        if want.only_if_cached {
            return Lookup::NotCached;
        }
        self.counters.misses.inc();
        family.counters.misses.inc();
        Lookup::of(
            self.fill(Arc::from(key), family, params).await,
            Source::Miss,
        )
    }

    /// The value computed from the database now (a query that starts after this call, shared
    /// with the concurrent bypass reads of the key), stored nowhere.
    pub(super) async fn database_answer(
        self: &Arc<Self>,
        key: &str,
        family: &Arc<FamilyState>,
        params: Params,
        reason: &'static str,
    ) -> Lookup {
        let mut outcome = Err(FillError::Superseded);
        // Superseded: everyone waiting for that query left just as this request joined it.
        for _ in 0..3 {
            outcome = self.read_through(key, family, params.clone()).await;
            if !matches!(outcome, Err(FillError::Superseded)) {
                break;
            }
        }
        Lookup::of(outcome, Source::Bypass(reason))
    }

    /// Whether a write-behind recompute of `key` is still needed: not when a reader's miss has
    /// already refilled it (that value is fresh: an invalidation supersedes fills in flight, so
    /// anything stored after it read after it). Redis is not asked: the recompute's store is
    /// guarded there.
    pub fn needs_recompute(&self, key: &str) -> bool {
        match &self.store {
            Store::Memory(memory) => memory.get(key).is_none(),
            Store::Redis(_) => true,
        }
    }

    /// How many values are cached (for `/v1/status`): in memory, the entries (some may be
    /// expired or hidden by a mark and not yet evicted); in Redis, the members of the families'
    /// groups.
    pub async fn count(&self) -> Result<u64, StoreError> {
        match &self.store {
            Store::Memory(memory) => Ok(memory.entry_count()),
            Store::Redis(redis) => {
                let live = self.registry.live();
                let groups: Vec<String> =
                    live.families.iter().map(|f| f.def.group.clone()).collect();
                redis.count(&groups).await
            }
        }
    }

    /// The bytes the values take as `max_bytes` counts them, and that bound: in memory with
    /// `max_bytes` set, else None.
    pub fn bytes(&self) -> Option<(u64, u64)> {
        match &self.store {
            Store::Memory(memory) => memory.bytes(),
            Store::Redis(_) => None,
        }
    }

    /// Redis's address, prefix and health; `None` on the memory backend.
    pub fn remote_health(&self) -> Option<(String, String, Health)> {
        match &self.store {
            Store::Memory(_) => None,
            Store::Redis(redis) => Some((redis.address(), redis.prefix.clone(), redis.health())),
        }
    }

    /// Up to `limit` cached keys (a sample for `verify`). Blocking.
    pub fn sample(&self, limit: usize) -> Result<Vec<Arc<str>>, StoreError> {
        match &self.store {
            Store::Memory(memory) => Ok(memory.keys(limit)),
            Store::Redis(redis) => {
                let live = self.registry.live();
                let groups: Vec<String> =
                    live.families.iter().map(|f| f.def.group.clone()).collect();
                Ok(redis
                    .keys(&groups, limit)?
                    .into_iter()
                    .map(Arc::from)
                    .collect())
            }
        }
    }

    /// What is stored for `key` now, as a reader would get it (for `verify`): None when nothing
    /// is; else the body (None: a cached "no row"). Blocking.
    pub fn stored(&self, key: &str) -> Result<Option<Option<Body>>, StoreError> {
        match &self.store {
            Store::Memory(memory) => Ok(memory.get(key).map(|e| e.body.clone())),
            Store::Redis(redis) => Ok(redis.get_blocking(key)?.map(Some)),
        }
    }
}

/// Whether the configured store answers (for `cachetail check`): a warning when a remote one
/// does not (not a config problem: the daemon waits for it), None otherwise. Blocking.
pub fn unreachable(settings: &crate::config::CacheSettings) -> Option<String> {
    let crate::config::Backend::Redis { url, .. } = &settings.backend else {
        return None;
    };
    let pinged = redis::client::ping(url, Duration::from_secs(2));
    pinged.err().map(|e| match &url.sentinel {
        Some(s) => format!(
            "redis (the primary `{}` per the sentinels) does not answer ({e}); the daemon will retry until it does",
            s.master
        ),
        None => format!(
            "redis at {}:{} does not answer ({e}); the daemon will retry until it does",
            url.host, url.port
        ),
    })
}

/// A value read from Redis: its age from the rest of its TTL.
fn redis_entry(body: Body, remaining: Duration, family: &Arc<FamilyState>) -> Arc<Entry> {
    let now = Instant::now();
    let age = family.def.ttl.saturating_sub(remaining);
    Arc::new(Entry::new(
        0,
        Some(body),
        Arc::clone(family),
        Box::new([]),
        now.checked_sub(age).unwrap_or(now),
    ))
}

fn query_failed(family: &FamilyState, error: &rusqlite::Error) -> String {
    format!(
        "the query of key family `{}` failed: {error}",
        family.def.pattern
    )
}
