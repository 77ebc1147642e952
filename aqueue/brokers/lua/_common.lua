-- Helpers for the scripts. Each script is loaded with the blocks here that it uses, directly or
-- through another block, in this order (see _scripts.py): so a block is a definition with its
-- comment, and blocks are separated by blank lines, never containing one.
-- KEYS[1] is the queue's key prefix "aqueue:{name}:"; every key is derived from it, so all of them
-- share its hash tag and cluster slot.
local prefix = KEYS[1]
local GROUP = 'workers'

-- A block of its own, as each helper is: a table costs every call of a script that carries it.
local FINAL = {succeeded = true, failed = true, cancelled = true, revoked = true, expired = true}

-- A stream id's greatest sequence: `unread` moves a group back to it, in the millisecond before an
-- entry that is its millisecond's first. Past what a Lua number holds exactly: kept as a string.
local MAX_SEQ = '18446744073709551615'

local function job_key(id) return prefix .. 'job:' .. id end
local function stream_key(p) return prefix .. 'stream:' .. p end

local function done_channel(waiter) return prefix .. 'done:' .. waiter end

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

-- Whether `token` is a lean delivery's (see `lean_delivery`), still the job's: it holds token 1
-- of a record that stays 'pending', with token 0, until the job ends.
local function lean_live(token, record_token, state)
  return token == '1' and record_token == '0' and state == 'pending'
end

-- Whether `token` names the job's current, still running delivery: returns the record's state
-- then, else false.
local function live(jk, token)
  local rec = redis.call('HMGET', jk, 'token', 'state')
  if rec[2] == 'running' then return rec[1] == token and 'running' end
  return lean_live(token, rec[1], rec[2]) and 'pending'
end

-- `command key [group] items...` for many items, 1000 at a time: unpack is bounded by Lua's stack.
local function call_chunked(items, command, key, group)
  for j = 1, #items, 1000 do
    local last = math.min(j + 999, #items)
    if group then
      redis.call(command, key, group, unpack(items, j, last))
    else
      redis.call(command, key, unpack(items, j, last))
    end
  end
end

-- An entry is done with: acked here, and trimmed off its stream by `trim_acked` (a trim per
-- batch costs less than an XDEL per entry).
local function drop_entry(s, entry)
  return redis.call('XACK', s, GROUP, entry)
end

-- Stream ids compare as (ms, seq) pairs. Two ids of one length with the dash at one place compare
-- as their strings do, digit by digit: no parsing (a finish compares each entry it acks, and
-- parsing both ids cost a tenth of the finish).
local function id_after(a, b)
  if #a == #b then
    local dash = string.find(b, '-', 1, true)
    if string.byte(a, dash) == 45 then return a > b end  -- 45: '-'
  end
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams > bms or (ams == bms and tonumber(aseq) > tonumber(bseq))
end

-- The group's progress on a stream: the newest entry it has delivered ('0-0': none yet; every
-- older entry was delivered too, as the group hands entries out in order, so it is now either
-- pending or done with), and how many entries it has yet to read and has read: false where Redis
-- cannot tell (before Redis 7, or after a deletion ahead of what the group read, until it reads
-- past it).
local function group_progress(s)
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', s)) do
    local name, last, lag, read = nil, nil, false, false
    for j = 1, #group, 2 do
      local field = group[j]
      if field == 'name' then name = group[j + 1]
      elseif field == 'last-delivered-id' then last = group[j + 1]
      elseif field == 'lag' then lag = group[j + 1]
      elseif field == 'entries-read' then read = group[j + 1] end
    end
    if name == GROUP then return last, lag, read end
  end
  return '0-0', false, false
end

-- Trim the entries of a stream that are done with: those older than both the newest the group
-- has delivered and the oldest still pending. What was delivered and is not pending was acked.
-- Entries acked behind a job still pending (a long one) wait for the trim that follows its end,
-- which drops them a node at a time. Deleting one sooner costs Redis a scan of its node (XDEL:
-- about 20k instructions an entry), and under two workers most entries end behind the other's
-- batch. Once more than `keep` wait, `acked` (the entries just acked, optional) are deleted at
-- once instead, in one XDEL, so that a long job does not hold back a stream's ended entries
-- until it ends. The count is unknown where the lag is (see group_progress): deleted then.
local function trim_acked(s, acked, keep)
  local read, lag = group_progress(s)
  if read == '0-0' then return end
  local ms, seq = string.match(read, '^(%d+)-(%d+)$')
  local floor
  if seq == MAX_SEQ then  -- where `unread` moved the group: the next millisecond's first id
    floor = string.format('%d', tonumber(ms) + 1) .. '-0'
  else
    floor = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
  end
  local pending = redis.call('XPENDING', s, GROUP)
  if pending[1] > 0 and id_after(floor, pending[2]) then
    floor = pending[2]
    -- Waiting: in the stream and delivered (not still to read), and not pending.
    if acked and not (lag and redis.call('XLEN', s) - lag - pending[1] <= keep) then
      local behind = {}
      for _, entry in ipairs(acked) do
        if id_after(entry, floor) then behind[#behind + 1] = entry end
      end
      call_chunked(behind, 'XDEL', s)
    end
  end
  redis.call('XTRIM', s, 'MINID', floor)
end

-- EXPIRE's argument for a ttl: whole seconds, at least 1, formatted once per script call (a
-- number handed to redis.call is printed with "%.17g" every time).
local expire_args = {}
local function expire_arg(ttl)
  local arg = expire_args[ttl]
  if not arg then
    arg = string.format('%d', math.max(1, math.ceil(ttl)))
    expire_args[ttl] = arg
  end
  return arg
end

-- Append name/value pairs to a list of HSET arguments.
local function with(fields, ...)
  local more = {...}
  for i = 1, #more do fields[#fields + 1] = more[i] end
  return fields
end

-- Add an entry of these fields to a band's stream; returns its id. NOMKSTREAM: a band's stream
-- is only ever made with its group, by ensure_stream.
local function add_entry(p, ...)
  return redis.call('XADD', stream_key(p), 'NOMKSTREAM', '*', ...) or
    redis.call('XADD', ensure_stream(p), '*', ...)
end

-- Put a job on its band's stream, ready for any worker; `fields` are more record fields to write
-- in the same HSET. A new record's fields start with its state, already 'pending'. `lean`
-- ({task, payload, enqueued_at}, for a new job only) makes the entry lean: it carries what the
-- worker needs, so that its first delivery need not read or write the record.
local function make_ready(id, jk, p, fields, lean)
  local entry
  if lean then
    entry = add_entry(p, 'id', id, 'task', lean[1], 'payload', lean[2], 'at', lean[3])
  else
    entry = add_entry(p, 'id', id)
  end
  fields = fields or {}
  local n = #fields
  if fields[1] ~= 'state' then
    fields[n + 1], fields[n + 2], n = 'state', 'pending', n + 2
  end
  fields[n + 1], fields[n + 2] = 'entry', entry
  redis.call('HSET', jk, unpack(fields))
end

-- An entry read past what the consumer asked for (XREADGROUP's COUNT is per stream): off the
-- pending list, and its job back on its stream, at the back, for any worker. `fields`: the entry's.
-- Only a job still waiting goes back: one cancelled (or otherwise ended) meanwhile stays ended.
local function put_back(s, p, entry, fields)
  drop_entry(s, entry)
  local id = nil
  for j = 1, #fields, 2 do if fields[j] == 'id' then id = fields[j + 1] end end
  local jk = id and job_key(id)
  if not jk then return end
  local rec = redis.call('HMGET', jk, 'entry', 'state')
  if rec[1] == entry and rec[2] == 'pending' then make_ready(id, jk, p) end
end

-- Entries read past what the consumer asked for, the last a read took from a stream (`rows`:
-- {entry id, fields or nil where deleted}, oldest first), handed back unread: they keep their
-- place, ahead of the entries after them. The group's position moves back to just before them,
-- unless someone read past them since, or the span holds entries not theirs (delivered
-- elsewhere, or done with): then each goes back at the stream's end (put_back). A wake-up entry
-- after them wakes a worker blocked on the stream, as an entry put back would.
local function unread(s, p, rows)
  local first, last = rows[1][1], rows[#rows][1]
  local ours = {}
  for _, row in ipairs(rows) do ours[row[1]] = true end
  local delivered, _, read = group_progress(s)
  local movable = delivered == last
  if movable then
    for _, e in ipairs(redis.call('XRANGE', s, first, last, 'COUNT', #rows + 1)) do
      if not ours[e[1]] then movable = false end
    end
  end
  if movable then
    -- A lean entry is run unchecked when read again; its job, taken for delivered, may have been
    -- flagged meanwhile (a cancel, a revoke): it goes back plain, for `start` to see the flag.
    -- Only a record that may hold rare fields (`more`) is looked at for the flags.
    for _, row in ipairs(rows) do
      local f = row[2]
      if f and f[3] == 'task' then
        local jk = job_key(f[2])
        if redis.call('HGET', jk, 'more') == '1' then
          local flags = redis.call('HMGET', jk, 'cancel', 'revoked')
          if flags[1] == '1' or flags[2] == '1' then movable = false end
        end
      end
    end
  end
  if not movable then
    for _, row in ipairs(rows) do
      if row[2] then put_back(s, p, row[1], row[2]) else drop_entry(s, row[1]) end
    end
    return
  end
  local ids = {}
  for j, row in ipairs(rows) do ids[j] = row[1] end
  call_chunked(ids, 'XACK', s, GROUP)
  local ms, seq = string.match(first, '^(%d+)-(%d+)$')
  local before
  if seq == '0' then
    before = string.format('%d', tonumber(ms) - 1) .. '-' .. MAX_SEQ
  else
    before = ms .. '-' .. string.format('%d', tonumber(seq) - 1)
  end
  -- The count read is kept known: unknown, the lag is counted again only once the group reads
  -- to the stream's end, and the trims meanwhile delete each entry as it ends (see trim_acked).
  if read then
    redis.call('XGROUP', 'SETID', s, GROUP, before, 'ENTRIESREAD', read - #rows)
  else
    redis.call('XGROUP', 'SETID', s, GROUP, before)
  end
  redis.call('XADD', s, '*', 'wake', p)
end

-- A new job's score in the index: its enqueue time in whole microseconds. The jobs one call stores
-- share its `now`, and a zset orders equal scores by member (random ids): each gets a microsecond
-- more than the one stored before it in the call, so that listings keep the order they were
-- enqueued in. Made an integer string here: a Lua number given to redis.call is written with
-- "%.17g", which cost Redis 5 to 9% more per enqueue.
local written, written_at, base = 0, nil, 0
local function in_order(now)
  if now ~= written_at then
    written_at, base = now, math.floor(tonumber(now) * 1e6 + 0.5)
  end
  written = written + 1
  return string.format('%d', base + written)
end
-- One enqueue split into calls: this call's jobs come after the `first` ones stored before it.
local function in_order_after(first)
  written = tonumber(first)
end

-- Store a plain new job (no key, eta, expiry or workflow link) and make it ready with a lean
-- entry: store_job's common case, written out without its tables, as most jobs take it. The
-- record's fields are store_job's, in its order, with `more` 0. A job already stored under the id
-- is left as it is.
local function store_plain(now, id, task, payload, p)
  local jk = job_key(id)
  if redis.call('EXISTS', jk) == 1 then return end
  local entry = add_entry(p, 'id', id, 'task', task, 'payload', payload, 'at', now)
  redis.call('HSET', jk, 'state', 'pending', 'token', '0', 'more', '0', 'task', task,
    'payload', payload, 'priority', p, 'attempt', '1', 'enqueued_at', now, 'entry', entry)
  redis.call('ZADD', prefix .. 'index', in_order(now), id)
end

-- Whether a job's expiry still holds, from its record's token and 'unstarted' mark: it was never
-- delivered, or handed back by workers that never ran it. `expires` is about starting: a job that
-- started is never expired afterwards.
local function never_started(token, unstarted)
  return (token or '0') == '0' or unstarted == '1'
end

-- A job's stream entry, as the record names it, and where it stands: returns the stream, the
-- entry id, whether the entry is lean, and its row in the pending list (delivered, not done
-- with) or nil. Nil when the record names no entry.
local function queued_entry(jk)
  local rec = redis.call('HMGET', jk, 'entry', 'priority')
  if not rec[1] or rec[1] == '' then return nil end
  local s, entry = stream_key(rec[2] or '0'), rec[1]
  local found = redis.call('XRANGE', s, entry, entry)[1]
  local pending = redis.call('XPENDING', s, GROUP, entry, entry, 1)[1]
  return s, entry, found ~= nil and found[2][3] == 'task', pending
end

-- A job whose record says 'pending' may be running all the same, on a lean delivery (see
-- `lean_delivery`): returns that delivery's row in the pending list, or nil when none runs it.
local function lean_running(jk)
  local _, _, lean, pending = queued_entry(jk)
  if lean then return pending end
  return nil
end

-- The live job an idempotency key names, if any (the key's entry may outlive its job's end). A
-- job past its expiry that never started is not: it ends expired when met, and never runs. Nor is
-- one revoked that no worker holds (its entry not delivered, or none): it ends revoked when met.
-- One revoked while a worker holds it may be running, and runs on: it keeps the key.
local function live_key_holder(key, now)
  local holder = redis.call('GET', prefix .. 'key:' .. key)
  if not holder then return nil end
  local jk = job_key(holder)
  local rec = redis.call('HMGET', jk, 'state', 'expires', 'token', 'unstarted', 'revoked')
  if not rec[1] or FINAL[rec[1]] then return nil end
  local expires = rec[2] and rec[2] ~= '' and tonumber(rec[2])  -- unreadable: dead-lettered when met
  if expires and expires < tonumber(now) and never_started(rec[3], rec[4]) then return nil end
  if rec[5] == '1' and rec[1] ~= 'running' then
    local _, _, _, held = queued_entry(jk)
    if not held then return nil end
  end
  return holder
end

-- Store a new job, ready now or scheduled for its eta. Returns the id it lives under: an existing
-- live job's id when the idempotency key names one. `extra` holds more record fields (workflow
-- links); with waiting = '1' among them the job waits, neither ready nor scheduled, until a
-- workflow step activates it.
local function store_job(now, id, task, payload, p, eta, expires, key, extra)
  if key == '' and expires == '' and not (extra and #extra > 0) and
      (eta == '' or tonumber(eta) <= tonumber(now)) then
    store_plain(now, id, task, payload, p)
    return id
  end
  if key ~= '' then
    local existing = live_key_holder(key, now)
    if existing then return existing end
  end
  local jk = job_key(id)
  if redis.call('EXISTS', jk) == 1 then return id end
  -- One HSET for the whole record; empty fields are left out (a missing field reads as empty).
  -- The fields every start and finish read come first, where a small record (a listpack) finds
  -- them soonest; a start then overwrites them in place. `more` says whether the record may hold
  -- fields that are usually missing (an expiry, a key, workflow links; later a waiter, an error,
  -- a cancel or revoke flag): only then do a start and a finish look them up, as looking up a
  -- missing field costs a scan of the whole record.
  local more, waiting = '0', false
  if key ~= '' or expires ~= '' or (extra and #extra > 0) then more = '1' end
  local fields = {'state', 'pending', 'token', '0', 'more', more, 'task', task,
    'payload', payload, 'priority', p, 'attempt', '1', 'enqueued_at', now}
  if expires ~= '' then with(fields, 'expires', expires) end
  if key ~= '' then with(fields, 'key', key) end
  for i = 1, #(extra or {}), 2 do
    with(fields, extra[i], extra[i + 1])
    if extra[i] == 'waiting' then waiting = true end
  end
  local scheduled = waiting or (eta ~= '' and tonumber(eta) > tonumber(now))
  if scheduled then fields[2] = 'scheduled' end
  if waiting then
    redis.call('HSET', jk, unpack(fields))
  elseif scheduled then
    redis.call('HSET', jk, unpack(with(fields, 'eta', eta)))
    redis.call('ZADD', prefix .. 'scheduled', eta, id)
  elseif expires == '' then
    make_ready(id, jk, p, fields, {task, payload, now})
  else
    -- An expiry is checked when the job starts: that needs the record, so a plain entry.
    make_ready(id, jk, p, fields)
  end
  redis.call('ZADD', prefix .. 'index', in_order(now), id)
  if key ~= '' then redis.call('SET', prefix .. 'key:' .. key, id) end
  return id
end

-- A waiting job (a pipeline step, a chord callback) becomes ready, with a new payload if given.
-- Once only: a job that is not waiting is left as it is.
local function activate(id, payload)
  local jk = job_key(id)
  if redis.call('HGET', jk, 'waiting') ~= '1' then return end
  redis.call('HDEL', jk, 'waiting')
  if payload and payload ~= '' then redis.call('HSET', jk, 'payload', payload) end
  make_ready(id, jk, redis.call('HGET', jk, 'priority') or '0')
end

-- Payloads are written by aqueue with "args" first: put a value in front of the arguments.
local ARGS_HEAD = '{"args":['
local function prepend_arg(payload, value)
  local rest = string.sub(payload, #ARGS_HEAD + 1)
  if string.sub(rest, 1, 1) == ']' then return ARGS_HEAD .. value .. rest end
  return ARGS_HEAD .. value .. ',' .. rest
end

local ERROR_HEAD = '{"__aqueue_error__":'
local function error_marker(err)
  if not err or err == '' then err = '{}' end
  return ERROR_HEAD .. err .. '}'
end

-- TaskError metadata for an error that ended a job without running it: no frames of its own.
local function error_metadata(id, attempt, kind, err)
  return cjson.encode({error = err, type = kind, traceback = '', job_id = id,
    attempt = tonumber(attempt) or 1, retries_left = 0})
end

-- The error of a stream entry that cannot be read as a job (another writer's): a message that
-- cannot be decoded, as the worker says of a payload it cannot read. Its id may be bytes that are
-- no UTF-8, which no JSON reader takes: past ASCII they are written as Python escapes them.
local function unreadable_error(id, reason)
  local shown = string.gsub(id, '[\128-\255]', function(c)
    return string.format('\\x%02x', string.byte(c))
  end)
  return error_metadata(shown, 1, 'SerializationError', "SerializationError('" .. reason .. "')")
end

-- The error that stands for a job that ended without one of its own (in its chord slot, in the
-- pipeline steps it skipped, for its error handler): TaskError metadata with every key; a
-- cancelled, revoked or expired job's names the ending as `job.result()` would (no table of names:
-- a table costs every call of a script that carries it), a failed one's why it died (`reason`).
local function ending_error(id, state, attempt, reason)
  local kind, err = '', 'failed'
  if state == 'cancelled' then kind = 'JobCancelled'
  elseif state == 'revoked' then kind = 'JobRevoked'
  elseif state == 'expired' then kind = 'JobExpired' end
  if kind ~= '' then err = kind .. "('job " .. id .. ' was ' .. state .. "')"
  elseif reason and reason ~= '' then err = reason end
  return error_metadata(id, attempt, kind, err)
end

-- Whether any task is revoked: asked once per script call (a receive asks for every job it
-- leases), so that when none is, one EXISTS answers for every job.
local revocations_checked, any_revocations = false, false
local function revocations_exist()
  if not revocations_checked then
    revocations_checked = true
    any_revocations = redis.call('EXISTS', prefix .. 'revoked_tasks') == 1
  end
  return any_revocations
end

-- Whether a record's count (attempt, deliveries, token) or time (enqueued_at, expires, a
-- revocation's until) reads as aqueue writes it, in Lua and in Python alike (Lua alone reads
-- "0x10", and reads "nan" as a number no comparison holds for); a missing one does.
local function count_field(v) return not v or (#v <= 15 and string.find(v, '^%d+$') ~= nil) end
local function number_field(v)
  local x = v and tonumber(v)
  return not v or (x ~= nil and x == x and not string.find(v, '[xX]'))
end

-- For the delivery of a run after a retry (its 11th field): the retries the job asked for
-- (`RetryTask`), which use none of the task's. A first attempt has asked for none, and is not
-- read; a count another program wrote, unreadable, counts as none.
local function asked_of(jk, attempt)
  if attempt == '1' then return nil end
  local asked = redis.call('HGET', jk, 'asked')
  if asked and count_field(asked) then return asked end
  return nil
end

-- Whether a task is revoked now; a revocation for one job only is used up here.
-- Stored as "<once 0|1>|<until or empty>". Answers are kept for the rest of the script call.
local revoked_known = {}
local function task_revoked(task, now)
  local hkey = prefix .. 'revoked_tasks'
  if not revocations_exist() then return false end
  if revoked_known[task] ~= nil then return revoked_known[task] end
  local v = redis.call('HGET', hkey, task)
  local revoked, once = false, false
  if v then
    local once_flag, till = string.match(v, '^([01])|(.*)$')
    if till and till ~= '' then till = number_field(till) and tonumber(till) end
    if not till then
      redis.call('HDEL', hkey, task)  -- not a revocation aqueue wrote (another writer's): dropped
    elseif till ~= '' and till <= tonumber(now) then
      redis.call('HDEL', hkey, task)
    else
      revoked, once = true, once_flag == '1'
      if once then redis.call('HDEL', hkey, task) end
    end
  end
  revoked_known[task] = revoked and not once  -- a revocation for one job is used up by this one
  return revoked
end

local finalize

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

-- Ready again with a fresh attempt count: a dead letter retried, or a chord's callback run again
-- with a retried member's new value (`payload`). The steps its failure skipped wait for it again,
-- so that its success runs them. A revoke or cancel asked for while it ran last is spent, as
-- running it again is asking it to; but not with `asks_stand` (a run again that no one asked for,
-- see `fresh`): it is revoked or cancelled when met, as a retry is.
local function rearm(id, jk, payload, asks_stand)
  redis.call('ZREM', prefix .. 'dead', id)
  redis.call('HDEL', jk, 'result', 'error', 'dead_reason', 'finished_at', 'started_at', 'worker',
    'progress', 'asked', 'fresh')
  if not asks_stand then redis.call('HDEL', jk, 'revoked', 'cancel') end
  redis.call('HSET', jk, 'attempt', 1, 'deliveries', 0)
  if payload then redis.call('HSET', jk, 'payload', payload) end
  redis.call('PERSIST', jk)
  make_ready(id, jk, redis.call('HGET', jk, 'priority') or '0')
  uncount(id, jk)
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
end

-- A chord's values as its callback's first argument (JSON, in member order), and whether an
-- error stands among them.
local function chord_values(ck, size)
  local parts, failed = {}, false
  for i = 0, tonumber(size) - 1 do
    local part = redis.call('HGET', ck, 's' .. i)
    parts[#parts + 1] = part
    if string.sub(part, 1, #ERROR_HEAD) == ERROR_HEAD then failed = true end
  end
  return '[' .. table.concat(parts, ',') .. ']', failed
end

-- A fired chord's callback given its values anew, a retried member having succeeded: one that
-- ended succeeded or failed runs again with them; one that has not started (or waits for its
-- retry) runs with them; one running now runs again with them once it ends succeeded or failed.
-- One cancelled, revoked or expired is not run. `fresh` is the first delivery token to carry the
-- payload as it stands: the end of an earlier delivery is not the job's (see finish.lua).
local function refire(callback, payload)
  local jk = job_key(callback)
  local state, token = unpack(redis.call('HMGET', jk, 'state', 'token'))
  if state == 'succeeded' or state == 'failed' then
    rearm(callback, jk, payload)
  elseif state == 'pending' or state == 'scheduled' then
    redis.call('HSET', jk, 'payload', payload)
  elseif state == 'running' then
    redis.call('HSET', jk, 'payload', payload, 'more', '1',
      'fresh', string.format('%d', (tonumber(token) or 0) + 1))
  end
end

-- Whether a delivery holding `token` started before the job's payload last changed (see refire).
local function outdated(jk, token)
  local fresh = redis.call('HGET', jk, 'fresh')
  return (fresh and tonumber(token) < tonumber(fresh)) or false
end

-- A chord member ended: its value (or its error) fills its slot, counted once; the last one to
-- arrive fires the callback with every value in member order. A member retried from the dead
-- letters may replace its error with a value, without being counted again: after the callback
-- fired, the callback is given every value as it stands (see refire). Once fired, what fills a
-- chord is kept `ttl` (from its last firing) while a slot holds an error, and goes as soon as none
-- does.
local function chord_arrive(cid, slot, value, ttl)
  local ck = prefix .. 'chord:' .. cid
  local size = redis.call('HGET', ck, 'size')
  if not size then return end
  local field = 's' .. slot
  local old = redis.call('HGET', ck, field)
  if old and string.sub(old, 1, #ERROR_HEAD) ~= ERROR_HEAD then return end
  redis.call('HSET', ck, field, value)
  if old then
    local base = redis.call('HGET', ck, 'base')
    if not base or string.sub(value, 1, #ERROR_HEAD) == ERROR_HEAD then return end
    local values, failed = chord_values(ck, size)
    refire(redis.call('HGET', ck, 'callback'), prepend_arg(base, values))
    if failed then redis.call('EXPIRE', ck, expire_arg(ttl)) else redis.call('DEL', ck) end
    return
  end
  if redis.call('HINCRBY', ck, 'arrived', 1) < tonumber(size) then return end
  if redis.call('HSETNX', ck, 'fired', '1') == 0 then return end
  local values, failed = chord_values(ck, size)
  local callback = redis.call('HGET', ck, 'callback')
  local payload = redis.call('HGET', job_key(callback), 'payload') or ''
  activate(callback, prepend_arg(payload, values))
  if failed then
    redis.call('HSET', ck, 'base', payload)
    redis.call('EXPIRE', ck, expire_arg(ttl))
  else
    redis.call('DEL', ck)
  end
end

-- A batch whose members have all ended is kept only while a retry can change it: while one of
-- them is a dead letter, or was skipped after a pipeline step that is one (until the skipped
-- step's record expires with `ttl`: a retry after that cannot reach it; retry.lua takes the ttl
-- off when it re-arms the step). A batch kept by a dead letter is listed for purge.lua.
local function settle_batch(bk, bid, all_succeeded, ttl)
  local kept = prefix .. 'batches'
  if not all_succeeded then
    local fields = redis.call('HGETALL', bk)
    local skipped = false
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, 2) == 'm:' then
        local state = fields[i + 1]
        if state == 'failed' then
          redis.call('PERSIST', bk)
          redis.call('SADD', kept, bid)
          return
        end
        if state == 'cancelled' and not skipped then
          skipped = redis.call('HGET', job_key(string.sub(fields[i], 3)), 'skipped') == '1'
        end
      end
    end
    if skipped then
      redis.call('EXPIRE', bk, expire_arg(ttl))
      redis.call('SREM', kept, bid)
      return
    end
  end
  redis.call('DEL', bk)
  redis.call('SREM', kept, bid)
end

-- A batch member ended: count it, and fire each callback once when its moment comes. A failed
-- member retried into success is counted again, so on_success can still fire (once).
local function batch_arrive(bid, id, state, now, ttl)
  local bk = prefix .. 'batch:' .. bid
  local size = tonumber(redis.call('HGET', bk, 'size') or '0')
  if size == 0 then return end
  -- The same end again (a retried member failed again): nothing to count, nor to fire (each
  -- callback fires once), but the batch is settled anew.
  local prev = redis.call('HGET', bk, 'm:' .. id)
  if prev ~= state then
    redis.call('HSET', bk, 'm:' .. id, state)
    if not prev then redis.call('HINCRBY', bk, 'ended', 1) end
    if state == 'succeeded' then
      redis.call('HINCRBY', bk, 'ok', 1)
    elseif prev == 'succeeded' then
      redis.call('HINCRBY', bk, 'ok', -1)
    end
  end
  local ended = tonumber(redis.call('HGET', bk, 'ended'))
  if ended < size then return end
  local ok = tonumber(redis.call('HGET', bk, 'ok') or '0')
  local fire = {'complete'}
  if ok == size then fire[2] = 'success' else fire[2] = 'failure' end
  for _, kind in ipairs(fire) do
    local cb = redis.call('HMGET', bk, kind .. '_task', kind .. '_payload', kind .. '_priority')
    if cb[1] and redis.call('HSETNX', bk, 'fired_' .. kind, '1') == 1 then
      store_job(now, bid .. ':' .. kind, cb[1], cb[2], cb[3], '', '', '', nil)
    end
  end
  settle_batch(bk, bid, ok == size, ttl)
end

-- The record fields that ending a job looks at, read in one call (missing ones are false).
local END_FIELDS = {'token', 'state', 'key', 'chord', 'slot', 'batch', 'next', 'err_task',
  'err_payload', 'err_priority', 'result', 'error', 'attempt', 'waiters', 'fresh'}
local function end_fields(jk)
  local values = redis.call('HMGET', jk, unpack(END_FIELDS))
  local rec = {}
  for i, name in ipairs(END_FIELDS) do rec[name] = values[i] end
  return rec
end

local function set(value) return value and value ~= '' end

-- A record that expires is listed under the whole second it expires in: a list of job ids per
-- second, and a zset of those seconds, so that pruning finds exactly the index entries whose
-- records have expired. One list append per job costs less than one zset entry per job, which
-- with a batch's ids all at one score costs a skiplist walk comparing ids.
local function list_expiring(second, ids)
  call_chunked(ids, 'RPUSH', prefix .. 'expiring:' .. second)
  redis.call('ZADD', prefix .. 'expiring_at', second, second)
end

-- Set by a script that ends many jobs (finish): finalize then collects the ids of the records
-- it sets to expire here, all under the one second `expiring_second` (the batch's latest end
-- plus the ttl, rounded up: parsing and printing a float per job is a large part of ending
-- it), and `flush_expiring` lists them in one go.
local expiring_batch, expiring_second = nil, nil
local function flush_expiring()
  if expiring_batch and #expiring_batch > 0 then list_expiring(expiring_second, expiring_batch) end
  expiring_batch = nil
end

-- What ending a job means for the workflow around it.
local function after_final(id, state, now, ttl, rec, reason)
  if not (set(rec.chord) or set(rec.batch) or set(rec.next) or set(rec.err_task)) then return end
  -- What stands for an end other than success, in the steps it skips and in its chord slot.
  local err = rec.error
  if state ~= 'succeeded' then
    if not set(err) then err = ending_error(id, state, rec.attempt, reason) end
    if set(rec.next) then
      -- The rest of the pipeline is skipped; the last step carries the error to its chord.
      local nk = job_key(rec.next)
      if redis.call('HGET', nk, 'waiting') == '1' then
        redis.call('HDEL', nk, 'waiting')
        -- A retry of the failed step re-arms it (retry.lua); its error names the step that ended
        -- the pipeline (retry_failed retries that one).
        finalize(rec.next, nk, 'cancelled', now, ttl, nil, nil, {'skipped', '1', 'error', err})
      end
    end
    if state == 'failed' and set(rec.err_task) then
      -- Each failure for good has its own handler (see error_handler_id): a retried dead letter
      -- that fails again runs it again.
      local handler = id .. ':error'
      if rec.failures > 1 then handler = handler .. ':' .. rec.failures end
      store_job(now, handler, rec.err_task, prepend_arg(rec.err_payload, error_marker(err)),
        rec.err_priority, '', '', '', nil)
    end
  end
  if set(rec.chord) then
    local value = rec.result
    if state ~= 'succeeded' then value = error_marker(err) elseif not set(value) then value = 'null' end
    chord_arrive(rec.chord, rec.slot, value, ttl)
  end
  if set(rec.batch) then batch_arrive(rec.batch, id, state, now, ttl) end
end

-- What a waiter on the job's outcome needs, in the message itself when it is small, so that
-- `job.result()` need not read the record: "id ends\nstate\nattempt\nbody\nreason", the body
-- being the result (succeeded) or the error (JSON: never a raw newline); "id ends\nstate"
-- otherwise. `ends` counts the job's ends told (see watch.lua): a message of an earlier end, read
-- late, is told apart from this one's. (On the first line: an earlier aqueue, which routes by the
-- whole line, leaves the message to its recheck rather than misread it.)
local OUTCOME_IN_MESSAGE = 16384
local function done_message(id, ends, state, rec, reason)
  local head = id .. ' ' .. ends .. '\n' .. state
  local body = rec.error
  if state == 'succeeded' then body = rec.result end
  if not body then body = '' end
  if #body > OUTCOME_IN_MESSAGE then return head end
  if state ~= 'failed' or not reason then reason = '' end
  return head .. '\n' .. (rec.attempt or '1') .. '\n' .. body .. '\n' .. reason
end

-- A final state: free the idempotency key, wake waiters, tell the workflow; dead letters are
-- kept, other records expire. `rec` is the job's `end_fields` when the caller read them already
-- (with what it changes since), `fields` more record fields to write in the same HSET.
finalize = function(id, jk, state, now, ttl, reason, rec, fields)
  rec = rec or end_fields(jk)
  fields = fields or {}
  -- The record's error is the ending's own, an `error` among `fields` (what its chord slot and
  -- skipped steps get): an end that brings none leaves none of an earlier attempt's.
  local own = nil
  for i = 1, #fields, 2 do if fields[i] == 'error' then own = fields[i + 1] end end
  if own then
    rec.error = own
  elseif rec.error then
    redis.call('HDEL', jk, 'error')
    rec.error = false
  end
  with(fields, 'state', state, 'finished_at', now)
  if state == 'failed' and set(reason) then with(fields, 'dead_reason', reason) end
  redis.call('HSET', jk, unpack(fields))
  if set(rec.key) and redis.call('GET', prefix .. 'key:' .. rec.key) == id then
    redis.call('DEL', prefix .. 'key:' .. rec.key)
  end
  if state == 'failed' then
    redis.call('ZADD', prefix .. 'dead', now, id)
    rec.failures = redis.call('HINCRBY', jk, 'failures', 1)  -- a dead letter retried may fail again
  else
    redis.call('EXPIRE', jk, expire_arg(ttl))
    if expiring_batch then
      expiring_batch[#expiring_batch + 1] = id
    else
      list_expiring(string.format('%d', math.ceil(tonumber(now) + ttl)), {id})
    end
  end
  after_final(id, state, now, ttl, rec, reason)
  -- Only processes waiting on the outcome hear of it (see watch.lua): no message otherwise.
  if set(rec.waiters) then
    -- pcall: another writer's `ends` that counts nothing must not fail the end; it starts over.
    local ends = redis.pcall('HINCRBY', jk, 'ends', 1)
    if type(ends) ~= 'number' then
      ends = 1
      redis.call('HSET', jk, 'ends', ends)
    end
    local message = done_message(id, ends, state, rec, reason)
    for waiter in string.gmatch(rec.waiters, '%S+') do
      -- pcall: a message Redis refuses (an ACL user without channel rights) must not undo the
      -- end half way; the waiter reads the job again on its own.
      redis.pcall('PUBLISH', done_channel(waiter), message)
    end
    redis.call('HDEL', jk, 'waiters')  -- told: a later end (after a retry) tells whoever waits then
  end
end

-- An entry that is no job to run (another writer's): dropped, its job kept as a dead letter, the
-- reason its error, and listed as dead letters are. `fields`: record fields it lacks besides the
-- counts and times, which are given afresh.
local function dead_entry(s, entry, id, now, ttl, reason, fields)
  drop_entry(s, entry)
  local jk = job_key(id)
  redis.call('HSET', jk, 'attempt', 1, 'enqueued_at', now, 'token', 0, 'deliveries', 1, unpack(fields))
  finalize(id, jk, 'failed', now, ttl, reason, nil, {'error', unreadable_error(id, reason)})
  redis.call('ZADD', prefix .. 'index', 'NX', in_order(now), id)
end

-- Lease one stream entry (already in this consumer's pending list) to the worker. Returns the
-- delivery as an array; a notice (its 9th field says how) when the job is ended here instead
-- (expired, revoked, cancelled, or dead-lettered past max_deliveries, a number); nil when the entry
-- is dropped (a wake-up, a malformed message, an already final job).
local function start(s, p, entry, fields, consumer, now, max_deliveries, ttl)
  local id, lean = nil, false
  for i = 1, #fields, 2 do
    local name = fields[i]
    if name == 'id' then id = fields[i + 1] elseif name == 'wake' then id = false
    elseif name == 'task' then lean = true end
  end
  if id == false then drop_entry(s, entry) return nil end
  if id == nil then
    -- Not ours to interpret: keep it as a dead letter with the reason.
    dead_entry(s, entry, 'entry-' .. entry, now, ttl, 'malformed stream entry: no job id',
      {'task', '', 'payload', cjson.encode(fields), 'priority', p})
    return nil
  end
  local jk = job_key(id)
  local rec = redis.call('HMGET', jk, 'state', 'task', 'payload', 'attempt', 'enqueued_at',
    'more', 'deliveries', 'token', 'entry')
  if rec[6] == '0' then
    rec[6] = false
  else  -- the record may hold an expiry, or a cancel or revoke flag
    local rare = redis.call('HMGET', jk, 'expires', 'revoked', 'cancel', 'unstarted')
    rec[6], rec[10], rec[11], rec[12] = rare[1], rare[2], rare[3], rare[4]
  end
  if not rec[1] then
    dead_entry(s, entry, id, now, ttl, 'no job record for stream entry ' .. entry,
      {'task', '', 'payload', '', 'priority', p})
    return nil
  end
  if rec[9] ~= entry or FINAL[rec[1]] then
    -- A leftover entry: the job was finished, or put on a stream again, since.
    drop_entry(s, entry)
    return nil
  end
  if not (count_field(rec[4]) and count_field(rec[7]) and count_field(rec[8])
      and number_field(rec[5]) and number_field(rec[6])) then
    -- Numbers another writer made unreadable (read below, and by the worker, they failed every
    -- receive that met the job): dead-lettered, as an entry with no record is.
    redis.call('HDEL', jk, 'expires')
    dead_entry(s, entry, id, now, ttl, 'unreadable job record for stream entry ' .. entry, {})
    return nil
  end
  local expiry = rec[6] and rec[6] ~= '' and never_started(rec[8], rec[12]) and rec[6]
  -- Ended here rather than run: the worker gets a notice (9th field) so it can report it.
  local ended = nil
  if rec[11] == '1' then
    ended = 'cancelled'
  elseif rec[10] == '1' or task_revoked(rec[2], now) then
    ended = 'revoked'
  elseif expiry and tonumber(expiry) < tonumber(now) then
    ended = 'expired'
  end
  if ended then
    drop_entry(s, entry)
    finalize(id, jk, ended, now, ttl, nil)
    return {id, rec[2], '', rec[4], '0', p, rec[5], entry, ended}
  end
  -- As strings: a number handed to redis.call is printed with "%.17g", a float's slow path; and
  -- the first delivery (the usual one) needs neither parsing nor printing.
  local deliveries, token = '1', '1'
  if lean and rec[1] == 'pending' then
    -- A lean entry may have been delivered before without a word to the record (see
    -- `lean_delivery`): its deliveries are counted by the pending list, and its token 1 is taken.
    local pending = redis.call('XPENDING', s, GROUP, entry, entry, 1)[1]
    if pending then deliveries = string.format('%d', pending[4]) end
    token = '2'
  else
    if rec[7] and rec[7] ~= '0' then deliveries = string.format('%d', tonumber(rec[7]) + 1) end
    if rec[8] and rec[8] ~= '0' then token = string.format('%d', tonumber(rec[8]) + 1) end
  end
  if (deliveries == '1' and 1 or tonumber(deliveries)) > max_deliveries then
    drop_entry(s, entry)
    -- The token its last delivery holds is used up (a lean one's 1 was never written): a retry's
    -- delivery must not carry it again.
    redis.call('HSET', jk, 'deliveries', deliveries, 'token', string.format('%d', tonumber(token) - 1))
    -- Its error is written down as any failure's is (the repr Python gives, the reason unquoted).
    local reason = 'delivered ' .. deliveries .. ' times without finishing (max_deliveries=' ..
      max_deliveries .. ')'
    finalize(id, jk, 'failed', now, ttl, reason, nil, {'error', error_metadata(id, rec[4],
      'DeliveryLimitExceeded', "DeliveryLimitExceeded('" .. reason .. "')")})
    return {id, rec[2], '', rec[4], '0', p, rec[5], entry, 'failed'}  -- a notice, as for `ended`
  end
  redis.call('HSET', jk, 'state', 'running', 'started_at', now, 'worker', consumer,
    'deliveries', deliveries, 'token', token)
  if rec[12] then redis.call('HDEL', jk, 'unstarted') end
  -- Its last worker died or went silent: this run starts over.
  if deliveries ~= '1' then redis.call('HDEL', jk, 'progress') end
  local asked = asked_of(jk, rec[4])
  if expiry or asked then
    -- The expiry too (10th; no ending, 9th): a worker that would start it later hands it back;
    -- and the retries it asked for (11th).
    return {id, rec[2], rec[3], rec[4], token, p, rec[5], entry, '', expiry or '', asked}
  end
  return {id, rec[2], rec[3], rec[4], token, p, rec[5], entry}
end

-- A lean delivery: the entry of a new job carries what the worker needs (see make_ready), so the job is
-- handed over without reading or writing its record. Its token is 1, and the record stays 'pending'
-- (token 0) until the job ends, a renewal writes the start down, or another delivery takes over
-- (`start` then counts deliveries by the pending list). What would have stopped it at the start is
-- dealt with where it arises: a cancel or revoke moves the waiting entry, an expiry makes the entry
-- plain. Returns nil when `start` must decide instead: a plain entry, or some task is revoked (the
-- entry's task may be), or the entry may not be aqueue's: its time not decimal digits (Lua would read
-- "0x10", Python not), or bytes past ASCII in its id or task, which the worker must decode (`start`
-- reads them from the record, and dead-letters an entry that has none).
local function lean_delivery(p, entry, fields)
  if fields[3] ~= 'task' or #fields ~= 8 or fields[1] ~= 'id'
      or not string.find(fields[8], '^%d+%.?%d*$')
      or string.find(fields[2], '[\128-\255]') or string.find(fields[4], '[\128-\255]')
      or revocations_exist() then
    return nil
  end
  return {fields[2], fields[4], fields[6], '1', '1', p, fields[8], entry}
end

-- The record fields a lean delivery's start would have written (see `lean_delivery`), from the
-- entry's row in the pending list (XPENDING's extended form), for the step that first writes to
-- the record while the entry is still pending: the start is when the entry was delivered, `now`
-- less its idle time (reset by no one before).
local function lean_start(pending, now)
  return {'token', '1', 'started_at', string.format('%.6f', tonumber(now) - pending[3] / 1000),
    'worker', pending[2], 'deliveries', string.format('%d', pending[4])}
end

-- Priority bands, highest first; band 0 always exists.
local function bands()
  ensure_stream('0')
  return redis.call('ZREVRANGE', prefix .. 'priorities', 0, -1)
end
