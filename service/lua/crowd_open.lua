-- A funded job becomes claimable, unless it was closed meanwhile (then it stays closed).
-- KEYS[1] job. No ARGV. Returns 1 (now open) | 0 (status was not 'funding': nothing changes)
if redis.call('HGET', KEYS[1], 'status') ~= 'funding' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'open')
return 1
