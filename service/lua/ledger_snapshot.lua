-- KEYS[1] accounts set, [2] journal, [3] the journal's archive checkpoint (journal_checkpoint.lua).
-- ARGV[1] the account key prefix ('{tag}:acct:'). Read-only.
-- Returns {journal's last id ('0-0' when empty), checkpoint's last id ('0-0': none), its counters JSON,
--     its accounts-opened JSON, its entry count, name, dp, cp, dpend, cpend, name, ...}, atomically.
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local c = redis.call('HMGET', KEYS[3], 'last', 'counters', 'opened', 'entries')
local out = {last[1] and last[1][1] or '0-0', c[1] or '0-0', c[2] or '{}', c[3] or '[]', c[4] or '0'}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('HMGET', ARGV[1] .. name, 'dp', 'cp', 'dpend', 'cpend')
  table.insert(out, name); table.insert(out, v[1] or '0'); table.insert(out, v[2] or '0')
  table.insert(out, v[3] or '0'); table.insert(out, v[4] or '0')
end
return out
