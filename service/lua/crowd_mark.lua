-- Bring a result's state and the job's counters in line with what the ledger decided: 'accepted' once the
-- payment claimed `accepted_at` (idempotent); 'rejected' only while no payment claimed it (the payment's
-- guard forbids `rejected_at` from then on); 'provisional' = auto-accepted, paid when the dispute window ends.
-- KEYS[1] result, [2] job, [3] release zset (only for 'provisional')
-- ARGV[1] accepted|rejected|provisional, [2] now_ms ('provisional': the window's end), [3] release member
-- Returns 1 (changed) | 0 (nothing to do) | -2 (rejected, but a payment already claimed it)
local r = redis.call('HMGET', KEYS[1], 'state', 'accepted_at', 'rejected_at')
local undecided = r[1] == 'submitted' or r[1] == 'provisional'
if ARGV[1] == 'provisional' then  -- auto-accepted: paid when the dispute window (ARGV[2] = its end) ends
  if r[1] ~= 'submitted' or r[2] then return 0 end
  redis.call('HSET', KEYS[1], 'state', 'provisional', 'release_at', ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])  -- the sweeper's queue of rewards to release
  return 1
end
if ARGV[1] == 'accepted' then
  if not r[2] then return 0 end
  if not undecided then return 0 end
  redis.call('HINCRBY', KEYS[2], 'accepted', 1)
else
  if r[2] then return -2 end
  if not undecided then return 0 end
  redis.call('HSET', KEYS[1], 'rejected_at', ARGV[2])
end
redis.call('HINCRBY', KEYS[2], 'pending', -1)
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return 1
