//! What the stages share while the daemon runs: the config in force, the cache, the read pool,
//! the applied position, counters, and the reload state.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::apply::WriteBehindQueue;
use crate::cache::Cache;
use crate::config::{Backend, Config};
use crate::fill::ReadPool;
use crate::latency::Recent;
use crate::redis_cache::RedisCache;

/// Counters shown by `/v1/status`.
#[derive(Debug)]
pub struct Stats {
    pub events: AtomicU64,
    pub batches: AtomicU64,
    pub invalidations: AtomicU64,
    pub tag_invalidations: AtomicU64,
    pub recomputes: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub fills: AtomicU64,
    pub fill_errors: AtomicU64,
    pub apply_errors: AtomicU64,
    /// Cached values `verify` compared with the database, and how many of them were stale.
    pub verified: AtomicU64,
    pub stale_found: AtomicU64,
    /// Capture (re)installs after start-up (a migration, a reload, pause/resume).
    pub reinstalls: AtomicU64,
    /// When the tail last found nothing left to apply (unix ms): lag in seconds is the time
    /// since, while there is lag.
    pub caught_up_at_ms: AtomicU64,
    /// How long fills' queries took (seconds).
    pub fill_seconds: prometheus_client::metrics::histogram::Histogram,
    /// From a write (its captured time) to its cache actions done (seconds).
    pub fresh_seconds: prometheus_client::metrics::histogram::Histogram,
    /// The same two, recent samples, for percentiles in `/v1/status` and the dashboard.
    pub fill_recent: Recent,
    pub fresh_recent: Recent,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            events: AtomicU64::default(),
            batches: AtomicU64::default(),
            invalidations: AtomicU64::default(),
            tag_invalidations: AtomicU64::default(),
            recomputes: AtomicU64::default(),
            hits: AtomicU64::default(),
            misses: AtomicU64::default(),
            fills: AtomicU64::default(),
            fill_errors: AtomicU64::default(),
            apply_errors: AtomicU64::default(),
            verified: AtomicU64::default(),
            stale_found: AtomicU64::default(),
            reinstalls: AtomicU64::default(),
            caught_up_at_ms: AtomicU64::default(),
            // 50 µs to ~1.6 s, doubling.
            fill_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 16),
            ),
            // 250 µs to ~8 s, doubling (the captured time has millisecond precision).
            fresh_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_25, 2.0, 16),
            ),
            fill_recent: Recent::default(),
            fresh_recent: Recent::default(),
        }
    }
}

/// The outcome of the last config reloads.
#[derive(Debug, Default, Clone)]
pub struct ReloadState {
    pub reloads: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub loaded_at: Option<SystemTime>,
}

pub struct Shared {
    config: RwLock<Arc<Config>>,
    /// Values in memory, and (with either backend) the fills in flight.
    pub cache: Cache,
    /// The shared cache, when `cache.backend = "redis"`.
    pub redis: Option<RedisCache>,
    /// This daemon holds the lease and applies the outbox (else it is a standby).
    pub active: AtomicBool,
    /// The lease epoch this daemon applies under (its fencing token in Redis).
    pub epoch: AtomicU64,
    /// Redis groups of families a reload replaced, (pattern, group), not yet retired in Redis.
    retired: Mutex<Vec<(String, String)>>,
    pub pool: ReadPool,
    pub stats: Stats,
    /// The last applied outbox position (the cursor), for `?fresh=1` waiters and status.
    pub applied: watch::Sender<u64>,
    pub write_behind: WriteBehindQueue,
    pub reload: Mutex<ReloadState>,
    /// Capture is paused (`cachetail pause`): reads bypass the cache.
    pub paused: AtomicBool,
    /// The live change feed (`GET /v1/events`).
    pub events: crate::events::Feed,
    /// Set when the daemon stops: long-lived streams end so shutdown need not wait for them.
    pub stopping: watch::Sender<bool>,
    /// Warm start's progress.
    pub warm: crate::warm::WarmProgress,
    /// Tables that cannot be captured now, with why (shown in `/v1/status`).
    pub capture_failures: Mutex<Vec<(String, String)>>,
}

impl Shared {
    /// Runs `work` on a pooled read connection, on tokio's blocking pool (SQLite blocks).
    pub async fn read<R: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, String> {
        let shared = Arc::clone(self);
        match tokio::task::spawn_blocking(move || shared.pool.with(work)).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn new(config: Config, cursor: u64) -> Shared {
        let cache = Cache::new(config.cache.max_entries);
        let pool = ReadPool::new(config.database.clone(), 8);
        let write_behind = WriteBehindQueue::new(config.write_behind.delay);
        let redis = match &config.cache.backend {
            Backend::Memory => None,
            Backend::Redis {
                url,
                prefix,
                publish,
            } => Some(RedisCache::new(url.clone(), prefix.clone(), *publish)),
        };
        Shared {
            config: RwLock::new(Arc::new(config)),
            cache,
            redis,
            active: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            retired: Mutex::new(Vec::new()),
            pool,
            stats: Stats::default(),
            applied: watch::channel(cursor).0,
            write_behind,
            reload: Mutex::new(ReloadState {
                loaded_at: Some(SystemTime::now()),
                ..ReloadState::default()
            }),
            paused: AtomicBool::new(false),
            capture_failures: Mutex::new(Vec::new()),
            warm: crate::warm::WarmProgress::default(),
            events: crate::events::feed(),
            stopping: watch::channel(false).0,
        }
    }

    /// The config in force now. Cheap: an `Arc` clone under a read lock.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts a new config in force, atomically for every stage.
    pub fn swap_config(&self, config: Arc<Config>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// Records families a reload replaced, for the tail to retire in Redis.
    pub fn retire_families(&self, families: impl IntoIterator<Item = (String, String)>) {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(families);
    }

    pub fn retired_families(&self) -> Vec<(String, String)> {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn forget_retired(&self, done: &[(String, String)]) {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|f| !done.contains(f));
    }

    /// Whether reads must skip the in-process cache: capture is paused, or this daemon is a
    /// standby with the memory backend (it applies nothing, so its memory would go stale).
    pub fn bypass_cache(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::Acquire)
            || (self.redis.is_none() && !self.active.load(std::sync::atomic::Ordering::Acquire))
    }

    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    pub fn reload_state(&self) -> ReloadState {
        self.reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
