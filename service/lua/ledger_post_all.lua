-- Several single-phase transfers, all or nothing (e.g. every coin of one on-chain payment).
-- KEYS: journal, accounts-set, then per transfer: xfer, debit acct, credit acct, debit history, credit history
-- ARGV: open kind for missing credit accounts ('' = they must exist), then per transfer: id, debit, credit,
--       amount, meta. Returns {'ok'}; {'replayed', i, <transfer i's fields>} if transfer i exists (nothing
--       moved: idempotent as a whole when all exist); or {<refusal>, i}: same_account, no_debit_account,
--       no_credit_account, insufficient, counter_limit (a counter would pass 2^53 - 1, see MAX_COUNTER).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local MAX = 9007199254740991
local function over(a, b, c) return a + b + c > MAX end  -- exact: a true sum above MAX rounds to >= 2^53
local n = (#KEYS - 2) / 5
local delta, opened = {}, {}
local outs, ins = {}, {}  -- per account: dp + dpend and cp + cpend, plus what this script adds (<= MAX)
local function counters(name, key)
  if outs[name] then return true end
  local v = redis.call('HMGET', key, 'dp', 'cp', 'dpend', 'cpend')
  outs[name] = tonumber(v[1] or '0') + tonumber(v[3] or '0')
  ins[name] = tonumber(v[2] or '0') + tonumber(v[4] or '0')
  return outs[name] <= MAX and ins[name] <= MAX
end
for i = 1, n do
  local k, a = 2 + (i - 1) * 5, 1 + (i - 1) * 5
  if redis.call('EXISTS', KEYS[k + 1]) == 1 then
    return {'replayed', i, unpack(redis.call('HGETALL', KEYS[k + 1]))}
  end
  local amount = tonumber(ARGV[a + 4])
  if ARGV[a + 2] == ARGV[a + 3] then return {'same_account', i} end
  local d = redis.call('HMGET', KEYS[k + 2], 'nonneg', 'dp', 'cp', 'dpend')
  if not d[1] then return {'no_debit_account', i} end
  local within = counters(ARGV[a + 2], KEYS[k + 2]) and counters(ARGV[a + 3], KEYS[k + 3])
  if not amount or amount > MAX or not within then return {'counter_limit', i} end
  outs[ARGV[a + 2]] = outs[ARGV[a + 2]] + amount
  ins[ARGV[a + 3]] = ins[ARGV[a + 3]] + amount
  if outs[ARGV[a + 2]] > MAX or ins[ARGV[a + 3]] > MAX then return {'counter_limit', i} end
  if redis.call('EXISTS', KEYS[k + 3]) == 0 and not opened[ARGV[a + 3]] then
    if ARGV[1] == '' then return {'no_credit_account', i} end
    opened[ARGV[a + 3]] = KEYS[k + 3]
  end
  delta[ARGV[a + 2]] = (delta[ARGV[a + 2]] or 0) - amount
  delta[ARGV[a + 3]] = (delta[ARGV[a + 3]] or 0) + amount
  if d[1] == '1' and tonumber(d[3]) - tonumber(d[2]) - tonumber(d[4]) + delta[ARGV[a + 2]] < 0 then
    return {'insufficient', i}
  end
end
for name, key in pairs(opened) do
  redis.call('HSET', key, 'name', name, 'kind', ARGV[1], 'nonneg', 1, 'dp', 0, 'cp', 0, 'dpend', 0, 'cpend', 0,
    'created', now_ms)
  redis.call('SADD', KEYS[2], name)
  redis.call('XADD', KEYS[1], '*', 'op', 'open', 'account', name, 'kind', ARGV[1], 'ts', now_ms)
end
for i = 1, n do
  local k, a = 2 + (i - 1) * 5, 1 + (i - 1) * 5
  local amount = tonumber(ARGV[a + 4])
  redis.call('HINCRBY', KEYS[k + 2], 'dp', amount)
  redis.call('HINCRBY', KEYS[k + 3], 'cp', amount)
  redis.call('HSET', KEYS[k + 1], 'id', ARGV[a + 1], 'debit', ARGV[a + 2], 'credit', ARGV[a + 3], 'amount', amount,
    'state', 'posted', 'created', now_ms, 'expires', 0, 'meta', ARGV[a + 5], 'token', '')
  redis.call('XADD', KEYS[1], '*', 'op', 'post', 'id', ARGV[a + 1], 'debit', ARGV[a + 2], 'credit', ARGV[a + 3],
    'amount', amount, 'ts', now_ms)
  if redis.call('HGET', KEYS[k + 2], 'kind') == 'user' then
    redis.call('LPUSH', KEYS[k + 4], ARGV[a + 1]); redis.call('LTRIM', KEYS[k + 4], 0, 999)
  end
  if redis.call('HGET', KEYS[k + 3], 'kind') == 'user' then
    redis.call('LPUSH', KEYS[k + 5], ARGV[a + 1]); redis.call('LTRIM', KEYS[k + 5], 0, 999)
  end
end
return {'ok'}
