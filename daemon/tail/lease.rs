//! The lease: of the daemons on one database, exactly one applies the outbox.
//!
//! The lease is a row in the database (`cachetail_lease`): holder, epoch, expiry. The holder
//! renews it while it applies; a standby takes it when it has expired, or at once when the
//! holder's process is provably gone. The holder names itself
//! `host:pid:nonce:pidns=INODE:boot=BOOT_ID` (its PID namespace, from `/proc/self/ns/pid`, and
//! the kernel's boot id): a pid means something only in its PID namespace, so the shortcut
//! applies only to a holder on the same host, in the same PID namespace, since the same boot
//! (two containers on one host share the hostname and the database's folder, not their pids);
//! any other holder is waited out until its lease expires. Each takeover raises the epoch, the
//! fencing token:
//!
//! - the cursor (and pruning) moves only in a transaction that finds this daemon's holder and
//!   epoch still in the row, so a daemon paused past its lease cannot move it when it resumes;
//! - with Redis, a new holder first claims its epoch there (`raise_epoch` lifts the row above
//!   every epoch Redis has seen, if the row was deleted or reset since), then each batch
//!   carries the epoch and Redis refuses one older than it has seen;
//! - the daemon renews the lease when a third of it has passed: before each batch (`keep`), and
//!   inside a batch wherever the tail shows progress (`Renewer`: between write-through
//!   recomputes, and from SQLite's progress handler while one query runs), so a live holder
//!   keeps it however long a batch or a query takes, while a holder that makes no progress (killed,
//!   stopped, hung outside SQLite) renews nothing and loses it when it expires. Every renewal is
//!   an UPDATE that matches only while the row names this holder and epoch: a daemon that lost
//!   the lease never extends it, and learns there that it lost it, and stands by.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

/// How long a renewal from inside a batch that found the write lock taken waits before the next
/// try (it never waits for the lock itself).
const RETRY_RENEWAL: Duration = Duration::from_millis(2);

pub struct Lease {
    /// Where this process runs, as a holder's identity records it.
    place: Place,
    /// Who holds it and for how long, shared with the `Renewer` that renews it inside batches.
    held: Arc<Held>,
}

/// The lease as this daemon holds it (all on the tail's thread: the tail, the applier's hook,
/// and the progress handler on the tail's connection).
struct Held {
    holder: String,
    duration: Duration,
    term: Mutex<Term>,
}

#[derive(Debug, Clone, Copy)]
struct Term {
    /// The epoch while this daemon holds the lease.
    epoch: Option<i64>,
    /// When the last acquisition or renewal started (the lease runs from no earlier than this).
    renewed_at: Instant,
    /// A renewal from inside a batch is not tried before this (it found the write lock taken).
    retry_at: Instant,
}

impl Held {
    /// The term. Never held across a statement on the tail's connection: its progress handler
    /// renews through `Renewer`, which only tries the lock.
    fn term(&self) -> MutexGuard<'_, Term> {
        self.term.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn expiry_ms(&self) -> i64 {
        now_ms() + i64::try_from(self.duration.as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// The fenced renewal: moves the expiry only while the row names this holder and epoch.
    /// `Ok(false)`: the lease was lost (another daemon took over).
    fn renew(&self, conn: &Connection, epoch: i64) -> rusqlite::Result<bool> {
        let renewed = conn
            .prepare_cached(
                "UPDATE cachetail_lease SET expires_at = ?1 WHERE name = 'main' AND holder = ?2 AND epoch = ?3",
            )?
            .execute(params![self.expiry_ms(), self.holder, epoch])?;
        Ok(renewed == 1)
    }
}

/// Renews the held lease from inside a batch, wherever the tail shows progress: the applier calls
/// it between write-through recomputes, and SQLite's progress handler on the tail's connection
/// while one query runs long. Cheap to call often: it renews only when a third of the lease has
/// passed. It renews through a connection of its own (a progress handler must not use the
/// connection it watches) that never waits for the write lock: when the app (or the tail's own
/// connection, in a cursor write) holds it, a later call tries again; the app waits at most for
/// the one-row UPDATE. A renewal that finds the lease taken records it lost: the batch's cursor
/// write then finds it so (`LeaseLost`) and the daemon stands by.
#[derive(Clone)]
pub struct Renewer {
    held: Arc<Held>,
    conn: Arc<Mutex<Connection>>,
}

impl Renewer {
    /// The connection renewals from inside a batch go through: to the database at `path`,
    /// never waiting for a lock.
    pub fn connection(path: &std::path::Path) -> rusqlite::Result<Arc<Mutex<Connection>>> {
        let conn = crate::db::open(path)?;
        conn.busy_timeout(Duration::ZERO)?;
        Ok(Arc::new(Mutex::new(conn)))
    }

    /// Renews the lease if this daemon holds it and a third of it has passed since the last
    /// renewal; records it lost if another daemon took it. Never waits.
    pub fn renew_if_due(&self) {
        // Busy only if the tail itself is in the middle of a renewal or acquisition.
        let Ok(mut term) = self.held.term.try_lock() else {
            return;
        };
        let Some(epoch) = term.epoch else {
            return;
        };
        let started = Instant::now();
        if started - term.renewed_at < self.held.duration / 3 || started < term.retry_at {
            return;
        }
        let Ok(conn) = self.conn.try_lock() else {
            return;
        };
        match self.held.renew(&conn, epoch) {
            Ok(true) => term.renewed_at = started,
            Ok(false) => {
                tracing::warn!(
                    holder = self.held.holder,
                    epoch,
                    "renewing the lease in the middle of a batch found another daemon holding it: this daemon stands by after the batch"
                );
                term.epoch = None;
            }
            // Locked (by the app, or the tail's own write): the lease is ours until it runs out;
            // the next call tries again.
            Err(e) => {
                tracing::debug!(error = %e, "renewing the lease inside a batch failed; retrying");
                term.retry_at = started + RETRY_RENEWAL;
            }
        }
    }
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
        let place = Place::here();
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let now = Instant::now();
        Lease {
            held: Arc::new(Held {
                holder: place.holder(std::process::id(), nonce),
                duration,
                term: Mutex::new(Term {
                    epoch: None,
                    renewed_at: now,
                    retry_at: now,
                }),
            }),
            place,
        }
    }

    pub fn holder(&self) -> &str {
        &self.held.holder
    }

    /// The fencing token while held.
    pub fn epoch(&self) -> Option<i64> {
        self.held.term().epoch
    }

    /// Whether this daemon holds the lease (as far as it knows: `keep` finds out).
    pub fn held(&self) -> bool {
        self.epoch().is_some()
    }

    /// The renewer of this lease from inside a batch, renewing through `conn` (see `Renewer`).
    pub fn renewer(&self, conn: Arc<Mutex<Connection>>) -> Renewer {
        Renewer {
            held: Arc::clone(&self.held),
            conn,
        }
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
        .execute(params![self.held.holder, epoch, self.held.expiry_ms()])?;
        tx.commit()?;
        let mut term = self.held.term();
        term.epoch = Some(epoch);
        term.renewed_at = started;
        Ok(true)
    }

    fn takeable(&self, current: &Holder) -> bool {
        current.holder == self.held.holder
            || current.expires_at_ms <= now_ms()
            || self.holder_is_gone(&current.holder)
    }

    /// Whether the holder was a process that provably no longer runs: in this PID namespace
    /// (so its pid means what it means here), since this boot, and gone from this `/proc`.
    fn holder_is_gone(&self, holder: &str) -> bool {
        match Place::of_holder(holder) {
            Some((place, pid)) if place == self.place && self.place.is_known() => {
                !std::path::Path::new(&format!("/proc/{pid}")).exists()
            }
            _ => false,
        }
    }

    /// Renews the lease when a third of it has passed (between batches: it may wait for the
    /// write lock). Returns false when it was lost (another daemon took over): from then on this
    /// daemon must apply nothing.
    pub fn keep(&mut self, conn: &Connection) -> rusqlite::Result<bool> {
        let Term {
            epoch, renewed_at, ..
        } = *self.held.term();
        let Some(epoch) = epoch else {
            return Ok(false);
        };
        if renewed_at.elapsed() < self.held.duration / 3 {
            return Ok(true);
        }
        let started = Instant::now();
        let renewed = self.held.renew(conn, epoch);
        let mut term = self.held.term();
        match renewed {
            Ok(true) => {
                term.renewed_at = started;
                Ok(true)
            }
            Ok(false) => {
                term.epoch = None;
                Ok(false)
            }
            // Locked by an app writer for long: the lease is ours until it runs out.
            Err(e) if term.renewed_at.elapsed() < self.held.duration => {
                tracing::debug!(error = %e, "renewing the lease failed; retrying");
                Ok(true)
            }
            Err(e) => {
                term.epoch = None;
                Err(e)
            }
        }
    }

    /// Raises the epoch of the lease this daemon holds to `to`, only while the row still names
    /// this daemon and the epoch it took (Redis has seen an epoch at or above it: the row was
    /// deleted or reset since an older holder's takeover). Returns false when the lease was lost
    /// meanwhile: from then on this daemon must apply nothing.
    pub fn raise_epoch(&mut self, conn: &Connection, to: i64) -> rusqlite::Result<bool> {
        let Some(epoch) = self.epoch() else {
            return Ok(false);
        };
        let raised = conn
            .prepare_cached(
                "UPDATE cachetail_lease SET epoch = ?1 WHERE name = 'main' AND holder = ?2 AND epoch = ?3 AND epoch < ?1",
            )?
            .execute(params![to, self.held.holder, epoch]);
        match raised {
            Ok(1) => {
                self.held.term().epoch = Some(to);
                Ok(true)
            }
            Ok(_) => {
                self.held.term().epoch = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// How long until `keep` must renew.
    pub fn renew_in(&self) -> Duration {
        (self.held.duration / 3).saturating_sub(self.held.term().renewed_at.elapsed())
    }

    /// Gives the lease up (at shutdown), so a standby takes over at once.
    pub fn release(&mut self, conn: &Connection) {
        let epoch = self.held.term().epoch.take();
        if let Some(epoch) = epoch {
            let released = conn.execute(
                "UPDATE cachetail_lease SET expires_at = 0 WHERE name = 'main' AND holder = ?1 AND epoch = ?2",
                params![self.held.holder, epoch],
            );
            if let Err(e) = released {
                tracing::warn!(error = %e, "releasing the lease failed; a standby takes over when it expires");
            }
        }
    }
}

/// Where a process runs, as far as its pid means anything: the host, the PID namespace (the
/// inode of `/proc/self/ns/pid`, known only when this `/proc` is that namespace's own, so that
/// `/proc/{pid}` looks pids up there), and the boot (`/proc/sys/kernel/random/boot_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    host: String,
    pid_namespace: Option<u64>,
    boot: Option<String>,
}

impl Place {
    fn here() -> Place {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .map(|text| text.trim().to_owned())
                .filter(|text| !text.is_empty() && !text.contains(':'))
        };
        Place {
            host: read("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".to_owned()),
            pid_namespace: pid_namespace(),
            boot: read("/proc/sys/kernel/random/boot_id"),
        }
    }

    fn is_known(&self) -> bool {
        self.host != "unknown" && self.pid_namespace.is_some() && self.boot.is_some()
    }

    /// The holder name of process `pid` here: `host:pid:nonce:pidns=INODE:boot=ID` (`?` for
    /// what is not known).
    fn holder(&self, pid: u32, nonce: u32) -> String {
        let namespace = self
            .pid_namespace
            .map_or_else(|| "?".to_owned(), |n| n.to_string());
        let boot = self.boot.as_deref().unwrap_or("?");
        format!(
            "{}:{pid}:{nonce:08x}:pidns={namespace}:boot={boot}",
            self.host
        )
    }

    /// The place and pid a holder name records (None: not this shape, e.g. an older
    /// cachetail's `host:pid:nonce`, which says nothing of its namespace).
    fn of_holder(holder: &str) -> Option<(Place, u32)> {
        let mut parts = holder.rsplitn(5, ':');
        let boot = parts.next()?.strip_prefix("boot=")?;
        let namespace = parts.next()?.strip_prefix("pidns=")?;
        let _nonce = parts.next()?;
        let pid = parts.next()?.parse().ok()?;
        let host = parts.next()?;
        let place = Place {
            host: host.to_owned(),
            pid_namespace: namespace.parse().ok(),
            boot: (boot != "?").then(|| boot.to_owned()),
        };
        Some((place, pid))
    }
}

/// This process's PID namespace (the inode `/proc/self/ns/pid` names: `pid:[4026531836]`), if
/// `/proc` is mounted for it: `/proc/self` must be this process's own pid, else `/proc/{pid}`
/// would look pids up in another namespace (a container that shares its host's `/proc`).
fn pid_namespace() -> Option<u64> {
    let own = std::fs::read_link("/proc/self").ok()?;
    if own.to_str()? != std::process::id().to_string() {
        return None;
    }
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    link.to_str()?
        .strip_prefix("pid:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid no process has here now.
    fn dead_pid() -> u32 {
        (100_000..4_000_000)
            .find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
            .expect("a free pid")
    }

    #[test]
    fn the_epoch_is_raised_only_while_this_daemon_holds_the_epoch_it_took() {
        let conn = Connection::open_in_memory().expect("sqlite");
        conn.execute_batch(crate::capture::SCHEMA).expect("schema");
        let (mut first, mut second) = (
            Lease::new(Duration::from_millis(1)),
            Lease::new(Duration::from_secs(5)),
        );
        assert!(first.try_acquire(&conn).expect("acquire"));
        assert_eq!(first.epoch(), Some(1));
        assert!(first.raise_epoch(&conn, 42).expect("raise"));
        assert_eq!(first.epoch(), Some(42));
        assert_eq!(
            Lease::current(&conn).expect("row").map(|h| h.epoch),
            Some(42)
        );
        // Never lowered.
        assert!(!first.raise_epoch(&conn, 7).expect("raise"));
        assert!(!first.held());
        // Another daemon took over (the 1 ms lease ran out): the old holder cannot raise it.
        std::thread::sleep(Duration::from_millis(5));
        let mut first = Lease::new(Duration::from_millis(1));
        assert!(first.try_acquire(&conn).expect("acquire"));
        std::thread::sleep(Duration::from_millis(5));
        assert!(second.try_acquire(&conn).expect("acquire"));
        assert!(!first.raise_epoch(&conn, 100).expect("raise"));
        assert!(!first.held());
        assert_eq!(
            Lease::current(&conn).expect("row").map(|h| h.epoch),
            second.epoch()
        );
    }

    #[test]
    fn a_renewer_renews_only_the_lease_this_daemon_still_holds_and_never_waits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("lease.db");
        let conn = Connection::open(&path).expect("sqlite");
        conn.execute_batch(crate::capture::SCHEMA).expect("schema");
        let expiry = || Lease::current(&conn).expect("row").map(|h| h.expires_at_ms);
        let mut lease = Lease::new(Duration::from_millis(1500));
        let renewer = lease.renewer(Renewer::connection(&path).expect("open"));
        renewer.renew_if_due();
        assert_eq!(expiry(), None, "nothing held: nothing renewed");
        assert!(lease.try_acquire(&conn).expect("acquire"));
        let first = expiry();
        renewer.renew_if_due();
        assert_eq!(expiry(), first, "not due before a third of the lease");
        std::thread::sleep(Duration::from_millis(550));
        renewer.renew_if_due();
        assert!(expiry() > first, "renewed once due");

        // The write lock taken (by the app): the renewal does not wait for it, and the lease is
        // still held (renewed when the lock is free).
        std::thread::sleep(Duration::from_millis(550));
        conn.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let started = Instant::now();
        renewer.renew_if_due();
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "{:?}",
            started.elapsed()
        );
        conn.execute_batch("COMMIT").expect("unlock");
        assert!(lease.held());
        let locked_out = expiry();
        std::thread::sleep(RETRY_RENEWAL);
        renewer.renew_if_due();
        assert!(expiry() > locked_out, "renewed once the lock was free");

        // Another daemon took over: a renewal neither extends its lease nor keeps this one.
        conn.execute(
            "UPDATE cachetail_lease SET holder = 'elsewhere:1:0', epoch = epoch + 1, expires_at = 42",
            [],
        )
        .expect("take the lease");
        std::thread::sleep(Duration::from_millis(550));
        renewer.renew_if_due();
        assert!(!lease.held(), "the renewal found the lease lost");
        assert_eq!(expiry(), Some(42));
        renewer.renew_if_due();
        assert_eq!(expiry(), Some(42));
    }

    #[test]
    fn a_holder_names_its_host_pid_namespace_and_boot() {
        let place = Place {
            host: "web-1".into(),
            pid_namespace: Some(4026531836),
            boot: Some("8f5c060d-b6ea-42c9-92bb-64b549c293e8".into()),
        };
        let holder = place.holder(42, 7);
        assert_eq!(
            holder,
            "web-1:42:00000007:pidns=4026531836:boot=8f5c060d-b6ea-42c9-92bb-64b549c293e8"
        );
        assert_eq!(Place::of_holder(&holder), Some((place, 42)));
        // An older cachetail's holder says nothing of its namespace.
        assert_eq!(Place::of_holder("web-1:42:00000007"), None);
    }

    #[test]
    fn only_a_holder_in_this_pid_namespace_and_boot_is_taken_over_when_its_pid_is_gone() {
        let lease = Lease::new(Duration::from_secs(5));
        assert!(
            lease.place.is_known(),
            "this test machine has a hostname, its own /proc, and a boot id: {:?}",
            lease.place
        );
        let pid = dead_pid();
        let here = lease.place.holder(pid, 1);
        assert!(lease.holder_is_gone(&here), "{here}");
        let alive = lease.place.holder(std::process::id(), 1);
        assert!(!lease.holder_is_gone(&alive), "{alive}");
        let elsewhere = |place: Place| place.holder(pid, 1);
        let other_namespace = Place {
            pid_namespace: lease.place.pid_namespace.map(|n| n + 1),
            ..lease.place.clone()
        };
        let other_boot = Place {
            boot: Some("00000000-0000-0000-0000-000000000000".into()),
            ..lease.place.clone()
        };
        let unknown_namespace = Place {
            pid_namespace: None,
            ..lease.place.clone()
        };
        for holder in [
            elsewhere(other_namespace),
            elsewhere(other_boot),
            elsewhere(unknown_namespace),
            format!("{}:{pid}:00000001", lease.place.host),
        ] {
            assert!(!lease.holder_is_gone(&holder), "{holder}");
        }
    }
}
