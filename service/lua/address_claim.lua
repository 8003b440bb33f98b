-- KEYS: registry entry for (key, branch), the registry's index (one hash tag shared by every deployment
-- on this Redis). ARGV: owner. Returns the owner: ARGV[1] when the claim is (now) ours.
local owner = redis.call('GET', KEYS[1])
if owner then return owner end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], KEYS[1])
return ARGV[1]
