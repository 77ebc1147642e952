-- Take over entries whose lease lapsed (their worker died) and lease them to this consumer.
-- KEYS[1] prefix
-- ARGV: consumer, count, now, max_deliveries, result_ttl, min_idle_ms
-- XPENDING IDLE finds lapsed entries anywhere in the pending list (XAUTOCLAIM from 0-0 would only
-- look at the first 10 x COUNT entries); XCLAIM re-checks the idle time, so two workers reclaiming
-- at once cannot both take one entry.
local consumer, count, now, max_deliveries, ttl, min_idle =
  ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local out = {}
for _, p in ipairs(bands()) do
  if #out >= count then break end
  local s = stream_key(p)
  local lapsed = redis.call('XPENDING', s, GROUP, 'IDLE', min_idle, '-', '+', count - #out)
  if #lapsed > 0 then
    local ids = {}
    for _, e in ipairs(lapsed) do ids[#ids + 1] = e[1] end
    -- Entries deleted from the stream while pending are dropped from the list by XCLAIM.
    for _, e in ipairs(redis.call('XCLAIM', s, GROUP, consumer, min_idle, unpack(ids))) do
      if e then
        local d = start(s, p, e[1], e[2], consumer, now, max_deliveries, ttl)
        if d then out[#out + 1] = d end
      end
    end
  end
end
return out
