-- Take over entries whose lease lapsed (their worker died) and lease them to this consumer.
-- KEYS[1] prefix
-- ARGV: consumer, count, now, max_deliveries, result_ttl, min_idle_ms
local consumer, count, now, max_deliveries, ttl, min_idle =
  ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local out = {}
for _, p in ipairs(bands()) do
  if #out >= count then break end
  local s = stream_key(p)
  local reply = redis.call('XAUTOCLAIM', s, GROUP, consumer, min_idle, '0-0', 'COUNT', count - #out)
  for _, e in ipairs(reply[2]) do
    local d = start(s, p, e[1], e[2], consumer, now, max_deliveries, ttl)
    if d then out[#out + 1] = d end
  end
  -- Entries deleted from the stream while pending: nothing left to run.
  for _, entry in ipairs(reply[3] or {}) do redis.call('XACK', s, GROUP, entry) end
end
return out
