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

/// A connection for one piece of work: an idle one, or none (connect one: the slot is held).
pub(super) type Checkout<'a, C> = (Slot<'a>, Option<C>);

/// One slot, held while its connection is in use (or being opened): given back with the
/// connection when the work is done, else freed when dropped (the connection failed, or the
/// request went away mid-way: a cancelled read must not keep its slot).
pub(super) struct Slot<'a> {
    pool: &'a Pool,
    held: bool,
}

impl Slot<'_> {
    /// The work is done: the connection is idle again, and keeps the slot.
    pub(super) fn give_back_read(mut self, conn: AsyncConn) {
        self.held = false;
        self.pool.lock().reads.push(conn);
        self.pool.wake();
    }

    pub(super) fn give_back_store(mut self, conn: Conn) {
        self.held = false;
        self.pool.lock().stores.push(conn);
        self.pool.wake();
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.held {
            self.pool.discard();
        }
    }
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

    fn slot(&self) -> Slot<'_> {
        Slot {
            pool: self,
            held: true,
        }
    }

    /// A read connection now, if one is idle or a slot is free (an idle store connection's
    /// slot included: it is closed).
    fn try_read(&self) -> Option<Checkout<'_, AsyncConn>> {
        let mut idle = self.lock();
        if let Some(conn) = idle.reads.pop() {
            return Some((self.slot(), Some(conn)));
        }
        if idle.open < self.max {
            idle.open += 1;
            return Some((self.slot(), None));
        }
        idle.stores.pop().map(|_| (self.slot(), None))
    }

    /// A read connection, waiting at most `WAIT` for one; None: all are taken.
    pub(super) async fn read(&self) -> Option<Checkout<'_, AsyncConn>> {
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
    pub(super) fn store(&self) -> Option<Checkout<'_, Conn>> {
        let deadline = Instant::now() + WAIT;
        let mut idle = self.lock();
        loop {
            if let Some(conn) = idle.stores.pop() {
                return Some((self.slot(), Some(conn)));
            }
            if idle.open < self.max {
                idle.open += 1;
                return Some((self.slot(), None));
            }
            if idle.reads.pop().is_some() {
                return Some((self.slot(), None));
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

    /// A slot is freed (its connection failed or was never opened).
    fn discard(&self) {
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
        let pool = Pool::new(2);
        let first = pool.store().expect("a slot");
        let second = pool.store().expect("a slot");
        assert!(first.1.is_none() && second.1.is_none(), "nothing idle yet");
        assert_eq!(pool.open(), 2);
        // All taken: a store waits `WAIT`, then goes without.
        let started = Instant::now();
        assert!(pool.store().is_none());
        assert!(started.elapsed() >= WAIT);
        std::thread::scope(|scope| {
            // A slot freed meanwhile (its connection failed: the slot is dropped) goes to the
            // waiter.
            scope.spawn(|| {
                std::thread::sleep(WAIT / 4);
                drop(first);
            });
            let third = pool.store().expect("the freed slot");
            assert_eq!(pool.open(), 2);
            drop(third);
        });
        // An async read gives up too, after `WAIT`; a read that goes away mid-way (its future
        // dropped) frees its slot.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let taken = runtime.block_on(pool.read()).expect("a slot");
        assert!(runtime.block_on(pool.read()).is_none());
        drop(taken);
        drop(second);
        assert_eq!(pool.open(), 0);
    }
}
