-- The pool bound in one step: reserve an address (a free pooled one, else the next index) and lease it.
-- KEYS: lease zset (invoice address -> lease expiry ms, never paid), next index, derived hash (index ->
-- address, filled by the caller: Lua cannot derive), all addresses, this client's leases (address -> expiry)
-- ARGV: now_ms, lease_ms, pool, per-client cap (0: none), info key prefix, branch, client
-- Returns the address; '' when none may be leased; 'derive:<i>' when the caller must derive index i first.
local now, lease, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. now)
  if redis.call('ZCARD', KEYS[5]) >= cap then return '' end
end
local address
local free = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 1)
if #free > 0 then
  address = free[1]
else
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return '' end
  local index = tonumber(redis.call('GET', KEYS[2]) or '0')
  address = redis.call('HGET', KEYS[3], index)
  if not address then return 'derive:' .. index end
  redis.call('SET', KEYS[2], index + 1)
  redis.call('HDEL', KEYS[3], index)
  redis.call('HSET', ARGV[5] .. address, 'index', index, 'branch', ARGV[6], 'purpose', 'invoice')
  redis.call('SADD', KEYS[4], address)
end
redis.call('ZADD', KEYS[1], now + lease, address)
redis.call('HSET', ARGV[5] .. address, 'client', ARGV[7])
if cap > 0 then
  redis.call('ZADD', KEYS[5], now + lease, address)
  redis.call('PEXPIRE', KEYS[5], lease)
end
return address
