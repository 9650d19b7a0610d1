//! Fills: computing a missed key's value once however many requests want it, and storing it
//! only if nothing made it stale meanwhile and its key is one rules can reach; and the
//! write-through recompute, which supersedes any fill in flight. A fill waits for one of the
//! pool's readers; it is given up when too many reads wait already, and stopped when no request
//! waits for it any more.

use std::sync::Arc;
use std::time::Instant;

use rusqlite::Connection;

use super::flights::{Begin, FillTicket, Filled};
use super::{Cache, Entry, FillError, FillOutcome, KEY_SPELLING, Lookup, Store, query_failed};
use crate::config::spelling;
use crate::counters::now_ms;
use crate::db::{Body, Computed, compute, compute_with, is_interrupted};
use crate::escape::Escaped;
use crate::registry::FamilyState;
use crate::types::Params;

/// What a fill's query read, and whether it may be stored: not when it was read while capture
/// was paused, nor when the key is not spelled as rules render the rows it read (under the
/// schema the query read).
struct Read {
    computed: Computed,
    storable: bool,
}

impl Cache {
    /// Fills a missed key: joins the fill in flight, or leads a new one on a blocking thread.
    pub async fn fill(
        self: &Arc<Self>,
        key: Arc<str>,
        family: &Arc<FamilyState>,
        params: Params,
    ) -> FillOutcome {
        // A key no rule renders (`book:042`) is answered, never stored (`lookup` answers such
        // keys before filling; this is for write-behind and warm start).
        if family.spelling_problem(&params).is_some() {
            return match self
                .database_answer(&key, family, params, KEY_SPELLING)
                .await
            {
                Lookup::Value(entry, _) => Ok(entry),
                Lookup::Failed(message) => Err(FillError::Failed(Arc::from(message))),
                Lookup::NotCached => Err(FillError::Failed(Arc::from("not cached"))),
                Lookup::Busy(message) => Err(FillError::Busy(Arc::from(message))),
            };
        }
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
                // Its own task: the fill completes (and serves the joiners) even if the request
                // that started it goes away, as long as one request still waits for it.
                tokio::spawn(Arc::clone(self).lead(ticket, params));
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

    /// Leads a fill: waits for a reader, runs the query and stores what it read if the guard
    /// allows. Given up (`Busy`) when too many reads wait for a reader already; stopped (the
    /// query interrupted, or never started) once no request waits for it.
    async fn lead(self: Arc<Self>, ticket: FillTicket, params: Params) {
        let reader = match self.pool.reader(ticket.abandoned()).await {
            Ok(reader) => reader,
            Err(e) => return self.flights.give_up(ticket, FillError::from(e)),
        };
        let abandoned = ticket.abandoned();
        let cache = Arc::clone(&self);
        let work = move |conn: rusqlite::Result<&Connection>| {
            let outcome = conn.and_then(|conn| {
                let family = ticket.family();
                let query =
                    |conn: &Connection| compute(conn, &family.def.query, family.def.many, &params);
                cache.timed_read(conn, family, &params, query)
            });
            match outcome {
                Err(e) if is_interrupted(&e) => {
                    cache.flights.give_up(ticket, FillError::Superseded);
                }
                outcome => {
                    cache.finish(ticket, &params, outcome);
                }
            }
        };
        // A panic drops the ticket, which wakes the requests waiting with an error.
        let _ = reader.run(work, abandoned).await;
    }

    /// The last try answers with what it read, stored if it may be (a superseding recompute in
    /// memory; Redis's guard), so that no older read lands after this answer; never stored if it
    /// was read while capture was paused (or its key is not one rules reach).
    async fn last_try(
        self: &Arc<Self>,
        key: Arc<str>,
        family: Arc<FamilyState>,
        params: Params,
    ) -> FillOutcome {
        let reader = self
            .pool
            .reader(std::future::pending())
            .await
            .map_err(FillError::from)?;
        let cache = Arc::clone(self);
        let work = move |conn: rusqlite::Result<&Connection>| {
            let ticket = cache.flights.begin_refresh(Arc::clone(&key), &family);
            let computed = conn.and_then(|conn| cache.read_query(conn, &family, &params));
            if computed.as_ref().is_err_and(is_interrupted) {
                // The request went away (it was dropped): nobody reads this answer.
                cache.flights.give_up(ticket, FillError::Superseded);
                return Err(FillError::Superseded);
            }
            let answer = match &computed {
                Ok(Read { computed: c, .. }) => Ok(Arc::new(Entry::new(
                    c.version,
                    c.body.clone(),
                    Arc::clone(&family),
                    family.def.render_tags(&params),
                    Instant::now(),
                ))),
                Err(e) => Err(FillError::Failed(Arc::from(query_failed(&family, e)))),
            };
            // Finished either way, so the flight leaves the map and its joiners wake.
            cache.finish(ticket, &params, computed);
            answer
        };
        // Dropping this future (the request went away) stops the query.
        let answered = reader.run(work, std::future::pending()).await;
        answered.unwrap_or_else(|e| Err(FillError::from(e)))
    }

    /// Recomputes a key now and stores it, superseding any fill in flight (write-through).
    /// Blocking: runs on the applying thread with its connection. Returns false (after removing
    /// the key, so nothing stale stays) when the query failed; a value read while capture was
    /// paused is not stored, and the key is removed likewise.
    ///
    /// The key kept its previous value while the recompute ran (no window of misses). A
    /// recompute that read but was not stored — superseded by a later one (a reader's last
    /// try), or refused — must not leave that previous value served once the change counts as
    /// applied: every value read before the recompute is dropped (a newer one stays, and so
    /// does the flight that superseded it, which stores when it lands).
    pub fn refresh_now(
        &self,
        conn: &Connection,
        key: &str,
        family: &Arc<FamilyState>,
        params: &Params,
    ) -> bool {
        let query = |conn: &Connection| compute(conn, &family.def.query, family.def.many, params);
        self.refresh_now_from(conn, key, family, params, query)
    }

    /// `refresh_now`, the value computed by `value` (in its read transaction with the outbox
    /// head, as `db::compute_with`) instead of the family's query: a maintained family's state.
    pub fn refresh_now_with(
        &self,
        conn: &Connection,
        key: &str,
        family: &Arc<FamilyState>,
        params: &Params,
        value: impl FnOnce(&Connection) -> rusqlite::Result<Option<Body>>,
    ) -> bool {
        let computed = |conn: &Connection| compute_with(conn, value);
        self.refresh_now_from(conn, key, family, params, computed)
    }

    fn refresh_now_from(
        &self,
        conn: &Connection,
        key: &str,
        family: &Arc<FamilyState>,
        params: &Params,
        computed: impl FnOnce(&Connection) -> rusqlite::Result<Computed>,
    ) -> bool {
        if family.spelling_problem(params).is_some() {
            // A key no family would store (a rule rendered `book:042`): nothing to recompute.
            self.invalidate_key(key);
            return true;
        }
        let ticket = self.flights.begin_refresh(Arc::from(key), family);
        let outcome = self.timed_read(conn, family, params, computed);
        let ok = outcome.is_ok();
        let read = match &outcome {
            Ok(read) if read.storable => Some(read.computed.version),
            _ => None,
        };
        let stored = self.finish(ticket, params, outcome);
        match read {
            None => self.invalidate_key(key),
            Some(version) if !stored => self.drop_older(key, version),
            Some(_) => {}
        }
        ok
    }

    /// `read`, its duration recorded.
    fn timed_read(
        &self,
        conn: &Connection,
        family: &FamilyState,
        params: &Params,
        computed: impl FnOnce(&Connection) -> rusqlite::Result<Computed>,
    ) -> rusqlite::Result<Read> {
        let started = Instant::now();
        let read = self.read(conn, family, params, computed);
        let took = started.elapsed();
        self.counters
            .fill_latency
            .record(now_ms(), &[took.as_secs_f64() * 1000.0]);
        family.counters.computes.inc();
        family.counters.compute_micros.add(took.as_micros() as u64);
        read
    }

    /// Runs the family's query for `params`, and tells whether what it read may be stored.
    fn read_query(
        &self,
        conn: &Connection,
        family: &FamilyState,
        params: &Params,
    ) -> rusqlite::Result<Read> {
        let query = |conn: &Connection| compute(conn, &family.def.query, family.def.many, params);
        self.read(conn, family, params, query)
    }

    /// Computes a value with `computed`, and tells whether what it read may be stored.
    fn read(
        &self,
        conn: &Connection,
        family: &FamilyState,
        params: &Params,
        computed: impl FnOnce(&Connection) -> rusqlite::Result<Computed>,
    ) -> rusqlite::Result<Read> {
        let computed = computed(conn)?;
        let storable = !computed.paused && reachable(conn, family, params, computed.schema_version);
        Ok(Read { computed, storable })
    }

    /// Ends a fill: counts it, and stores what it read if the guard allows. Returns whether it
    /// was stored.
    fn finish(&self, ticket: FillTicket, params: &Params, outcome: rusqlite::Result<Read>) -> bool {
        let family = Arc::clone(ticket.family());
        family.counters.fills.inc();
        self.counters.fills.inc();
        let unstorable = outcome.as_ref().is_ok_and(|read| !read.storable);
        let computed = match outcome {
            Ok(Read { computed: c, .. }) => Ok(Filled {
                version: c.version,
                body: c.body,
                tags: family.def.render_tags(params),
            }),
            Err(e) => {
                self.counters.fill_errors.inc();
                tracing::warn!(key = %Escaped(ticket.key()), family = %family.def.pattern, error = %Escaped(&e), "fill failed");
                Err(Arc::from(query_failed(&family, &e)))
            }
        };
        match &self.store {
            // Read while capture was paused: not stored, and not handed to the requests that
            // joined either (one may have joined after a change the read missed): they fill
            // again, and the last try answers from the database without storing. The same for
            // a key the schema it read made a spelling no rule renders.
            _ if unstorable => self
                .flights
                .finish_elsewhere(ticket, computed, |_, _| false),
            Store::Memory(memory) => self.flights.finish(ticket, computed, |key, entry| {
                memory.store_if_newer(key, entry)
            }),
            Store::Redis(redis) => self
                .flights
                .finish_elsewhere(ticket, computed, |key, entry| {
                    redis.store_entry(key, entry, self.progress.applied())
                }),
        }
    }
}

/// Whether `params` spell their key as rules render the rows the family's query reads, under
/// the schema the query read (`schema_version`). After a schema change the family's analysis is
/// redone first (on this connection); a value read under another schema than the analysis is
/// not stored.
fn reachable(
    conn: &Connection,
    family: &FamilyState,
    params: &Params,
    schema_version: i64,
) -> bool {
    let mut known = family.spelling();
    if known.schema_version != schema_version {
        let now = Arc::new(spelling::analyse(
            &family.def.pattern,
            &family.def.query,
            conn,
        ));
        if !now.same_uses(&known) && known.schema_version >= 0 {
            tracing::info!(family = %family.def.pattern, "the schema changed how the family's query compares its placeholders");
        }
        family.set_spelling(Arc::clone(&now));
        known = now;
    }
    known.schema_version == schema_version && known.problem(params).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Reads};
    use crate::db::ReadPool;
    use crate::registry::Registry;
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
        let computed = Computed {
            version: 5,
            body: Some(b"{\"id\":1}".as_slice().into()),
            paused: true,
            schema_version: 0,
        };
        let read = Read {
            computed,
            storable: false,
        };
        cache.finish(ticket, &params, Ok(read));
        assert!(cache.hot("k:1").is_none(), "not stored");
        let seen = waiter.borrow_and_update().clone();
        assert!(matches!(seen, Some(Err(FillError::Superseded))), "{seen:?}");
    }
}
