//! The Lua scripts that keep Redis exactly as fresh as the database, atomically inside Redis:
//! `APPLY` runs a batch's invalidations (and refuses one from an older lease epoch), `STORE`
//! stores a fill unless an invalidation it did not see came first. Loaded on first use (and
//! again after a restart forgot them).

use std::sync::Mutex;

use super::resp::{Conn, RedisError, Reply};

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
if pos > tonumber(applied) then redis.call('HSET', state, 'applied', pos) end
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[i + 1]) end
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
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
  if redis.call('PTTL', set) < ttl then redis.call('PEXPIRE', set, ttl) end
end
return 1
"#;

/// A Lua script, loaded into Redis on first use (and again after a restart forgot it).
pub(super) struct Script {
    source: &'static str,
    sha: Mutex<Option<String>>,
}

impl Script {
    pub(super) const fn new(source: &'static str) -> Script {
        Script {
            source,
            sha: Mutex::new(None),
        }
    }

    pub(super) fn run(&self, conn: &mut Conn, args: &[Vec<u8>]) -> Result<Reply, RedisError> {
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
