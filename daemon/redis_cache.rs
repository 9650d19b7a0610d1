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
//! - `P#state`: hash `applied` (the highest outbox position applied to Redis) and `floor`
//!   (values read before it are refused: set when the namespace is rebuilt).
//!
//! A fill stores through one Lua script that refuses a value read before any invalidation that
//! applies to it (key, groups, floor), and refuses anything if Redis lost cachetail's state
//! (`applied` below what this daemon saw: a restart from an older snapshot, a FLUSHALL).
//! Invalidations of a batch run in one script too, which also records `applied` and publishes
//! the batch on `P` + `invalidations` for app-local caches.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::resp::{AsyncConn, Conn, RedisError, RedisUrl, Reply};

/// How long invalidation marks outlive the invalidation: longer than any fill can take.
const MARK_TTL: Duration = Duration::from_secs(600);
/// The mark of a retired family generation: no fill of it is ever stored again.
const RETIRED: u64 = 1 << 52;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle connections kept: one per concurrent request at the loads we expect, so a busy endpoint
/// never connects per request.
const MAX_IDLE: usize = 256;

const APPLY: &str = r#"
local prefix = ARGV[1]
local pos = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local state = prefix .. '#state'
local applied = redis.call('HGET', state, 'applied')
if not applied or tonumber(applied) < tonumber(ARGV[4]) then return -1 end
-- Epoch 0: an operator's removal (admin API), from any daemon: it only removes values, so it
-- needs no fencing, and it applies no outbox position.
local epoch = tonumber(ARGV[7])
local known = tonumber(redis.call('HGET', state, 'epoch') or '0')
if epoch > 0 and known > epoch then return -2 end
if epoch > known then redis.call('HSET', state, 'epoch', epoch) end
local i = 8
local n = tonumber(ARGV[6])
for _ = 1, n do
  local key = ARGV[i]; i = i + 1
  redis.call('UNLINK', prefix .. key)
  local meta = prefix .. '#m:' .. key
  if tonumber(redis.call('HGET', meta, 'i') or '0') < pos then redis.call('HSET', meta, 'i', pos) end
  if redis.call('PTTL', meta) < ttl then redis.call('PEXPIRE', meta, ttl) end
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local group = ARGV[i]; local mark = tonumber(ARGV[i + 1]); i = i + 2
  local set = prefix .. '#g:' .. group
  -- Only the values read before the mark: one read after it already reflects the change.
  for _, key in ipairs(redis.call('ZRANGE', set, 0, -1)) do
    if tonumber(redis.call('HGET', prefix .. '#m:' .. key, 'v') or '0') < mark then
      redis.call('UNLINK', prefix .. key)
      redis.call('ZREM', set, key)
    end
  end
  local gm = prefix .. '#gm:' .. group
  local old = tonumber(redis.call('GET', gm) or '0')
  if old > mark then mark = old end
  redis.call('SET', gm, mark, 'PX', ttl)
end
local floor = tonumber(ARGV[i])
if floor > tonumber(redis.call('HGET', state, 'floor') or '0') then redis.call('HSET', state, 'floor', floor) end
if epoch > 0 and pos > tonumber(applied) then redis.call('HSET', state, 'applied', pos) end
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[i + 1]) end
return 1
"#;

const STORE: &str = r#"
local prefix, key = ARGV[1], ARGV[2]
local v = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local state = prefix .. '#state'
local applied = redis.call('HGET', state, 'applied')
if not applied or tonumber(applied) < tonumber(ARGV[6]) then return -1 end
if v < tonumber(redis.call('HGET', state, 'floor') or '0') then return 0 end
local meta = prefix .. '#m:' .. key
local m = redis.call('HMGET', meta, 'i', 'v')
if v < tonumber(m[1] or '0') then return 0 end
local value = prefix .. key
-- Never below a value stored before, even one invalidated since: the daemon may apply a change
-- after a fill that already saw it stored a newer value, so an older read must stay out.
if v < tonumber(m[2] or '0') then return 0 end
local n = tonumber(ARGV[8])
for j = 1, n do
  if v < tonumber(redis.call('GET', prefix .. '#gm:' .. ARGV[8 + j]) or '0') then return 0 end
end
if ARGV[9 + n] ~= 'check' then
  redis.call('SET', value, ARGV[5], 'PX', ttl)
elseif v > tonumber(m[2] or '0') then
  -- A read that found no row is not stored, but it is an answer: a value read before it must
  -- not land after it, and one stored before it goes.
  redis.call('UNLINK', value)
end
if v > tonumber(m[2] or '0') then redis.call('HSET', meta, 'v', v) end
if redis.call('PTTL', meta) < ttl then redis.call('PEXPIRE', meta, ttl) end
if ARGV[9 + n] == 'check' then return 1 end
local now = tonumber(ARGV[7])
for j = 1, n do
  local set = prefix .. '#g:' .. ARGV[8 + j]
  redis.call('ZADD', set, now + ttl, key)
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
  if redis.call('PTTL', set) < ttl then redis.call('PEXPIRE', set, ttl) end
end
return 1
"#;

/// A Lua script, loaded into Redis on first use (and again after a restart forgot it).
struct Script {
    source: &'static str,
    sha: Mutex<Option<String>>,
}

impl Script {
    const fn new(source: &'static str) -> Script {
        Script {
            source,
            sha: Mutex::new(None),
        }
    }

    fn run(&self, conn: &mut Conn, args: &[Vec<u8>]) -> Result<Reply, RedisError> {
        let known = self.sha.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(sha) = known {
            match conn.cmd(&evalsha(&sha, args)) {
                Err(RedisError::Server(e)) if e.starts_with("NOSCRIPT") => {}
                other => return other,
            }
        }
        let sha = match conn.cmd(&[&b"SCRIPT"[..], b"LOAD", self.source.as_bytes()])? {
            Reply::Bulk(sha) => String::from_utf8_lossy(&sha).into_owned(),
            other => {
                return Err(RedisError::Protocol(format!(
                    "SCRIPT LOAD answered {other:?}"
                )));
            }
        };
        *self.sha.lock().unwrap_or_else(|e| e.into_inner()) = Some(sha.clone());
        conn.cmd(&evalsha(&sha, args))
    }
}

fn evalsha(sha: &str, args: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut command = vec![b"EVALSHA".to_vec(), sha.as_bytes().to_vec(), b"0".to_vec()];
    command.extend(args.iter().cloned());
    command
}

/// One batch of invalidations, as Redis applies it.
#[derive(Debug, Default)]
pub struct Invalidation {
    /// The outbox position the batch ends at.
    pub position: u64,
    pub keys: Vec<String>,
    /// Groups to empty, each with the mark fills must have read at or after.
    pub groups: Vec<(String, u64)>,
    /// Values read before this position are refused (0: no change).
    pub floor: u64,
    /// The pub/sub message (JSON) for app-local caches.
    pub message: String,
    /// The applying daemon's lease epoch: Redis refuses a batch from an older epoch. 0 for an
    /// operator's removal (admin API), which applies no outbox position.
    pub epoch: u64,
}

/// Whether Redis answers, for `/v1/status` and the logs.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub down_since: Option<SystemTime>,
    pub last_error: Option<String>,
    pub outages: u64,
}

pub struct RedisCache {
    url: RedisUrl,
    pub prefix: String,
    channel: String,
    apply_conn: Mutex<Option<Conn>>,
    store_conns: Mutex<Vec<Conn>>,
    read_conns: Mutex<Vec<AsyncConn>>,
    /// The highest `applied` this daemon wrote or read: Redis below it lost state.
    seen: AtomicU64,
    health: Mutex<Health>,
    /// Redis failed or showed lost state since the last reconcile: the tail checks it again.
    suspect: std::sync::atomic::AtomicBool,
    apply_script: Script,
    store_script: Script,
}

impl RedisCache {
    pub fn new(url: RedisUrl, prefix: String, publish: bool) -> RedisCache {
        let channel = if publish {
            format!("{prefix}invalidations")
        } else {
            String::new()
        };
        RedisCache {
            url,
            prefix,
            channel,
            apply_conn: Mutex::new(None),
            store_conns: Mutex::new(Vec::new()),
            read_conns: Mutex::new(Vec::new()),
            seen: AtomicU64::new(0),
            health: Mutex::new(Health::default()),
            suspect: std::sync::atomic::AtomicBool::new(false),
            apply_script: Script::new(APPLY),
            store_script: Script::new(STORE),
        }
    }

    pub fn address(&self) -> String {
        format!("{}:{}/{}", self.url.host, self.url.port, self.url.db)
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
            Err(RedisError::Fenced) => {}
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
                    tracing::warn!(address = %self.address(), error = %e, "redis is unavailable: reads answer from the database, the cursor waits");
                }
                health.last_error = Some(e.to_string());
            }
        }
    }

    /// Makes Redis's contents trustworthy for a daemon whose applied position is `cursor`: if
    /// Redis has not applied everything up to it (restarted from an older snapshot, flushed) or
    /// has applied beyond the database's outbox (the outbox was recreated), every cachetail key
    /// is removed and the state starts at `cursor`. Blocking.
    pub fn reconcile(&self, cursor: u64, head: Option<u64>) -> Result<(), RedisError> {
        let mut guard = self.apply_conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.reconcile_on(&mut guard, cursor, head);
        self.note(&result);
        if result.is_err() {
            *guard = None;
        }
        result
    }

    fn reconcile_on(
        &self,
        slot: &mut Option<Conn>,
        cursor: u64,
        head: Option<u64>,
    ) -> Result<(), RedisError> {
        let conn = connected(slot, &self.url)?;
        let state = format!("{}#state", self.prefix);
        let applied = conn.cmd(&[&b"HGET"[..], state.as_bytes(), b"applied"])?;
        let applied = applied.as_int().map(|a| a.max(0) as u64);
        let trustworthy = match applied {
            Some(a) => a >= cursor && head.is_none_or(|h| a <= h),
            None => false,
        };
        if trustworthy {
            self.seen.fetch_max(applied.unwrap_or(0), Ordering::AcqRel);
            return Ok(());
        }
        let removed = self.remove_namespace(conn)?;
        conn.cmd(&[
            &b"HSET"[..],
            state.as_bytes(),
            b"applied",
            cursor.to_string().as_bytes(),
            b"floor",
            cursor.to_string().as_bytes(),
        ])?;
        self.seen.fetch_max(cursor, Ordering::AcqRel);
        tracing::warn!(
            redis_applied = ?applied,
            cursor,
            removed,
            "redis did not hold every applied invalidation (restarted, flushed, or a new outbox): its cachetail keys were removed"
        );
        Ok(())
    }

    /// Removes every key under the prefix (SCAN, not KEYS: never blocks Redis for long).
    fn remove_namespace(&self, conn: &mut Conn) -> Result<u64, RedisError> {
        let pattern = format!("{}*", glob_escape(&self.prefix));
        let mut cursor = b"0".to_vec();
        let mut removed = 0u64;
        loop {
            let reply = conn.cmd(&[
                &b"SCAN"[..],
                &cursor,
                b"MATCH",
                pattern.as_bytes(),
                b"COUNT",
                b"1000",
            ])?;
            let Reply::Array(mut parts) = reply else {
                return Err(RedisError::Protocol("SCAN did not answer an array".into()));
            };
            let (Some(Reply::Array(keys)), Some(Reply::Bulk(next))) = (parts.pop(), parts.pop())
            else {
                return Err(RedisError::Protocol("SCAN answered an odd shape".into()));
            };
            let keys: Vec<Vec<u8>> = keys
                .into_iter()
                .filter_map(|k| match k {
                    Reply::Bulk(k) => Some(k),
                    _ => None,
                })
                .collect();
            if !keys.is_empty() {
                let mut command = vec![b"UNLINK".to_vec()];
                removed += keys.len() as u64;
                command.extend(keys);
                conn.cmd(&command)?;
            }
            if next == b"0" {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// Reconciles again if Redis failed or lost state since the last look (called by the tail
    /// between batches, so a restarted Redis is rebuilt even when no change comes).
    pub fn heal(&self, cursor: u64) -> Result<(), RedisError> {
        if !self.suspect.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.reconcile(cursor, None)
    }

    /// Applies one batch of invalidations atomically, then publishes it. Blocking (the tail
    /// thread). `cursor` is the position applied before this batch.
    pub fn apply(&self, batch: &Invalidation, cursor: u64) -> Result<(), RedisError> {
        let mut guard = self.apply_conn.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = guard.is_none();
        let result = (|| {
            if fresh {
                self.reconcile_on(&mut guard, cursor, None)?;
            }
            let args = self.apply_args(batch);
            let conn = connected(&mut guard, &self.url)?;
            let mut outcome = self.apply_script.run(conn, &args)?.as_int();
            if outcome == Some(-1) {
                // Redis lost state since the last batch (a FLUSHALL, a restart): rebuild, retry.
                self.reconcile_on(&mut guard, cursor, None)?;
                let conn = connected(&mut guard, &self.url)?;
                outcome = self.apply_script.run(conn, &args)?.as_int();
            }
            match outcome {
                Some(-2) => Err(RedisError::Fenced),
                Some(-1) => Err(RedisError::StateLost),
                _ => Ok(()),
            }
        })();
        self.note(&result);
        match &result {
            Ok(()) if batch.epoch > 0 => {
                self.seen.fetch_max(batch.position, Ordering::AcqRel);
            }
            Ok(()) => {}
            Err(_) => *guard = None,
        }
        result
    }

    /// An operator's removal (admin API; `batch.epoch` must be 0), from any daemon: no
    /// reconcile, no fencing; refused while Redis has lost state (the applier rebuilds it).
    pub fn remove(&self, batch: &Invalidation) -> Result<(), RedisError> {
        let args = self.apply_args(batch);
        let outcome = self.with_store_conn(|conn| self.apply_script.run(conn, &args))?;
        match outcome.as_int() {
            Some(-1) => Err(RedisError::StateLost),
            _ => Ok(()),
        }
    }

    fn apply_args(&self, batch: &Invalidation) -> Vec<Vec<u8>> {
        let mut args: Vec<Vec<u8>> = vec![
            self.prefix.as_bytes().to_vec(),
            batch.position.to_string().into_bytes(),
            MARK_TTL.as_millis().to_string().into_bytes(),
            self.seen.load(Ordering::Acquire).to_string().into_bytes(),
            self.channel.as_bytes().to_vec(),
            batch.keys.len().to_string().into_bytes(),
            batch.epoch.to_string().into_bytes(),
        ];
        args.extend(batch.keys.iter().map(|k| k.as_bytes().to_vec()));
        args.push(batch.groups.len().to_string().into_bytes());
        for (group, mark) in &batch.groups {
            args.push(group.as_bytes().to_vec());
            args.push(mark.to_string().into_bytes());
        }
        args.push(batch.floor.to_string().into_bytes());
        args.push(batch.message.as_bytes().to_vec());
        args
    }

    /// Stores a computed value unless an invalidation it did not see came first. Blocking.
    /// Returns whether it was stored. With no `body` (the query found no row) nothing is stored:
    /// it returns whether the result is still current.
    pub fn store(
        &self,
        key: &str,
        version: u64,
        ttl: Duration,
        body: Option<&[u8]>,
        groups: &[String],
    ) -> Result<bool, RedisError> {
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
            self.seen.load(Ordering::Acquire).to_string().into_bytes(),
            now.to_string().into_bytes(),
            groups.len().to_string().into_bytes(),
        ];
        args.extend(groups.iter().map(|g| g.as_bytes().to_vec()));
        args.push(if body.is_some() {
            b"store".to_vec()
        } else {
            b"check".to_vec()
        });
        let result = self.with_store_conn(|conn| self.store_script.run(conn, &args));
        match result?.as_int() {
            Some(1) => Ok(true),
            Some(-1) => Err(RedisError::StateLost),
            _ => Ok(false),
        }
    }

    fn with_store_conn<R>(
        &self,
        mut work: impl FnMut(&mut Conn) -> Result<R, RedisError>,
    ) -> Result<R, RedisError> {
        let idle = self
            .store_conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let pooled = idle.is_some();
        let mut result = match idle {
            Some(mut conn) => work(&mut conn).map(|r| (r, conn)),
            None => Err(RedisError::Io(std::io::ErrorKind::NotConnected.into())),
        };
        // A pooled connection may have died with a Redis restart: one try on a new one.
        if matches!(result, Err(RedisError::Io(_))) {
            if pooled {
                tracing::debug!("a pooled redis connection failed; reconnecting");
            }
            result = Conn::connect(&self.url, IO_TIMEOUT)
                .and_then(|mut conn| work(&mut conn).map(|r| (r, conn)));
        }
        self.note(&result);
        let (reply, conn) = result?;
        let mut idle = self.store_conns.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
        Ok(reply)
    }

    /// The cached value of `key` and the rest of its TTL, if Redis has one it may serve. An
    /// error means the endpoint must answer from the database (Redis is down, or lost state it
    /// has not rebuilt yet).
    pub async fn get(&self, key: &str) -> Result<Option<(Bytes, Duration)>, RedisError> {
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
        let known = self.seen.load(Ordering::Acquire);
        let replies = self.with_read_conn(&commands).await?;
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
            Some(Reply::Bulk(body)) => Ok(Some((Bytes::from(body), remaining))),
            Some(Reply::Nil) | None => Ok(None),
            Some(Reply::Error(e)) => Err(RedisError::Server(e)),
            Some(other) => Err(RedisError::Protocol(format!("GET answered {other:?}"))),
        }
    }

    async fn with_read_conn(&self, commands: &[Vec<&[u8]>]) -> Result<Vec<Reply>, RedisError> {
        let idle = self
            .read_conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let mut result = match idle {
            Some(conn) => read_on(conn, commands).await,
            None => Err(RedisError::Io(std::io::ErrorKind::NotConnected.into())),
        };
        // A pooled connection may have died with a Redis restart: one try on a new one.
        if matches!(result, Err(RedisError::Io(_))) {
            result = match timed(AsyncConn::connect(&self.url)).await {
                Ok(conn) => read_on(conn, commands).await,
                Err(e) => Err(e),
            };
        }
        if result.is_err() {
            self.note(&result);
        }
        let (replies, conn) = result?;
        let mut idle = self.read_conns.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
        Ok(replies)
    }

    /// A cached value, blocking (for `verify`).
    pub fn get_blocking(&self, key: &str) -> Result<Option<Bytes>, RedisError> {
        let value = format!("{}{key}", self.prefix);
        let reply = self.with_store_conn(|conn| conn.cmd(&[&b"GET"[..], value.as_bytes()]))?;
        Ok(match reply {
            Reply::Bulk(body) => Some(Bytes::from(body)),
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
            let set = format!("{}#g:{group}", self.prefix);
            let stop = (limit - keys.len()).saturating_sub(1).to_string();
            let reply = self.with_store_conn(|conn| {
                conn.cmd(&[&b"ZRANGE"[..], set.as_bytes(), b"0", stop.as_bytes()])
            })?;
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
        let replies = self.with_read_conn(&commands).await?;
        Ok(replies
            .iter()
            .filter_map(Reply::as_int)
            .map(|n| n.max(0) as u64)
            .sum())
    }
}

async fn read_on(
    mut conn: AsyncConn,
    commands: &[Vec<&[u8]>],
) -> Result<(Vec<Reply>, AsyncConn), RedisError> {
    let replies = timed(conn.pipeline(commands)).await?;
    Ok((replies, conn))
}

async fn timed<T>(
    work: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    tokio::time::timeout(IO_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(RedisError::Io(std::io::ErrorKind::TimedOut.into())))
}

fn connected<'a>(slot: &'a mut Option<Conn>, url: &RedisUrl) -> Result<&'a mut Conn, RedisError> {
    if slot.is_none() {
        *slot = Some(Conn::connect(url, IO_TIMEOUT)?);
    }
    slot.as_mut()
        .ok_or_else(|| RedisError::Protocol("no connection".into()))
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

/// The group name of a family generation: a value computed by another definition of the family
/// (before a reload changed its query) is in another group, which the reload retires.
pub fn family_group(pattern: &str, definition: &str) -> String {
    // Stable across builds, so two daemons on one config agree.
    format!("f:{pattern}:{:016x}", crate::fnv1a(definition.as_bytes()))
}

/// The pub/sub message app-local caches receive for one invalidation (README, "Fan-out").
pub fn fan_out_message(
    position: u64,
    keys: &[&str],
    tags: &[&str],
    families: &[&str],
    all: bool,
) -> String {
    serde_json::json!({
        "position": position, "keys": keys, "tags": tags, "families": families, "all": all,
    })
    .to_string()
}

pub fn tag_group(tag: &str) -> String {
    format!("t:{tag}")
}

/// The mark that retires a family generation for good.
pub const RETIRED_MARK: u64 = RETIRED;

/// The batch script's fencing, and the store script's refusal of a value read before a 404 that
/// was answered, against a real `redis-server` (started here, on a free loopback port, like the
/// end-to-end tests: it is required, not optional).
#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    const PREFIX: &str = "p:";

    /// A `redis-server` of the test's own; killed when dropped.
    struct Server {
        child: Child,
        url: RedisUrl,
    }

    impl Server {
        fn start() -> Server {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server runs (apt-get install redis-server): these tests need one");
            let url = RedisUrl::parse(&format!("redis://127.0.0.1:{port}/0")).expect("url");
            let started = Instant::now();
            while Conn::connect(&url, IO_TIMEOUT)
                .and_then(|mut c| c.cmd(&["PING"]))
                .is_err()
            {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "redis-server did not answer"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Server { child, url }
        }

        /// One daemon's handle on the shared Redis.
        fn daemon(&self) -> RedisCache {
            RedisCache::new(self.url.clone(), PREFIX.to_owned(), true)
        }

        fn conn(&self) -> Conn {
            Conn::connect(&self.url, IO_TIMEOUT).expect("connect")
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn batch(epoch: u64, position: u64, keys: &[&str], message: &str) -> Invalidation {
        Invalidation {
            position,
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            groups: Vec::new(),
            floor: 0,
            message: message.to_owned(),
            epoch,
        }
    }

    /// A plain command's reply, as text (None for nil).
    fn text(conn: &mut Conn, args: &[&str]) -> Option<String> {
        match conn.cmd(args).expect("redis answers") {
            Reply::Nil => None,
            Reply::Bulk(b) => Some(String::from_utf8_lossy(&b).into_owned()),
            Reply::Int(i) => Some(i.to_string()),
            Reply::Status(s) => Some(s),
            other => panic!("{args:?} answered {other:?}"),
        }
    }

    /// The messages published on the channel, in order, until (and with) `last`.
    fn messages_until(subscriber: &mut Conn, last: &str) -> Vec<String> {
        let mut seen = Vec::new();
        while seen.last().map(String::as_str) != Some(last) {
            match subscriber
                .next_push()
                .expect("a message before the timeout")
            {
                Reply::Array(parts) => match parts.as_slice() {
                    [Reply::Bulk(kind), _, Reply::Bulk(body)] if kind == b"message" => {
                        seen.push(String::from_utf8_lossy(body).into_owned());
                    }
                    _ => {}
                },
                other => panic!("a push, got {other:?}"),
            }
        }
        seen
    }

    #[test]
    fn a_batch_from_an_older_epoch_is_refused_whole_and_an_equal_or_newer_one_applies() {
        let server = Server::start();
        let mut subscriber = server.conn();
        subscriber
            .cmd(&["SUBSCRIBE", &format!("{PREFIX}invalidations")])
            .expect("subscribe");
        let mut probe = server.conn();
        let ttl = Duration::from_secs(60);
        let group = tag_group("books");

        // The first holder (epoch 1) applies up to 10 and caches `k` (tagged) read at 10.
        let first = server.daemon();
        first.reconcile(0, Some(0)).expect("reconcile");
        first
            .apply(&batch(1, 10, &["a"], "first@10"), 0)
            .expect("epoch 1 applies");
        assert!(
            first
                .store("k", 10, ttl, Some(b"v10"), std::slice::from_ref(&group))
                .expect("store")
        );

        // A second daemon takes over (epoch 2) and applies up to 20.
        let second = server.daemon();
        second.reconcile(10, Some(20)).expect("reconcile");
        second
            .apply(&batch(2, 20, &["b"], "second@20"), 10)
            .expect("epoch 2 applies");

        // The first one resumes mid-stream and sends its next batch, still at epoch 1: a key, its
        // tag, a floor. Redis refuses all of it.
        let late = Invalidation {
            groups: vec![(group.clone(), 30)],
            floor: 30,
            ..batch(1, 30, &["k"], "first@30")
        };
        let refused = first.apply(&late, 10);
        assert!(
            matches!(refused, Err(RedisError::Fenced)),
            "a batch from an older epoch must be refused, got {refused:?}"
        );
        assert!(
            first.health().down_since.is_none(),
            "being fenced is not an outage"
        );
        let state = format!("{PREFIX}#state");
        assert_eq!(
            text(&mut probe, &["GET", &format!("{PREFIX}k")]).as_deref(),
            Some("v10"),
            "the refused batch removed a key"
        );
        assert_eq!(
            text(&mut probe, &["HGET", &format!("{PREFIX}#m:k"), "i"]),
            None,
            "the refused batch left an invalidation mark"
        );
        assert_eq!(
            text(&mut probe, &["GET", &format!("{PREFIX}#gm:{group}")]),
            None,
            "the refused batch marked the tag"
        );
        assert!(
            text(&mut probe, &["ZSCORE", &format!("{PREFIX}#g:{group}"), "k"]).is_some(),
            "the refused batch emptied the tag's group"
        );
        assert_eq!(
            text(&mut probe, &["HGET", &state, "applied"]).as_deref(),
            Some("20"),
            "the refused batch moved the applied position"
        );
        assert_eq!(
            text(&mut probe, &["HGET", &state, "floor"]).as_deref(),
            Some("0"),
            "the refused batch raised the floor"
        );
        assert_eq!(
            text(&mut probe, &["HGET", &state, "epoch"]).as_deref(),
            Some("2")
        );
        // The current holder's next batch (the same epoch) applies.
        second
            .apply(&batch(2, 40, &["k"], "second@40"), 20)
            .expect("an equal epoch applies");
        assert_eq!(text(&mut probe, &["GET", &format!("{PREFIX}k")]), None);
        assert_eq!(
            text(&mut probe, &["HGET", &state, "applied"]).as_deref(),
            Some("40")
        );

        // A third daemon takes over (epoch 3): from then on epoch 2 is the older one.
        let third = server.daemon();
        third.reconcile(40, Some(50)).expect("reconcile");
        third
            .apply(&batch(3, 50, &["c"], "third@50"), 40)
            .expect("a newer epoch applies");
        let refused = second.apply(&batch(2, 60, &["c"], "second@60"), 40);
        assert!(
            matches!(refused, Err(RedisError::Fenced)),
            "epoch 2 after epoch 3: {refused:?}"
        );
        third
            .apply(&batch(3, 70, &["d"], "third@70"), 50)
            .expect("epoch 3 applies");
        assert_eq!(
            text(&mut probe, &["HGET", &state, "applied"]).as_deref(),
            Some("70")
        );

        // An operator's removal (epoch 0, any daemon) is not fenced, and applies no position.
        probe
            .cmd(&["SET", &format!("{PREFIX}e"), "ve"])
            .expect("SET");
        first
            .remove(&batch(0, 65, &["e"], "admin@65"))
            .expect("an admin removal applies from any daemon");
        assert_eq!(text(&mut probe, &["GET", &format!("{PREFIX}e")]), None);
        assert_eq!(
            text(&mut probe, &["HGET", &state, "applied"]).as_deref(),
            Some("70")
        );
        assert_eq!(
            text(&mut probe, &["HGET", &state, "epoch"]).as_deref(),
            Some("3")
        );

        // Nothing of a refused batch was published: app-local caches hear only the holders.
        assert_eq!(
            messages_until(&mut subscriber, "admin@65"),
            [
                "first@10",
                "second@20",
                "second@40",
                "third@50",
                "third@70",
                "admin@65"
            ]
        );
    }

    /// An interleaving the randomized checker (`tests/e2e/race.rs`) found on Redis, replayed
    /// against the store script. A daemon's fill finds no row (the row was deleted at 6, not yet
    /// applied) and answers 404 at 7, while the other daemon's slower fill, which read the row at
    /// 5 before the delete, has not stored yet. When it does, it must be refused: else the next
    /// read answers the row again, going backwards.
    #[test]
    fn a_value_read_before_a_404_that_was_answered_is_refused() {
        let server = Server::start();
        let cache = RedisCache::new(server.url.clone(), "race404:".to_owned(), false);
        cache.reconcile(0, None).expect("redis state");
        let (ttl, groups) = (Duration::from_secs(60), ["f:k".to_owned()]);
        let store = |version: u64, body: Option<&[u8]>| {
            cache
                .store("k:1", version, ttl, body, &groups)
                .expect("the store script runs")
        };
        assert!(store(4, Some(br#"{"n":4}"#)), "a value read at 4 is stored");
        assert!(
            store(7, None),
            "a read at 7 that found no row is current: answered 404"
        );
        assert_eq!(
            cache.get_blocking("k:1").expect("GET"),
            None,
            "the value read before the 404 is gone"
        );
        assert!(
            !store(5, Some(br#"{"n":5}"#)),
            "a value read at 5 must not land after a 404 read at 7 was answered"
        );
        assert_eq!(cache.get_blocking("k:1").expect("GET"), None);
    }
}
