-- Undo a claim whose broadcast the network refused (only while nothing was booked).
-- KEYS[1] tx record, [2] address claim, [3] open set. ARGV[1] txid, [2] invoice.
-- Returns 1 (released) | 0 (another invoice's record, or past 'broadcasting': nothing changes)
if redis.call('HGET', KEYS[1], 'invoice') ~= ARGV[2] or redis.call('HGET', KEYS[1], 'state') ~= 'broadcasting' then
  return 0
end
redis.call('DEL', KEYS[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
