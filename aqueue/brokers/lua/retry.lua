-- Take a job out of the dead letters and make it ready with a fresh attempt count.
-- KEYS[1] prefix
-- ARGV: job id, now
local id = ARGV[1]

if redis.call('ZREM', prefix .. 'dead', id) == 0 then return 0 end
local jk = job_key(id)
if redis.call('EXISTS', jk) == 0 then return 0 end
-- Live again, it takes its idempotency key back, unless another live job holds it by now.
local key = redis.call('HGET', jk, 'key')
if key and key ~= '' and not live_key_holder(key, ARGV[2]) then redis.call('SET', prefix .. 'key:' .. key, id) end
rearm(id, jk)
return 1
