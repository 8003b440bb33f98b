-- Extend the lease of the current attempt only, and reset the stream entry's idle time with it.
-- KEYS[1] run hash, [2] queue stream. ARGV[1] token, [2] lease_ms, [3] group, [4] consumer,
--     [5] entry id ('' = none)
-- Returns 1 (renewed) | 0 (not running, another attempt, or settled: nothing changes)
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'settled')
if r[1] ~= 'running' or r[2] ~= ARGV[1] or r[3] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', now_ms + tonumber(ARGV[2]))
if ARGV[5] ~= '' then redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[5], 'JUSTID') end
return 1
