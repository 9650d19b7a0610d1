//! A time after which the statement running on one connection is interrupted: armed around a
//! statement that must not run long (a derived rule's lookup), watched by the connection's
//! progress handler (which may do other work too: the tail's also renews its lease).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// Shared between the code that arms it and the connection's progress handler. Unarmed, the
/// handler's check is one atomic load.
#[derive(Clone)]
pub struct Deadline(Arc<Inner>);

struct Inner {
    origin: Instant,
    /// Nanoseconds after `origin` past which statements stop; 0 when unarmed.
    at: AtomicU64,
}

impl Default for Deadline {
    fn default() -> Deadline {
        Deadline(Arc::new(Inner {
            origin: Instant::now(),
            at: AtomicU64::new(0),
        }))
    }
}

/// Virtual machine steps between two looks at the clock while a deadline is armed.
pub const STEPS_BETWEEN_CHECKS: i32 = 10_000;

impl Deadline {
    /// Statements stop once `bound` has passed, until the guard is dropped.
    pub fn arm(&self, bound: Duration) -> Armed<'_> {
        let at = self
            .now()
            .saturating_add(bound.as_nanos().try_into().unwrap_or(u64::MAX));
        self.0.at.store(at.max(1), Ordering::Relaxed);
        Armed(self)
    }

    /// Whether an armed deadline has passed (for a progress handler: true interrupts).
    pub fn passed(&self) -> bool {
        let at = self.0.at.load(Ordering::Relaxed);
        at != 0 && self.now() > at
    }

    /// Installs a progress handler on `conn` that watches only this deadline.
    pub fn watch(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        let deadline = self.clone();
        conn.progress_handler(STEPS_BETWEEN_CHECKS, Some(move || deadline.passed()))
    }

    fn now(&self) -> u64 {
        u64::try_from(self.0.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// An armed deadline; disarmed when dropped.
pub struct Armed<'a>(&'a Deadline);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.0.at.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_armed_deadline_interrupts_a_long_statement_and_then_nothing() {
        let mut conn = Connection::open_in_memory().expect("open");
        let deadline = Deadline::default();
        deadline.watch(&mut conn).expect("watch");
        let endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n";
        let started = Instant::now();
        let stopped = {
            let _armed = deadline.arm(Duration::from_millis(50));
            conn.query_row(endless, [], |row| row.get::<_, i64>(0))
        };
        assert!(
            stopped.as_ref().is_err_and(crate::db::is_interrupted),
            "{stopped:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // Disarmed: a statement runs to its end.
        let counted: i64 = conn
            .query_row("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000) SELECT count(*) FROM n", [], |row| row.get(0))
            .expect("runs");
        assert_eq!(counted, 300_000);
    }
}
