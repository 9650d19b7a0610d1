//! The Lua scripts that keep Redis exactly as fresh as the database, atomically inside Redis:
//! `CLAIM` records a new lease holder's epoch (refused unless above every epoch seen);
//! `APPLY` runs a batch's invalidations (and refuses one from an older lease epoch), with
//! `PURGE` and `FINISH` after it when a group is too large to empty in one script (Redis runs
//! nothing else while a script runs); `STORE` stores a fill unless an invalidation it did not
//! see came first. Loaded on first use (and
//! again after a restart forgot them).
//!
//! A batch's fan-out happens in the script that records it applied (`APPLY`, or `FINISH`),
//! atomic with it: its message is published on the channel and appended to the stream
//! `{prefix}#invalidations` (field `message`, trimmed exactly to `[cache] stream_max_len`
//! entries), both or neither, and only when `publish` is on (an empty channel argument).

use super::client::{Conn, RedisError, Reply};

/// A daemon that took the lease claims its epoch before it touches anything else: Redis's epoch
/// only grows, and a claim succeeds only above it, so no two daemons ever apply under one epoch
/// (even when the lease row was reset and gave an epoch out again). Returns the epoch Redis held
/// before: at or above the claimed one, the claim was refused.
pub(super) const CLAIM: &str = r#"
local state = ARGV[1] .. '#state'
local epoch = tonumber(ARGV[2])
local known = tonumber(redis.call('HGET', state, 'epoch') or '0')
if known < epoch then redis.call('HSET', state, 'epoch', epoch) end
return known
"#;

pub(super) const APPLY: &str = r#"
local prefix = ARGV[1]
local pos = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local state = prefix .. '#state'
local applied = redis.call('HGET', state, 'applied')
if not applied or tonumber(applied) < tonumber(ARGV[4]) then return -1 end
local epoch = tonumber(ARGV[7])
local known = tonumber(redis.call('HGET', state, 'epoch') or '0')
if known > epoch then return -2 end
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
local groups = i
i = i + 2 * n
local floor = tonumber(ARGV[i])
local budget = tonumber(ARGV[i + 2])
local pending = {}
for g = 0, n - 1 do
  local group = ARGV[groups + 2 * g]; local mark = tonumber(ARGV[groups + 2 * g + 1])
  local set = prefix .. '#g:' .. group
  -- The mark first: from now on no value read before it is stored, so the set only gains keys
  -- read after it, and emptying it may take several scripts.
  local gm = prefix .. '#gm:' .. group
  local old = tonumber(redis.call('GET', gm) or '0')
  redis.call('SET', gm, math.max(old, mark), 'PX', ttl)
  local size = redis.call('ZCARD', set)
  if size <= budget then
    budget = budget - size
    -- Only the values read before the mark: one read after it already reflects the change.
    for _, key in ipairs(redis.call('ZRANGE', set, 0, -1)) do
      if tonumber(redis.call('HGET', prefix .. '#m:' .. key, 'v') or '0') < mark then
        redis.call('UNLINK', prefix .. key)
        redis.call('ZREM', set, key)
      end
    end
  else
    -- Too many keys for one script (Redis runs nothing else meanwhile): `PURGE` empties it, a
    -- page at a time, then `FINISH` records the batch.
    pending[#pending + 1] = group
    pending[#pending + 1] = tostring(mark)
  end
end
if floor > tonumber(redis.call('HGET', state, 'floor') or '0') then redis.call('HSET', state, 'floor', floor) end
if #pending > 0 then return pending end
if pos > tonumber(applied) then redis.call('HSET', state, 'applied', pos) end
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[i + 1])
  redis.call('XADD', prefix .. '#invalidations', 'MAXLEN', ARGV[i + 3], '*', 'message', ARGV[i + 1])
end
return 1
"#;

/// One page of a group too large for `APPLY`: removes the values of its keys read before the
/// mark (ZSCAN: every key in the set from the first page to the last is seen; keys added
/// meanwhile were read after the mark). Returns the next cursor ("0": done).
pub(super) const PURGE: &str = r#"
local prefix, mark = ARGV[1], tonumber(ARGV[3])
local set = prefix .. '#g:' .. ARGV[2]
local page = redis.call('ZSCAN', set, ARGV[4], 'COUNT', ARGV[5])
local entries = page[2]
for j = 1, #entries, 2 do
  local key = entries[j]
  if tonumber(redis.call('HGET', prefix .. '#m:' .. key, 'v') or '0') < mark then
    redis.call('UNLINK', prefix .. key)
    redis.call('ZREM', set, key)
  end
end
return page[1]
"#;

/// Records a batch whose groups `PURGE` emptied: its position applied, its message published
/// and appended to the stream (only now: an app-local cache that refetches on the message must not find a value the batch
/// removes). Refused like `APPLY` if Redis lost its state or another epoch took over meanwhile.
pub(super) const FINISH: &str = r#"
local prefix, pos = ARGV[1], tonumber(ARGV[2])
local state = prefix .. '#state'
local applied = redis.call('HGET', state, 'applied')
if not applied or tonumber(applied) < tonumber(ARGV[3]) then return -1 end
if tonumber(redis.call('HGET', state, 'epoch') or '0') > tonumber(ARGV[4]) then return -2 end
if pos > tonumber(applied) then redis.call('HSET', state, 'applied', pos) end
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  redis.call('XADD', prefix .. '#invalidations', 'MAXLEN', ARGV[7], '*', 'message', ARGV[6])
end
return 1
"#;

pub(super) const STORE: &str = r#"
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
  -- Expired members, a few at a time (a set where many expired at once is not walked here).
  local expired = redis.call('ZRANGEBYSCORE', set, '-inf', now, 'LIMIT', 0, 32)
  if #expired > 0 then redis.call('ZREM', set, unpack(expired)) end
  if redis.call('PTTL', set) < ttl then redis.call('PEXPIRE', set, ttl) end
end
return 1
"#;

/// A Lua script, run by its SHA1 (`EVALSHA`); the crate loads it when Redis does not know it
/// (first use, or a restart forgot it) and runs it again.
pub(super) struct Script(redis::Script);

impl Script {
    pub(super) fn new(source: &'static str) -> Script {
        Script(redis::Script::new(source))
    }

    fn invocation(&self, args: &[Vec<u8>]) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.0.prepare_invoke();
        for arg in args {
            invocation.arg(arg.as_slice());
        }
        invocation
    }

    /// Blocking, on the tail's connection.
    pub(super) fn run(&self, conn: &mut Conn, args: &[Vec<u8>]) -> Result<Reply, RedisError> {
        let value: redis::Value = self.invocation(args).invoke(conn.inner())?;
        Ok(Reply::from(value))
    }

    /// On a shared (multiplexed) connection.
    pub(super) async fn run_async(
        &self,
        conn: &mut super::pool::Link,
        args: &[Vec<u8>],
    ) -> Result<Reply, RedisError> {
        self.run_keys_async::<&[u8]>(conn, &[], args).await
    }

    /// With its keys declared (`KEYS`): a Redis Cluster runs it on the node of their slot
    /// (they all share one), and redirects it while that slot moves.
    pub(super) async fn run_keys_async<K: AsRef<[u8]>>(
        &self,
        conn: &mut super::pool::Link,
        keys: &[K],
        args: &[Vec<u8>],
    ) -> Result<Reply, RedisError> {
        let mut invocation = self.invocation(args);
        for key in keys {
            invocation.key(key.as_ref());
        }
        let value: redis::Value = invocation.invoke_async(conn).await?;
        Ok(Reply::from(value))
    }
}
