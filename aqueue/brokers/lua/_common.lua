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

-- Store a new job, ready now or scheduled for its eta. Returns the id it lives under: an existing
-- live job's id when the idempotency key names one.
local function store_job(now, id, task, payload, p, eta, expires, key)
  if key ~= '' then
    local existing = redis.call('GET', prefix .. 'key:' .. key)
    if existing then
      local state = redis.call('HGET', job_key(existing), 'state')
      if state and not FINAL[state] then return existing end
    end
  end
  local jk = job_key(id)
  if redis.call('EXISTS', jk) == 1 then return id end
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
  return id
end

-- Whether a task is revoked now; a revocation for one job only is used up here.
-- Stored as "<once 0|1>|<until or empty>".
local function task_revoked(task, now)
  local hkey = prefix .. 'revoked_tasks'
  local v = redis.call('HGET', hkey, task)
  if not v then return false end
  local once, till = string.match(v, '^(%d)|(.*)$')
  if till ~= '' and tonumber(till) <= tonumber(now) then
    redis.call('HDEL', hkey, task)
    return false
  end
  if once == '1' then redis.call('HDEL', hkey, task) end
  return true
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
    'expires', 'deliveries', 'token', 'entry', 'revoked', 'cancel')
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
  -- Ended here rather than run: the worker gets a notice (9th field) so it can report it.
  local ended = nil
  if rec[11] == '1' then
    ended = 'cancelled'
  elseif rec[10] == '1' or task_revoked(rec[2], now) then
    ended = 'revoked'
  elseif rec[6] and rec[6] ~= '' and tonumber(rec[6]) < tonumber(now) and (rec[8] or '0') == '0' then
    -- `expires` is about starting: a job that already started is never expired afterwards
    ended = 'expired'
  end
  if ended then
    drop_entry(s, entry)
    finalize(id, jk, ended, now, ttl, nil)
    return {id, rec[2], '', rec[4], '0', p, rec[5], entry, ended}
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
