-- Lease entries a blocking XREADGROUP already handed to this consumer.
-- KEYS[1] prefix
-- ARGV: consumer, now, max_deliveries, result_ttl, then pairs: band, entry id
local consumer, now, max_deliveries, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local out = {}
for i = 5, #ARGV, 2 do
  local p, entry = ARGV[i], ARGV[i + 1]
  local s = stream_key(p)
  local found = redis.call('XRANGE', s, entry, entry)
  if #found == 0 then
    redis.call('XACK', s, GROUP, entry)  -- deleted meanwhile: nothing to run
  else
    local d = start(s, p, entry, found[1][2], consumer, now, max_deliveries, ttl)
    if d then out[#out + 1] = d end
  end
end
return out
