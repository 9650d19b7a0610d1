//! Reads that bypass the cache (`Cache-Control: no-cache`, capture paused, a standby's memory,
//! Redis unavailable): each answers with a value read from the database after the request
//! arrived, stored nowhere. Concurrent ones of one key share a query: a request joins the next
//! query of its key to start, never one already running (it may have read before the request
//! arrived), so a burst of them runs at most one query of a key at a time, plus one waiting to
//! start that serves everyone who came meanwhile. One task per key runs its queries in turn.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use super::{Cache, Entry, FillError, FillOutcome, query_failed};
use crate::db::{compute, is_interrupted};
use crate::registry::FamilyState;
use crate::types::Params;

/// The next query of a key: who waits for it. Present while the key's task runs.
struct Next {
    family: Arc<FamilyState>,
    params: Params,
    waiting: Option<watch::Sender<Option<FillOutcome>>>,
}

/// The keys whose bypass reads are under way.
#[derive(Default)]
pub struct Bypasses {
    keys: Mutex<HashMap<Arc<str>, Next>>,
}

/// How a request gets its bypass read.
enum Joined {
    /// It waits for the next query of the key; `start` says whether the key's task must be
    /// started (no query of the key was under way).
    Next {
        waiter: watch::Receiver<Option<FillOutcome>>,
        start: bool,
    },
    /// The key's queries under way are another family's (a reload came in between): read alone.
    Alone,
}

impl Bypasses {
    fn join(&self, key: &Arc<str>, family: &Arc<FamilyState>, params: &Params) -> Joined {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        match keys.get_mut(key) {
            Some(next) if Arc::ptr_eq(&next.family, family) => {
                let waiting = next.waiting.get_or_insert_with(|| watch::channel(None).0);
                Joined::Next {
                    waiter: waiting.subscribe(),
                    start: false,
                }
            }
            Some(_) => Joined::Alone,
            None => {
                let (waiting, waiter) = watch::channel(None);
                let next = Next {
                    family: Arc::clone(family),
                    params: params.clone(),
                    waiting: Some(waiting),
                };
                keys.insert(Arc::clone(key), next);
                Joined::Next {
                    waiter,
                    start: true,
                }
            }
        }
    }

    /// The requests waiting for the key's next query, with what it runs; None (and the key's
    /// task ends) when nobody waits.
    fn take_next(
        &self,
        key: &str,
    ) -> Option<(watch::Sender<Option<FillOutcome>>, Arc<FamilyState>, Params)> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let next = keys.get_mut(key)?;
        match next.waiting.take() {
            Some(waiting) => Some((waiting, Arc::clone(&next.family), next.params.clone())),
            None => {
                keys.remove(key);
                None
            }
        }
    }
}

impl Cache {
    /// The value read from the database now (after this call), stored nowhere; shared with the
    /// concurrent bypass reads of the key that arrived before the query started.
    pub(super) async fn read_through(
        self: &Arc<Self>,
        key: &str,
        family: &Arc<FamilyState>,
        params: Params,
    ) -> FillOutcome {
        let key: Arc<str> = Arc::from(key);
        let mut waiter = match self.bypasses.join(&key, family, &params) {
            Joined::Alone => return self.read_now(family, params, std::future::pending).await,
            Joined::Next { waiter, start } => {
                if start {
                    tokio::spawn(Arc::clone(self).run_bypasses(key));
                }
                waiter
            }
        };
        match waiter.wait_for(Option::is_some).await {
            Ok(outcome) => outcome
                .clone()
                .unwrap_or_else(|| Err(FillError::Failed(Arc::from("the read vanished")))),
            Err(_) => Err(FillError::Failed(Arc::from("the read was abandoned"))),
        }
    }

    /// A key's task: runs its next query while anyone waits for one.
    async fn run_bypasses(self: Arc<Self>, key: Arc<str>) {
        while let Some((waiting, family, params)) = self.bypasses.take_next(&key) {
            if waiting.is_closed() {
                continue; // everyone who waited went away
            }
            let abandoned = || {
                let waiting = waiting.clone();
                async move { waiting.closed().await }
            };
            let outcome = self.read_now(&family, params, abandoned).await;
            waiting.send_replace(Some(outcome));
        }
    }

    /// One query on a reader, stopped when a future `abandoned` makes resolves.
    async fn read_now<F: std::future::Future<Output = ()>>(
        &self,
        family: &Arc<FamilyState>,
        params: Params,
        abandoned: impl Fn() -> F,
    ) -> FillOutcome {
        let reader = self.pool.reader(abandoned()).await?;
        let query_of = Arc::clone(family);
        let work = move |conn: rusqlite::Result<&rusqlite::Connection>| {
            conn.and_then(|conn| compute(conn, &query_of.def.query, query_of.def.many, &params))
        };
        match reader.run(work, abandoned()).await? {
            Ok(computed) => Ok(Arc::new(Entry::new(
                computed.version,
                computed.body,
                Arc::clone(family),
                Box::new([]),
                Instant::now(),
            ))),
            Err(e) if is_interrupted(&e) => Err(FillError::Superseded),
            Err(e) => Err(FillError::Failed(Arc::from(query_failed(family, &e)))),
        }
    }
}
