-- Take a job out of the dead letters and make it ready with a fresh attempt count.
-- KEYS[1] prefix
-- ARGV: job id, now
local id = ARGV[1]
if redis.call('ZREM', prefix .. 'dead', id) == 0 then return 0 end
local jk = job_key(id)
if redis.call('EXISTS', jk) == 0 then return 0 end
-- A revoke or cancel asked for while it ran last is spent: retrying it is asking it to run.
redis.call('HDEL', jk, 'result', 'error', 'dead_reason', 'finished_at', 'started_at', 'worker',
  'progress', 'revoked', 'cancel')
redis.call('HSET', jk, 'attempt', 1, 'deliveries', 0)
-- Live again, it takes its idempotency key back, unless another live job holds it by now.
local key = redis.call('HGET', jk, 'key')
if key and key ~= '' and not live_key_holder(key) then redis.call('SET', prefix .. 'key:' .. key, id) end
make_ready(id, jk, redis.call('HGET', jk, 'priority') or '0')
-- The steps its failure skipped wait for it again, so that its success runs them.
local following = redis.call('HGET', jk, 'next')
while following and following ~= '' do
  local nk = job_key(following)
  if redis.call('HGET', nk, 'skipped') ~= '1' then break end
  redis.call('HDEL', nk, 'skipped', 'error', 'finished_at')
  redis.call('HSET', nk, 'state', 'scheduled', 'waiting', '1')
  redis.call('PERSIST', nk)
  -- A batch member: its batch was kept as long as the step's record (see settle_batch).
  local batch = redis.call('HGET', nk, 'batch')
  if batch and batch ~= '' then redis.call('PERSIST', prefix .. 'batch:' .. batch) end
  following = redis.call('HGET', nk, 'next')
end
return 1
