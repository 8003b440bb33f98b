-- Record a run's outcome once, for the current attempt only; a refund already claimed `settled` =
-- '<token>:error' in its ledger script, and is recorded here by that token.
-- KEYS[1] run hash, [2] owner's active counter, [3] result. ARGV[1] token, [2] status, [3] summary json,
--     [4] error, [5] refund id, [6] cases json ('' = none), [7] result ttl s
-- Returns 'ok' | 'done' (finished before) | 'settled' (another claim won) | 'stale' (fenced attempt)
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'settled')
if r[1] == 'passed' or r[1] == 'failed' or r[1] == 'error' then return 'done' end
local claim = ARGV[1] .. ':' .. ARGV[2]
if r[3] and r[3] ~= claim then return 'settled' end
if r[2] ~= ARGV[1] or redis.call('HEXISTS', KEYS[1], 'fenced:' .. ARGV[1]) == 1 then return 'stale' end
if ARGV[6] ~= '' then redis.call('SET', KEYS[3], ARGV[6], 'EX', tonumber(ARGV[7])) end
redis.call('HSET', KEYS[1], 'settled', claim, 'status', ARGV[2], 'finished', now_ms, 'summary', ARGV[3],
  'error', ARGV[4], 'refund', ARGV[5])
redis.call('HDEL', KEYS[1], 'lease_until')
if tonumber(redis.call('DECR', KEYS[2])) < 0 then redis.call('SET', KEYS[2], 0) end
return 'ok'
