-- Cancel a job: at once when it waits, by request (pushed to its worker) when it runs.
-- KEYS[1] prefix
-- ARGV: job id, now, result_ttl
-- Returns 'cancelled', 'requested', or false (unknown or final).
local id, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local jk = job_key(id)
local state = redis.call('HGET', jk, 'state')
if not state or FINAL[state] then return false end
if state == 'pending' then
  local s, entry, lean, pending = queued_entry(jk)
  if lean and pending then
    state = 'running'  -- a lean delivery runs it (see lean_delivery)
  elseif entry and not pending then
    redis.call('XDEL', s, entry)  -- a lean entry would run when met, unchecked
  end
end
if state == 'running' then
  -- The flag outlives a missed message: `start` ends the job if it is delivered again.
  redis.call('HSET', jk, 'cancel', '1', 'more', '1')
  redis.pcall('PUBLISH', prefix .. 'cancel', id)  -- refused (no channel rights): the flag stands
  return 'requested'
end
if state == 'scheduled' then
  redis.call('ZREM', prefix .. 'scheduled', id)
  redis.call('HDEL', jk, 'waiting')  -- a pipeline step or chord callback: never activated now
end
finalize(id, jk, 'cancelled', now, ttl, nil)  -- an entry already delivered is dropped by `start`
return 'cancelled'
