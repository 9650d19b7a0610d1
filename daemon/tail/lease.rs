//! The lease: of the daemons on one database, exactly one applies the outbox.
//!
//! The lease is a row in the database (`cachetail_lease`): holder, epoch, expiry. The holder
//! renews it while it applies; a standby takes it when it has expired, or at once when the
//! holder's process is gone (same host: SQLite's WAL needs every process on one machine). Each
//! takeover raises the epoch, the fencing token:
//!
//! - the cursor (and pruning) moves only in a transaction that finds this daemon's holder and
//!   epoch still in the row, so a daemon paused past its lease cannot move it when it resumes;
//! - with Redis, each batch carries the epoch and Redis refuses one older than it has seen;
//! - before each batch the daemon renews the lease (when a third of it has passed): a daemon
//!   that lost it learns so there, and stands by.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

pub struct Lease {
    holder: String,
    host: String,
    duration: Duration,
    /// The epoch while this daemon holds the lease.
    epoch: Option<i64>,
    /// When the last acquisition or renewal started (the lease runs from no earlier than this).
    renewed_at: Instant,
}

/// Who holds the lease now, as the database says.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    pub holder: String,
    pub epoch: i64,
    pub expires_at_ms: i64,
}

impl Lease {
    pub fn new(duration: Duration) -> Lease {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        Lease {
            holder: format!("{host}:{}:{nonce:08x}", std::process::id()),
            host,
            duration,
            epoch: None,
            renewed_at: Instant::now(),
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The fencing token while held.
    pub fn epoch(&self) -> Option<i64> {
        self.epoch
    }

    /// Whether this daemon holds the lease (as far as it knows: `keep` finds out).
    pub fn held(&self) -> bool {
        self.epoch.is_some()
    }

    /// The lease row, if any.
    pub fn current(conn: &Connection) -> rusqlite::Result<Option<Holder>> {
        conn.prepare_cached(
            "SELECT holder, epoch, expires_at FROM cachetail_lease WHERE name = 'main'",
        )?
        .query_row([], |row| {
            Ok(Holder {
                holder: row.get(0)?,
                epoch: row.get(1)?,
                expires_at_ms: row.get(2)?,
            })
        })
        .optional()
    }

    /// Takes the lease if nobody holds it, it expired, or its holder's process is gone.
    /// Returns whether this daemon holds it now.
    pub fn try_acquire(&mut self, conn: &Connection) -> rusqlite::Result<bool> {
        // A cheap read first: a standby polls, and must not take the write lock each time.
        let seen = Lease::current(conn)?;
        if seen.as_ref().is_some_and(|h| !self.takeable(h)) {
            return Ok(false);
        }
        let started = Instant::now();
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        let current = Lease::current(&tx)?;
        if current.as_ref().is_some_and(|h| !self.takeable(h)) {
            return Ok(false);
        }
        let epoch = current.map_or(1, |h| h.epoch + 1);
        tx.prepare_cached(
            "INSERT INTO cachetail_lease (name, holder, epoch, expires_at) VALUES ('main', ?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, epoch = excluded.epoch, expires_at = excluded.expires_at",
        )?
        .execute(params![self.holder, epoch, self.expiry_ms()])?;
        tx.commit()?;
        self.epoch = Some(epoch);
        self.renewed_at = started;
        Ok(true)
    }

    fn takeable(&self, current: &Holder) -> bool {
        current.holder == self.holder
            || current.expires_at_ms <= now_ms()
            || self.holder_is_gone(&current.holder)
    }

    /// Whether the holder was a process on this host that no longer runs.
    fn holder_is_gone(&self, holder: &str) -> bool {
        let mut parts = holder.rsplitn(3, ':');
        let (_, pid, host) = (parts.next(), parts.next(), parts.next());
        match (host, pid.and_then(|p| p.parse::<u32>().ok())) {
            (Some(host), Some(pid)) if host == self.host && self.host != "unknown" => {
                !std::path::Path::new(&format!("/proc/{pid}")).exists()
            }
            _ => false,
        }
    }

    /// Renews the lease when a third of it has passed. Returns false when it was lost (another
    /// daemon took over): from then on this daemon must apply nothing.
    pub fn keep(&mut self, conn: &Connection) -> rusqlite::Result<bool> {
        let Some(epoch) = self.epoch else {
            return Ok(false);
        };
        if self.renewed_at.elapsed() < self.duration / 3 {
            return Ok(true);
        }
        let started = Instant::now();
        let renewed = conn
            .prepare_cached(
                "UPDATE cachetail_lease SET expires_at = ?1 WHERE name = 'main' AND holder = ?2 AND epoch = ?3",
            )?
            .execute(params![self.expiry_ms(), self.holder, epoch]);
        match renewed {
            Ok(1) => {
                self.renewed_at = started;
                Ok(true)
            }
            Ok(_) => {
                self.epoch = None;
                Ok(false)
            }
            // Locked by an app writer for long: the lease is ours until it runs out.
            Err(e) if self.renewed_at.elapsed() < self.duration => {
                tracing::debug!(error = %e, "renewing the lease failed; retrying");
                Ok(true)
            }
            Err(e) => {
                self.epoch = None;
                Err(e)
            }
        }
    }

    /// How long until `keep` must renew.
    pub fn renew_in(&self) -> Duration {
        (self.duration / 3).saturating_sub(self.renewed_at.elapsed())
    }

    /// Gives the lease up (at shutdown), so a standby takes over at once.
    pub fn release(&mut self, conn: &Connection) {
        if let Some(epoch) = self.epoch.take() {
            let released = conn.execute(
                "UPDATE cachetail_lease SET expires_at = 0 WHERE name = 'main' AND holder = ?1 AND epoch = ?2",
                params![self.holder, epoch],
            );
            if let Err(e) = released {
                tracing::warn!(error = %e, "releasing the lease failed; a standby takes over when it expires");
            }
        }
    }

    fn expiry_ms(&self) -> i64 {
        now_ms() + i64::try_from(self.duration.as_millis()).unwrap_or(i64::MAX / 2)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
