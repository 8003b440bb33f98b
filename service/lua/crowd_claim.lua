-- Lease a slot of an open crowd job to a runner (one claim per runner and per account, ever).
-- KEYS[1] job, [2] leases (runner -> deadline ms; expired leases are dropped here), [3] claimed-by set,
--     [4] claiming accounts set
-- ARGV[1] runner, [2] now_ms, [3] lease_ms, [4] the runner's account
-- Returns 'ok' | 'closed' (not open, or past its expiry) | 'seen' (runner or account claimed before) |
--     'full' (live leases + accepted + awaiting decision fill `wanted`)
local j = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'wanted', 'accepted', 'pending')
if j[1] ~= 'open' or tonumber(j[2]) <= tonumber(ARGV[2]) then return 'closed' end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return 'seen' end
if redis.call('SISMEMBER', KEYS[4], ARGV[4]) == 1 then return 'seen' end
local active = 0
local leases = redis.call('HGETALL', KEYS[2])
for i = 1, #leases, 2 do
  if tonumber(leases[i + 1]) < tonumber(ARGV[2]) then redis.call('HDEL', KEYS[2], leases[i])
  else active = active + 1 end
end
-- a slot is taken by a live lease, an accepted result, or a result awaiting the buyer's decision
if active + tonumber(j[4]) + tonumber(j[5] or 0) >= tonumber(j[3]) then return 'full' end
redis.call('HSET', KEYS[2], ARGV[1], tonumber(ARGV[2]) + tonumber(ARGV[3]))
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[4])
return 'ok'
