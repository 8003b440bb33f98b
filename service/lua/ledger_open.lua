-- KEYS[1] acct hash, [2] accounts set, [3] journal. ARGV[1] name, [2] kind, [3] nonneg (1|0),
--     [4..] meta key/value pairs (stored as meta:<key>). Returns {'ok'} | {'exists'} (nothing changes)
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'kind', ARGV[2], 'nonneg', ARGV[3],
  'dp', 0, 'cp', 0, 'dpend', 0, 'cpend', 0, 'created', now_ms)
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], 'meta:' .. ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'op', 'open', 'account', ARGV[1], 'kind', ARGV[2], 'ts', now_ms)
return {'ok'}
