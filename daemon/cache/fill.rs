//! Fills: computing a missed key's value once however many requests want it, and storing it
//! only if nothing made it stale meanwhile; and the write-through recompute, which supersedes
//! any fill in flight.

use std::sync::Arc;
use std::time::Instant;

use rusqlite::Connection;

use super::flights::{Begin, FillTicket, Filled};
use super::{Cache, Entry, FillError, FillOutcome, Store, query_failed};
use crate::counters::now_ms;
use crate::db::{Computed, compute};
use crate::registry::FamilyState;
use crate::types::Params;

impl Cache {
    /// Fills a missed key: joins the fill in flight, or leads a new one on a blocking thread.
    pub async fn fill(
        self: &Arc<Self>,
        key: Arc<str>,
        family: &Arc<FamilyState>,
        params: Params,
    ) -> FillOutcome {
        // The fill this request led or joined is not handed out when it was not stored: an
        // invalidation of the key superseded it, a mark raised while its query ran hides it
        // (this request may have joined after the mark), Redis refused it (perhaps another
        // daemon's invalidation), or a reload retired its family. Fill again (rare: only when
        // something changes while the query runs), then compute without the cache.
        let (mut family, mut params) = (Arc::clone(family), params);
        for _ in 0..3 {
            match self
                .fill_once(Arc::clone(&key), &family, params.clone())
                .await
            {
                Err(FillError::Superseded) if family.is_retired() => {
                    // A reload replaced the family: answer under the definition now in force,
                    // rather than run the retired query again (its values are never stored).
                    let live = self.registry.live();
                    let Some((current, current_params)) = live.match_key(&key) else {
                        break; // the key has no family any more: the last try answers
                    };
                    family = Arc::clone(current);
                    params = current_params;
                }
                Err(FillError::Superseded) => {}
                other => return other,
            }
        }
        self.last_try(key, family, params).await
    }

    async fn fill_once(
        self: &Arc<Self>,
        key: Arc<str>,
        family: &Arc<FamilyState>,
        params: Params,
    ) -> FillOutcome {
        let begun = match &self.store {
            Store::Memory(memory) => self.flights.begin(key, family, |k| memory.get(k)),
            Store::Redis(_) => self.flights.begin(key, family, |_| None),
        };
        let mut waiter = match begun {
            Begin::Cached(entry) => return Ok(entry),
            Begin::Join(waiter) => waiter,
            Begin::Lead(ticket, waiter) => {
                let cache = Arc::clone(self);
                // Its own task: the fill completes (and serves the joiners) even if the request
                // that started it goes away.
                tokio::spawn(async move {
                    let _ = tokio::task::spawn_blocking(move || {
                        let pool = Arc::clone(&cache.pool);
                        let outcome =
                            pool.with(|conn| cache.timed_compute(conn, ticket.family(), &params));
                        cache.finish(ticket, &params, outcome);
                    })
                    .await;
                });
                waiter
            }
        };
        match waiter.wait_for(Option::is_some).await {
            Ok(outcome) => outcome
                .clone()
                .unwrap_or_else(|| Err(FillError::Failed(Arc::from("fill vanished")))),
            Err(_) => Err(FillError::Failed(Arc::from("the fill was abandoned"))),
        }
    }

    /// The last try answers with what it read, stored if it may be (a superseding recompute in
    /// memory; Redis's guard), so that no older read lands after this answer; never stored if it
    /// was read while capture was paused.
    async fn last_try(
        self: &Arc<Self>,
        key: Arc<str>,
        family: Arc<FamilyState>,
        params: Params,
    ) -> FillOutcome {
        let cache = Arc::clone(self);
        let computed = tokio::task::spawn_blocking(move || {
            let ticket = cache.flights.begin_refresh(Arc::clone(&key), &family);
            let pool = Arc::clone(&cache.pool);
            let computed =
                pool.with(|conn| compute(conn, &family.def.query, family.def.many, &params));
            let answer = match &computed {
                Ok(c) => Ok(Arc::new(Entry {
                    version: c.version,
                    body: c.body.clone(),
                    tags: family.def.render_tags(&params),
                    family: Arc::clone(&family),
                    stored_at: Instant::now(),
                })),
                Err(e) => Err(FillError::Failed(Arc::from(query_failed(&family, e)))),
            };
            // Finished either way, so the flight leaves the map and its joiners wake.
            cache.finish(ticket, &params, computed);
            answer
        })
        .await;
        computed.unwrap_or_else(|e| Err(FillError::Failed(Arc::from(e.to_string()))))
    }

    /// Recomputes a key now and stores it, superseding any fill in flight (write-through).
    /// Blocking: runs on the applying thread with its connection. Returns false (after removing
    /// the key, so nothing stale stays) when the query failed; a value read while capture was
    /// paused is not stored, and the key is removed likewise.
    pub fn refresh_now(
        &self,
        conn: &Connection,
        key: &str,
        family: &Arc<FamilyState>,
        params: &Params,
    ) -> bool {
        let ticket = self.flights.begin_refresh(Arc::from(key), family);
        let outcome = self.timed_compute(conn, family, params);
        let ok = outcome.is_ok();
        let paused = outcome.as_ref().is_ok_and(|c| c.paused);
        self.finish(ticket, params, outcome);
        if !ok || paused {
            self.invalidate_key(key);
        }
        ok
    }

    /// `compute`, its duration recorded.
    fn timed_compute(
        &self,
        conn: &Connection,
        family: &FamilyState,
        params: &Params,
    ) -> rusqlite::Result<Computed> {
        let started = Instant::now();
        let computed = compute(conn, &family.def.query, family.def.many, params);
        let took = started.elapsed();
        self.counters
            .fill_latency
            .record(now_ms(), &[took.as_secs_f64() * 1000.0]);
        family.counters.computes.inc();
        family.counters.compute_micros.add(took.as_micros() as u64);
        computed
    }

    /// Ends a fill: counts it, and stores what it read if the guard allows.
    fn finish(&self, ticket: FillTicket, params: &Params, outcome: rusqlite::Result<Computed>) {
        let family = Arc::clone(ticket.family());
        family.counters.fills.inc();
        self.counters.fills.inc();
        let paused = outcome.as_ref().is_ok_and(|c| c.paused);
        let computed = match outcome {
            Ok(c) => Ok(Filled {
                version: c.version,
                body: c.body,
                tags: family.def.render_tags(params),
            }),
            Err(e) => {
                self.counters.fill_errors.inc();
                tracing::warn!(key = %ticket.key(), family = %family.def.pattern, error = %e, "fill failed");
                Err(Arc::from(query_failed(&family, &e)))
            }
        };
        match &self.store {
            // Read while capture was paused: not stored, and not handed to the requests that
            // joined either (one may have joined after a change the read missed): they fill
            // again, and the last try answers from the database without storing.
            _ if paused => {
                self.flights
                    .finish_elsewhere(ticket, computed, |_, _| false);
            }
            Store::Memory(memory) => {
                self.flights.finish(ticket, computed, |key, entry| {
                    memory.store_if_newer(key, entry)
                });
            }
            Store::Redis(redis) => {
                let known = self.progress.applied();
                self.flights
                    .finish_elsewhere(ticket, computed, |key, entry| {
                        redis.store_entry(key, entry, known)
                    });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Reads};
    use crate::db::ReadPool;
    use crate::registry::Registry;
    use bytes::Bytes;
    use std::path::Path;

    fn cache() -> (Cache, Arc<FamilyState>) {
        let config = Config::parse(
            "database = \"x.db\"\n[keys.\"k:{id}\"]\nquery = \"SELECT :id AS id\"\n",
            "test.toml",
            Path::new("."),
        )
        .expect("valid");
        let pool = Arc::new(ReadPool::new(config.database.clone(), 1));
        let registry = Arc::new(Registry::new(config, Reads::default()));
        let (_writer, progress) = crate::progress::channel(0);
        let cache = Cache::new(&registry.config(), pool, Arc::clone(&registry), progress);
        let family = Arc::clone(&registry.live().families[0]);
        (cache, family)
    }

    #[test]
    fn a_value_read_while_capture_was_paused_is_neither_stored_nor_handed_out() {
        let (cache, family) = cache();
        let params = vec![("id".to_owned(), "1".to_owned())];
        let Begin::Lead(ticket, _) = cache.flights.begin(Arc::from("k:1"), &family, |_| None)
        else {
            panic!("expected to lead the fill");
        };
        let Begin::Join(mut waiter) = cache.flights.begin(Arc::from("k:1"), &family, |_| None)
        else {
            panic!("expected to join");
        };
        // Its read transaction found capture paused: writes since may have no outbox row.
        let read = Computed {
            version: 5,
            body: Some(Bytes::from_static(b"{\"id\":1}")),
            paused: true,
        };
        cache.finish(ticket, &params, Ok(read));
        assert!(cache.hot("k:1").is_none(), "not stored");
        let seen = waiter.borrow_and_update().clone();
        assert!(matches!(seen, Some(Err(FillError::Superseded))), "{seen:?}");
    }
}
