-- Capture (post) or void a pending transfer. A capture past the hold's deadline voids it instead.
-- KEYS[1] xfer hash, [2] debit acct, [3] credit acct, [4] pending zset, [5] journal, [6] token hash
--     ('{tag}:token:-' when none), [7] response key ('{tag}:resp:-' when none)
-- ARGV[1] id, [2] action (post|void), [3] reason, [4] response record to keep under KEYS[7] when the
--     capture applies ('' = none), [5] its TTL in seconds
-- Returns {'ok', state} | {'expired', 'voided'} | {'not_pending', state} | {'not_found'} |
--     {'locked', owner} (a locked hold is not voided as 'expired' by the sweeper)
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local x = redis.call('HMGET', KEYS[1], 'state', 'amount', 'debit', 'credit', 'expires', 'token', 'locked')
if not x[1] then return {'not_found'} end
if x[1] ~= 'pending' then return {'not_pending', x[1]} end
if x[7] and ARGV[3] == 'expired' then return {'locked', x[7]} end  -- a locked hold never expires
local amount = tonumber(x[2])
local action, reason, result = ARGV[2], ARGV[3], 'ok'
if action == 'post' and tonumber(x[5]) < now_ms then
  action, reason, result = 'void', 'expired', 'expired'
end
redis.call('HINCRBY', KEYS[2], 'dpend', -amount)
redis.call('HINCRBY', KEYS[3], 'cpend', -amount)
local state, op = 'voided', 'void'
if action == 'post' then
  redis.call('HINCRBY', KEYS[2], 'dp', amount)
  redis.call('HINCRBY', KEYS[3], 'cp', amount)
  state, op = 'posted', 'capture'
  if ARGV[4] and ARGV[4] ~= '' then redis.call('SET', KEYS[7], ARGV[4], 'EX', ARGV[5]) end
end
if state == 'voided' and x[6] and x[6] ~= '' then redis.call('HINCRBY', KEYS[6], 'spent', -amount) end
redis.call('HSET', KEYS[1], 'state', state, 'resolved', now_ms, 'reason', reason)
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[5], '*', 'op', op, 'id', ARGV[1], 'debit', x[3], 'credit', x[4],
  'amount', amount, 'ts', now_ms, 'reason', reason)
return {result, state}
