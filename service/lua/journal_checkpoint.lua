-- Move the journal's balance checkpoint forward and drop the entries it now covers, in one step.
-- KEYS[1] checkpoint hash, [2] journal stream.
-- ARGV[1] the checkpoint's last id the caller started from ('0-0': none yet), [2] the new last id,
--     [3] counters JSON, [4] accounts opened JSON, [5] entries covered in all, [6] the first id to keep
-- Returns 'ok' | 'moved' (another archiver moved it first: nothing changes; the caller's batch is dropped)
if (redis.call('HGET', KEYS[1], 'last') or '0-0') ~= ARGV[1] then return 'moved' end
redis.call('HSET', KEYS[1], 'last', ARGV[2], 'counters', ARGV[3], 'opened', ARGV[4], 'entries', ARGV[5])
redis.call('XTRIM', KEYS[2], 'MINID', ARGV[6])
return 'ok'
