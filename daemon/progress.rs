//! The tail's progress and role, as it publishes them: the applied position (what `?fresh=1`
//! waits for), whether this daemon holds the lease (active) or stands by, whether capture is
//! paused, the tables that cannot be captured, and when the tail was last caught up.
//!
//! The tail owns the one `ProgressWriter` (made by `channel`, handed to the tail thread at
//! start): nothing else can change these. Every other stage reads through a `Progress`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

struct Inner {
    applied: watch::Sender<u64>,
    active: AtomicBool,
    paused: AtomicBool,
    caught_up_at_ms: AtomicU64,
    capture_failures: Mutex<Vec<(String, String)>>,
}

/// Read access to the tail's progress; cheap to clone.
#[derive(Clone)]
pub struct Progress(Arc<Inner>);

/// Write access, held by the tail alone.
pub struct ProgressWriter(Arc<Inner>);

/// A new progress starting at the durable `cursor`, standing by (not active), not paused.
pub fn channel(cursor: u64) -> (ProgressWriter, Progress) {
    let inner = Arc::new(Inner {
        applied: watch::channel(cursor).0,
        active: AtomicBool::new(false),
        paused: AtomicBool::new(false),
        caught_up_at_ms: AtomicU64::new(0),
        capture_failures: Mutex::new(Vec::new()),
    });
    (ProgressWriter(Arc::clone(&inner)), Progress(inner))
}

impl Progress {
    /// The last applied outbox position.
    pub fn applied(&self) -> u64 {
        *self.0.applied.borrow()
    }

    /// Wakes on every move of the applied position (`?fresh=1`, verify).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.applied.subscribe()
    }

    /// This daemon holds the lease and applies the outbox (else it is a standby).
    pub fn is_active(&self) -> bool {
        self.0.active.load(Ordering::Acquire)
    }

    /// Capture is paused (`cachetail pause`): reads bypass the cache.
    pub fn is_paused(&self) -> bool {
        self.0.paused.load(Ordering::Acquire)
    }

    /// When the tail last found nothing left to apply (unix ms; 0: never).
    pub fn caught_up_at_ms(&self) -> u64 {
        self.0.caught_up_at_ms.load(Ordering::Relaxed)
    }

    /// Tables that cannot be captured now, with why.
    pub fn capture_failures(&self) -> Vec<(String, String)> {
        self.0
            .capture_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ProgressWriter {
    pub fn reader(&self) -> Progress {
        Progress(Arc::clone(&self.0))
    }

    /// Every change up to `position` is applied (it only moves forward, but after a takeover,
    /// which starts from the durable cursor).
    pub fn applied(&self, position: u64) {
        self.0.applied.send_replace(position);
    }

    /// A standby follows the durable cursor: moves the applied position forward only.
    pub fn follow(&self, cursor: u64) {
        self.0.applied.send_if_modified(|applied| {
            let moved = cursor > *applied;
            *applied = (*applied).max(cursor);
            moved
        });
    }

    /// Returns whether it was active before.
    pub fn set_active(&self, active: bool) -> bool {
        self.0.active.swap(active, Ordering::AcqRel)
    }

    /// Returns whether it was paused before.
    pub fn set_paused(&self, paused: bool) -> bool {
        self.0.paused.swap(paused, Ordering::AcqRel)
    }

    pub fn caught_up(&self, now_ms: u64) {
        self.0.caught_up_at_ms.store(now_ms, Ordering::Relaxed);
    }

    pub fn set_capture_failures(&self, failures: &[(String, String)]) {
        self.0
            .capture_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone_from(&failures.to_vec());
    }
}
