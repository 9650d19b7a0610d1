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
