-- One transfer, posted at once or held pending. Every check runs before the first write, so a refused
-- transfer changes nothing (no account opened, no journal entry).
-- KEYS[1] xfer hash, [2] debit acct, [3] credit acct, [4] pending zset, [5] journal, [6] debit history,
--     [7] credit history, [8] token hash ('{tag}:token:-' when not paid by token), [9] guard hash
--     ('{tag}:guard:-' without a guard), [10] accounts set (a credit account opened here joins it),
--     [11] idempotency-key record ('{tag}:idem:-' without one)
-- ARGV[1] id, [2] debit, [3] credit, [4] amount (integer sat, or '*' = all the debit account has),
--     [5] mode (post|pend), [6] timeout_s (pend), [7] require_pubkey ('' = any), [8] meta (JSON object),
--     [9] token secret hash ('' = not paid by token), [10] resource path (the token's route caveat),
--     [11] guard: field that must be absent, [12] guard: field to claim, [13] claim value,
--     [14] kind to open the credit account with when it does not exist ('' = it must exist),
--     [15] '1' = bind KEYS[11] to this transfer when it applies ('' = no key), [16] the binding's TTL in s
-- Returns {'ok', state, amount} | {'replayed', field, value, ...} (the first transfer) |
--     {'key_used', first transfer id} (KEYS[11] names another transfer) | {outcome}: one of
--     same_account, token_invalid, token_revoked, token_expired, token_max_per_call, token_route,
--     token_max_total, no_debit_account, pubkey_mismatch, no_credit_account, nothing, guarded, claimed,
--     insufficient, counter_limit (a counter would pass 2^53 - 1: amounts stay exact integers in Lua's doubles)
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local MAX = 9007199254740991
local function over(a, b, c) return a + b + c > MAX end  -- exact: a true sum above MAX rounds to >= 2^53
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'replayed', unpack(redis.call('HGETALL', KEYS[1]))}
end
if ARGV[2] == ARGV[3] then return {'same_account'} end
local amount = 0
if ARGV[4] ~= '*' then
  amount = tonumber(ARGV[4])
  if not amount or amount > MAX then return {'counter_limit'} end
end
local token = ''
if ARGV[9] ~= '' then
  local t = redis.call('HMGET', KEYS[8], 'id', 'secret_hash', 'owner', 'revoked', 'expires_at', 'max_per_call',
    'max_total', 'spent', 'routes')
  if not t[1] or t[2] ~= ARGV[9] or t[3] ~= ARGV[2] then return {'token_invalid'} end
  if t[4] == '1' then return {'token_revoked'} end
  if tonumber(t[5]) > 0 and tonumber(t[5]) * 1000 <= now_ms then return {'token_expired'} end
  if tonumber(t[6]) > 0 and amount > tonumber(t[6]) then return {'token_max_per_call'} end
  local routes, allowed = cjson.decode(t[9]), false
  for _, prefix in ipairs(routes) do  -- whole path segments, as ledger.route_allows says
    local path = ARGV[10]
    if string.sub(path, 1, #prefix) == prefix and (#path == #prefix or string.sub(prefix, -1) == '/'
        or string.sub(path, #prefix + 1, #prefix + 1) == '/') then allowed = true end
  end
  if #routes > 0 and not allowed then return {'token_route'} end
  if over(tonumber(t[8]), amount, 0) then return {'counter_limit'} end
  if amount > tonumber(t[7]) - tonumber(t[8]) then return {'token_max_total'} end  -- exact: both <= MAX
  token = t[1]
end
local d = redis.call('HMGET', KEYS[2], 'nonneg', 'dp', 'cp', 'dpend', 'meta:pubkey', 'kind')
if not d[1] then return {'no_debit_account'} end
if ARGV[7] ~= '' and d[5] ~= ARGV[7] then return {'pubkey_mismatch'} end
if ARGV[15] == '1' then  -- after the payer's key check: only the payer may read what the key bought
  local first = redis.call('GET', KEYS[11])
  if first and first ~= ARGV[1] then return {'key_used', first} end
end
local c = redis.call('HMGET', KEYS[3], 'kind', 'dp', 'cp', 'dpend', 'cpend')
local credit_kind, open_credit = c[1], false
if not credit_kind and ARGV[14] ~= '' then  -- an escrow opened by its first payment (written below, if paid)
  credit_kind, open_credit = ARGV[14], true
  c = {credit_kind, '0', '0', '0', '0'}
end
if not credit_kind then return {'no_credit_account'} end
local ddp, dcp, ddpend = tonumber(d[2]), tonumber(d[3]), tonumber(d[4])
local cdp, ccp, cdpend, ccpend = tonumber(c[2]), tonumber(c[3]), tonumber(c[4]), tonumber(c[5])
-- lifetime counters stay <= MAX, so every difference below is an exact integer
if over(dcp, 0, 0) or over(ddp, ddpend, 0) or over(cdp, cdpend, 0) or over(ccp, ccpend, 0) then
  return {'counter_limit'}
end
if ARGV[4] == '*' then
  amount = dcp - ddp - ddpend
  if amount <= 0 then return {'nothing'} end
end
if ARGV[11] ~= '' and redis.call('HEXISTS', KEYS[9], ARGV[11]) == 1 then return {'guarded'} end
if ARGV[12] ~= '' and redis.call('HEXISTS', KEYS[9], ARGV[12]) == 1 then return {'claimed'} end
if d[1] == '1' and dcp - ddp - ddpend < amount then return {'insufficient'} end
if over(ddp, ddpend, amount) or over(ccp, ccpend, amount) then return {'counter_limit'} end
-- every check passed: write
if open_credit then
  redis.call('HSET', KEYS[3], 'name', ARGV[3], 'kind', credit_kind, 'nonneg', 1, 'dp', 0, 'cp', 0, 'dpend', 0,
    'cpend', 0, 'created', now_ms)
  redis.call('SADD', KEYS[10], ARGV[3])
  redis.call('XADD', KEYS[5], '*', 'op', 'open', 'account', ARGV[3], 'kind', credit_kind, 'ts', now_ms)
end
if ARGV[12] ~= '' then redis.call('HSET', KEYS[9], ARGV[12], ARGV[13]) end
if ARGV[15] == '1' then redis.call('SET', KEYS[11], ARGV[1], 'EX', ARGV[16]) end
local state, op, expires = 'posted', 'post', 0
if ARGV[5] == 'pend' then
  state, op = 'pending', 'pend'
  expires = now_ms + tonumber(ARGV[6]) * 1000
  redis.call('HINCRBY', KEYS[2], 'dpend', amount)
  redis.call('HINCRBY', KEYS[3], 'cpend', amount)
  redis.call('ZADD', KEYS[4], expires, ARGV[1])
else
  redis.call('HINCRBY', KEYS[2], 'dp', amount)
  redis.call('HINCRBY', KEYS[3], 'cp', amount)
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'debit', ARGV[2], 'credit', ARGV[3], 'amount', amount,
  'state', state, 'created', now_ms, 'expires', expires, 'meta', ARGV[8], 'token', token)
if token ~= '' then redis.call('HINCRBY', KEYS[8], 'spent', amount) end
redis.call('XADD', KEYS[5], '*', 'op', op, 'id', ARGV[1], 'debit', ARGV[2], 'credit', ARGV[3],
  'amount', amount, 'ts', now_ms)
-- per-user index of recent transfers (system accounts are audited through the journal instead)
if d[6] == 'user' then redis.call('LPUSH', KEYS[6], ARGV[1]); redis.call('LTRIM', KEYS[6], 0, 999) end
if credit_kind == 'user' then redis.call('LPUSH', KEYS[7], ARGV[1]); redis.call('LTRIM', KEYS[7], 0, 999) end
return {'ok', state, amount}
