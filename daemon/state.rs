//! What the stages share while the daemon runs: the config in force, the cache, the read pool,
//! the applied position, counters, and the reload state.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::apply::WriteBehindQueue;
use crate::cache::Cache;
use crate::config::Config;
use crate::fill::ReadPool;

/// Counters shown by `/v1/status`.
#[derive(Debug, Default)]
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
    pub cache: Cache,
    pub pool: ReadPool,
    pub stats: Stats,
    /// The last applied outbox position (the cursor), for `?fresh=1` waiters and status.
    pub applied: watch::Sender<u64>,
    pub write_behind: WriteBehindQueue,
    pub reload: Mutex<ReloadState>,
    /// Capture is paused (`cachetail pause`): reads bypass the cache.
    pub paused: AtomicBool,
    /// Tables that cannot be captured now, with why (shown in `/v1/status`).
    pub capture_failures: Mutex<Vec<(String, String)>>,
}

impl Shared {
    pub fn new(config: Config, cursor: u64) -> Shared {
        let cache = Cache::new(config.cache.max_entries);
        let pool = ReadPool::new(config.database.clone(), 8);
        let write_behind = WriteBehindQueue::new(config.write_behind.delay);
        Shared {
            config: RwLock::new(Arc::new(config)),
            cache,
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
