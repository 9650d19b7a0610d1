//! The JSON the daemon reports itself with, as types shared by the server, `cachetail watch` and
//! the tests: `GET /v1/status` (`Status`), the live feed `GET /v1/events` (`FeedEvent`), and
//! `POST /v1/verify` (`VerifyReport`). The counters in `Status` and the feed's status come from
//! one list (`ops::COUNTS`), flattened into the object under their names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::counters::Summary;

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// `active`: holds the lease and applies; `standby`.
    pub role: String,
    /// `memory` or `redis`.
    pub backend: String,
    /// The remote store (Redis), when values live there.
    #[serde(rename = "redis")]
    pub remote: Option<RemoteStatus>,
    /// The last applied outbox id.
    pub cursor: u64,
    /// The newest outbox id (None: the outbox could not be read, see `head_error`).
    pub head: Option<u64>,
    /// Changes committed but not applied yet, and how long the oldest of them has waited.
    pub lag: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub latency: Latencies,
    pub head_error: Option<String>,
    /// `events`, `batches`, `invalidations`, `tag_invalidations`, `recomputes`, `apply_micros`,
    /// `lookup_micros`, `lookups`, `lookup_fallbacks`, `hits`, `misses`, `fills`, `fill_errors`,
    /// `apply_errors`, `unreadable_rows`, `outbox_rebuilds`, `verified`, `stale_found`.
    #[serde(flatten)]
    pub counters: BTreeMap<String, u64>,
    /// Values cached (None: Redis could not say).
    pub entries: Option<u64>,
    /// With `[cache] max_bytes` (in memory): the bytes the values take, counted as the bound
    /// counts them (keys, bodies, tags, per-entry overhead), and the bound. Else absent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_bytes: Option<u64>,
    pub write_behind_queue: u64,
    pub warm: Warm,
    pub paused: bool,
    pub capture_failures: Vec<CaptureFailure>,
    pub config: ConfigStatus,
    /// Unix seconds.
    pub now: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteStatus {
    pub address: String,
    pub prefix: String,
    pub ok: bool,
    /// Unix seconds.
    pub down_since: Option<u64>,
    pub last_error: Option<String>,
    pub outages: u64,
}

/// Commit → fresh and fill time, over the last `window_seconds`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latencies {
    pub window_seconds: u64,
    pub commit_to_fresh: Summary,
    pub fill: Summary,
}

/// Warm start's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Warm {
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    pub finished: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptureFailure {
    pub table: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub tracking_gaps: Vec<String>,
    pub path: Option<String>,
    pub database: String,
    /// Unix seconds.
    pub loaded_at: Option<u64>,
    pub reloads: u64,
    pub reload_failures: u64,
    pub last_reload_error: Option<String>,
    pub families: Vec<FamilyStatus>,
    pub rules: Vec<RuleStatus>,
}

/// A family: its counters and its definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FamilyStatus {
    pub pattern: String,
    #[serde(flatten)]
    pub counters: FamilyCounts,
    pub many: bool,
    pub ttl_ms: u64,
    pub tags: Vec<String>,
    /// `maintain = "incremental"` families: how the value is kept up to date (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintained: Option<Maintained>,
}

/// How a `maintain = "incremental"` family is kept up to date: its shape (`per-key`, `grouped`,
/// `scalar`), the state it keeps (rows, an estimate of their bytes), the full runs that built
/// it, and the changes applied from their rows vs. those for which part of it was re-run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Maintained {
    pub shape: String,
    pub state_rows: u64,
    pub state_bytes: u64,
    pub state_builds: u64,
    pub incremental: u64,
    pub recomputed: u64,
}

/// A family's counters: reads answered from the cache, reads that filled, values computed, and
/// the mean time of its queries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FamilyCounts {
    pub hits: u64,
    pub misses: u64,
    pub fills: u64,
    pub mean_fill_ms: Option<f64>,
}

/// A family's counters in the live feed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeedFamily {
    pub family: String,
    #[serde(flatten)]
    pub counters: FamilyCounts,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleStatus {
    pub table: String,
    pub on: Vec<String>,
    pub keys: Vec<String>,
    pub tags: Vec<String>,
    pub strategy: String,
    pub derived_from: Option<String>,
}

/// One event of the live feed (`data:` of each Server-Sent Event).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FeedEvent {
    Change(ChangeEvent),
    /// Changes not described (past 200 in one batch, or a subscriber too slow to keep up).
    Skipped {
        count: u64,
    },
    Status(Box<LiveStatus>),
}

/// An applied change: its table, operation, the row's captured columns, and what it did to the
/// cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeEvent {
    pub position: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub table: Option<String>,
    /// `insert`, `update`, `delete`, `flush` (a table), `reset` (everything: the outbox was
    /// rebuilt by hand), `unreadable`.
    pub op: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub row: Option<serde_json::Map<String, serde_json::Value>>,
    pub keys: Vec<KeyChange>,
    pub tags: Vec<String>,
    pub flush: bool,
    /// Families dropped whole instead of the keys a lookup would have found, and why.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub fallbacks: Vec<FamilyFallback>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyChange {
    pub key: String,
    pub strategy: String,
    /// The rule that reached the key: its index in the config in force (as in `/v1/status`'s
    /// `rules` and the metrics' `rule` label).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rule: Option<usize>,
    /// For a key a derived rule's lookup found: the lookup (`books.author_id where books.id =
    /// reviews.book_id`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub via: Option<String>,
}

/// A family dropped whole for a change, instead of the keys its derived rule's lookup would find.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FamilyFallback {
    pub family: String,
    pub rule: usize,
    pub via: String,
    /// Why: a table of the lookup changed after the batch, the lookup failed, or it ran past
    /// its time bound.
    pub reason: String,
}

/// The feed's status, every second: the moving numbers, not the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveStatus {
    pub cursor: u64,
    pub head: Option<u64>,
    pub lag: Option<u64>,
    pub lag_seconds: Option<f64>,
    /// `events`, `hits`, `misses`, `fills`, `fill_errors`.
    #[serde(flatten)]
    pub counters: BTreeMap<String, u64>,
    pub write_behind_queue: u64,
    pub latency: Latencies,
    pub role: String,
    pub backend: String,
    /// Whether the remote store answers (None on the in-process backend).
    #[serde(rename = "redis_ok")]
    pub remote_ok: Option<bool>,
    pub paused: bool,
    pub reloads: u64,
    pub reload_failures: u64,
    pub last_reload_error: Option<String>,
    pub families: Vec<FeedFamily>,
    pub now_ms: u64,
}

/// `POST /v1/verify`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Cached values compared with the database.
    pub checked: u64,
    /// Values that differed from the database: stale entries.
    pub stale: u64,
    /// Keys sampled but gone from the cache by the time they were compared (nothing to check).
    pub gone: u64,
    /// Keys that could not be compared because the database kept changing, or a query failed.
    pub unverified: u64,
    /// The first stale keys, for a look.
    pub stale_keys: Vec<String>,
}
