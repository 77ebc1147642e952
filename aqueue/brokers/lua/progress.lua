-- Store a running job's progress unless its token is stale.
-- KEYS[1] prefix
-- ARGV: job id, token, progress
local jk = job_key(ARGV[1])
if not live(jk, ARGV[2]) then return 0 end
redis.call('HSET', jk, 'progress', ARGV[3])
return 1
