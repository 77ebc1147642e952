-- Shared by every script (prepended when loaded).
-- KEYS[1] is the queue's key prefix "aqueue:{name}:"; every key is derived from it, so all of them
-- share its hash tag and cluster slot.
local prefix = KEYS[1]
local GROUP = 'workers'
local FINAL = {succeeded = true, failed = true, cancelled = true, revoked = true, expired = true}

local function job_key(id) return prefix .. 'job:' .. id end
local function stream_key(p) return prefix .. 'stream:' .. p end
local function done_channel(id) return prefix .. 'done:' .. id end

-- The stream of a priority band, created with its consumer group on first use. A new band also
-- drops a 'wake' entry into band 0, so a worker blocked on the bands it knew learns of it.
local function ensure_stream(p)
  local s = stream_key(p)
  if redis.call('EXISTS', s) == 0 then
    redis.call('XGROUP', 'CREATE', s, GROUP, '0', 'MKSTREAM')
    redis.call('ZADD', prefix .. 'priorities', tonumber(p), p)
    if p ~= '0' then
      local s0 = stream_key('0')
      if redis.call('EXISTS', s0) == 0 then
        redis.call('XGROUP', 'CREATE', s0, GROUP, '0', 'MKSTREAM')
        redis.call('ZADD', prefix .. 'priorities', 0, '0')
      end
      redis.call('XADD', s0, '*', 'wake', p)
    end
  end
  return s
end

-- Whether `token` names the job's current, still running delivery.
local function live(jk, token)
  local rec = redis.call('HMGET', jk, 'token', 'state')
  return rec[1] == token and rec[2] == 'running'
end

local function drop_entry(s, entry)
  redis.call('XACK', s, GROUP, entry)
  redis.call('XDEL', s, entry)
end

-- Put a job on its band's stream, ready for any worker.
local function make_ready(id, jk, p)
  local entry = redis.call('XADD', ensure_stream(p), '*', 'id', id)
  redis.call('HSET', jk, 'state', 'pending', 'entry', entry)
end

-- A final state: free the idempotency key, wake waiters; dead letters are kept, others expire.
local function finalize(id, jk, state, now, ttl, reason)
  redis.call('HSET', jk, 'state', state, 'finished_at', now)
  local key = redis.call('HGET', jk, 'key')
  if key and key ~= '' and redis.call('GET', prefix .. 'key:' .. key) == id then
    redis.call('DEL', prefix .. 'key:' .. key)
  end
  if state == 'failed' then
    if reason and reason ~= '' then redis.call('HSET', jk, 'dead_reason', reason) end
    redis.call('ZADD', prefix .. 'dead', now, id)
  else
    redis.call('EXPIRE', jk, math.max(1, math.ceil(ttl)))
  end
  redis.call('PUBLISH', done_channel(id), state)
end

-- Lease one stream entry (already in this consumer's pending list) to the worker. Returns the
-- delivery as an array, or nil when the entry is dropped instead (a wake-up, a malformed message,
-- an expired or already final job, or one past max_deliveries).
local function start(s, p, entry, fields, consumer, now, max_deliveries, ttl)
  local id = nil
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then id = fields[i + 1] elseif fields[i] == 'wake' then id = false end
  end
  if id == false then drop_entry(s, entry) return nil end
  if id == nil then
    -- Not ours to interpret: keep it as a dead letter with the reason.
    drop_entry(s, entry)
    local dead_id = 'entry-' .. entry
    redis.call('HSET', job_key(dead_id), 'task', '', 'payload', cjson.encode(fields), 'priority', p,
      'attempt', 1, 'enqueued_at', now, 'token', 0, 'deliveries', 1)
    finalize(dead_id, job_key(dead_id), 'failed', now, ttl, 'malformed stream entry: no job id')
    return nil
  end
  local jk = job_key(id)
  local rec = redis.call('HMGET', jk, 'state', 'task', 'payload', 'attempt', 'enqueued_at',
    'expires', 'deliveries', 'token', 'entry')
  if not rec[1] then
    drop_entry(s, entry)
    redis.call('HSET', jk, 'task', '', 'payload', '', 'priority', p, 'attempt', 1,
      'enqueued_at', now, 'token', 0, 'deliveries', 1)
    finalize(id, jk, 'failed', now, ttl, 'no job record for stream entry ' .. entry)
    return nil
  end
  if rec[9] ~= entry or FINAL[rec[1]] then
    -- A leftover entry: the job was finished, or put on a stream again, since.
    drop_entry(s, entry)
    return nil
  end
  if rec[6] and rec[6] ~= '' and tonumber(rec[6]) < tonumber(now) then
    drop_entry(s, entry)
    finalize(id, jk, 'expired', now, ttl, nil)
    return nil
  end
  local deliveries = tonumber(rec[7] or '0') + 1
  if deliveries > tonumber(max_deliveries) then
    drop_entry(s, entry)
    redis.call('HSET', jk, 'deliveries', deliveries)
    finalize(id, jk, 'failed', now, ttl, 'delivered ' .. deliveries ..
      ' times without finishing (max_deliveries=' .. max_deliveries .. ')')
    return nil
  end
  local token = tonumber(rec[8] or '0') + 1
  redis.call('HSET', jk, 'state', 'running', 'started_at', now, 'worker', consumer,
    'deliveries', deliveries, 'token', token)
  return {id, rec[2], rec[3], rec[4], tostring(token), p, rec[5], entry}
end

-- Priority bands, highest first; band 0 always exists.
local function bands()
  ensure_stream('0')
  return redis.call('ZREVRANGE', prefix .. 'priorities', 0, -1)
end
