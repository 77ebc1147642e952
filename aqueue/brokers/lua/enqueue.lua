-- Store jobs and make each ready or scheduled.
-- KEYS[1] prefix
-- ARGV: now, then 7 per job: id, task, payload, priority, eta ('' = now), expires (''), key ('')
-- Returns the id each job lives under (an existing live job's id for a repeated idempotency key).
local now = ARGV[1]
local out = {}
for i = 2, #ARGV, 7 do
  local id, task, payload, p, eta, expires, key =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local live = nil
  if key ~= '' then
    local existing = redis.call('GET', prefix .. 'key:' .. key)
    if existing then
      local state = redis.call('HGET', job_key(existing), 'state')
      if state and not FINAL[state] then live = existing end
    end
  end
  local jk = job_key(id)
  if live then
    out[#out + 1] = live
  elseif redis.call('EXISTS', jk) == 1 then
    out[#out + 1] = id
  else
    redis.call('HSET', jk, 'task', task, 'payload', payload, 'priority', p, 'attempt', 1,
      'enqueued_at', now, 'token', 0, 'deliveries', 0, 'expires', expires, 'key', key)
    if eta ~= '' and tonumber(eta) > tonumber(now) then
      redis.call('HSET', jk, 'state', 'scheduled', 'eta', eta)
      redis.call('ZADD', prefix .. 'scheduled', eta, id)
    else
      make_ready(id, jk, p)
    end
    redis.call('ZADD', prefix .. 'index', now, id)
    if key ~= '' then redis.call('SET', prefix .. 'key:' .. key, id) end
    out[#out + 1] = id
  end
end
return out
