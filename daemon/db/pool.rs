//! The readers requests use: at most `readers` SQLite connections, opened when first needed and
//! reused. Work waits for a free one in a bounded line (past `read_queue` waiting, it is refused at
//! once: `ReadError::Busy`, a 503 for the client), and no more blocking threads run SQLite than
//! there are readers. A read nobody waits for any more stops: it leaves the line, or its query is
//! interrupted (SQLite's progress handler). SQLite in WAL mode lets them all read while the app
//! writes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `read_queue` when none is given.
const DEFAULT_QUEUE: usize = 1024;

/// How many SQLite virtual-machine steps run between two looks at whether the read was
/// abandoned: a few microseconds of work.
const STEPS_BETWEEN_CHECKS: i32 = 1000;

/// Why a read did not run to its end.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// Too many reads wait for a reader already.
    #[error(
        "no SQLite reader free: {waiting} reads already wait for the {readers} readers (`http.readers`, `http.read_queue`); retry in a moment"
    )]
    Busy { readers: usize, waiting: usize },
    /// Nobody waits for the answer any more.
    #[error("the read was abandoned: nobody waits for its answer")]
    Abandoned,
    /// The blocking thread that ran it panicked.
    #[error("the read failed: {0}")]
    Panicked(String),
    /// SQLite's error (opening a connection, or the work's own).
    #[error("{0}")]
    Sqlite(String),
}

/// The read connections, and the line of work waiting for one.
pub struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    readers: Arc<Semaphore>,
    size: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// A reader's place: while it is held, one connection is this work's.
pub struct Reader {
    pool: Arc<ReadPool>,
    _place: OwnedSemaphorePermit,
}

impl ReadPool {
    /// At most `readers` connections (at least one) to the database at `path`.
    pub fn new(path: PathBuf, readers: usize) -> ReadPool {
        let size = readers.max(1);
        ReadPool {
            path,
            idle: Mutex::new(Vec::new()),
            readers: Arc::new(Semaphore::new(size)),
            size,
            waiting: AtomicUsize::new(0),
            max_waiting: DEFAULT_QUEUE,
        }
    }

    /// At most `max_waiting` reads wait for a reader; more are refused at once.
    pub fn with_queue(mut self, max_waiting: usize) -> ReadPool {
        self.max_waiting = max_waiting;
        self
    }

    /// How many readers there are.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Waits for a free reader in line: `Busy` at once when the line is full, `Abandoned` when
    /// `abandoned` resolves first. Cancel-safe: dropping it leaves the line.
    pub async fn reader(
        self: &Arc<Self>,
        abandoned: impl Future<Output = ()>,
    ) -> Result<Reader, ReadError> {
        let reader = |place| Reader {
            pool: Arc::clone(self),
            _place: place,
        };
        // A free reader is taken at once (tokio's semaphore hands released places to those in
        // line first, so this never jumps it).
        if let Ok(place) = Arc::clone(&self.readers).try_acquire_owned() {
            return Ok(reader(place));
        }
        let in_line = InLine::join(&self.waiting);
        if in_line.ahead >= self.max_waiting {
            return Err(ReadError::Busy {
                readers: self.size,
                waiting: in_line.ahead,
            });
        }
        tokio::select! {
            place = Arc::clone(&self.readers).acquire_owned() => place
                .map(reader)
                .map_err(|_| ReadError::Panicked("the read pool is closed".to_owned())),
            () = abandoned => Err(ReadError::Abandoned),
        }
    }

    /// Runs `work` on a reader (waiting in line for one) and returns what it returned. Dropping
    /// the future abandons the read (its query is interrupted).
    pub async fn read<R: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, ReadError> {
        let reader = self.reader(std::future::pending()).await?;
        reader
            .run(|conn| conn.and_then(work), std::future::pending())
            .await?
            .map_err(|e| ReadError::Sqlite(e.to_string()))
    }

    /// `read`, from a blocking thread of the runtime (verify).
    pub fn read_blocking<R: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, ReadError> {
        tokio::runtime::Handle::try_current()
            .map_err(|e| ReadError::Panicked(e.to_string()))?
            .block_on(self.read(work))
    }

    /// An idle connection, or a new one (there are never more than `size`: each is used under a
    /// reader's place).
    fn checkout(&self) -> rusqlite::Result<Connection> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => open_reader(&self.path),
        }
    }

    /// Keeps a connection for the next read, unless an error left it inside a transaction.
    fn checkin(&self, conn: Connection) {
        if conn.is_autocommit() {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        }
    }
}

impl Reader {
    /// Runs `work` on a blocking thread with a connection (or the error opening one); `work`
    /// runs exactly once. If `abandoned` resolves, or this future is dropped, before it is done,
    /// its query is interrupted (`is_interrupted` tells the error) and the reader is free soon
    /// after.
    pub async fn run<R: Send + 'static>(
        self,
        work: impl FnOnce(rusqlite::Result<&Connection>) -> R + Send + 'static,
        abandoned: impl Future<Output = ()>,
    ) -> Result<R, ReadError> {
        let stop = Arc::new(AtomicBool::new(false));
        let job = {
            let stop = Arc::clone(&stop);
            tokio::task::spawn_blocking(move || self.work_on_connection(work, stop))
        };
        let stop_if_dropped = StopOnDrop(Arc::clone(&stop));
        tokio::pin!(job, abandoned);
        let done = tokio::select! {
            done = &mut job => done,
            () = &mut abandoned => {
                stop.store(true, Ordering::Relaxed);
                job.await
            }
        };
        // Done: setting the flag now stops nothing (the handler watching it is gone).
        drop(stop_if_dropped);
        done.map_err(|e| ReadError::Panicked(e.to_string()))
    }

    /// On the blocking thread: a connection, the work with its progress handler watching
    /// `stop`, the connection back for the next read. The place is given back when `self` goes.
    fn work_on_connection<R>(
        self,
        work: impl FnOnce(rusqlite::Result<&Connection>) -> R,
        stop: Arc<AtomicBool>,
    ) -> R {
        let mut conn = match self.pool.checkout() {
            Ok(conn) => conn,
            Err(e) => return work(Err(e)),
        };
        let watching = conn.progress_handler(
            STEPS_BETWEEN_CHECKS,
            Some(move || stop.load(Ordering::Relaxed)),
        );
        let done = work(watching.map(|()| &conn));
        let _ = conn.progress_handler(0, None::<fn() -> bool>);
        self.pool.checkin(conn);
        done
    }
}

/// Whether an error is a query stopped because its read was abandoned.
pub fn is_interrupted(error: &rusqlite::Error) -> bool {
    error.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted)
}

/// A place in the line of reads waiting for a reader, left when dropped.
struct InLine<'a> {
    count: &'a AtomicUsize,
    /// How many were waiting when this one joined.
    ahead: usize,
}

impl<'a> InLine<'a> {
    fn join(count: &'a AtomicUsize) -> InLine<'a> {
        let ahead = count.fetch_add(1, Ordering::AcqRel);
        InLine { count, ahead }
    }
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Stops the work (its query) when the future running it is dropped before it is done.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Opens a connection that can only read: a family's query can never write to the app's data.
pub fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = super::open(path)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::time::Duration;

    fn database(dir: &tempfile::TempDir) -> PathBuf {
        let path = dir.path().join("app.db");
        let app = Connection::open(&path).expect("open");
        app.execute_batch(
            "CREATE TABLE t (x); INSERT INTO t VALUES (1);\
             CREATE TABLE cachetail_outbox (id INTEGER PRIMARY KEY);\
             CREATE TABLE cachetail_meta (key TEXT PRIMARY KEY, value TEXT);",
        )
        .expect("schema");
        path
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// `check` refuses a family query that writes, so no running daemon reaches this; the
    /// connection refuses it anyway (README: "it runs on a `query_only` connection in any case").
    #[test]
    fn a_family_query_runs_on_a_query_only_connection_and_cannot_write() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = database(&dir);
        // Parsed without a database, so not checked: the writing query gets this far.
        let config = Config::parse(
            "database = \"app.db\"\n[keys.\"w:{id}\"]\nquery = \"INSERT INTO t (x) VALUES (:id) RETURNING x\"\n",
            "test.toml",
            dir.path(),
        )
        .expect("valid");
        let family = Arc::clone(&config.families[0]);
        let pool = Arc::new(ReadPool::new(path.clone(), 1));
        let runtime = runtime();
        let query_only: bool = runtime
            .block_on(pool.read(|conn| conn.query_row("PRAGMA query_only", [], |row| row.get(0))))
            .expect("pragma");
        assert!(query_only, "the pool's connections are query_only");
        let params = vec![("id".to_owned(), "2".to_owned())];
        let written =
            runtime.block_on(pool.read(move |conn| {
                super::super::compute(conn, &family.query, family.many, &params)
            }));
        let error = match written {
            Ok(computed) => panic!("the write ran: {:?}", computed.body),
            Err(error) => error.to_string(),
        };
        assert!(error.contains("readonly"), "{error}");
        let rows: i64 = Connection::open(&path)
            .expect("open")
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .expect("count");
        assert_eq!(rows, 1, "nothing was written");
    }

    /// A query that would spin for minutes, and a way to tell it started.
    const SPIN: &str = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10000000000) SELECT count(*) FROM n";

    #[test]
    fn the_line_is_bounded_and_an_abandoned_query_stops() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pool = Arc::new(ReadPool::new(database(&dir), 1).with_queue(1));
        let runtime = runtime();
        runtime.block_on(async {
            // The one reader spins until its caller goes away.
            let (abandon, abandoned) = tokio::sync::oneshot::channel::<()>();
            let reader = pool.reader(std::future::pending()).await.expect("free");
            let spinning = tokio::spawn(reader.run(
                |conn| conn.and_then(|c| c.query_row(SPIN, [], |row| row.get::<_, i64>(0))),
                async {
                    let _ = abandoned.await;
                },
            ));
            // One read waits in line; the next is refused at once.
            let waiting = tokio::spawn({
                let pool = Arc::clone(&pool);
                async move {
                    pool.read(|conn| conn.query_row("SELECT 7", [], |r| r.get::<_, i64>(0)))
                        .await
                }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            let refused = pool
                .read(|conn| conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
                .await;
            assert!(
                matches!(
                    refused,
                    Err(ReadError::Busy {
                        readers: 1,
                        waiting: 1
                    })
                ),
                "{refused:?}"
            );
            // Abandoned: the spinning query is interrupted, and the one in line runs.
            drop(abandon);
            let stopped = tokio::time::timeout(Duration::from_secs(5), spinning)
                .await
                .expect("the query stops")
                .expect("no panic")
                .expect("it ran");
            assert!(stopped.as_ref().is_err_and(is_interrupted), "{stopped:?}");
            let seven = tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .expect("the read in line runs")
                .expect("no panic");
            assert_eq!(seven.expect("read"), 7);
            // Dropping a read's future stops its query too.
            let dropped = tokio::time::timeout(
                Duration::from_millis(100),
                pool.read(|conn| conn.query_row(SPIN, [], |row| row.get::<_, i64>(0))),
            )
            .await;
            assert!(dropped.is_err(), "timed out");
            let after = tokio::time::timeout(
                Duration::from_secs(5),
                pool.read(|conn| conn.query_row("SELECT 8", [], |r| r.get::<_, i64>(0))),
            )
            .await
            .expect("the reader is free again");
            assert_eq!(after.expect("read"), 8);
        });
    }
}
