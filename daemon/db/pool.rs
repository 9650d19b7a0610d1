//! Read connections for fills, reused across requests. SQLite in WAL mode lets them all read
//! while the app writes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

/// Idle read connections, kept for reuse.
pub struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
}

impl ReadPool {
    pub fn new(path: PathBuf, max_idle: usize) -> ReadPool {
        ReadPool {
            path,
            idle: Mutex::new(Vec::new()),
            max_idle,
        }
    }

    /// Runs `work` on an idle connection (opening one if none is idle). Blocking: call it from
    /// a blocking thread.
    pub fn with<R>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<R>,
    ) -> rusqlite::Result<R> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => open_reader(&self.path)?,
        };
        let result = work(&conn);
        // A connection left inside a transaction by an error is not reused.
        if conn.is_autocommit() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < self.max_idle {
                idle.push(conn);
            }
        }
        result
    }

    /// Runs `work` on a pooled connection, on tokio's blocking pool (SQLite blocks).
    pub async fn read<R: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, String> {
        let pool = Arc::clone(self);
        match tokio::task::spawn_blocking(move || pool.with(work)).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
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

    /// `check` refuses a family query that writes, so no running daemon reaches this; the
    /// connection refuses it anyway (README: "it runs on a `query_only` connection in any case").
    #[test]
    fn a_family_query_runs_on_a_query_only_connection_and_cannot_write() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("app.db");
        let app = Connection::open(&path).expect("open");
        app.execute_batch(
            "CREATE TABLE t (x); INSERT INTO t VALUES (1);\
             CREATE TABLE cachetail_outbox (id INTEGER PRIMARY KEY);\
             CREATE TABLE cachetail_meta (key TEXT PRIMARY KEY, value TEXT);",
        )
        .expect("schema");
        // Parsed without a database, so not checked: the writing query gets this far.
        let config = Config::parse(
            "database = \"app.db\"\n[keys.\"w:{id}\"]\nquery = \"INSERT INTO t (x) VALUES (:id) RETURNING x\"\n",
            "test.toml",
            dir.path(),
        )
        .expect("valid");
        let family = &config.families[0];
        let pool = ReadPool::new(path, 1);
        let query_only: bool = pool
            .with(|conn| conn.query_row("PRAGMA query_only", [], |row| row.get(0)))
            .expect("pragma");
        assert!(query_only, "the pool's connections are query_only");
        let params = vec![("id".to_owned(), "2".to_owned())];
        let error = match pool
            .with(|conn| super::super::compute(conn, &family.query, family.many, &params))
        {
            Ok(computed) => panic!("the write ran: {:?}", computed.body),
            Err(error) => error.to_string(),
        };
        assert!(error.contains("readonly"), "{error}");
        let rows: i64 = app
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .expect("count");
        assert_eq!(rows, 1, "nothing was written");
    }
}
