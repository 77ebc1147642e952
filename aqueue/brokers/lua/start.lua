-- Lease entries a blocking XREADGROUP already handed to this consumer.
-- KEYS[1] prefix
-- ARGV: consumer, now, max_deliveries, result_ttl, count, retry (1: a second try, after an
--       error kept the first from answering), then pairs: band, entry id (highest band first).
--       XREADGROUP's COUNT is per stream, so more than `count` may have been read: those past
--       `count` are put back on their stream for any worker.
local consumer, now, max_deliveries, ttl, count =
  ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local retry = ARGV[6] == '1'
-- Returns {bands, delivery, ...}: the bands as the script sees them, so a consumer learns new ones.
local out = {bands()}
for i = 7, #ARGV, 2 do
  local p, entry = ARGV[i], ARGV[i + 1]
  local s = stream_key(p)
  -- A second try skips the entries no longer this consumer's (reclaimed, or ended meanwhile).
  if not retry or #redis.call('XPENDING', s, GROUP, entry, entry, 1, consumer) > 0 then
    local found = redis.call('XRANGE', s, entry, entry)
    if #found == 0 then
      redis.call('XACK', s, GROUP, entry)  -- deleted meanwhile: nothing to run
    elseif #out - 1 >= count then
      put_back(s, p, entry, found[1][2])
    else
      local d = lean_delivery(p, entry, found[1][2]) or
        start(s, p, entry, found[1][2], consumer, now, max_deliveries, ttl)
      if d then out[#out + 1] = d end
    end
  end
end
return out
