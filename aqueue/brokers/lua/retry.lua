-- Take a job out of the dead letters and make it ready with a fresh attempt count.
-- KEYS[1] prefix
-- ARGV: job id, now
local id = ARGV[1]

-- Live again, a job is no longer counted as ended in its batch, nor in its chord while that has
-- not fired: they wait for its new end (a batch would otherwise fire its callbacks, or a chord
-- its callback with the old error, while the job runs again). Its batch is kept until then (one
-- kept by a skipped step lasted as long as the step's record: see settle_batch).
local function uncount(member, jk)
  local batch, chord, slot = unpack(redis.call('HMGET', jk, 'batch', 'chord', 'slot'))
  if batch and batch ~= '' then
    local bk = prefix .. 'batch:' .. batch
    redis.call('PERSIST', bk)
    local prev = redis.call('HGET', bk, 'm:' .. member)
    if prev then
      redis.call('HDEL', bk, 'm:' .. member)
      redis.call('HINCRBY', bk, 'ended', -1)
      if prev == 'succeeded' then redis.call('HINCRBY', bk, 'ok', -1) end
    end
  end
  if chord and chord ~= '' and slot and slot ~= '' then
    local ck = prefix .. 'chord:' .. chord
    if redis.call('HEXISTS', ck, 'fired') == 0 and redis.call('HDEL', ck, 's' .. slot) == 1 then
      redis.call('HINCRBY', ck, 'arrived', -1)
    end
  end
end

if redis.call('ZREM', prefix .. 'dead', id) == 0 then return 0 end
local jk = job_key(id)
if redis.call('EXISTS', jk) == 0 then return 0 end
-- A revoke or cancel asked for while it ran last is spent: retrying it is asking it to run.
redis.call('HDEL', jk, 'result', 'error', 'dead_reason', 'finished_at', 'started_at', 'worker',
  'progress', 'revoked', 'cancel', 'asked')
redis.call('HSET', jk, 'attempt', 1, 'deliveries', 0)
-- Live again, it takes its idempotency key back, unless another live job holds it by now.
local key = redis.call('HGET', jk, 'key')
if key and key ~= '' and not live_key_holder(key, ARGV[2]) then redis.call('SET', prefix .. 'key:' .. key, id) end
make_ready(id, jk, redis.call('HGET', jk, 'priority') or '0')
uncount(id, jk)
-- The steps its failure skipped wait for it again, so that its success runs them.
local following = redis.call('HGET', jk, 'next')
while following and following ~= '' do
  local nk = job_key(following)
  if redis.call('HGET', nk, 'skipped') ~= '1' then break end
  redis.call('HDEL', nk, 'skipped', 'error', 'finished_at')
  redis.call('HSET', nk, 'state', 'scheduled', 'waiting', '1')
  redis.call('PERSIST', nk)
  uncount(following, nk)
  following = redis.call('HGET', nk, 'next')
end
return 1
