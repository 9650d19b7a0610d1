//! The floor under commit → fresh: what a process that does nothing but watch would see. A bare
//! watcher in the bench's process (a `notify` watch on the database's folder, then re-reading
//! the outbox's head at once until the commit shows, as the best possible tail would) times
//! each commit from its return to the moment its outbox row is readable; beside it, the
//! write-through recompute's query alone on its own connection. With half a cached GET (the
//! reader's poll), these add up to the least commit → fresh could be.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use rusqlite::Connection;

use super::{BOOKS, percentile};
use crate::demo::Rng;

/// The outbox's head, and when the watcher first read it.
type Seen = Arc<Mutex<(i64, Instant)>>;

/// The floor's parts, sorted latencies: the wake-up and read, and the recompute's query.
pub(super) struct Floor {
    pub wake_and_read: Vec<Duration>,
    pub query: Vec<Duration>,
}

impl Floor {
    /// p50 (or p99) of the wake-up and read, plus the query's, plus `poll` (half a cached GET).
    pub fn sum(&self, p: f64, poll: Duration) -> Duration {
        percentile(&self.wake_and_read, p) + percentile(&self.query, p) + poll
    }
}

/// Commits `commits` reviews at about 1,000/s into `db` (capture installed, the daemon running
/// beside it) and times each as a bare watcher sees it.
pub(super) fn measure(db: &Path, commits: u32) -> anyhow::Result<Floor> {
    let head = |conn: &Connection| -> rusqlite::Result<i64> {
        conn.query_row(
            "SELECT coalesce(max(id), 0) FROM cachetail_outbox",
            [],
            |r| r.get(0),
        )
    };
    let watcher_conn = Connection::open(db)?;
    let seen: Seen = Arc::new(Mutex::new((head(&watcher_conn)?, Instant::now())));
    let stop = Arc::new(AtomicBool::new(false));
    let (ring, rung) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
        let _ = ring.send(());
    })?;
    let folder = db.parent().unwrap_or(Path::new("."));
    watcher.watch(folder, RecursiveMode::NonRecursive)?;
    let watching = {
        let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
        std::thread::spawn(move || watch(&watcher_conn, &rung, &seen, &stop, head))
    };
    let conn = Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut rng = Rng::new(17);
    let mut wake_and_read = Vec::with_capacity(commits as usize);
    let mut query = Vec::with_capacity(commits as usize);
    let mut recompute = conn.prepare(
        "SELECT b.id, count(r.id) AS review_count, round(avg(r.rating), 2) AS avg_rating FROM books b LEFT JOIN reviews r ON r.book_id = b.id WHERE b.id = ?1 GROUP BY b.id",
    )?;
    for _ in 0..commits {
        let book = rng.pick(BOOKS);
        conn.execute_batch("BEGIN")?;
        conn.execute(
            "INSERT INTO reviews (book_id, user_id, rating) VALUES (?1, 1, 4)",
            [book],
        )?;
        let expected = head(&conn)?;
        conn.execute_batch("COMMIT")?;
        let committed = Instant::now();
        let deadline = committed + Duration::from_secs(5);
        let at = loop {
            let (id, at) = *seen.lock().unwrap_or_else(|e| e.into_inner());
            if id >= expected {
                break at;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the watcher never saw {expected}"
            );
            std::thread::yield_now();
        };
        wake_and_read.push(at.saturating_duration_since(committed));
        let began = Instant::now();
        recompute.query_row([book], |r| r.get::<_, i64>(1))?;
        query.push(began.elapsed());
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    drop(recompute);
    let _ = watching.join();
    wake_and_read.sort();
    query.sort();
    Ok(Floor {
        wake_and_read,
        query,
    })
}

/// On each notification, re-reads the head at once (yielding between looks, for up to 2 ms)
/// until it moves: the notification comes a moment before the commit is readable.
fn watch(
    conn: &Connection,
    rung: &mpsc::Receiver<()>,
    seen: &Seen,
    stop: &AtomicBool,
    head: impl Fn(&Connection) -> rusqlite::Result<i64>,
) {
    while !stop.load(Ordering::Relaxed) {
        if rung.recv_timeout(Duration::from_millis(50)).is_err() {
            continue;
        }
        let known = seen.lock().unwrap_or_else(|e| e.into_inner()).0;
        let until = Instant::now() + Duration::from_millis(2);
        while Instant::now() < until {
            match head(conn) {
                Ok(id) if id > known => {
                    *seen.lock().unwrap_or_else(|e| e.into_inner()) = (id, Instant::now());
                    break;
                }
                Ok(_) => std::thread::yield_now(),
                Err(_) => break,
            }
        }
    }
}
