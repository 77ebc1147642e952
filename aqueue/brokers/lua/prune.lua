-- Forget index entries of jobs whose records have expired, task revocations that lapsed, and
-- consumers that hold nothing and have read nothing for `idle_ms`.
-- KEYS[1] prefix
-- ARGV: now, limit, idle_ms
-- Returns how many records were forgotten (fewer than limit: none are left).
local now, limit, idle_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ikey = prefix .. 'index'
-- Task revocations whose `until` has passed: one that stays keeps every delivery off the lean
-- path (see lean_delivery) until a job of its task is met.
local rkey = prefix .. 'revoked_tasks'
local revocations = redis.call('HGETALL', rkey)
for i = 1, #revocations, 2 do
  local till = string.match(revocations[i + 1], '^[01]|(.*)$')
  if till and till ~= '' then till = number_field(till) and tonumber(till) end
  -- One aqueue did not write (another writer's) goes too: the scripts drop it where they meet it.
  if not till or (till ~= '' and till <= tonumber(now)) then redis.call('HDEL', rkey, revocations[i]) end
end
for _, p in ipairs(redis.call('ZRANGE', prefix .. 'priorities', 0, -1)) do
  local s = stream_key(p)
  if redis.call('EXISTS', s) == 1 then
    -- Entries acked outside a finish (wake-ups, jobs ended before they ran) leave their stream here.
    trim_acked(s)
    -- A worker that stopped cleanly removes its consumers (forget.lua); one that died (killed, out
    -- of memory) leaves them, emptied by the takeover of its jobs. Removing one that holds nothing
    -- is harmless even if its worker lives: a read names it again (a blocked one too).
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', s, GROUP)) do
      local name, pending, idle = nil, nil, nil
      for j = 1, #c, 2 do
        if c[j] == 'name' then name = c[j + 1]
        elseif c[j] == 'pending' then pending = c[j + 1]
        elseif c[j] == 'idle' then idle = c[j + 1] end
      end
      if pending == 0 and idle and idle >= idle_ms then
        redis.call('XGROUP', 'DELCONSUMER', s, GROUP, name)
      end
    end
  end
end
-- Records listed one by one in the zset 'expiring' (by aqueue before the per-second lists).
local legacy = prefix .. 'expiring'
local ids = redis.call('ZRANGEBYSCORE', legacy, '-inf', now, 'LIMIT', 0, limit)
call_chunked(ids, 'ZREM', ikey)
call_chunked(ids, 'ZREM', legacy)
local forgotten = #ids
-- The per-second lists (see list_expiring), oldest first.
local seconds = prefix .. 'expiring_at'
while forgotten < limit do
  local due = redis.call('ZRANGEBYSCORE', seconds, '-inf', now, 'LIMIT', 0, 1)
  if #due == 0 then break end
  local list = prefix .. 'expiring:' .. due[1]
  local popped = redis.call('LPOP', list, limit - forgotten)
  if popped then
    -- A record listed here but kept past this second keeps its index entry: a skipped pipeline
    -- step that a retry re-armed, its ttl taken off (it is listed again as it ends), or one that
    -- ended again since (a re-armed step that ran) and is listed for later too: it is listed
    -- once more under the second it expires in now. Those expiring by the next second go (the
    -- listing forgets a little before the record; the record is never lost).
    local clock = redis.call('TIME')
    local clock_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
    local gone = {}
    for _, id in ipairs(popped) do
      local left = redis.call('PTTL', job_key(id))
      if left == -2 or (left >= 0 and clock_ms + left <= (tonumber(due[1]) + 1) * 1000) then
        gone[#gone + 1] = id
      elseif left >= 0 then
        list_expiring(string.format('%d', math.ceil((clock_ms + left) / 1000)), {id})
      end
    end
    call_chunked(gone, 'ZREM', ikey)
    forgotten = forgotten + #gone  -- one listed again is met again at most once more (then gone)
  end
  if redis.call('EXISTS', list) == 0 then redis.call('ZREM', seconds, due[1]) end
end
return forgotten
