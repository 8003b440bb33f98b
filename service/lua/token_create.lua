-- Store a spending token and index it, unless its owner already holds `cap` live tokens.
-- KEYS[1] token hash, [2] owner's token index (every token, for listing), [3] owner's live tokens (zset by expiry)
-- ARGV[1] id, [2] owner, [3] secret hash, [4] max_total, [5] max_per_call, [6] expires_at (0: never),
--     [7] routes json, [8] label, [9] cap (0: none)
-- Returns 'ok' | 'too_many' (the owner already has `cap` live tokens) | 'exists' (the id is taken); nothing
--     is written unless 'ok'.
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)  -- expired tokens no longer count
local cap = tonumber(ARGV[9])
if cap > 0 and redis.call('ZCARD', KEYS[3]) >= cap then return 'too_many' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'owner', ARGV[2], 'secret_hash', ARGV[3], 'max_total', ARGV[4],
  'max_per_call', ARGV[5], 'expires_at', ARGV[6], 'routes', ARGV[7], 'label', ARGV[8], 'spent', 0, 'revoked', 0,
  'created', now)
redis.call('SADD', KEYS[2], ARGV[1])
local expires = tonumber(ARGV[6])
redis.call('ZADD', KEYS[3], expires > 0 and expires or '+inf', ARGV[1])
return 'ok'
