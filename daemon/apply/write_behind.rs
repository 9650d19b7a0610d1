//! Write-behind: a key invalidated now and recomputed a moment later, off the app's path. A key
//! queued again before its recompute runs is recomputed once (a burst of changes to one key
//! costs one query), and the queue holds each key at most once, `MAX_QUEUED` keys at most.
//!
//! The recomputes run on threads of their own (`[write_behind] workers`), each with its own
//! SQLite connection, at the lowest CPU priority (nice 19 on Linux): they use the CPU the app's
//! writers and the tail leave free, never take it from them. While the machine is busy they
//! wait, and the changes that keep coming to a key queued meanwhile coalesce into its one
//! recompute. Freshness does not depend on them: the key was removed when its change was
//! applied, so until its recompute lands a read misses and fills from the database.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::ApplyCounters;
use crate::cache::Cache;
use crate::escape::Escaped;
use crate::progress::Progress;
use crate::registry::Registry;

/// Keys waiting for a recompute, at most. Past it, a key is not queued: it stays removed (a read
/// refills it), as with the delete strategy.
pub const MAX_QUEUED: usize = 100_000;

/// Keys waiting for a write-behind recompute, each at most once.
pub struct WriteBehindQueue {
    delay: Duration,
    state: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    keys: HashSet<String>,
    due: VecDeque<(Instant, String)>,
    stopped: bool,
}

impl WriteBehindQueue {
    pub fn new(delay: Duration) -> WriteBehindQueue {
        WriteBehindQueue {
            delay,
            state: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a recompute of `key` after the delay, unless one is already queued (or the queue
    /// is full: the key then stays removed until a read refills it).
    pub fn push(&self, key: &str) {
        let mut state = self.lock();
        if state.keys.len() >= MAX_QUEUED || state.keys.contains(key) {
            return;
        }
        state.keys.insert(key.to_owned());
        let was_empty = state.due.is_empty();
        state
            .due
            .push_back((Instant::now() + self.delay, key.to_owned()));
        if was_empty {
            self.wake.notify_all();
        }
    }

    pub fn depth(&self) -> usize {
        self.lock().due.len()
    }

    /// Stops the workers: each returns from `next_due` at once.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_all();
    }

    /// The next key that is due, waiting for it; `None` once stopped.
    fn next_due(&self) -> Option<String> {
        let mut state = self.lock();
        loop {
            if state.stopped {
                return None;
            }
            let now = Instant::now();
            state = match state.due.front() {
                None => self.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some((at, _)) if *at > now => {
                    let wait = *at - now;
                    self.wake
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                Some(_) => {
                    let (_, key) = state.due.pop_front()?;
                    state.keys.remove(&key);
                    if !state.due.is_empty() {
                        // Another worker may take the next one.
                        self.wake.notify_one();
                    }
                    return Some(key);
                }
            };
        }
    }
}

/// What a worker needs, handed to it at start.
#[derive(Clone)]
pub struct Workers {
    pub queue: Arc<WriteBehindQueue>,
    pub cache: Arc<Cache>,
    pub registry: Arc<Registry>,
    pub progress: Progress,
    pub counters: Arc<ApplyCounters>,
    pub database: PathBuf,
}

impl Workers {
    /// Starts `count` worker threads; they run until `queue.stop()`.
    pub fn start(self, count: usize) -> Vec<std::thread::JoinHandle<()>> {
        (0..count)
            .filter_map(|n| {
                let workers = self.clone();
                std::thread::Builder::new()
                    .name(format!("cachetail-wb-{n}"))
                    .spawn(move || workers.run())
                    .ok()
            })
            .collect()
    }

    /// One worker: at the lowest priority, recomputes due keys until stopped.
    fn run(self) {
        lower_priority();
        let mut conn: Option<Connection> = None;
        while let Some(key) = self.queue.next_due() {
            // Paused: nothing is cached (reads answer from the database). A reader's miss may
            // have refilled it since: then there is nothing to redo.
            if self.progress.is_paused() || !self.cache.needs_recompute(&key) {
                continue;
            }
            let live = self.registry.live();
            let Some((family, params)) = live.match_key(&key) else {
                continue;
            };
            let conn = match &mut conn {
                Some(conn) => conn,
                empty => match crate::db::open_reader(&self.database) {
                    Ok(opened) => empty.insert(opened),
                    Err(e) => {
                        // The key stays removed: a read refills it.
                        tracing::warn!(error = %Escaped(&e), "write-behind: opening a connection failed; the key is left to the next read");
                        continue;
                    }
                },
            };
            self.counters.recomputes.inc();
            self.cache.refresh_now(conn, &key, family, &params);
        }
    }
}

/// This thread at nice 19 (Linux: the priority is per thread): it runs when the app's writers
/// and the tail leave a CPU free.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), LOWEST_PRIORITY)
    {
        tracing::debug!(error = %e, "write-behind: lowering the worker's priority failed");
    }
}

#[cfg(target_os = "linux")]
const LOWEST_PRIORITY: i32 = 19;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_queued_once_and_the_queue_is_bounded() {
        let queue = WriteBehindQueue::new(Duration::ZERO);
        queue.push("a");
        queue.push("a");
        assert_eq!(queue.depth(), 1);
        for i in 0..MAX_QUEUED + 10 {
            queue.push(&format!("k{i}"));
        }
        assert_eq!(queue.depth(), MAX_QUEUED);
        assert_eq!(queue.next_due().as_deref(), Some("a"));
        queue.stop();
        assert_eq!(queue.next_due(), None);
    }
}
