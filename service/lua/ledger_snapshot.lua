-- KEYS[1] accounts set, [2] journal. ARGV[1] the account key prefix ('{tag}:acct:'). Read-only.
-- Returns {journal's last id ('0-0' when empty), name, dp, cp, dpend, cpend, name, ...}, atomically.
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local out = {last[1] and last[1][1] or '0-0'}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('HMGET', ARGV[1] .. name, 'dp', 'cp', 'dpend', 'cpend')
  table.insert(out, name); table.insert(out, v[1] or '0'); table.insert(out, v[2] or '0')
  table.insert(out, v[3] or '0'); table.insert(out, v[4] or '0')
end
return out
