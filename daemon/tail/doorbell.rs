//! The doorbell file notifications ring to wake the tail (and the reload thread): a ring while
//! nobody waits is kept for the next wait, so no wake-up is ever lost. A doorbell, not the
//! truth: the tail also polls.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A wake-up signal that is never lost: a ring while nobody waits is kept for the next wait.
#[derive(Default)]
pub struct Doorbell {
    rung: Mutex<bool>,
    bell: Condvar,
}

impl Doorbell {
    pub fn ring(&self) {
        *self.rung.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.bell.notify_all();
    }

    /// Waits until rung or `timeout` passes; returns whether it was rung.
    pub fn wait(&self, timeout: Duration) -> bool {
        let rung = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        let (mut rung, _) = self
            .bell
            .wait_timeout_while(rung, timeout, |rung| !*rung)
            .unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *rung, false)
    }

    /// Waits the whole `timeout` whatever rings meanwhile, unless `stop` turns true (stopping
    /// rings the bell): a backoff, which the waiter's own writes to the database (they ring it
    /// through the file watcher) must not cut short.
    pub fn back_off(&self, timeout: Duration, stop: &watch::Receiver<bool>) {
        let deadline = Instant::now() + timeout;
        while !*stop.borrow() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            self.wait(left);
        }
    }
}
