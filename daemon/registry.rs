//! What the running daemon keeps beside the config in force, which is plain data: per family its
//! runtime state (the floor below which its values are not served, whether a reload retired it,
//! how its query compares its placeholders under the schema last seen, its counters), per rule its counters, what each family's query reads (from `check`), and the
//! outcome of the reloads so far.
//!
//! `Live` is one consistent view: a config with the state aligned to its families and rules. A
//! reload builds the next `Live` from a `ConfigDiff` (continued families keep their state, and
//! so their cached values; the others are retired) and swaps it in whole.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::config::spelling::FamilySpelling;
use crate::config::{Config, ConfigDiff, Family, Reads};
use crate::counters::{Counter, Striped};
use crate::maintain::{Settled, Size};
use crate::types::Params;

/// One family's runtime state. Cached values point at it: a value of a retired family, or read
/// before its floor, is not served.
#[derive(Debug)]
pub struct FamilyState {
    pub def: Arc<Family>,
    floor: AtomicU64,
    retired: AtomicBool,
    /// How its query compares its placeholders under the schema last seen: which spellings of
    /// its keys may be cached.
    spelling: RwLock<Arc<FamilySpelling>>,
    pub counters: FamilyCounters,
}

/// A family's counters, kept across reloads that leave it unchanged.
#[derive(Debug, Default)]
pub struct FamilyCounters {
    /// Bumped by every hit from every thread: striped.
    pub hits: Striped,
    pub misses: Counter,
    pub fills: Counter,
    /// Queries run for this family (fills and recomputes), and their total time.
    pub computes: Counter,
    pub compute_micros: Counter,
    /// `maintain = "incremental"`: changes applied from their rows, changes for which part of
    /// the state was re-run instead, full runs that built the state, and the state's size.
    pub incremental: Counter,
    pub recomputed: Counter,
    pub state_builds: Counter,
    pub state_rows: Counter,
    pub state_bytes: Counter,
}

impl FamilyCounters {
    pub fn note_built(&self, size: Size) {
        self.state_builds.inc();
        self.note_size(size);
    }

    pub fn note_settled(&self, settled: Settled, size: Size) {
        self.incremental.add(settled.incremental);
        self.recomputed.add(settled.recomputed);
        self.note_size(size);
    }

    fn note_size(&self, size: Size) {
        self.state_rows.set(size.rows);
        self.state_bytes.set(size.bytes);
    }
}

/// A rule's counters since the config that holds it was loaded.
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Keys and tags it invalidated, and of those keys the ones it had recomputed.
    pub invalidations: Counter,
    pub recomputes: Counter,
}

impl FamilyState {
    fn new(def: Arc<Family>, spelling: Arc<FamilySpelling>) -> FamilyState {
        FamilyState {
            def,
            floor: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            spelling: RwLock::new(spelling),
            counters: FamilyCounters::default(),
        }
    }

    /// How its query compares its placeholders (see `config::spelling`).
    pub fn spelling(&self) -> Arc<FamilySpelling> {
        Arc::clone(&self.spelling.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Why `params` (a requested key's) are not spelled as rules render the rows they read, if
    /// they are not: such a key is never cached.
    pub fn spelling_problem(&self, params: &Params) -> Option<String> {
        self.spelling().problem(params)
    }

    /// Records how its query compares its placeholders under a newer schema.
    pub fn set_spelling(&self, spelling: Arc<FamilySpelling>) {
        *self.spelling.write().unwrap_or_else(|e| e.into_inner()) = spelling;
    }

    /// Values computed before this outbox position are not served (a family flush).
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }

    pub fn raise_floor(&self, position: u64) {
        self.floor.fetch_max(position, Ordering::AcqRel);
    }

    /// A reload replaced this family: values it computed are no longer served.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}

/// A config in force with its runtime state.
#[derive(Debug)]
pub struct Live {
    pub config: Arc<Config>,
    /// Aligned with `config.families`.
    pub families: Vec<Arc<FamilyState>>,
    /// Aligned with `config.rules`.
    pub rules: Vec<RuleCounters>,
    pub reads: Reads,
}

impl Live {
    fn new(config: Config, reads: Reads, keep: impl Fn(usize) -> Option<Arc<FamilyState>>) -> Live {
        let families = config
            .families
            .iter()
            .enumerate()
            .map(|(i, def)| {
                let spelling = reads.spelling(def.pattern.source());
                match keep(i) {
                    Some(kept) => {
                        kept.set_spelling(spelling);
                        kept
                    }
                    None => Arc::new(FamilyState::new(Arc::clone(def), spelling)),
                }
            })
            .collect();
        let rules = config
            .rules
            .iter()
            .map(|_| RuleCounters::default())
            .collect();
        Live {
            config: Arc::new(config),
            families,
            rules,
            reads,
        }
    }

    /// The family whose pattern matches `key`, with the parameters the key gives it.
    pub fn match_key(&self, key: &str) -> Option<(&Arc<FamilyState>, Params)> {
        let (index, params) = self.config.match_key(key)?;
        Some((self.families.get(index)?, params))
    }

    /// The family written as `pattern` in the config.
    pub fn family_named(&self, pattern: &str) -> Option<&Arc<FamilyState>> {
        self.families.get(self.config.family_named(pattern)?)
    }

    /// Whether `family`'s values may depend on `table`: its query reads it (or `check` could
    /// not tell), or a rule on `table` refreshes it. What a flush of the table (its capture was
    /// missing, or one of its rows could not be decoded) drops: too much is safe, too little is
    /// not.
    pub fn depends_on(&self, family: &FamilyState, table: &str) -> bool {
        self.reads
            .of(family.def.pattern.source())
            .is_none_or(|reads| reads.reads_table(table))
            || self.config.refreshes(table, &family.def)
    }

    /// The families whose values may depend on `table` (`depends_on`).
    pub fn families_depending_on<'a>(
        &'a self,
        table: &'a str,
    ) -> impl Iterator<Item = &'a Arc<FamilyState>> + 'a {
        self.families
            .iter()
            .filter(move |family| self.depends_on(family, table))
    }
}

/// The outcome of the config reloads so far.
#[derive(Debug, Default, Clone)]
pub struct ReloadLog {
    pub reloads: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub loaded_at: Option<SystemTime>,
}

/// The config in force and its runtime state, swapped whole by a reload.
pub struct Registry {
    live: RwLock<Arc<Live>>,
    log: Mutex<ReloadLog>,
}

impl Registry {
    pub fn new(config: Config, reads: Reads) -> Registry {
        Registry {
            live: RwLock::new(Arc::new(Live::new(config, reads, |_| None))),
            log: Mutex::new(ReloadLog {
                loaded_at: Some(SystemTime::now()),
                ..ReloadLog::default()
            }),
        }
    }

    /// The config in force with its state. Cheap: an `Arc` clone under a read lock.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.live().config)
    }

    /// Puts `config` in force as `diff` (from the running config to it) says: continued families
    /// keep their state, the others are retired. Returns the retired families.
    pub fn apply(&self, config: Config, reads: Reads, diff: &ConfigDiff) -> Vec<Arc<FamilyState>> {
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        let running = Arc::clone(&live);
        let next = Live::new(config, reads, |i| {
            let continued = diff.continued.get(i).copied().flatten()?;
            running.families.get(continued).cloned()
        });
        let retired: Vec<Arc<FamilyState>> = diff
            .retired
            .iter()
            .filter_map(|&i| running.families.get(i).cloned())
            .collect();
        for family in &retired {
            family.retired.store(true, Ordering::Release);
        }
        *live = Arc::new(next);
        retired
    }

    /// Records a reload's outcome.
    pub fn record_reload(&self, outcome: &Result<(), String>) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(()) => {
                log.reloads += 1;
                log.last_error = None;
                log.loaded_at = Some(SystemTime::now());
            }
            Err(error) => {
                log.failures += 1;
                log.last_error = Some(error.clone());
            }
        }
    }

    pub fn reload_log(&self) -> ReloadLog {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
