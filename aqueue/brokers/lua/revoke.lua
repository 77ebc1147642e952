-- Set or clear a job's revoked flag.
-- KEYS[1] prefix
-- ARGV: job id, '1' to revoke or '0' to restore
-- Returns 1, or 0 when the job is unknown or final.
local id = ARGV[1]
local jk = job_key(id)
local state = redis.call('HGET', jk, 'state')
if not state or FINAL[state] then return 0 end
if ARGV[2] == '1' and state == 'pending' then
  -- A lean entry is not checked when met: the job waits on a plain one instead, at the back.
  local s, entry, lean, pending = queued_entry(jk)
  if lean and not pending then
    redis.call('XDEL', s, entry)
    make_ready(id, jk, redis.call('HGET', jk, 'priority') or '0')
  end
end
if ARGV[2] == '1' then redis.call('HSET', jk, 'revoked', '1', 'more', '1') else redis.call('HDEL', jk, 'revoked') end
return 1
