-- Record a runner's result under its live lease (the lease ends here).
-- KEYS[1] leases, [2] result hash, [3] results list, [4] job, [5] stakes
-- ARGV[1] runner, [2] now_ms, [3] result id, [4] result fields json, [5] account, [6] '1' when the job wants
--     a stake (then the account's claim must have paid it)
-- Returns 'ok' | 'no_lease' | 'no_stake' | 'lease_expired' (the expired lease is dropped)
local deadline = redis.call('HGET', KEYS[1], ARGV[1])
if not deadline then return 'no_lease' end
if ARGV[6] == '1' and redis.call('HEXISTS', KEYS[5], ARGV[5]) == 0 then return 'no_stake' end
if tonumber(deadline) < tonumber(ARGV[2]) then redis.call('HDEL', KEYS[1], ARGV[1]); return 'lease_expired' end
redis.call('HDEL', KEYS[1], ARGV[1])
local f = cjson.decode(ARGV[4])
for k, v in pairs(f) do redis.call('HSET', KEYS[2], k, v) end
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('HINCRBY', KEYS[4], 'pending', 1)
return 'ok'
