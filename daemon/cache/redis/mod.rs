//! The shared cache in Redis: values app servers can read directly, kept exactly as fresh as the
//! database by the same guard as the in-process cache, enforced atomically inside Redis.
//!
//! Layout under the configured prefix `P` (see README "Redis backend"):
//!
//! - `P{key}`: the value, exactly the JSON body `GET /v1/keys/{key}` returns, with the family's
//!   TTL. Keys whose query found no row are not stored.
//! - `P#m:{key}`: hash `i` (outbox position of the key's last invalidation) and `v` (the position
//!   the stored value read at, or the last read that found no row, if later).
//! - `P#g:{group}`: sorted set of the keys in a group (a tag `t:{tag}`, or a family
//!   `f:{pattern}:{generation}`), scored by expiry, so invalidating a tag touches only its keys.
//! - `P#gm:{group}`: the position of the group's last invalidation.
//! - `P#state`: hash `applied` (the highest outbox position applied to Redis), `floor`
//!   (values read before it are refused: set when the namespace is rebuilt) and `epoch` (the
//!   highest lease epoch claimed or applied under: it only grows, a rebuild keeps it).
//!
//! A fill stores through one Lua script that refuses a value read before any invalidation that
//! applies to it (key, groups, floor), and refuses anything if Redis lost cachetail's state
//! (`applied` below what this daemon saw: a restart from an older snapshot, a FLUSHALL).
//! Invalidations of a batch run in one script too, which also records `applied` and publishes
//! the batch on `P` + `invalidations` for app-local caches, and appends it to the stream
//! `P#invalidations` (field `message`, the last `[cache] stream_max_len` entries kept), from
//! which a subscriber that was away resumes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::RedisUrl;
use crate::db::Body;
use crate::escape::Escaped;

mod batches;
pub mod client;
mod cluster;
mod cluster_rebuild;
mod cluster_scripts;
mod pool;
mod rebuild;
mod scripts;

use batches::fan_out_message;
pub use batches::{Invalidation, tag_group};
use client::{Conn, RedisError, Reply, Target};
use pool::Pool;
use scripts::{APPLY, CLAIM, FINISH, PURGE, STORE, Script};

/// How long invalidation marks outlive the invalidation: longer than any fill can take.
const MARK_TTL: Duration = Duration::from_secs(600);
/// The mark of a retired family generation: no fill of it is ever stored again.
const RETIRED: u64 = 1 << 52;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The most keys of groups one script looks at: Redis serves nobody while a script runs, so a
/// tag an attacker grew to millions of keys is emptied a page at a time (well under a
/// millisecond each), other clients served in between.
const PURGE_PAGE: usize = 100;
/// How often the applying daemon checks, even with nothing to apply, that Redis still holds
/// what it applied (a Redis restored from an older snapshot, or flushed, is rebuilt within it;
/// until then every daemon answers from the database).
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Whether Redis answers, for `/v1/status` and the logs.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub down_since: Option<SystemTime>,
    pub last_error: Option<String>,
    pub outages: u64,
}

pub struct RedisStore {
    url: RedisUrl,
    /// Where connections go: the URL's server, or the primary Sentinel names.
    target: std::sync::Arc<Target>,
    pub prefix: String,
    channel: String,
    /// The invalidation stream's entries kept (`[cache] stream_max_len`).
    stream_max_len: u64,
    apply_conn: Mutex<Option<Conn>>,
    /// The shared connections for reads and fills' stores, requests in flight capped
    /// (`[cache] max_connections`).
    pool: Pool,
    /// The highest `applied` this daemon wrote or read: Redis below it lost state.
    seen: AtomicU64,
    /// The lease epoch this daemon last claimed or applied under (0: none): claimed again on
    /// every new connection, so a promoted replica that missed the claim holds it at once.
    epoch: AtomicU64,
    health: Mutex<Health>,
    /// Redis failed or showed lost state since the last reconcile: the tail checks it again.
    suspect: std::sync::atomic::AtomicBool,
    /// When the applying daemon last checked Redis's applied position (`heal`).
    probed_at: Mutex<Option<std::time::Instant>>,
    claim_script: Script,
    apply_script: Script,
    purge_script: Script,
    finish_script: Script,
    store_script: Script,
    /// On a Redis Cluster (`[cache] cluster`): its names, scripts and slots' positions.
    cluster: Option<cluster::Cluster>,
}

/// What `APPLY` did: all of the batch (its outcome), or all but emptying these groups (each
/// with its mark), which `PURGE` does a page at a time before `FINISH`.
enum Begun {
    Done(Option<i64>),
    Pending(Vec<(String, u64)>),
}

impl RedisStore {
    pub fn new(
        url: RedisUrl,
        prefix: String,
        (publish, stream_max_len): (bool, u64),
        max_connections: usize,
    ) -> RedisStore {
        let channel = if publish {
            format!("{prefix}invalidations")
        } else {
            String::new()
        };
        let target = std::sync::Arc::new(Target::new(&url));
        RedisStore {
            pool: Pool::new(std::sync::Arc::clone(&target), max_connections, IO_TIMEOUT),
            target,
            cluster: (!url.cluster.is_empty()).then(|| cluster::Cluster::new(&prefix)),
            url,
            prefix,
            channel,
            stream_max_len,
            apply_conn: Mutex::new(None),
            seen: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            health: Mutex::new(Health::default()),
            suspect: std::sync::atomic::AtomicBool::new(false),
            probed_at: Mutex::new(None),
            claim_script: Script::new(CLAIM),
            apply_script: Script::new(APPLY),
            purge_script: Script::new(PURGE),
            finish_script: Script::new(FINISH),
            store_script: Script::new(STORE),
        }
    }

    /// The primary's address and database (with Sentinel: the one named last, and the name).
    pub fn address(&self) -> String {
        if !self.url.cluster.is_empty() {
            let seeds: Vec<String> = self
                .url
                .cluster
                .iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect();
            return format!("cluster {}", seeds.join(","));
        }
        let at = match self.target.address() {
            Some((host, port)) => format!("{host}:{port}/{}", self.url.db),
            None => format!("?/{}", self.url.db),
        };
        match &self.url.sentinel {
            Some(sentinels) => format!("{at} (primary `{}` per sentinel)", sentinels.master),
            None => at,
        }
    }

    /// A new blocking connection (the tail's) to the primary: with Sentinel, the one named now.
    fn connect(&self) -> Result<Conn, RedisError> {
        let url = match self.pool.block_on(self.target.primary(IO_TIMEOUT)) {
            Some(url) => url?,
            None => return Err(RedisError::Io(std::io::ErrorKind::NotConnected.into())),
        };
        Conn::connect(&url, IO_TIMEOUT, self.target.is_sentinel())
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn note<T>(&self, result: &Result<T, RedisError>) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            // Refused as designed, or every connection busy: Redis itself answers.
            Err(RedisError::Fenced | RedisError::PoolFull(_)) => {}
            Err(RedisError::StateLost) => self.suspect.store(true, Ordering::Release),
            Ok(_) => {
                if let Some(since) = health.down_since.take() {
                    let down = since.elapsed().unwrap_or_default();
                    tracing::info!(address = %self.address(), ?down, "redis is back");
                }
            }
            Err(e) => {
                self.suspect.store(true, Ordering::Release);
                if health.down_since.is_none() {
                    health.down_since = Some(SystemTime::now());
                    health.outages += 1;
                    tracing::warn!(address = %self.address(), error = %Escaped(e), "redis is unavailable: reads answer from the database, the cursor waits");
                }
                health.last_error = Some(e.to_string());
            }
        }
    }

    /// Claims lease epoch `epoch` for this daemon before it applies anything (see `CLAIM`).
    /// Returns None when claimed, or the epoch Redis has seen when that is at or above it: the
    /// lease row was deleted or reset since, and the daemon must take an epoch above it.
    pub fn claim_epoch(&self, epoch: u64) -> Result<Option<u64>, RedisError> {
        if self.cluster.is_some() {
            return self
                .cluster_claim(epoch)
                .map(|known| (known >= epoch).then_some(known));
        }
        let mut guard = self.apply_conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = (|| {
            let args = [self.prefix.as_bytes(), epoch.to_string().as_bytes()].map(<[u8]>::to_vec);
            match self.claim_script.run(self.connected(&mut guard)?, &args)? {
                Reply::Int(known) => Ok(u64::try_from(known).unwrap_or(0)),
                other => Err(RedisError::Protocol(format!("CLAIM answered {other:?}"))),
            }
        })();
        self.note(&result);
        match result {
            Ok(known) if known < epoch => {
                self.epoch.store(epoch, Ordering::Release);
                Ok(None)
            }
            Ok(known) => Ok(Some(known)),
            Err(e) => {
                *guard = None;
                Err(e)
            }
        }
    }

    /// Applies one batch of invalidations atomically, then publishes it. Blocking (the tail
    /// thread). `cursor` is the position applied before this batch.
    pub fn apply(&self, batch: &Invalidation, cursor: u64) -> Result<(), RedisError> {
        if self.cluster.is_some() {
            return self.cluster_apply(batch, cursor);
        }
        let mut guard = self.apply_conn.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = guard.is_none();
        let result = (|| {
            if fresh {
                self.reconcile_on(&mut guard, cursor, None)?;
            }
            let mut outcome = self.run_batch(self.connected(&mut guard)?, batch)?;
            if outcome == Some(-1) {
                // Redis lost state since the last batch (a FLUSHALL, a restart): rebuild, retry.
                self.reconcile_on(&mut guard, cursor, None)?;
                outcome = self.run_batch(self.connected(&mut guard)?, batch)?;
            }
            match outcome {
                Some(-2) => Err(RedisError::Fenced),
                Some(-1) => Err(RedisError::StateLost),
                _ => Ok(()),
            }
        })();
        self.note(&result);
        match &result {
            Ok(()) => {
                self.seen.fetch_max(batch.position, Ordering::AcqRel);
            }
            Err(_) => *guard = None,
        }
        result
    }

    /// One batch: `APPLY`, then, for each group too large for it, `PURGE` a page at a time
    /// (Redis serves other clients between pages) and `FINISH`. The group's mark was raised
    /// first, so no value read before it lands meanwhile. The outcome: 1, or -1 (Redis lost
    /// state), -2 (fenced).
    fn run_batch(&self, conn: &mut Conn, batch: &Invalidation) -> Result<Option<i64>, RedisError> {
        let pending = match self.begin_batch(conn, batch)? {
            Begun::Done(outcome) => return Ok(outcome),
            Begun::Pending(groups) => groups,
        };
        for (group, mark) in &pending {
            let mut cursor = b"0".to_vec();
            loop {
                cursor = self.purge_page(conn, group, *mark, &cursor)?;
                if cursor == b"0" {
                    break;
                }
            }
        }
        self.finish_batch(conn, batch)
    }

    fn begin_batch(&self, conn: &mut Conn, batch: &Invalidation) -> Result<Begun, RedisError> {
        match self.apply_script.run(conn, &self.apply_args(batch))? {
            Reply::Array(items) => {
                let text = |item: Option<Reply>| match item {
                    Some(Reply::Bulk(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
                    other => Err(RedisError::Protocol(format!("APPLY listed {other:?}"))),
                };
                let mut items = items.into_iter();
                let mut groups = Vec::new();
                while let Some(group) = items.next() {
                    let group = text(Some(group))?;
                    let mark = text(items.next())?.parse().unwrap_or(u64::MAX);
                    groups.push((group, mark));
                }
                Ok(Begun::Pending(groups))
            }
            other => Ok(Begun::Done(other.as_int())),
        }
    }

    /// Removes one page of a group's values read before `mark`; returns the next cursor.
    fn purge_page(
        &self,
        conn: &mut Conn,
        group: &str,
        mark: u64,
        cursor: &[u8],
    ) -> Result<Vec<u8>, RedisError> {
        let args = [
            self.prefix.as_bytes(),
            group.as_bytes(),
            mark.to_string().as_bytes(),
            cursor,
            PURGE_PAGE.to_string().as_bytes(),
        ]
        .map(<[u8]>::to_vec);
        match self.purge_script.run(conn, &args)? {
            Reply::Bulk(next) => Ok(next),
            other => Err(RedisError::Protocol(format!("PURGE answered {other:?}"))),
        }
    }

    fn finish_batch(
        &self,
        conn: &mut Conn,
        batch: &Invalidation,
    ) -> Result<Option<i64>, RedisError> {
        let args = [
            self.prefix.as_bytes(),
            batch.position.to_string().as_bytes(),
            self.seen.load(Ordering::Acquire).to_string().as_bytes(),
            batch.epoch.to_string().as_bytes(),
            self.channel.as_bytes(),
            batch.message.as_bytes(),
            self.stream_max_len.to_string().as_bytes(),
        ]
        .map(<[u8]>::to_vec);
        Ok(self.finish_script.run(conn, &args)?.as_int())
    }

    fn apply_args(&self, batch: &Invalidation) -> Vec<Vec<u8>> {
        // No family stores a key beginning with `#` (config refuses such patterns on Redis):
        // one a rule renders from a row (a title `#state`), or an operator deletes, names no
        // value, and removing `{prefix}#…` would remove cachetail's bookkeeping.
        let keys: Vec<&String> = batch.keys.iter().filter(|k| !k.starts_with('#')).collect();
        let mut args: Vec<Vec<u8>> = vec![
            self.prefix.as_bytes().to_vec(),
            batch.position.to_string().into_bytes(),
            MARK_TTL.as_millis().to_string().into_bytes(),
            self.seen.load(Ordering::Acquire).to_string().into_bytes(),
            self.channel.as_bytes().to_vec(),
            keys.len().to_string().into_bytes(),
            batch.epoch.to_string().into_bytes(),
        ];
        args.extend(keys.iter().map(|k| k.as_bytes().to_vec()));
        args.push(batch.groups.len().to_string().into_bytes());
        for (group, mark) in &batch.groups {
            args.push(group.as_bytes().to_vec());
            args.push(mark.to_string().into_bytes());
        }
        args.push(batch.floor.to_string().into_bytes());
        args.push(batch.message.as_bytes().to_vec());
        args.push(PURGE_PAGE.to_string().into_bytes());
        args.push(self.stream_max_len.to_string().into_bytes());
        args
    }

    /// Stores a computed value unless an invalidation it did not see came first. Blocking.
    /// Returns whether it was stored. With no `body` (the query found no row) nothing is stored:
    /// it returns whether the result is still current. `known`: a position this daemon knows
    /// Redis has applied (see `get`).
    pub fn store(
        &self,
        key: &str,
        (version, known): (u64, u64),
        ttl: Duration,
        body: Option<&[u8]>,
        groups: &[String],
    ) -> Result<bool, RedisError> {
        if self.cluster.is_some() {
            return self.cluster_store(key, (version, known), ttl, body, groups);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let mut args: Vec<Vec<u8>> = vec![
            self.prefix.as_bytes().to_vec(),
            key.as_bytes().to_vec(),
            version.to_string().into_bytes(),
            ttl.as_millis().max(1).to_string().into_bytes(),
            body.unwrap_or_default().to_vec(),
            self.expected(known).to_string().into_bytes(),
            now.to_string().into_bytes(),
            groups.len().to_string().into_bytes(),
        ];
        args.extend(groups.iter().map(|g| g.as_bytes().to_vec()));
        args.push(if body.is_some() {
            b"store".to_vec()
        } else {
            b"check".to_vec()
        });
        let args = &args;
        let result = self.pool.run_blocking(|mut conn| async move {
            self.store_script.run_async(&mut conn, args).await
        });
        self.note(&result);
        match result?.as_int() {
            Some(1) => Ok(true),
            Some(-1) => Err(RedisError::StateLost),
            _ => Ok(false),
        }
    }

    /// Stores a computed value (`store`, with its groups: its tags' and its family's).
    /// Blocking. A value refused (or Redis unreachable) is simply not stored.
    pub fn store_entry(&self, key: &str, entry: &super::Entry, known: u64) -> bool {
        let mut groups: Vec<String> = entry.tags.iter().map(|t| tag_group(t)).collect();
        groups.push(entry.family.def.group.clone());
        let (ttl, body) = (entry.family.def.ttl, entry.body.as_deref());
        match self.store(key, (entry.version, known), ttl, body, &groups) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::debug!(key = %Escaped(key), error = %Escaped(&e), "not stored in redis");
                false
            }
        }
    }

    /// What Redis must have applied, at least, for this daemon to trust it: the highest
    /// `applied` it wrote or read, and `known`, a position it knows Redis has applied (the
    /// tail's applied position: on the applying daemon, what it applied to Redis; on a standby,
    /// the durable cursor, which the active daemon writes only after Redis applied up to it).
    /// A standby that just started has read nothing from Redis yet: without `known` it would
    /// trust a Redis restored from a snapshot older than the durable cursor.
    fn expected(&self, known: u64) -> u64 {
        self.seen.load(Ordering::Acquire).max(known)
    }

    /// The cached value of `key` and the rest of its TTL, if Redis has one it may serve. An
    /// error means the endpoint must answer from the database (Redis is down, or lost state it
    /// has not rebuilt yet). `known`: a position this daemon knows Redis has applied.
    pub async fn get(&self, key: &str, known: u64) -> Result<Option<(Body, Duration)>, RedisError> {
        if self.cluster.is_some() {
            return self.cluster_get(key, known).await;
        }
        let value = format!("{}{key}", self.prefix);
        let state = format!("{}#state", self.prefix);
        let commands = [
            vec![&b"GET"[..], value.as_bytes()],
            vec![&b"HGET"[..], state.as_bytes(), &b"applied"[..]],
            vec![&b"PTTL"[..], value.as_bytes()],
        ];
        // What this daemon knew Redis had applied before asking: Redis answering less lost it.
        // (Compared with `seen` after the answer instead, an apply finishing meanwhile would
        // look like a loss.)
        let known = self.expected(known);
        let replies = self.pipelined(&commands).await?;
        let mut replies = replies.into_iter();
        let (value, applied, ttl) = (replies.next(), replies.next(), replies.next());
        let applied = applied
            .as_ref()
            .and_then(Reply::as_int)
            .ok_or(RedisError::StateLost)
            .inspect_err(|_| self.suspect.store(true, Ordering::Release))?;
        let applied = applied.max(0) as u64;
        self.seen.fetch_max(applied, Ordering::AcqRel);
        if applied < known {
            self.suspect.store(true, Ordering::Release);
            return Err(RedisError::StateLost);
        }
        let remaining = ttl
            .as_ref()
            .and_then(Reply::as_int)
            .map_or(Duration::ZERO, |ms| Duration::from_millis(ms.max(0) as u64));
        match value {
            Some(Reply::Bulk(body)) => Ok(Some((body.into_boxed_slice(), remaining))),
            Some(Reply::Nil) | None => Ok(None),
            Some(Reply::Error(e)) => Err(RedisError::Server(e)),
            Some(other) => Err(RedisError::Protocol(format!("GET answered {other:?}"))),
        }
    }

    /// The tail's connection, opened if there is none.
    fn connected<'a>(&self, slot: &'a mut Option<Conn>) -> Result<&'a mut Conn, RedisError> {
        if slot.is_none() {
            *slot = Some(self.connect()?);
        }
        slot.as_mut()
            .ok_or_else(|| RedisError::Protocol("no connection".into()))
    }

    /// Sends `commands` at once on a shared connection and returns their replies, in order.
    async fn pipelined(&self, commands: &[Vec<&[u8]>]) -> Result<Vec<Reply>, RedisError> {
        let result = self.pool.run(|conn| pipeline(conn, commands)).await;
        if result.is_err() {
            self.note(&result);
        }
        result
    }

    /// One command on a shared connection, blocking.
    fn command_blocking(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        let result = self.pool.run_blocking(|conn| async move {
            let mut replies = pipeline(conn, &[args.to_vec()]).await?;
            replies
                .pop()
                .ok_or_else(|| RedisError::Protocol("no reply".into()))
        });
        self.note(&result);
        result
    }

    /// A cached value, blocking (for `verify`).
    pub fn get_blocking(&self, key: &str) -> Result<Option<Body>, RedisError> {
        let value = format!("{}{key}", self.prefix);
        let reply = self.command_blocking(&[&b"GET"[..], value.as_bytes()])?;
        Ok(match reply {
            Reply::Bulk(body) => Some(body.into_boxed_slice()),
            _ => None,
        })
    }

    /// Up to `limit` keys of these groups (a sample for `verify`). Blocking.
    pub fn keys(&self, groups: &[String], limit: usize) -> Result<Vec<String>, RedisError> {
        let mut keys = Vec::new();
        for group in groups {
            if keys.len() >= limit {
                break;
            }
            let set = match &self.cluster {
                Some(c) => c.group_set(group),
                None => format!("{}#g:{group}", self.prefix),
            };
            let stop = (limit - keys.len()).saturating_sub(1).to_string();
            let reply =
                self.command_blocking(&[&b"ZRANGE"[..], set.as_bytes(), b"0", stop.as_bytes()])?;
            if let Reply::Array(items) = reply {
                keys.extend(items.into_iter().filter_map(|item| match item {
                    Reply::Bulk(k) => String::from_utf8(k).ok(),
                    _ => None,
                }));
            }
        }
        Ok(keys)
    }

    /// How many values the groups hold (expired members may linger until the next store).
    pub async fn count(&self, groups: &[String]) -> Result<u64, RedisError> {
        if self.cluster.is_some() {
            return self.cluster_count(groups).await;
        }
        let sets: Vec<String> = groups
            .iter()
            .map(|g| format!("{}#g:{g}", self.prefix))
            .collect();
        let commands: Vec<Vec<&[u8]>> = sets
            .iter()
            .map(|s| vec![&b"ZCARD"[..], s.as_bytes()])
            .collect();
        if commands.is_empty() {
            return Ok(0);
        }
        let replies = self.pipelined(&commands).await?;
        Ok(replies
            .iter()
            .filter_map(Reply::as_int)
            .map(|n| n.max(0) as u64)
            .sum())
    }
}

async fn pipeline(mut conn: pool::Link, commands: &[Vec<&[u8]>]) -> Result<Vec<Reply>, RedisError> {
    let mut pipe = redis::pipe();
    for args in commands {
        pipe.add_command(client::command(args));
    }
    let values: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
    Ok(values.into_iter().map(Reply::from).collect())
}

/// Escapes a literal for a Redis glob pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests;
