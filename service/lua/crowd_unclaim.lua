-- Undo a claim whose stake could not be paid (the slot and the account's one claim come back).
-- KEYS[1] leases, [2] claimed-by set, [3] claiming accounts set. ARGV[1] runner, [2] account. Returns 1.
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2])
return 1
