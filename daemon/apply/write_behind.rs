//! Write-behind: a key invalidated now and recomputed a moment later by a bounded pool of
//! workers. A key queued again within the delay is recomputed once (a burst of changes to one
//! key costs one query).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::ApplyCounters;
use crate::cache::Cache;
use crate::progress::Progress;
use crate::registry::Registry;

/// Keys waiting for a write-behind recompute, each at most once.
pub struct WriteBehindQueue {
    delay: Duration,
    state: Mutex<Pending>,
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    keys: HashSet<String>,
    due: VecDeque<(Instant, String)>,
}

impl WriteBehindQueue {
    pub fn new(delay: Duration) -> WriteBehindQueue {
        WriteBehindQueue {
            delay,
            state: Mutex::new(Pending::default()),
            wake: Notify::new(),
        }
    }

    /// Queues a recompute of `key` after the delay, unless one is already queued.
    pub fn push(&self, key: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.keys.insert(key.to_owned()) {
            let was_empty = state.due.is_empty();
            state
                .due
                .push_back((Instant::now() + self.delay, key.to_owned()));
            if was_empty {
                self.wake.notify_waiters();
            }
        }
    }

    pub fn depth(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .due
            .len()
    }

    /// The next key that is due, or how long to wait for one (None: the queue is empty).
    fn take_due(&self) -> Result<String, Option<Instant>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.due.front() {
            None => Err(None),
            Some((at, _)) if *at > Instant::now() => Err(Some(*at)),
            Some(_) => {
                let (_, key) = state.due.pop_front().ok_or(None)?;
                state.keys.remove(&key);
                Ok(key)
            }
        }
    }
}

/// One write-behind worker: recomputes due keys until the daemon stops (it is aborted then).
pub async fn worker(
    queue: Arc<WriteBehindQueue>,
    cache: Arc<Cache>,
    registry: Arc<Registry>,
    progress: Progress,
    counters: Arc<ApplyCounters>,
) {
    loop {
        let notified = queue.wake.notified();
        match queue.take_due() {
            // Paused: nothing is cached (reads answer from the database).
            Ok(_) if progress.is_paused() => {}
            // A reader's miss may have refilled it since: then there is nothing to redo.
            Ok(key) if !cache.needs_recompute(&key) => {}
            Ok(key) => {
                let live = registry.live();
                if let Some((family, params)) = live.match_key(&key) {
                    counters.recomputes.inc();
                    let _ = cache.fill(Arc::from(key.as_str()), family, params).await;
                }
            }
            Err(None) => notified.await,
            Err(Some(at)) => {
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
        }
    }
}
