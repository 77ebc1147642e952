-- Make due scheduled jobs ready. Safe from many workers at once: ZREM decides who moves a job.
-- KEYS[1] prefix
-- ARGV: now, limit
-- Returns the eta of the earliest job still scheduled, or false.
local now, limit = ARGV[1], tonumber(ARGV[2])
local zkey = prefix .. 'scheduled'
for _, id in ipairs(redis.call('ZRANGEBYSCORE', zkey, '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', zkey, id)
  local jk = job_key(id)
  local rec = redis.call('HMGET', jk, 'state', 'priority')
  if rec[1] == 'scheduled' then make_ready(id, jk, rec[2]) end
end
local nxt = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
if #nxt == 0 then return false end
return nxt[2]
