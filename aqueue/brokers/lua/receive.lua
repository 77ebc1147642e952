-- Lease up to `count` ready jobs to a consumer, highest band first, without blocking.
-- KEYS[1] prefix
-- ARGV: consumer, count, now, max_deliveries, result_ttl
-- Returns {bands, delivery, delivery, ...}: the bands let the caller block on every stream.
local consumer, count, now, max_deliveries, ttl =
  ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), ARGV[5]
local all = bands()
local out = {all}
for _, p in ipairs(all) do
  local s = stream_key(p)
  while #out - 1 < count do
    local reply = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', count - (#out - 1),
      'STREAMS', s, '>')
    if not reply or not reply[1] or #reply[1][2] == 0 then break end
    for _, e in ipairs(reply[1][2]) do
      local d = lean_delivery(p, e[1], e[2]) or
        start(s, p, e[1], e[2], consumer, now, max_deliveries, ttl)
      if d then out[#out + 1] = d end
    end
  end
  if #out - 1 >= count then break end
end
return out
