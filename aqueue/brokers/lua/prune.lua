-- Forget index entries of jobs whose records have expired.
-- KEYS[1] prefix
-- ARGV: now, limit
-- Returns how many were forgotten (fewer than limit: none are left).
local ekey, ikey = prefix .. 'expiring', prefix .. 'index'
-- Entries acked outside a finish (wake-ups, jobs ended before they ran) leave their streams here.
for _, p in ipairs(redis.call('ZRANGE', prefix .. 'priorities', 0, -1)) do
  local s = stream_key(p)
  if redis.call('EXISTS', s) == 1 then trim_acked(s, last_delivered(s)) end
end
local ids = redis.call('ZRANGEBYSCORE', ekey, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids == 0 then return 0 end
for i = 1, #ids, 1000 do
  local chunk = {unpack(ids, i, math.min(i + 999, #ids))}
  redis.call('ZREM', ikey, unpack(chunk))
  redis.call('ZREM', ekey, unpack(chunk))
end
return #ids
