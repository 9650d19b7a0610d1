//! What the daemon reports about itself: `GET /v1/status` (`status`), `GET /metrics`
//! (`metrics`), the live feed's status (`status::live`), and `verify` (recomputing cached values
//! at an applied point). Every stage keeps its own counters; `COUNTS` is the one list of them,
//! read by the status, the feed and the metrics alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::apply::{ApplyCounters, WarmProgress, WriteBehindQueue};
use crate::cache::Cache;
use crate::counters::Counter;
use crate::db::ReadPool;
use crate::progress::Progress;
use crate::registry::Registry;
use crate::tail::TailCounters;

pub mod metrics;
pub mod status;
pub mod verify;

/// The stages' state ops reads, handed at start.
#[derive(Clone)]
pub struct Sources {
    pub registry: Arc<Registry>,
    pub cache: Arc<Cache>,
    pub pool: Arc<ReadPool>,
    pub progress: Progress,
    pub tail: Arc<TailCounters>,
    pub apply: Arc<ApplyCounters>,
    pub write_behind: Arc<WriteBehindQueue>,
    pub warm: Arc<WarmProgress>,
    pub verify: Arc<VerifyCounters>,
}

/// What `verify` found, in total, and whether one runs now.
#[derive(Debug, Default)]
pub struct VerifyCounters {
    /// Cached values compared with the database, and how many of them were stale.
    pub verified: Counter,
    pub stale_found: Counter,
    running: Arc<AtomicBool>,
}

impl VerifyCounters {
    /// Marks a verify as running, unless one is: None then. It ends when the guard goes.
    pub fn start(&self) -> Option<VerifyRunning> {
        let running = &self.running;
        (!running.swap(true, Ordering::AcqRel)).then(|| VerifyRunning(Arc::clone(running)))
    }
}

/// A verify under way.
pub struct VerifyRunning(Arc<AtomicBool>);

impl Drop for VerifyRunning {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// One counter: its name in `/v1/status` (and whether the feed's status carries it), its
/// Prometheus name and help (None: not exported as such; hits, misses and fills are exported
/// per family), and where it is read.
pub struct Count {
    pub status: &'static str,
    pub feed: bool,
    pub metric: Option<(&'static str, &'static str)>,
    pub read: fn(&Sources) -> u64,
}

/// Every counter the daemon reports, once.
pub const COUNTS: &[Count] = &[
    Count {
        status: "events",
        feed: true,
        metric: Some(("cachetail_events_applied", "Outbox rows applied.")),
        read: |s| s.tail.events.get(),
    },
    Count {
        status: "batches",
        feed: false,
        metric: Some(("cachetail_batches_applied", "Batches applied.")),
        read: |s| s.tail.batches.get(),
    },
    Count {
        status: "invalidations",
        feed: false,
        metric: Some((
            "cachetail_invalidations",
            "Keys invalidated (any strategy).",
        )),
        read: |s| s.apply.invalidations.get(),
    },
    Count {
        status: "tag_invalidations",
        feed: false,
        metric: Some(("cachetail_tag_invalidations", "Tags invalidated.")),
        read: |s| s.apply.tag_invalidations.get(),
    },
    Count {
        status: "recomputes",
        feed: false,
        metric: Some((
            "cachetail_recomputes",
            "Write-through and write-behind recomputes.",
        )),
        read: |s| s.apply.recomputes.get(),
    },
    Count {
        status: "apply_micros",
        feed: false,
        metric: Some((
            "cachetail_apply_microseconds",
            "Time spent mapping applied batches to keys and carrying out their cache actions (write-through recomputes included, lookups apart), in microseconds.",
        )),
        read: |s| s.tail.apply_micros.get(),
    },
    Count {
        status: "lookup_micros",
        feed: false,
        metric: Some((
            "cachetail_lookup_microseconds",
            "Time spent in derived rules' lookups, in microseconds.",
        )),
        read: |s| s.tail.lookup_micros.get(),
    },
    Count {
        status: "lookups",
        feed: false,
        metric: Some((
            "cachetail_lookups",
            "Derived rules' lookups asked (one per rule and lookup per batch).",
        )),
        read: |s| s.tail.lookups.get(),
    },
    Count {
        status: "lookup_fallbacks",
        feed: false,
        metric: Some((
            "cachetail_lookup_fallbacks",
            "Lookups that dropped their whole family instead (a table of the chain changed after the batch, or the lookup failed).",
        )),
        read: |s| s.tail.lookup_fallbacks.get(),
    },
    Count {
        status: "hits",
        feed: true,
        metric: None,
        read: |s| s.cache.counters().hits.get(),
    },
    Count {
        status: "misses",
        feed: true,
        metric: None,
        read: |s| s.cache.counters().misses.get(),
    },
    Count {
        status: "fills",
        feed: true,
        metric: None,
        read: |s| s.cache.counters().fills.get(),
    },
    Count {
        status: "fill_errors",
        feed: true,
        metric: Some(("cachetail_fill_errors", "Fills whose query failed.")),
        read: |s| s.cache.counters().fill_errors.get(),
    },
    Count {
        status: "apply_errors",
        feed: false,
        metric: Some((
            "cachetail_apply_errors",
            "Batches that failed and were retried.",
        )),
        read: |s| s.tail.apply_errors.get(),
    },
    Count {
        status: "unreadable_rows",
        feed: false,
        metric: Some((
            "cachetail_unreadable_rows",
            "Outbox rows that could not be decoded; each dropped what depends on its table.",
        )),
        read: |s| s.tail.unreadable_rows.get(),
    },
    Count {
        status: "outbox_rebuilds",
        feed: false,
        metric: Some((
            "cachetail_outbox_rebuilds",
            "Times the outbox was found emptied or rebuilt by hand; each dropped everything cached.",
        )),
        read: |s| s.tail.outbox_rebuilds.get(),
    },
    Count {
        status: "verified",
        feed: false,
        metric: None,
        read: |s| s.verify.verified.get(),
    },
    Count {
        status: "stale_found",
        feed: false,
        metric: None,
        read: |s| s.verify.stale_found.get(),
    },
];
