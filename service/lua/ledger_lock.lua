-- Lock a pending hold for an owner (it leaves the expiry set and can no longer time out; only that owner may
-- unlock it), or unlock it (it gets a deadline again).
-- KEYS[1] xfer hash, [2] pending zset, [3] journal
-- ARGV[1] id, [2] action (lock|unlock), [3] owner, [4] timeout_s (unlock: the new deadline, from now)
-- Returns {'ok', owner} | {'replayed', owner} (lock: already ours) | {'replayed', ''} (unlock: not locked) |
--     {'locked', other owner} | {'expired', state} (lock past the deadline: the sweeper's) |
--     {'not_pending', state} | {'not_found'}
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local x = redis.call('HMGET', KEYS[1], 'state', 'amount', 'debit', 'credit', 'expires', 'locked')
if not x[1] then return {'not_found'} end
if x[1] ~= 'pending' then return {'not_pending', x[1]} end
if ARGV[2] == 'lock' then
  if x[6] then
    if x[6] == ARGV[3] then return {'replayed', x[6]} end
    return {'locked', x[6]}
  end
  if tonumber(x[5]) < now_ms then return {'expired', x[1]} end
  redis.call('HSET', KEYS[1], 'locked', ARGV[3], 'expires', 253402300799000)
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  if not x[6] then return {'replayed', ''} end
  if x[6] ~= ARGV[3] then return {'locked', x[6]} end
  local expires = now_ms + tonumber(ARGV[4]) * 1000
  redis.call('HDEL', KEYS[1], 'locked')
  redis.call('HSET', KEYS[1], 'expires', expires)
  redis.call('ZADD', KEYS[2], expires, ARGV[1])
end
redis.call('XADD', KEYS[3], '*', 'op', ARGV[2], 'id', ARGV[1], 'debit', x[3], 'credit', x[4], 'amount', x[2],
  'ts', now_ms, 'reason', ARGV[3])
return {'ok', ARGV[3]}
