//! The Redis backend on a Redis Cluster (`[cache] cluster`): the same guard as on one server,
//! with every script touching one slot, so each runs atomically on the node that holds it.
//!
//! Names (README, "Beyond one machine"): a value stays `P{key}` (app servers read that name;
//! Redis places it by its hash-tag rule). For each slot `s` the daemon knows a short tag `t_s`
//! whose slot is `s` (`slot_tags`), and a value's bookkeeping lives in the value's slot: its key
//! mark `P#m:{t_s}key` and the slot's state `P#s:{t_s}` (`applied`: the last position applied to
//! the slot; `floor`: set by a rebuild). A group (a tag, a family generation) lives in the slot
//! of its name: `P#g:{t}group` and `P#gm:{t}group`. The global state `P#state{t}` (`applied`,
//! `floor`, `epoch`, and `s<slot>`: the last position applied to each slot) shares its slot with
//! the stream `P#invalidations`.
//!
//! A fill first registers its key in each of its groups, each in the group's slot, refused if
//! the group's mark is above its read position; then stores the value in the value's slot,
//! refused if the key's mark is. A group invalidation at `q` raises the group's mark, then
//! deletes each member read before it and raises the member's key mark to `q`, in the member's
//! slot. A fill registered before the mark is a member, so its store either comes before the
//! member's deletion (and is deleted) or after (and finds the key mark); one registering after
//! the mark is refused there. Members are not removed from a group's set (that could not be
//! made atomic with the member's store): they leave when their value's TTL is over.
//!
//! Loss (a primary's failover that dropped its last writes, a node restarted empty): every slot
//! state exists from the namespace's first rebuild on, and the global state records each
//! slot's last applied position, so a read or store that finds its slot's state missing, or
//! below that record (or below what this daemon applied itself), refuses it and the namespace
//! is rebuilt.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::future::join_all;

use super::client::{self, Conn, RedisError, Reply};
use super::pool::Link;
use super::scripts::Script;
use super::{IO_TIMEOUT, Invalidation, MARK_TTL, RETIRED, RedisStore, glob_escape};

pub(super) const SLOTS: usize = 16384;
/// How long a batch or a rebuild may take on a cluster (one script per slot touched).
const LONG: Duration = Duration::from_secs(60);
/// Scripts or commands sent at once, at most.
const WAVE: usize = 256;
/// The most keys one slot's script deletes.
const PER_SCRIPT: usize = 100;
/// A group member outlives its value's TTL by this much (clocks differ a little).
const MEMBER_MARGIN: Duration = Duration::from_secs(60);
/// Above every position: a key of the batch is deleted whatever its value read.
const ALWAYS: u64 = 1 << 53;

/// CRC16-XMODEM, as Redis Cluster hashes keys.
pub(super) fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key name, with Redis's hash-tag rule: the text between the first `{` and the
/// first `}` after it, if not empty, stands for the name.
pub(super) fn slot_of(name: &[u8]) -> usize {
    let tagged = name.iter().position(|&b| b == b'{').and_then(|open| {
        let close = name[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &name[open + 1..open + 1 + close])
    });
    usize::from(crc16(tagged.unwrap_or(name))) % SLOTS
}

/// For each slot, the shortest tag (`0-9a-z`, fewest characters first) whose slot it is.
pub(super) fn slot_tags() -> Vec<String> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut tags = vec![String::new(); SLOTS];
    let mut left = SLOTS;
    for len in 1..=5u32 {
        for mut n in 0..ALPHABET.len().pow(len) {
            let mut tag = String::with_capacity(len as usize);
            for _ in 0..len {
                tag.push(char::from(ALPHABET[n % ALPHABET.len()]));
                n /= ALPHABET.len();
            }
            let slot = usize::from(crc16(tag.as_bytes())) % SLOTS;
            if tags[slot].is_empty() {
                tags[slot] = tag;
                left -= 1;
                if left == 0 {
                    return tags;
                }
            }
        }
    }
    tags
}

/// Reads a value, its slot's applied position and the value's TTL, atomically.
const READ: &str = r#"
return {redis.call('GET', KEYS[1]), redis.call('HGET', KEYS[2], 'applied'), redis.call('PTTL', KEYS[1])}
"#;

const CLAIM: &str = r#"
local epoch = tonumber(ARGV[1])
local known = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if known < epoch then redis.call('HSET', KEYS[1], 'epoch', epoch) end
return known
"#;

/// A batch's start on the global state: refused if it lost state (-1) or another epoch took
/// over (-2); records the epoch and the floor.
const BEGIN: &str = r#"
local applied = redis.call('HGET', KEYS[1], 'applied')
if not applied or tonumber(applied) < tonumber(ARGV[1]) then return -1 end
local epoch = tonumber(ARGV[2])
local known = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if known > epoch then return -2 end
if epoch > known then redis.call('HSET', KEYS[1], 'epoch', epoch) end
if tonumber(ARGV[3]) > tonumber(redis.call('HGET', KEYS[1], 'floor') or '0') then redis.call('HSET', KEYS[1], 'floor', ARGV[3]) end
return 1
"#;

/// Raises a group's mark: from now on no fill read before it registers in the group.
const MARK: &str = r#"
local old = tonumber(redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[1], math.max(old, tonumber(ARGV[1])), 'PX', ARGV[2])
return 1
"#;

/// One slot's share of a batch: KEYS are the slot's state, then (value, key mark) pairs; ARGV
/// the batch's position, the marks' TTL, the slot's applied position this daemon expects at
/// least, then per key the position below which its value goes and its new key mark.
const KEYS_OF_SLOT: &str = r#"
local applied = redis.call('HGET', KEYS[1], 'applied')
if not applied or tonumber(applied) < tonumber(ARGV[3]) then return -1 end
local pos, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
for j = 2, #KEYS, 2 do
  local value, meta = KEYS[j], KEYS[j + 1]
  local below, mark = tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
  if tonumber(redis.call('HGET', meta, 'v') or '0') < below then redis.call('UNLINK', value) end
  if tonumber(redis.call('HGET', meta, 'i') or '0') < mark then redis.call('HSET', meta, 'i', mark) end
  if redis.call('PTTL', meta) < ttl then redis.call('PEXPIRE', meta, ttl) end
end
if pos > tonumber(applied) then redis.call('HSET', KEYS[1], 'applied', pos) end
return 1
"#;

/// A batch's end on the global state: the slots it touched recorded, its position applied,
/// its message published and appended to the stream (KEYS: state, stream).
const FINISH: &str = r#"
local applied = redis.call('HGET', KEYS[1], 'applied')
if not applied or tonumber(applied) < tonumber(ARGV[2]) then return -1 end
if tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0') > tonumber(ARGV[3]) then return -2 end
local pos = tonumber(ARGV[1])
for j = 7, #ARGV do
  local field = 's' .. ARGV[j]
  if tonumber(redis.call('HGET', KEYS[1], field) or '0') < pos then redis.call('HSET', KEYS[1], field, pos) end
end
if pos > tonumber(applied) then redis.call('HSET', KEYS[1], 'applied', pos) end
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], '*', 'message', ARGV[5])
end
return 1
"#;

/// A fill's registration in one of its groups (KEYS: the group's mark and set): refused (0)
/// if the group was invalidated after the fill's read.
const REGISTER: &str = r#"
if tonumber(ARGV[1]) < tonumber(redis.call('GET', KEYS[1]) or '0') then return 0 end
if ARGV[4] == 'check' then return 1 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[6])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'LIMIT', 0, 32)
if #expired > 0 then redis.call('ZREM', KEYS[2], unpack(expired)) end
local ttl = tonumber(ARGV[5])
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"#;

/// A fill's store in the value's slot (KEYS: value, key mark, slot state), as `STORE` on one
/// server but for the groups (checked at registration).
const STORE: &str = r#"
local applied = redis.call('HGET', KEYS[3], 'applied')
if not applied or tonumber(applied) < tonumber(ARGV[4]) then return -1 end
local v = tonumber(ARGV[1])
if v < tonumber(redis.call('HGET', KEYS[3], 'floor') or '0') then return 0 end
local m = redis.call('HMGET', KEYS[2], 'i', 'v')
if v < tonumber(m[1] or '0') then return 0 end
if v < tonumber(m[2] or '0') then return 0 end
local ttl = tonumber(ARGV[2])
if ARGV[5] ~= 'check' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ttl)
elseif v > tonumber(m[2] or '0') then
  redis.call('UNLINK', KEYS[1])
end
if v > tonumber(m[2] or '0') then redis.call('HSET', KEYS[2], 'v', v) end
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"#;

/// A rebuild's start: the global state emptied but for the epoch (fencing never goes back).
const RESET: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
redis.call('DEL', KEYS[1])
if epoch then redis.call('HSET', KEYS[1], 'epoch', epoch) end
return 1
"#;

/// What the daemon knows of a cluster: the names, the scripts, and per slot the last position
/// applied to it.
pub(super) struct Cluster {
    prefix: String,
    tags: Vec<String>,
    state: String,
    stream: String,
    /// Per slot: the highest position this daemon knows the slot's state holds.
    known: Vec<AtomicU64>,
    /// `known` was loaded from the global state since the last rebuild.
    loaded: AtomicBool,
    rebuilds: AtomicU64,
    /// A slot was found to have lost state: the rebuild count + 1 when seen (a loss seen
    /// during a rebuild is not one).
    lost: AtomicU64,
    read: Script,
    claim: Script,
    begin: Script,
    mark: Script,
    keys_of_slot: Script,
    finish: Script,
    register: Script,
    store: Script,
    reset: Script,
}

impl Cluster {
    pub(super) fn new(prefix: &str) -> Cluster {
        let tags = slot_tags();
        let stream = format!("{prefix}#invalidations");
        let state = format!("{prefix}#state{{{}}}", tags[slot_of(stream.as_bytes())]);
        Cluster {
            prefix: prefix.to_owned(),
            tags,
            state,
            stream,
            known: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            loaded: AtomicBool::new(false),
            rebuilds: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            read: Script::new(READ),
            claim: Script::new(CLAIM),
            begin: Script::new(BEGIN),
            mark: Script::new(MARK),
            keys_of_slot: Script::new(KEYS_OF_SLOT),
            finish: Script::new(FINISH),
            register: Script::new(REGISTER),
            store: Script::new(STORE),
            reset: Script::new(RESET),
        }
    }

    fn value(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn slot(&self, key: &str) -> usize {
        slot_of(self.value(key).as_bytes())
    }

    fn meta(&self, key: &str) -> String {
        format!("{}#m:{{{}}}{key}", self.prefix, self.tags[self.slot(key)])
    }

    fn slot_state(&self, slot: usize) -> String {
        format!("{}#s:{{{}}}", self.prefix, self.tags[slot])
    }

    fn group_tag(&self, group: &str) -> &str {
        &self.tags[usize::from(crc16(group.as_bytes())) % SLOTS]
    }

    pub(super) fn group_set(&self, group: &str) -> String {
        format!("{}#g:{{{}}}{group}", self.prefix, self.group_tag(group))
    }

    fn group_mark(&self, group: &str) -> String {
        format!("{}#gm:{{{}}}{group}", self.prefix, self.group_tag(group))
    }

    fn note_lost(&self, since: u64) {
        self.lost.fetch_max(since + 1, Ordering::AcqRel);
    }
}

async fn cmd(conn: &mut Link, args: &[&[u8]]) -> Result<Reply, RedisError> {
    let value: redis::Value = client::command(args).query_async(conn).await?;
    Ok(Reply::from(value))
}

fn int(reply: Option<&Reply>) -> Option<u64> {
    reply.and_then(Reply::as_int).map(|n| n.max(0) as u64)
}

/// Runs `futures` at most `WAVE` at a time; their results in order.
async fn in_waves<T, F: Future<Output = T>>(futures: Vec<F>) -> Vec<T> {
    let mut results = Vec::with_capacity(futures.len());
    let mut futures = futures.into_iter().peekable();
    while futures.peek().is_some() {
        results.extend(join_all(futures.by_ref().take(WAVE)).await);
    }
    results
}

impl RedisStore {
    fn cluster(&self) -> Result<&Cluster, RedisError> {
        self.cluster
            .as_ref()
            .ok_or_else(|| RedisError::Protocol("not a cluster".into()))
    }

    /// `get` on a cluster: the value with its slot's state (one script on its node) and, beside
    /// it, the global state's applied position and its record of the slot.
    pub(super) async fn cluster_get(
        &self,
        key: &str,
        known: u64,
    ) -> Result<Option<(Bytes, Duration)>, RedisError> {
        let c = self.cluster()?;
        let (value, slot) = (c.value(key), c.slot(key));
        let slot_state = c.slot_state(slot);
        let field = format!("s{slot}");
        let known = self.expected(known);
        let (knew, since) = (
            c.known[slot].load(Ordering::Acquire),
            c.rebuilds.load(Ordering::Acquire),
        );
        let keys = [value.as_bytes(), slot_state.as_bytes()];
        let read = |conn: Link| {
            let mut conn = conn;
            async move { c.read.run_keys_async(&mut conn, &keys, &[]).await }
        };
        let global = [
            &b"HMGET"[..],
            c.state.as_bytes(),
            b"applied",
            field.as_bytes(),
        ];
        let read_again = &read;
        let result = self
            .pool
            .run(|conn| async move {
                let mut other = conn.clone();
                let (read, state) = tokio::join!(read(conn), cmd(&mut other, &global));
                Ok((read?, state?))
            })
            .await;
        if result.is_err() {
            self.note(&result);
        }
        let (read, state) = result?;
        let Reply::Array(state) = state else {
            return Err(RedisError::Protocol("HMGET did not answer an array".into()));
        };
        let Some(applied) = int(state.first()) else {
            self.suspect.store(true, Ordering::Release);
            return Err(RedisError::StateLost);
        };
        self.seen.fetch_max(applied, Ordering::AcqRel);
        if applied < known {
            self.suspect.store(true, Ordering::Release);
            return Err(RedisError::StateLost);
        }
        let expected = knew.max(int(state.get(1)).unwrap_or(0));
        let (reader, mut read) = (read_again, read);
        if !slot_holds(&read, expected) {
            // The record may be of a batch that finished after the slot was read: read again.
            read = self.pool.run(reader).await?;
            if !slot_holds(&read, expected) {
                c.note_lost(since);
                self.suspect.store(true, Ordering::Release);
                return Err(RedisError::StateLost);
            }
        }
        let Reply::Array(mut parts) = read else {
            return Err(RedisError::Protocol("READ did not answer an array".into()));
        };
        parts.truncate(3);
        let ttl = int(parts.get(2)).unwrap_or(0);
        match parts.into_iter().next() {
            Some(Reply::Bulk(body)) => Ok(Some((Bytes::from(body), Duration::from_millis(ttl)))),
            _ => Ok(None),
        }
    }

    /// `store` on a cluster: registration in each group (in the group's slot), then the store
    /// in the value's slot. Blocking.
    pub(super) fn cluster_store(
        &self,
        key: &str,
        (version, known): (u64, u64),
        ttl: Duration,
        body: Option<&[u8]>,
        groups: &[String],
    ) -> Result<bool, RedisError> {
        let c = self.cluster()?;
        let slot = c.slot(key);
        let (value, meta, slot_state) = (c.value(key), c.meta(key), c.slot_state(slot));
        let field = format!("s{slot}");
        let known = self.expected(known);
        let (knew, since) = (
            c.known[slot].load(Ordering::Acquire),
            c.rebuilds.load(Ordering::Acquire),
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let margin = MEMBER_MARGIN.as_millis() as u64;
        let mode: &[u8] = if body.is_some() { b"store" } else { b"check" };
        let register_args: Vec<Vec<u8>> = [
            version.to_string().into_bytes(),
            (now + ttl_ms + margin).to_string().into_bytes(),
            now.saturating_sub(margin).to_string().into_bytes(),
            mode.to_vec(),
            (ttl_ms + margin).to_string().into_bytes(),
            key.as_bytes().to_vec(),
        ]
        .to_vec();
        let group_keys: Vec<[String; 2]> = groups
            .iter()
            .map(|g| [c.group_mark(g), c.group_set(g)])
            .collect();
        let (register_args, group_keys) = (&register_args, &group_keys);
        let (value, meta, slot_state, field) = (&value, &meta, &slot_state, &field);
        let result = self.pool.run_blocking(|conn| async move {
            let mut conn = conn;
            let global = [
                &b"HMGET"[..],
                c.state.as_bytes(),
                b"applied",
                field.as_bytes(),
            ];
            let Reply::Array(state) = cmd(&mut conn, &global).await? else {
                return Err(RedisError::Protocol("HMGET did not answer an array".into()));
            };
            match int(state.first()) {
                Some(applied) if applied >= known => {}
                _ => return Ok(-1),
            }
            let expected = knew.max(int(state.get(1)).unwrap_or(0));
            let registrations = group_keys.iter().map(|keys| {
                let mut conn = conn.clone();
                async move {
                    c.register
                        .run_keys_async(&mut conn, keys, register_args)
                        .await
                }
            });
            for registered in join_all(registrations).await {
                if registered?.as_int() != Some(1) {
                    return Ok(0);
                }
            }
            let args = [
                version.to_string().into_bytes(),
                ttl_ms.to_string().into_bytes(),
                body.unwrap_or_default().to_vec(),
                expected.to_string().into_bytes(),
                mode.to_vec(),
            ];
            let keys = [value, meta, slot_state];
            Ok(c.store
                .run_keys_async(&mut conn, &keys, &args)
                .await?
                .as_int()
                .unwrap_or(0))
        });
        self.note(&result);
        match result? {
            1 => Ok(true),
            -1 => {
                c.note_lost(since);
                self.suspect.store(true, Ordering::Release);
                Err(RedisError::StateLost)
            }
            _ => Ok(false),
        }
    }

    /// `claim_epoch` on a cluster: the known epoch. Blocking.
    pub(super) fn cluster_claim(&self, epoch: u64) -> Result<u64, RedisError> {
        let c = self.cluster()?;
        let args = [epoch.to_string().into_bytes()];
        let state = [c.state.as_bytes()];
        let result = self.pool.run_blocking(|mut conn| {
            let (args, state) = (&args, &state);
            async move { c.claim.run_keys_async(&mut conn, state, args).await }
        });
        self.note(&result);
        match result? {
            Reply::Int(known) => Ok(u64::try_from(known).unwrap_or(0)),
            other => Err(RedisError::Protocol(format!("CLAIM answered {other:?}"))),
        }
    }

    /// `reconcile` on a cluster: trusted if the global
    /// state holds at least `cursor` (and at most `head`) and no slot was seen to have lost
    /// state; else rebuilt. Blocking.
    pub(super) fn cluster_reconcile(
        &self,
        cursor: u64,
        head: Option<u64>,
    ) -> Result<(), RedisError> {
        let c = self.cluster()?;
        let _tail = self.apply_conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.cluster_reconcile_on(c, cursor, head);
        self.note(&result);
        result
    }

    fn cluster_reconcile_on(
        &self,
        c: &Cluster,
        cursor: u64,
        head: Option<u64>,
    ) -> Result<(), RedisError> {
        let state = [&b"HGETALL"[..], c.state.as_bytes()];
        let all = self.pool.run_blocking(|mut conn| {
            let state = &state;
            async move { cmd(&mut conn, state).await }
        })?;
        let Reply::Array(all) = all else {
            return Err(RedisError::Protocol(
                "HGETALL did not answer an array".into(),
            ));
        };
        let mut fields = BTreeMap::new();
        for pair in all.chunks(2) {
            if let [Reply::Bulk(name), value] = pair {
                fields.insert(String::from_utf8_lossy(name).into_owned(), int(Some(value)));
            }
        }
        let applied = fields.get("applied").copied().flatten();
        let trustworthy = applied.is_some_and(|a| a >= cursor && head.is_none_or(|h| a <= h));
        let lost = c.lost.load(Ordering::Acquire) > c.rebuilds.load(Ordering::Acquire);
        if trustworthy && !lost {
            self.seen.fetch_max(applied.unwrap_or(0), Ordering::AcqRel);
            if !c.loaded.swap(true, Ordering::AcqRel) {
                for (name, position) in &fields {
                    let slot = name.strip_prefix('s').and_then(|s| s.parse::<usize>().ok());
                    if let (Some(slot), Some(position)) = (slot.filter(|s| *s < SLOTS), position) {
                        c.known[slot].fetch_max(*position, Ordering::AcqRel);
                    }
                }
            }
            return Ok(());
        }
        let removed = self.cluster_rebuild(c, cursor)?;
        tracing::warn!(
            redis_applied = ?applied,
            cursor,
            removed,
            slot_lost = lost,
            "the redis cluster did not hold every applied invalidation (a node restarted or failed over, flushed, or a new outbox): its cachetail keys were removed"
        );
        Ok(())
    }

    /// Removes every cachetail key from every primary and starts the state at `cursor`: the
    /// global state first (reads refuse), then every slot's state (stores refuse), then the
    /// rest, then every slot's state again with `floor` = `cursor`, then the global state.
    fn cluster_rebuild(&self, c: &Cluster, cursor: u64) -> Result<u64, RedisError> {
        let position = cursor.to_string();
        let state = [c.state.as_bytes()];
        self.pool.run_blocking(|mut conn| {
            let state = &state;
            async move { c.reset.run_keys_async(&mut conn, state, &[]).await }
        })?;
        let slot_states: Vec<String> = (0..SLOTS).map(|s| c.slot_state(s)).collect();
        self.each_slot_state(&slot_states, |name| {
            vec![b"DEL".to_vec(), name.as_bytes().to_vec()]
        })?;
        let mut removed = 0;
        for (host, port) in self.primaries()? {
            let mut url = self.url.clone();
            (url.host, url.port) = (host, port);
            let mut conn = Conn::connect(&url, IO_TIMEOUT, false)?;
            removed += remove_from_node(&mut conn, &c.prefix, &c.state)?;
        }
        for known in &c.known {
            known.store(0, Ordering::Release);
        }
        self.each_slot_state(&slot_states, |name| {
            [
                b"HSET",
                name.as_bytes(),
                b"applied",
                position.as_bytes(),
                b"floor",
                position.as_bytes(),
            ]
            .map(<[u8]>::to_vec)
            .to_vec()
        })?;
        let set = [
            &b"HSET"[..],
            c.state.as_bytes(),
            b"applied",
            position.as_bytes(),
            b"floor",
            position.as_bytes(),
        ];
        self.pool.run_blocking(|mut conn| {
            let set = &set;
            async move { cmd(&mut conn, set).await }
        })?;
        c.loaded.store(true, Ordering::Release);
        c.rebuilds.fetch_add(1, Ordering::AcqRel);
        self.seen.fetch_max(cursor, Ordering::AcqRel);
        self.cluster_announce_rebuild(c)?;
        Ok(removed)
    }

    /// The rebuild's `all` message, published and first in the new stream (see
    /// `announce_rebuild`: a subscriber behind lost its unread entries with the old stream).
    fn cluster_announce_rebuild(&self, c: &Cluster) -> Result<(), RedisError> {
        if self.channel.is_empty() {
            return Ok(());
        }
        let position = self.seen.load(Ordering::Acquire);
        let message = super::fan_out_message(position, &[], &[], &[], true);
        let max_len = self.stream_max_len.to_string();
        let xadd = [
            &b"XADD"[..],
            c.stream.as_bytes(),
            b"MAXLEN",
            max_len.as_bytes(),
            b"*",
            b"message",
            message.as_bytes(),
        ];
        let publish = [&b"PUBLISH"[..], self.channel.as_bytes(), message.as_bytes()];
        self.pool.run_blocking(|mut conn| {
            let (xadd, publish) = (&xadd, &publish);
            async move {
                cmd(&mut conn, xadd).await?;
                cmd(&mut conn, publish).await
            }
        })?;
        Ok(())
    }

    /// One command per slot state, a wave at a time.
    fn each_slot_state(
        &self,
        names: &[String],
        command: impl Fn(&str) -> Vec<Vec<u8>>,
    ) -> Result<(), RedisError> {
        let commands: Vec<Vec<Vec<u8>>> = names.iter().map(|n| command(n)).collect();
        let commands = &commands;
        self.pool.run_blocking_for(LONG, |conn| async move {
            let sends = commands.iter().map(|args| {
                let mut conn = conn.clone();
                async move {
                    let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                    cmd(&mut conn, &args).await
                }
            });
            for sent in in_waves(sends.collect()).await {
                sent?;
            }
            Ok(())
        })
    }

    /// The primaries' addresses (CLUSTER SLOTS).
    fn primaries(&self) -> Result<Vec<(String, u16)>, RedisError> {
        let reply = self.pool.run_blocking(|mut conn| async move {
            cmd(&mut conn, &[b"CLUSTER", b"SLOTS"]).await
        })?;
        let Reply::Array(ranges) = reply else {
            return Err(RedisError::Protocol(
                "CLUSTER SLOTS did not answer an array".into(),
            ));
        };
        let mut primaries = Vec::new();
        for range in ranges {
            let Reply::Array(parts) = range else { continue };
            let Some(Reply::Array(node)) = parts.get(2) else {
                continue;
            };
            let host = match node.first() {
                Some(Reply::Bulk(h)) if !h.is_empty() => String::from_utf8_lossy(h).into_owned(),
                _ => self.url.host.clone(),
            };
            let port = int(node.get(1)).and_then(|p| u16::try_from(p).ok());
            if let Some(port) = port
                && !primaries.contains(&(host.clone(), port))
            {
                primaries.push((host, port));
            }
        }
        Ok(primaries)
    }

    /// `apply` on a cluster. Blocking (the tail thread).
    pub(super) fn cluster_apply(
        &self,
        batch: &Invalidation,
        cursor: u64,
    ) -> Result<(), RedisError> {
        let c = self.cluster()?;
        let _tail = self.apply_conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = (|| {
            if !c.loaded.load(Ordering::Acquire) {
                self.cluster_reconcile_on(c, cursor, None)?;
            }
            let mut outcome = self.cluster_batch(batch)?;
            if outcome == -1 {
                // A slot or the global state lost state: rebuild, retry.
                self.cluster_reconcile_on(c, cursor, None)?;
                outcome = self.cluster_batch(batch)?;
            }
            match outcome {
                -2 => Err(RedisError::Fenced),
                -1 => Err(RedisError::StateLost),
                _ => Ok(()),
            }
        })();
        self.note(&result);
        if result.is_ok() {
            self.seen.fetch_max(batch.position, Ordering::AcqRel);
        }
        result
    }

    /// One batch. The outcome: 1, -1 (lost state), -2 (fenced).
    fn cluster_batch(&self, batch: &Invalidation) -> Result<i64, RedisError> {
        let c = self.cluster()?;
        let since = c.rebuilds.load(Ordering::Acquire);
        let outcome = self
            .pool
            .run_blocking_for(LONG, |conn| self.cluster_batch_on(c, conn, batch));
        if let Ok(-1) = outcome {
            c.note_lost(since);
        }
        outcome
    }

    async fn cluster_batch_on(
        &self,
        c: &Cluster,
        conn: Link,
        batch: &Invalidation,
    ) -> Result<i64, RedisError> {
        let mut conn = conn;
        let seen = self.seen.load(Ordering::Acquire).to_string().into_bytes();
        let (pos, epoch) = (batch.position, batch.epoch.to_string().into_bytes());
        let begun = c
            .begin
            .run_keys_async(
                &mut conn,
                &[c.state.as_bytes()],
                &[
                    seen.clone(),
                    epoch.clone(),
                    batch.floor.to_string().into_bytes(),
                ],
            )
            .await?;
        if begun.as_int() != Some(1) {
            return Ok(begun.as_int().unwrap_or(-1));
        }
        let mark_ttl = MARK_TTL.as_millis().to_string().into_bytes();
        let marks = batch.groups.iter().map(|(group, mark)| {
            let mut conn = conn.clone();
            let (key, args) = (
                c.group_mark(group),
                [mark.to_string().into_bytes(), mark_ttl.clone()],
            );
            async move { c.mark.run_keys_async(&mut conn, &[key], &args).await }
        });
        for marked in in_waves(marks.collect()).await {
            marked?;
        }
        // Each key to delete: the position below which its value goes, and its new key mark.
        let mut targets: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (group, mark) in &batch.groups {
            let key_mark = if *mark >= RETIRED { pos } else { *mark };
            for member in group_members(&mut conn, &c.group_set(group)).await? {
                let entry = targets.entry(member).or_insert((0, 0));
                *entry = (entry.0.max(*mark), entry.1.max(key_mark));
            }
        }
        for key in &batch.keys {
            targets.insert(key.clone(), (ALWAYS, pos));
        }
        let mut by_slot: BTreeMap<usize, Vec<(String, u64, u64)>> = BTreeMap::new();
        for (key, (below, mark)) in targets {
            // No family stores a key beginning with `#` (see `apply_args`).
            if !key.starts_with('#') {
                by_slot
                    .entry(c.slot(&key))
                    .or_default()
                    .push((key, below, mark));
            }
        }
        let scripts = by_slot.iter().flat_map(|(slot, keys)| {
            keys.chunks(PER_SCRIPT).map(|chunk| {
                let mut conn = conn.clone();
                let mut names = vec![c.slot_state(*slot)];
                let mut args = vec![
                    pos.to_string().into_bytes(),
                    mark_ttl.clone(),
                    c.known[*slot]
                        .load(Ordering::Acquire)
                        .to_string()
                        .into_bytes(),
                ];
                for (key, below, mark) in chunk {
                    names.extend([c.value(key), c.meta(key)]);
                    args.extend([
                        below.to_string().into_bytes(),
                        mark.to_string().into_bytes(),
                    ]);
                }
                async move {
                    c.keys_of_slot
                        .run_keys_async(&mut conn, &names, &args)
                        .await
                }
            })
        });
        for done in in_waves(scripts.collect()).await {
            if done?.as_int() != Some(1) {
                return Ok(-1);
            }
        }
        let mut args = vec![
            pos.to_string().into_bytes(),
            seen,
            epoch,
            self.channel.as_bytes().to_vec(),
            batch.message.as_bytes().to_vec(),
            self.stream_max_len.to_string().into_bytes(),
        ];
        args.extend(by_slot.keys().map(|s| s.to_string().into_bytes()));
        let finished = c
            .finish
            .run_keys_async(&mut conn, &[c.state.as_bytes(), c.stream.as_bytes()], &args)
            .await?
            .as_int()
            .unwrap_or(-1);
        if finished == 1 {
            for slot in by_slot.keys() {
                c.known[*slot].fetch_max(pos, Ordering::AcqRel);
            }
        }
        Ok(finished)
    }

    /// `count` on a cluster: each group's set in its own slot.
    pub(super) async fn cluster_count(&self, groups: &[String]) -> Result<u64, RedisError> {
        let c = self.cluster()?;
        let sets: Vec<String> = groups.iter().map(|g| c.group_set(g)).collect();
        let sets = &sets;
        let result = self
            .pool
            .run(|conn| async move {
                let counts = sets.iter().map(|set| {
                    let mut conn = conn.clone();
                    async move { cmd(&mut conn, &[b"ZCARD", set.as_bytes()]).await }
                });
                let mut total = 0;
                for count in join_all(counts).await {
                    total += int(Some(&count?)).unwrap_or(0);
                }
                Ok(total)
            })
            .await;
        if result.is_err() {
            self.note(&result);
        }
        result
    }
}

/// Whether a `READ` reply shows its slot holding at least `expected`.
fn slot_holds(read: &Reply, expected: u64) -> bool {
    match read {
        Reply::Array(parts) => int(parts.get(1)).is_some_and(|applied| applied >= expected),
        _ => false,
    }
}

/// Every member of a group's set (ZSCAN: each one present from the first page to the last is
/// seen; one added meanwhile registered after the group's mark).
async fn group_members(conn: &mut Link, set: &str) -> Result<Vec<String>, RedisError> {
    let mut members = Vec::new();
    let mut cursor = b"0".to_vec();
    loop {
        let reply = cmd(
            conn,
            &[b"ZSCAN", set.as_bytes(), &cursor, b"COUNT", b"1000"],
        )
        .await?;
        let Reply::Array(mut parts) = reply else {
            return Err(RedisError::Protocol("ZSCAN did not answer an array".into()));
        };
        let (Some(Reply::Array(entries)), Some(Reply::Bulk(next))) = (parts.pop(), parts.pop())
        else {
            return Err(RedisError::Protocol("ZSCAN answered an odd shape".into()));
        };
        members.extend(entries.into_iter().step_by(2).filter_map(|m| match m {
            Reply::Bulk(m) => String::from_utf8(m).ok(),
            _ => None,
        }));
        if next == b"0" {
            return Ok(members);
        }
        cursor = next;
    }
}

/// Removes every key under `prefix` from one node but `keep` (SCAN; one UNLINK per key, as keys
/// of different slots cannot go in one command). Returns how many.
fn remove_from_node(conn: &mut Conn, prefix: &str, keep: &str) -> Result<u64, RedisError> {
    let pattern = format!("{}*", glob_escape(prefix));
    let mut cursor = b"0".to_vec();
    let mut removed = 0;
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
        let (Some(Reply::Array(keys)), Some(Reply::Bulk(next))) = (parts.pop(), parts.pop()) else {
            return Err(RedisError::Protocol("SCAN answered an odd shape".into()));
        };
        let mut pipe = redis::pipe();
        for key in keys {
            if let Reply::Bulk(key) = key
                && key != keep.as_bytes()
            {
                pipe.add_command(client::command(&[&b"UNLINK"[..], &key]));
                removed += 1;
            }
        }
        if !pipe.is_empty() {
            let _: Vec<redis::Value> = pipe.query(conn.inner())?;
        }
        if next == b"0" {
            return Ok(removed);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis_hash_tags_and_every_slot_has_a_tag() {
        // Redis Cluster's specification: CRC16-XMODEM of "123456789" is 0x31C3.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(
            slot_of(b"foo{}{bar}"),
            usize::from(crc16(b"foo{}{bar}")) % SLOTS
        );
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        assert_eq!(slot_of(b"foo{bar}{zap}"), slot_of(b"bar"));
        let tags = slot_tags();
        for (slot, tag) in tags.iter().enumerate() {
            assert!(!tag.is_empty() && tag.len() <= 4, "slot {slot}: {tag:?}");
            assert_eq!(slot_of(format!("{{{tag}}}").as_bytes()), slot);
        }
    }

    #[test]
    fn a_keys_bookkeeping_shares_its_slot_whatever_braces_it_holds() {
        let c = Cluster::new("ct:");
        for key in [
            "book:1",
            "title:{x}y",
            "a{}b",
            "{",
            "}{",
            "x{y}{z}",
            "{#}state",
            "",
        ] {
            let slot = slot_of(c.value(key).as_bytes());
            assert_eq!(c.slot(key), slot, "{key}");
            assert_eq!(slot_of(c.meta(key).as_bytes()), slot, "{key}");
            assert_eq!(slot_of(c.slot_state(slot).as_bytes()), slot, "{key}");
        }
        for group in ["t:books", "t:{x}", "f:book:{id}:00ff"] {
            assert_eq!(
                slot_of(c.group_set(group).as_bytes()),
                slot_of(c.group_mark(group).as_bytes())
            );
        }
        assert_eq!(slot_of(c.state.as_bytes()), slot_of(c.stream.as_bytes()));
        assert_eq!(c.stream, "ct:#invalidations");
    }
}
