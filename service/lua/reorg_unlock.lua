-- Release the reorg re-check lock, only if this holder still owns it.
-- KEYS[1] lock key. ARGV[1] the holder's token. Returns 1 (deleted) | 0 (not ours, or gone)
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
