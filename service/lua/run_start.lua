-- A new attempt of a QA run (fencing token = attempts) unless the run is finished or settled, or another
-- attempt's lease is still live; starting attempt n fences attempt n-1.
-- KEYS[1] run hash. ARGV[1] worker, [2] lease_ms
-- Returns {'ok', token} | {'missing'} | {'done'} | {'settled', claim} | {'leased', worker}
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'status', 'settled', 'lease_until', 'worker', 'attempts')
if not r[1] then return {'missing'} end
if r[1] == 'passed' or r[1] == 'failed' or r[1] == 'error' then return {'done'} end
if r[2] then return {'settled', r[2]} end
if r[1] == 'running' and tonumber(r[3] or 0) > now_ms then return {'leased', r[4] or ''} end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if n > 1 then redis.call('HSET', KEYS[1], 'fenced:' .. (n - 1), now_ms) end
redis.call('HSET', KEYS[1], 'status', 'running', 'started', now_ms, 'worker', ARGV[1],
  'lease_until', now_ms + tonumber(ARGV[2]))
return {'ok', tostring(n)}
