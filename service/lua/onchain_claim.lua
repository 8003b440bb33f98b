-- Claim a tx for an invoice and its address, before it is broadcast.
-- KEYS[1] tx record, [2] address claim, [3] open set. ARGV[1] txid, [2] invoice, [3] address,
--     [4] request_hash, [5] payer, [6] now_ms
-- Returns 'retry' (this tx is ours for this invoice and payer already) | 'used' (it paid another invoice or
--     payer) | 'address_paid' (the invoice address took another tx) | 'new' (both claimed)
local inv = redis.call('HGET', KEYS[1], 'invoice')
if inv then
  if inv ~= ARGV[2] or redis.call('HGET', KEYS[1], 'payer') ~= ARGV[5] then return 'used' end
  return 'retry'
end
local paid = redis.call('GET', KEYS[2])
if paid and paid ~= ARGV[1] then return 'address_paid' end
redis.call('HSET', KEYS[1], 'txid', ARGV[1], 'invoice', ARGV[2], 'address', ARGV[3], 'request_hash', ARGV[4],
  'payer', ARGV[5], 'created', ARGV[6], 'state', 'broadcasting')
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return 'new'
