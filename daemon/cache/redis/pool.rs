//! The daemon's connections to Redis for reads (async, on the runtime) and for fills' stores
//! (blocking), capped together: every open connection, idle or in use, takes one of `max`
//! slots (the tail's own connection aside). A request that finds no idle connection and no free
//! slot takes the slot of an idle connection of the other kind, or waits for one at most
//! `WAIT`; past it, it goes without Redis (a read answers from the database, a fill is not
//! stored), as when Redis is down. So a burst of requests, or a Redis that stopped answering,
//! never opens a connection per request.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::resp::{AsyncConn, Conn};

/// How long a request waits for a connection when all are taken.
const WAIT: Duration = Duration::from_millis(100);

/// A connection for one piece of work: an idle one, or a slot for a new one.
pub(super) enum Checkout<C> {
    Idle(C),
    /// A slot is reserved: connect, then give the connection back (or `discard` the slot).
    Open,
}

#[derive(Default)]
struct Idle {
    /// Open connections, idle or in use.
    open: usize,
    reads: Vec<AsyncConn>,
    stores: Vec<Conn>,
}

pub(super) struct Pool {
    max: usize,
    idle: Mutex<Idle>,
    /// Blocking waiters (stores) and async ones (reads) are both woken when a slot frees.
    freed: Condvar,
    freed_async: Notify,
}

impl Pool {
    pub(super) fn new(max: usize) -> Pool {
        Pool {
            max: max.max(1),
            idle: Mutex::new(Idle::default()),
            freed: Condvar::new(),
            freed_async: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A read connection now, if one is idle or a slot is free (an idle store connection's
    /// slot included: it is closed).
    fn try_read(&self) -> Option<Checkout<AsyncConn>> {
        let mut idle = self.lock();
        if let Some(conn) = idle.reads.pop() {
            return Some(Checkout::Idle(conn));
        }
        if idle.open < self.max {
            idle.open += 1;
            return Some(Checkout::Open);
        }
        idle.stores.pop().map(|_| Checkout::Open)
    }

    /// A read connection, waiting at most `WAIT` for one; None: all are taken.
    pub(super) async fn read(&self) -> Option<Checkout<AsyncConn>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let freed = self.freed_async.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(checkout) = self.try_read() {
                return Some(checkout);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.try_read();
            }
        }
    }

    /// A store connection, waiting at most `WAIT` for one (blocking); None: all are taken.
    pub(super) fn store(&self) -> Option<Checkout<Conn>> {
        let deadline = Instant::now() + WAIT;
        let mut idle = self.lock();
        loop {
            if let Some(conn) = idle.stores.pop() {
                return Some(Checkout::Idle(conn));
            }
            if idle.open < self.max {
                idle.open += 1;
                return Some(Checkout::Open);
            }
            if idle.reads.pop().is_some() {
                return Some(Checkout::Open);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            idle = self
                .freed
                .wait_timeout(idle, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A read connection is idle again.
    pub(super) fn give_back_read(&self, conn: AsyncConn) {
        self.lock().reads.push(conn);
        self.wake();
    }

    pub(super) fn give_back_store(&self, conn: Conn) {
        self.lock().stores.push(conn);
        self.wake();
    }

    /// A connection in use was closed (it failed), or a slot reserved for one was not used.
    pub(super) fn discard(&self) {
        let mut idle = self.lock();
        idle.open = idle.open.saturating_sub(1);
        drop(idle);
        self.wake();
    }

    fn wake(&self) {
        self.freed.notify_one();
        self.freed_async.notify_one();
    }

    /// Open connections, idle or in use.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.lock().open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_a_waiter_gets_a_freed_one_or_gives_up() {
        let pool = std::sync::Arc::new(Pool::new(2));
        assert!(matches!(pool.store(), Some(Checkout::Open)));
        assert!(matches!(pool.store(), Some(Checkout::Open)));
        assert_eq!(pool.open(), 2);
        // All taken: a store waits `WAIT`, then goes without.
        let started = Instant::now();
        assert!(pool.store().is_none());
        assert!(started.elapsed() >= WAIT);
        // A slot freed meanwhile goes to the waiter.
        let freer = {
            let pool = std::sync::Arc::clone(&pool);
            std::thread::spawn(move || {
                std::thread::sleep(WAIT / 4);
                pool.discard();
            })
        };
        assert!(matches!(pool.store(), Some(Checkout::Open)));
        freer.join().expect("freer");
        assert_eq!(pool.open(), 2);
        // An async read gives up too, after `WAIT`.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        assert!(runtime.block_on(pool.read()).is_none());
        pool.discard();
        assert!(matches!(
            runtime.block_on(pool.read()),
            Some(Checkout::Open)
        ));
        assert_eq!(pool.open(), 2);
    }
}
