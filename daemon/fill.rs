//! Computing a key's value: the family's query with the key's parameters bound, run in one read
//! transaction together with a read of the outbox head (the value's version), encoded as JSON.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, Statement};

use crate::cache::{Begin, Entry, FillError, FillOutcome, FillTicket, Filled};
use crate::config::Family;
use crate::redis_cache::{self, RedisCache};
use crate::sqlite;
use crate::state::Shared;
use crate::template::Params;

/// Read connections for fills, reused across requests. SQLite in WAL mode lets them all read
/// while the app writes.
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
}

/// Opens a connection that can only read: a family's query can never write to the app's data.
pub fn open_reader(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let conn = sqlite::open(path)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

/// A computed value: the outbox position it read at and its JSON (None: no row, a 404).
pub struct Computed {
    pub version: u64,
    pub body: Option<Bytes>,
    /// Capture was paused when it was read: changes made since may have no outbox row, so
    /// nothing would ever mark this value stale. It may answer the request that read it, but
    /// it is never stored.
    pub paused: bool,
}

/// Runs `family`'s query for one key, in one read transaction with the outbox head (and the
/// pause flag, which says whether that head means anything).
pub fn compute(conn: &Connection, family: &Family, params: &Params) -> rusqlite::Result<Computed> {
    let tx = conn.unchecked_transaction()?;
    let (version, paused): (i64, bool) = tx
        .prepare_cached(
            "SELECT (SELECT coalesce(max(id), 0) FROM cachetail_outbox), \
                    EXISTS (SELECT 1 FROM cachetail_meta WHERE key = 'paused' AND value = '1')",
        )?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let body = {
        let mut stmt = tx.prepare_cached(&family.query)?;
        bind_params(&mut stmt, params)?;
        encode_rows(&mut stmt, family.many)?
    };
    tx.commit()?;
    Ok(Computed {
        version: u64::try_from(version).unwrap_or(0),
        body,
        paused,
    })
}

/// `compute`, its duration recorded in the fill latency histogram.
fn timed_compute(
    shared: &Shared,
    conn: &Connection,
    family: &Family,
    params: &Params,
) -> rusqlite::Result<Computed> {
    let started = std::time::Instant::now();
    let computed = compute(conn, family, params);
    let took = started.elapsed();
    shared.stats.fill_seconds.observe(took.as_secs_f64());
    shared
        .stats
        .fill_recent
        .record(crate::latency::now_ms(), &[took.as_secs_f64() * 1000.0]);
    family.stats.computes.fetch_add(1, Ordering::Relaxed);
    family
        .stats
        .compute_micros
        .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    computed
}

/// Binds each `:name` of the statement to the key parameter of that name. A value written the way
/// a key renders a number (`42`, `1.5`) is bound as that number, so `WHERE id = :id` matches
/// whatever the column's affinity; anything else is bound as text. Never spliced into the SQL.
fn bind_params(stmt: &mut Statement<'_>, params: &Params) -> rusqlite::Result<()> {
    for index in 1..=stmt.parameter_count() {
        let name = stmt.parameter_name(index).unwrap_or("");
        let bare = name.trim_start_matches([':', '@', '$']);
        let Some((_, value)) = params.iter().find(|(n, _)| n == bare) else {
            return Err(rusqlite::Error::InvalidParameterName(name.to_owned()));
        };
        if let Some(i) = canonical_integer(value) {
            stmt.raw_bind_parameter(index, i)?;
        } else if let Some(r) = canonical_real(value) {
            stmt.raw_bind_parameter(index, r)?;
        } else {
            stmt.raw_bind_parameter(index, value.as_str())?;
        }
    }
    Ok(())
}

fn canonical_integer(text: &str) -> Option<i64> {
    let i: i64 = text.parse().ok()?;
    (i.to_string() == text).then_some(i)
}

/// A real written exactly as a key renders one (`1.5`, not `1.50` or `1e0`).
fn canonical_real(text: &str) -> Option<f64> {
    let r: f64 = text.parse().ok()?;
    (r.is_finite() && r.to_string() == text).then_some(r)
}

/// Encodes the rows as JSON: an array of objects when `many`, else the first row's object
/// (None when there is no row).
fn encode_rows(stmt: &mut Statement<'_>, many: bool) -> rusqlite::Result<Option<Bytes>> {
    let names: Vec<String> = stmt
        .column_names()
        .map(|n| serde_json::to_string(n).unwrap_or_else(|_| "\"?\"".to_owned()))
        .collect();
    let mut out = String::with_capacity(256);
    let mut rows = stmt.raw_query();
    if many {
        out.push('[');
    }
    let mut count = 0usize;
    while let Some(row) = rows.next()? {
        if count > 0 {
            out.push(',');
        }
        out.push('{');
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(name);
            out.push(':');
            push_json(&mut out, row.get_ref(i)?);
        }
        out.push('}');
        count += 1;
        if !many {
            break;
        }
    }
    if many {
        out.push(']');
    } else if count == 0 {
        return Ok(None);
    }
    // Cached for minutes: keep exactly the bytes, not the growth slack of the buffer.
    out.shrink_to_fit();
    Ok(Some(Bytes::from(out)))
}

/// One SQLite value as JSON: numbers as numbers (non-finite reals as null), text as strings,
/// blobs as lowercase hex strings.
fn push_json(out: &mut String, value: ValueRef<'_>) {
    match value {
        ValueRef::Null => out.push_str("null"),
        ValueRef::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        ValueRef::Real(r) if r.is_finite() => {
            let text = serde_json::to_string(&r).unwrap_or_else(|_| "null".to_owned());
            out.push_str(&text);
        }
        ValueRef::Real(_) => out.push_str("null"),
        ValueRef::Text(bytes) => {
            let text = String::from_utf8_lossy(bytes);
            out.push_str(&serde_json::to_string(&*text).unwrap_or_else(|_| "null".to_owned()));
        }
        ValueRef::Blob(bytes) => {
            out.push('"');
            for b in bytes {
                let _ = write!(out, "{b:02x}");
            }
            out.push('"');
        }
    }
}

/// The tags a family's value carries, rendered from the key's parameters.
pub fn render_tags(family: &Family, params: &Params) -> Box<[Arc<str>]> {
    family
        .tags
        .iter()
        .filter_map(|t| t.render_with(params))
        .map(Arc::from)
        .collect()
}

/// Fills a missed key: joins the fill in flight, or leads a new one on a blocking thread.
pub async fn fill(
    shared: &Arc<Shared>,
    key: Arc<str>,
    family: &Arc<Family>,
    params: Params,
) -> FillOutcome {
    // The fill this request led or joined is not handed out when it was not stored: an
    // invalidation of the key superseded it, a mark raised while its query ran hides it (this
    // request may have joined after the mark), Redis refused it (perhaps another daemon's
    // invalidation), or a reload retired its family. Fill again (rare: only when something
    // changes while the query runs), then compute without the cache.
    let (mut family, mut params) = (Arc::clone(family), params);
    for _ in 0..3 {
        match fill_once(shared, Arc::clone(&key), &family, params.clone()).await {
            Err(FillError::Superseded) => {
                // A reload replaced the family: answer under the definition now in force,
                // rather than run the retired query again (its values are never stored).
                if family.retired.load(Ordering::Acquire) {
                    let config = shared.config();
                    let Some((current, current_params)) = config.match_key(&key) else {
                        break; // the key has no family any more: the last try answers
                    };
                    family = Arc::clone(current);
                    params = current_params;
                }
            }
            other => return other,
        }
    }
    // The last try answers with what it read, stored if it may be (a superseding recompute in
    // memory; Redis's guard), so that no older read lands after this answer; never stored if
    // it was read while capture was paused.
    let (reader, family_for_query) = (Arc::clone(shared), Arc::clone(&family));
    let refresh_key = Arc::clone(&key);
    let computed = tokio::task::spawn_blocking(move || {
        let ticket = reader
            .redis
            .is_none()
            .then(|| reader.cache.begin_refresh(refresh_key, &family_for_query));
        let computed = reader
            .pool
            .with(|conn| compute(conn, &family_for_query, &params));
        let paused = computed.as_ref().is_ok_and(|c| c.paused);
        if let Some(ticket) = ticket {
            // Finished either way, so the flight leaves the map and its joiners wake.
            let filled = match &computed {
                Ok(c) => Ok(Filled {
                    version: c.version,
                    body: c.body.clone(),
                    tags: render_tags(&family_for_query, &params),
                }),
                Err(e) => Err(Arc::from(e.to_string())),
            };
            if paused {
                reader.cache.finish_fill_with(ticket, filled, |_, _| false);
            } else {
                reader.cache.finish_fill(ticket, filled);
            }
        }
        let computed = computed?;
        let entry = Entry {
            version: computed.version,
            body: computed.body,
            tags: render_tags(&family_for_query, &params),
            family: family_for_query,
            stored_at: std::time::Instant::now(),
        };
        if let Some(redis) = reader.redis.as_ref().filter(|_| !paused) {
            store_in_redis(redis, &key, &entry);
        }
        Ok::<_, rusqlite::Error>(entry)
    })
    .await;
    match computed {
        Ok(Ok(entry)) => Ok(Arc::new(entry)),
        Ok(Err(e)) => Err(FillError::Failed(Arc::from(format!(
            "the query of key family `{}` failed: {e}",
            family.pattern
        )))),
        Err(e) => Err(FillError::Failed(Arc::from(e.to_string()))),
    }
}

async fn fill_once(
    shared: &Arc<Shared>,
    key: Arc<str>,
    family: &Arc<Family>,
    params: Params,
) -> FillOutcome {
    let mut waiter = match shared.cache.begin_fill(key, family) {
        Begin::Cached(entry) => return Ok(entry),
        Begin::Join(waiter) => waiter,
        Begin::Lead(ticket, waiter) => {
            let shared = Arc::clone(shared);
            // Its own task: the fill completes (and serves the joiners) even if the request that
            // started it goes away.
            tokio::spawn(async move {
                let worker = Arc::clone(&shared);
                let _ = tokio::task::spawn_blocking(move || {
                    let outcome = worker
                        .pool
                        .with(|conn| timed_compute(&worker, conn, ticket.family(), &params));
                    finish(&worker, ticket, &params, outcome);
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

/// Recomputes a key now and stores it, superseding any fill in flight (write-through). Blocking:
/// runs on the applying thread with its own connection. Returns false (after removing the key,
/// so nothing stale stays) when the query failed; a value read while capture was paused is not
/// stored, and the key is removed likewise.
pub fn refresh_now(
    shared: &Shared,
    conn: &Connection,
    key: &str,
    family: &Arc<Family>,
    params: &Params,
) -> bool {
    let ticket = shared.cache.begin_refresh(Arc::from(key), family);
    let outcome = timed_compute(shared, conn, family, params);
    let ok = outcome.is_ok();
    let paused = outcome.as_ref().is_ok_and(|c| c.paused);
    finish(shared, ticket, params, outcome);
    if !ok || paused {
        shared.cache.invalidate(key);
    }
    ok
}

fn finish(
    shared: &Shared,
    ticket: FillTicket,
    params: &Params,
    outcome: rusqlite::Result<Computed>,
) {
    let family = Arc::clone(ticket.family());
    family
        .stats
        .fills
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared
        .stats
        .fills
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let paused = outcome.as_ref().is_ok_and(|c| c.paused);
    let computed = match outcome {
        Ok(c) => Ok(Filled {
            version: c.version,
            body: c.body,
            tags: render_tags(&family, params),
        }),
        Err(e) => {
            shared
                .stats
                .fill_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(key = %ticket.key(), family = %family.pattern, error = %e, "fill failed");
            Err(Arc::from(format!(
                "the query of key family `{}` failed: {e}",
                family.pattern
            )))
        }
    };
    match &shared.redis {
        // Read while capture was paused: not stored, and not handed to the requests that joined
        // either (one may have joined after a change the read missed): they fill again, and
        // the last try answers from the database without storing.
        _ if paused => {
            shared
                .cache
                .finish_fill_with(ticket, computed, |_, _| false);
        }
        None => {
            shared.cache.finish_fill(ticket, computed);
        }
        Some(redis) => {
            shared
                .cache
                .finish_fill_with(ticket, computed, |key, entry| {
                    store_in_redis(redis, key, entry)
                });
        }
    }
}

/// Stores a computed value in Redis, which refuses it if it read before an invalidation or
/// below a value stored before. A key without a row is not stored (the value under a key is
/// always the JSON the endpoint serves), only checked. Blocking.
fn store_in_redis(redis: &RedisCache, key: &str, entry: &Entry) -> bool {
    let mut groups: Vec<String> = entry
        .tags
        .iter()
        .map(|t| redis_cache::tag_group(t))
        .collect();
    groups.push(entry.family.group.clone());
    let body = entry.body.as_deref();
    match redis.store(key, entry.version, entry.family.ttl, body, &groups) {
        Ok(stored) => stored,
        Err(e) => {
            tracing::debug!(key, error = %e, "not stored in redis");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

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
        let family = Arc::clone(&config.families[0]);
        let pool = ReadPool::new(path, 1);
        let query_only: bool = pool
            .with(|conn| conn.query_row("PRAGMA query_only", [], |row| row.get(0)))
            .expect("pragma");
        assert!(query_only, "the pool's connections are query_only");
        let params = vec![("id".to_owned(), "2".to_owned())];
        let error = match pool.with(|conn| compute(conn, &family, &params)) {
            Ok(computed) => panic!("the write ran: {:?}", computed.body),
            Err(error) => error.to_string(),
        };
        assert!(error.contains("readonly"), "{error}");
        let rows: i64 = app
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .expect("count");
        assert_eq!(rows, 1, "nothing was written");
    }

    #[test]
    fn a_value_read_while_capture_was_paused_is_neither_stored_nor_handed_out() {
        let config = Config::parse(
            "database = \"x.db\"\n[keys.\"k:{id}\"]\nquery = \"SELECT :id AS id\"\n",
            "test.toml",
            Path::new("."),
        )
        .expect("valid");
        let shared = Shared::new(config, 0);
        let family = Arc::clone(&shared.config().families[0]);
        let params = vec![("id".to_owned(), "1".to_owned())];
        let Begin::Lead(ticket, _) = shared.cache.begin_fill(Arc::from("k:1"), &family) else {
            panic!("expected to lead the fill");
        };
        let Begin::Join(mut waiter) = shared.cache.begin_fill(Arc::from("k:1"), &family) else {
            panic!("expected to join");
        };
        // Its read transaction found capture paused: writes since may have no outbox row.
        let read = Computed {
            version: 5,
            body: Some(Bytes::from_static(b"{\"id\":1}")),
            paused: true,
        };
        finish(&shared, ticket, &params, Ok(read));
        assert!(shared.cache.get("k:1").is_none(), "not stored");
        let seen = waiter.borrow_and_update().clone();
        assert!(matches!(seen, Some(Err(FillError::Superseded))), "{seen:?}");
    }
}
