//! The Lua scripts of the Redis Cluster layout (`cluster.rs`): each declares its keys, all in
//! one slot, so it runs atomically on the node holding that slot.

/// Reads a value, its slot's applied position and the value's TTL, atomically.
pub(super) const READ: &str = r#"
return {redis.call('GET', KEYS[1]), redis.call('HGET', KEYS[2], 'applied'), redis.call('PTTL', KEYS[1])}
"#;

pub(super) const CLAIM: &str = r#"
local epoch = tonumber(ARGV[1])
local known = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if known < epoch then redis.call('HSET', KEYS[1], 'epoch', epoch) end
return known
"#;

/// A batch's start on the global state: refused if it lost state (-1) or another epoch took
/// over (-2); records the epoch and the floor.
pub(super) const BEGIN: &str = r#"
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
pub(super) const MARK: &str = r#"
local old = tonumber(redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[1], math.max(old, tonumber(ARGV[1])), 'PX', ARGV[2])
return 1
"#;

/// One slot's share of a batch: KEYS are the slot's state, then (value, key mark) pairs; ARGV
/// the batch's position, the marks' TTL, the slot's applied position this daemon expects at
/// least, then per key the position below which its value goes and its new key mark.
pub(super) const KEYS_OF_SLOT: &str = r#"
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
pub(super) const FINISH: &str = r#"
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
pub(super) const REGISTER: &str = r#"
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
pub(super) const STORE: &str = r#"
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
pub(super) const RESET: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
redis.call('DEL', KEYS[1])
if epoch then redis.call('HSET', KEYS[1], 'epoch', epoch) end
return 1
"#;
