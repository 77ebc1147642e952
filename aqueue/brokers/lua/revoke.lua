-- Set or clear a job's revoked flag.
-- KEYS[1] prefix
-- ARGV: job id, '1' to revoke or '0' to restore
-- Returns 1, or 0 when the job is unknown or final.
local jk = job_key(ARGV[1])
local state = redis.call('HGET', jk, 'state')
if not state or FINAL[state] then return 0 end
if ARGV[2] == '1' then redis.call('HSET', jk, 'revoked', '1', 'more', '1') else redis.call('HDEL', jk, 'revoked') end
return 1
